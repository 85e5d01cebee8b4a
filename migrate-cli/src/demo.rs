//! `vmigrate demo`: two vmigrate processes on this machine, a self-checking
//! guest migrated between them over TCP while it runs.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use migrate_core::api::SendRequest;
use migrate_core::engine::MigrationStatus;

use crate::client::{print_report, send_with_progress};

#[derive(Args)]
pub struct DemoArgs {
    /// Workload of the demo guest.
    #[arg(long, default_value = "verify")]
    workload: String,
    /// Guest RAM.
    #[arg(long, default_value = "256M")]
    mem: String,
    /// Convergence policy.
    #[arg(long, default_value = "qemu")]
    policy: String,
    /// Page compression: none or zstd.
    #[arg(long, default_value = "none")]
    compress: String,
    /// Migrate over a Unix socket instead of TCP.
    #[arg(long)]
    unix: bool,
    /// Migrate over a plaintext channel instead of one authenticated with
    /// a pre-shared key generated for the demo.
    #[arg(long)]
    insecure: bool,
    /// Seconds the guest runs before the migration and after it.
    #[arg(long, default_value_t = 2.0)]
    settle: f64,
}

/// A child process that is killed if the demo bails out early.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn wait_for(path: &Path, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        if Instant::now() > deadline {
            bail!("{what} did not appear at {}", path.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn write_key(path: &Path) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let text = migrate_core::transport::Psk::generate_text()?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating the demo key {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

fn marks(path: &Path) -> (usize, usize) {
    let s = std::fs::read(path).unwrap_or_default();
    let pass = s.iter().filter(|&&b| b == harness::PASS_MARK).count();
    let bad = s.iter().filter(|&&b| b == harness::MISMATCH_MARK).count();
    (pass, bad)
}

pub fn demo(a: DemoArgs) -> anyhow::Result<ExitCode> {
    let exe = std::env::current_exe().context("locating the vmigrate binary")?;
    let dir = std::env::temp_dir().join(format!("vmigrate-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let p = |name: &str| -> PathBuf { dir.join(name) };
    let incoming = if a.unix {
        format!("unix:{}", p("migration.sock").display())
    } else {
        "tcp:127.0.0.1:0".to_string()
    };

    // A fresh random key for this demo only, readable by this user only.
    let key = p("migration.psk");
    let channel: Vec<String> = if a.insecure {
        vec!["--insecure".into()]
    } else {
        write_key(&key)?;
        vec!["--psk-file".into(), key.display().to_string()]
    };
    println!(
        "== destination: vmigrate run --incoming {incoming} {}",
        channel.join(" ")
    );
    let mut dest = Proc(
        Command::new(&exe)
            .args(["run", "--incoming", &incoming])
            .args(&channel)
            .arg("--serial")
            .arg(p("dest.serial"))
            .arg("--api-socket")
            .arg(p("dest.api"))
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the destination")?,
    );
    let mut line = String::new();
    BufReader::new(dest.0.stdout.take().context("destination stdout")?)
        .read_line(&mut line)
        .context("reading the destination's address")?;
    let to = line
        .trim()
        .strip_prefix("vmigrate: listening on ")
        .with_context(|| format!("destination said {line:?}"))?
        .to_string();

    println!(
        "== source: vmigrate run --workload {} --mem {} (guest serial: {})",
        a.workload,
        a.mem,
        p("source.serial").display()
    );
    let _src = Proc(
        Command::new(&exe)
            .args([
                "run",
                "--workload",
                &a.workload,
                "--mem",
                &a.mem,
                "--serial",
            ])
            .arg(p("source.serial"))
            .arg("--api-socket")
            .arg(p("source.api"))
            .spawn()
            .context("starting the source")?,
    );
    wait_for(&p("source.api"), "the source's API socket")?;
    std::thread::sleep(Duration::from_secs_f64(a.settle));
    let (before, _) = marks(&p("source.serial"));
    println!("   guest is running: {before} clean passes so far");

    println!(
        "== vmigrate send --to {to} --policy {} {}",
        a.policy,
        channel.join(" ")
    );
    let mut req = SendRequest::new(&to);
    if a.insecure {
        req.insecure = true;
    } else {
        req.psk_file = Some(key.clone());
    }
    req.policy = a.policy.clone();
    req.compress = a.compress.clone();
    req.verify = true;
    let report = send_with_progress(&p("source.api"), req, true)?;
    print_report(&report);
    if report.status != MigrationStatus::Completed {
        bail!("the migration did not complete; the source keeps the guest");
    }

    std::thread::sleep(Duration::from_secs_f64(a.settle));
    let (src_pass, src_bad) = marks(&p("source.serial"));
    let (dst_pass, dst_bad) = marks(&p("dest.serial"));
    println!("== after the switch-over");
    println!("   source printed {src_pass} clean passes, then stopped for good");
    println!("   destination continued: {dst_pass} more clean passes, {dst_bad} mismatch marks");
    crate::client::shutdown_quiet(&p("dest.api"));
    let _ = dest.0.wait();
    let ok = src_bad == 0 && dst_bad == 0 && dst_pass > 0;
    if ok {
        println!("== OK: the guest moved and its self-check found nothing lost");
        let _ = std::fs::remove_dir_all(&dir);
        Ok(ExitCode::SUCCESS)
    } else {
        println!("== FAILED: see {}", dir.display());
        Ok(ExitCode::from(1))
    }
}
