//! One QEMU migration of a halted guest holding the same amount of
//! pseudo-random content, placed in guest RAM by `-device loader`.
//!
//! QEMU cannot run vmigrate's VMM-side fill, so the bytes are written to a
//! blob file (the same generator, [`crate::FillContent::PseudoRandom`]) that
//! QEMU's generic loader copies to 1 MiB before the guest starts; the guest
//! is vmigrate's exported `halt` boot sector. SeaBIOS later writes its
//! tables over a few KiB of it; that changes nothing measurable.

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{Binaries, TransferConfig, TransferRun};
use crate::study::procs::{Guard, Stop};
use crate::study::qmp::Qmp;

/// `max-bandwidth` for "unlimited" (QEMU has no unlimited value).
const UNLIMITED: u64 = 1 << 50;
/// Where the content starts, as vmigrate's fill.
const FILL_START: u64 = 1 << 20;
/// Seed of the blob's generator.
const SEED: u64 = 0x7472_616e_7366_6572;

/// `qemu-system-x86_64 --version`'s version (`7.2.22`), if it runs.
#[must_use]
pub fn qemu_version(binary: &str) -> Option<String> {
    crate::study::qemu::qemu_version(binary)
}

/// Migrates the guest over loopback, with multifd when `channels > 1`;
/// never fails (a failure is the row's status and note).
#[allow(clippy::too_many_arguments)]
pub(super) fn migrate(
    cfg: &TransferConfig,
    bins: &Binaries,
    qemu: &str,
    version: &str,
    dir: &Path,
    rep: u32,
    channels: u32,
    stop: &Stop,
) -> TransferRun {
    let system = format!("qemu {}", crate::study::qemu::short_version(version));
    let row = TransferRun::new(rep, &system, channels);
    match try_migrate(cfg, bins, qemu, dir, channels, stop) {
        Ok(report) => row.with_report(&report),
        Err(e) => row.failed(e),
    }
}

/// Writes `len` pseudo-random bytes to `path` unless it is already there.
fn write_blob(path: &Path, len: u64) -> Result<(), String> {
    if std::fs::metadata(path).is_ok_and(|m| m.len() == len) {
        return Ok(());
    }
    let content = crate::FillContent::PseudoRandom { seed: SEED };
    let mut file = std::io::BufWriter::new(
        std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?,
    );
    let mut chunk = vec![0u8; 1 << 20];
    let mut at = 0u64;
    while at < len {
        let n = usize::try_from((len - at).min(chunk.len() as u64)).expect("at most 1 MiB");
        content.generate(at, &mut chunk[..n]);
        file.write_all(&chunk[..n])
            .map_err(|e| format!("{}: {e}", path.display()))?;
        at += n as u64;
    }
    file.flush().map_err(|e| format!("{}: {e}", path.display()))
}

fn try_migrate(
    cfg: &TransferConfig,
    bins: &Binaries,
    qemu: &str,
    dir: &Path,
    channels: u32,
    stop: &Stop,
) -> Result<Value, String> {
    let mem = crate::parse_size(&cfg.mem).map_err(|e| e.to_string())?;
    let blob = dir.join("../qemu-fill.bin");
    write_blob(&blob, mem - FILL_START)?;
    let f = |name: &str| dir.join(format!("qemu{channels}-{name}"));
    let out = Command::new(&bins.vmigrate)
        .args(["workload", "export", "halt", "--mem", &cfg.mem, "--out"])
        .arg(f("src.img"))
        .output()
        .map_err(|e| format!("workload export: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "workload export: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    std::fs::copy(f("src.img"), f("dst.img")).map_err(|e| e.to_string())?;
    let port = crate::study::qemu::free_port("127.0.0.1").ok_or("no free port")?;
    let uri = format!("tcp:127.0.0.1:{port}");
    let argv = |side: &str| -> Vec<String> {
        let mut v: Vec<String> = [
            qemu,
            "-accel",
            "kvm",
            "-m",
            &cfg.mem,
            "-smp",
            "1",
            "-display",
            "none",
            "-no-reboot",
        ]
        .map(String::from)
        .to_vec();
        v.push("-drive".into());
        v.push(format!(
            "format=raw,file={}",
            f(&format!("{side}.img")).display()
        ));
        v.push("-serial".into());
        v.push(format!("file:{}", f(&format!("{side}.serial")).display()));
        v.push("-qmp".into());
        v.push(format!(
            "unix:{},server=on,wait=off",
            f(&format!("{side}.qmp")).display()
        ));
        if side == "src" {
            v.push("-device".into());
            v.push(format!(
                "loader,file={},addr={FILL_START:#x},force-raw=on",
                blob.display()
            ));
        }
        v
    };
    let mut dst_argv = argv("dst");
    dst_argv.extend(["-incoming".to_owned(), "defer".to_owned()]);
    let mut dst = Guard::spawn(
        "destination QEMU",
        &dst_argv,
        &f("dst.out"),
        &f("dst.err"),
        None,
    )
    .map_err(|e| e.to_string())?;
    let mut src = Guard::spawn(
        "source QEMU",
        &argv("src"),
        &f("src.out"),
        &f("src.err"),
        None,
    )
    .map_err(|e| e.to_string())?;
    let qmp = |side: &str| {
        Qmp::connect(&f(&format!("{side}.qmp")), Duration::from_secs(20)).map_err(|e| e.to_string())
    };
    let mut sq = qmp("src")?;
    let mut dq = qmp("dst")?;
    let exec = |q: &mut Qmp, cmd: &str, args: Option<Value>| {
        q.execute(cmd, args).map_err(|e| format!("{cmd}: {e}"))
    };
    for q in [&mut sq, &mut dq] {
        if channels > 1 {
            exec(
                q,
                "migrate-set-capabilities",
                Some(json!({"capabilities": [{"capability": "multifd", "state": true}]})),
            )?;
            exec(
                q,
                "migrate-set-parameters",
                Some(json!({"multifd-channels": channels})),
            )?;
        }
    }
    exec(&mut dq, "migrate-incoming", Some(json!({ "uri": uri })))?;
    exec(
        &mut sq,
        "migrate-set-parameters",
        Some(json!({"max-bandwidth": UNLIMITED})),
    )?;
    // SeaBIOS takes seconds to reach the boot sector here.
    let deadline = Instant::now() + Duration::from_secs(120);
    while !std::fs::read(f("src.serial"))
        .unwrap_or_default()
        .contains(&crate::BOOT_MARK)
    {
        if let Some(st) = src.try_wait() {
            return Err(format!(
                "source QEMU exited ({st}): {}",
                crate::study::run::log_tail(&f("src.err"), 300)
            ));
        }
        if stop.requested() || Instant::now() > deadline {
            return Err("no boot mark from the QEMU guest within 120 s".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    exec(&mut sq, "migrate", Some(json!({ "uri": uri })))?;
    let t0 = Instant::now();
    let last = loop {
        let st = exec(&mut sq, "query-migrate", None)?;
        if let Some("completed" | "failed" | "cancelled") = st.get("status").and_then(Value::as_str)
        {
            break st;
        }
        if t0.elapsed().as_secs_f64() > cfg.time_cap_s || stop.requested() {
            let _ = exec(&mut sq, "migrate_cancel", None);
            return Err(format!("not completed within {} s", cfg.time_cap_s));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    for q in [&mut sq, &mut dq] {
        let _ = q.execute("quit", None);
    }
    src.stop(Duration::from_secs(5));
    dst.stop(Duration::from_secs(5));
    Ok(last)
}
