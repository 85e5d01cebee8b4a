//! The raw throughput of a link, measured in the same study run.
//!
//! A page rate means little alone: 3 Gbit/s is poor on loopback and
//! impossible on a 1 Gbit/s link. So before the migrations on a link, the
//! runner streams plain TCP across it with `tcp-baseline` (receiver where
//! the destination VM runs, sender where the source runs) and reports each
//! run's page rate as a fraction of that (`efficiency`).

use std::path::Path;
use std::time::{Duration, Instant};

use thiserror::Error;

use super::procs::{Guard, SpawnError, Stop};

/// The measurement failed.
#[derive(Debug, Error)]
pub enum BaselineError {
    /// A side could not be started.
    #[error(transparent)]
    Spawn(#[from] SpawnError),
    /// The receiver did not report its address.
    #[error("tcp-baseline receiver did not start listening: {0}")]
    NoListener(String),
    /// The sender failed or printed nothing usable.
    #[error("tcp-baseline sender failed: {0}")]
    Sender(String),
    /// Interrupted by a stop request.
    #[error("stopped")]
    Stopped,
}

/// Streams for `seconds` from this namespace to `listen_ip` (run through
/// `prefix`, e.g. `ip netns exec NS`); returns Mbit/s.
///
/// # Errors
/// [`BaselineError`] when either side fails.
pub fn measure(
    tcp_baseline: &Path,
    prefix: &[String],
    listen_ip: &str,
    seconds: f64,
    work: &Path,
    stop: &Stop,
) -> Result<f64, BaselineError> {
    measure_with(tcp_baseline, prefix, listen_ip, seconds, work, stop, &[])
}

/// [`measure`] with more `tcp-baseline` arguments on both ends (e.g.
/// `--memory 2G`: a memory-to-memory stream).
///
/// # Errors
/// [`BaselineError`] when either side fails.
#[allow(clippy::too_many_arguments)]
pub fn measure_with(
    tcp_baseline: &Path,
    prefix: &[String],
    listen_ip: &str,
    seconds: f64,
    work: &Path,
    stop: &Stop,
    extra: &[String],
) -> Result<f64, BaselineError> {
    let mut argv = prefix.to_vec();
    argv.extend([
        tcp_baseline.display().to_string(),
        "--listen".into(),
        format!("{listen_ip}:0"),
    ]);
    argv.extend(extra.iter().cloned());
    let out = work.join("baseline-listen.out");
    let mut listener = Guard::spawn(
        "tcp-baseline receiver",
        &argv,
        &out,
        &work.join("baseline-listen.err"),
        None,
    )?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let addr = loop {
        let text = std::fs::read_to_string(&out).unwrap_or_default();
        if let Some(a) = text
            .lines()
            .find_map(|l| l.strip_prefix("tcp-baseline: listening on "))
        {
            break a.trim().to_owned();
        }
        if stop.requested() {
            return Err(BaselineError::Stopped);
        }
        if listener.try_wait().is_some() || Instant::now() > deadline {
            let err = std::fs::read_to_string(work.join("baseline-listen.err")).unwrap_or_default();
            return Err(BaselineError::NoListener(err.trim().to_owned()));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut argv = vec![
        tcp_baseline.display().to_string(),
        "--connect".into(),
        addr,
        "--seconds".into(),
        format!("{seconds}"),
    ];
    argv.extend(extra.iter().cloned());
    let sout = work.join("baseline-send.out");
    let serr = work.join("baseline-send.err");
    let mut sender = Guard::spawn("tcp-baseline sender", &argv, &sout, &serr, None)?;
    let deadline = Instant::now() + Duration::from_secs_f64(seconds + 60.0);
    let status = loop {
        if let Some(s) = sender.try_wait() {
            break s;
        }
        if stop.requested() {
            return Err(BaselineError::Stopped);
        }
        if Instant::now() > deadline {
            return Err(BaselineError::Sender(
                "no result within 60 s of the end".into(),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    listener.stop(Duration::from_secs(2));
    let text = std::fs::read_to_string(&sout).unwrap_or_default();
    if !status.success() {
        let err = std::fs::read_to_string(&serr).unwrap_or_default();
        return Err(BaselineError::Sender(format!("{status}: {}", err.trim())));
    }
    let v: serde_json::Value = serde_json::from_str(text.trim())
        .map_err(|e| BaselineError::Sender(format!("{e}: {text:?}")))?;
    v.get("gbps")
        .and_then(serde_json::Value::as_f64)
        .map(|g| g * 1000.0)
        .ok_or_else(|| BaselineError::Sender(format!("no gbps in {text:?}")))
}
