//! One vmigrate migration between two fresh processes over loopback, with
//! the resident memory of both sides.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use super::{Binaries, TransferConfig, TransferRun, Variant};
use crate::study::procs::{Guard, Stop};

/// Mappings larger than this are guest RAM (a slot is the whole guest or up
/// to 1 GiB of it); everything else counts as the engine's own. Strictly
/// larger: a glibc thread arena is a mapping of at most exactly 64 MiB, so
/// the engine's heap is never mistaken for guest RAM. Conservative the
/// other way: a guest slot of 64 MiB or less counts as engine memory.
const GUEST_MAPPING_OVER: u64 = 64 << 20;

/// What one migration needs.
pub struct Migration<'a> {
    /// Name of this run's files in the work directory.
    pub tag: String,
    /// Workload spec (`idle:fill=random`, `sweep`, …).
    pub workload: &'a str,
    /// Guest RAM.
    pub mem: &'a str,
    /// Policy name.
    pub policy: &'a str,
    /// More `send` arguments.
    pub send_args: Vec<String>,
    /// More arguments of the destination's `run --incoming`.
    pub dst_args: Vec<String>,
    /// Seconds before `send` gives up (`--timeout`).
    pub time_cap_s: f64,
    /// Pass marks the guest must print before `send` (a sweep that has not
    /// finished its first pass has not yet written most of its RAM).
    pub warm_passes: usize,
}

/// Resident memory of one process, split by mapping size.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Resident {
    /// Whole process, KiB.
    pub total_kib: u64,
    /// In mappings of at most 64 MiB (not guest RAM): the engine's own.
    pub engine_kib: u64,
}

/// Reads `/proc/PID/smaps`; `None` if the process is gone.
#[must_use]
pub fn resident(pid: u32) -> Option<Resident> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let mut r = Resident::default();
    let mut size = 0u64;
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-') {
            if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                size = b.saturating_sub(a);
                continue;
            }
        }
        if first == "Rss:" {
            let kib: u64 = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
            r.total_kib += kib;
            if size <= GUEST_MAPPING_OVER {
                r.engine_kib += kib;
            }
        }
    }
    Some(r)
}

/// A finished migration: the report and the resident memory of the source
/// before `send` and of the destination after it.
pub struct Migrated {
    /// `send --json`'s report.
    pub report: serde_json::Value,
    /// Source before the migration.
    pub source: Option<Resident>,
    /// Destination once the guest runs there.
    pub destination: Option<Resident>,
}

/// Runs `m` in fresh processes.
///
/// # Errors
/// What went wrong, as text: a process that did not start or exited, no
/// report from `send`.
pub fn run_migration(
    bins: &Binaries,
    dir: &Path,
    m: &Migration<'_>,
    stop: &Stop,
) -> Result<Migrated, String> {
    let f = |name: &str| dir.join(format!("{}-{name}", m.tag));
    let bin = bins.vmigrate.display().to_string();
    let s = |p: &Path| p.display().to_string();
    for p in [f("dst.api"), f("src.api")] {
        let _ = std::fs::remove_file(p);
    }
    let mut dst_argv = vec![bin.clone(), "run".into()];
    dst_argv.extend(["--incoming", "tcp:127.0.0.1:0", "--insecure"].map(String::from));
    dst_argv.extend(["--serial".into(), s(&f("dst.serial"))]);
    dst_argv.extend(["--api-socket".into(), s(&f("dst.api"))]);
    dst_argv.extend(m.dst_args.iter().cloned());
    let mut dst = Guard::spawn(
        "destination vmigrate",
        &dst_argv,
        &f("dst.out"),
        &f("dst.err"),
        Some(&f("dst.api")),
    )
    .map_err(|e| e.to_string())?;
    let src_argv: Vec<String> = [
        bin.as_str(),
        "run",
        "--workload",
        m.workload,
        "--mem",
        m.mem,
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

    let deadline = Instant::now() + Duration::from_secs(300);
    let to = loop {
        let out = std::fs::read_to_string(f("dst.out")).unwrap_or_default();
        let serial = std::fs::read(f("src.serial")).unwrap_or_default();
        let booted = serial.contains(&crate::BOOT_MARK)
            && serial.iter().filter(|&&b| b == crate::PASS_MARK).count() >= m.warm_passes;
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
            return Err("guests not ready within 300 s".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let source = src.id().and_then(resident);
    let out = Command::new(&bins.vmigrate)
        .args(["send", "--api-socket"])
        .arg(f("src.api"))
        .args(["--to", &to, "--insecure", "--policy", m.policy, "--json"])
        .args(["--timeout", &format!("{}", m.time_cap_s)])
        .args(&m.send_args)
        .output()
        .map_err(|e| format!("vmigrate send: {e}"))?;
    let destination = dst.id().and_then(resident);
    src.stop(Duration::from_secs(5));
    dst.stop(Duration::from_secs(5));
    let text = String::from_utf8_lossy(&out.stdout);
    let report = serde_json::from_str(text.trim()).map_err(|_| {
        format!(
            "send gave no report ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )
    })?;
    Ok(Migrated {
        report,
        source,
        destination,
    })
}

/// Migrates `halt:fill=random` of `cfg.mem` with `channels` connections;
/// never fails (a failure is the row's status and note).
pub(super) fn migrate(
    cfg: &TransferConfig,
    bins: &Binaries,
    dir: &Path,
    rep: u32,
    channels: u32,
    variant: Variant,
    stop: &Stop,
) -> TransferRun {
    let row = TransferRun::new(rep, variant.label(), channels);
    let mut send_args = Vec::new();
    if channels > 1 {
        send_args.extend(["--channels".into(), channels.to_string()]);
    }
    if variant == Variant::CopyPages {
        send_args.push("--copy-pages".into());
    }
    let dst_args = if variant == Variant::Prefault {
        vec!["--mem".into(), cfg.mem.clone(), "--prefault".into()]
    } else {
        Vec::new()
    };
    let m = Migration {
        tag: format!("vm{channels}-{variant:?}"),
        workload: "halt:fill=random",
        mem: &cfg.mem,
        policy: "qemu",
        send_args,
        dst_args,
        time_cap_s: cfg.time_cap_s,
        warm_passes: 0,
    };
    match run_migration(bins, dir, &m, stop) {
        Ok(done) => row.with_report(&done.report),
        Err(e) => row.failed(e),
    }
}
