//! One vmigrate migration of the incompressible idle guest.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use super::{Binaries, TransferConfig, TransferRun};
use crate::study::procs::{Guard, Stop};

/// Migrates `idle:fill=random` of `cfg.mem` over loopback with `channels`
/// connections; never fails (a failure is the row's status and note).
pub(super) fn migrate(
    cfg: &TransferConfig,
    bins: &Binaries,
    dir: &Path,
    rep: u32,
    channels: u32,
    stop: &Stop,
) -> TransferRun {
    let row = TransferRun::new(rep, "vmigrate", channels);
    match try_migrate(cfg, bins, dir, channels, stop) {
        Ok(report) => row.with_report(&report),
        Err(e) => row.failed(e),
    }
}

fn try_migrate(
    cfg: &TransferConfig,
    bins: &Binaries,
    dir: &Path,
    channels: u32,
    stop: &Stop,
) -> Result<serde_json::Value, String> {
    let f = |name: &str| dir.join(format!("vm{channels}-{name}"));
    let bin = bins.vmigrate.display().to_string();
    let s = |p: &Path| p.display().to_string();
    for p in [f("dst.api"), f("src.api")] {
        let _ = std::fs::remove_file(p);
    }
    let mut dst_argv = vec![bin.clone(), "run".into()];
    dst_argv.extend(["--incoming", "tcp:127.0.0.1:0", "--insecure"].map(String::from));
    dst_argv.extend(["--serial".into(), s(&f("dst.serial"))]);
    dst_argv.extend(["--api-socket".into(), s(&f("dst.api"))]);
    let mut dst = Guard::spawn(
        "destination vmigrate",
        &dst_argv,
        &f("dst.out"),
        &f("dst.err"),
        Some(&f("dst.api")),
    )
    .map_err(|e| e.to_string())?;
    let workload = "idle:fill=random";
    let src_argv: Vec<String> = [
        bin.as_str(),
        "run",
        "--workload",
        workload,
        "--mem",
        &cfg.mem,
        "--serial",
        &s(&f("src.serial")),
        "--api-socket",
        &s(&f("src.api")),
    ]
    .map(String::from)
    .to_vec();
    let mut src = Guard::spawn(
        "source vmigrate",
        &src_argv,
        &f("src.out"),
        &f("src.err"),
        Some(&f("src.api")),
    )
    .map_err(|e| e.to_string())?;

    let deadline = Instant::now() + Duration::from_secs(120);
    let to = loop {
        let out = std::fs::read_to_string(f("dst.out")).unwrap_or_default();
        let booted = std::fs::read(f("src.serial"))
            .unwrap_or_default()
            .contains(&crate::BOOT_MARK);
        let addr = out
            .lines()
            .find_map(|l| l.strip_prefix("vmigrate: listening on "));
        if let (Some(a), true, true) = (addr, booted, f("src.api").exists()) {
            break a.trim().to_owned();
        }
        for (g, err) in [(&mut dst, "dst.err"), (&mut src, "src.err")] {
            if let Some(st) = g.try_wait() {
                return Err(format!(
                    "{} exited ({st}): {}",
                    g.what(),
                    crate::study::run::log_tail(&f(err), 300)
                ));
            }
        }
        if stop.requested() || Instant::now() > deadline {
            return Err("guests not ready within 120 s".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut send = Command::new(&bins.vmigrate);
    send.args(["send", "--api-socket"])
        .arg(f("src.api"))
        .args(["--to", &to, "--insecure", "--policy", "qemu", "--json"])
        .args(["--timeout", &format!("{}", cfg.time_cap_s)]);
    if channels > 1 {
        send.args(["--channels", &channels.to_string()]);
    }
    let out = send.output().map_err(|e| format!("vmigrate send: {e}"))?;
    src.stop(Duration::from_secs(5));
    dst.stop(Duration::from_secs(5));
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).map_err(|_| {
        format!(
            "send gave no report ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )
    })
}
