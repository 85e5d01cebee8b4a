//! `vmigrate send`: start a migration and follow it to its end.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Args;
use migrate_core::api::{ApiRequest, ApiResponse, SendRequest};
use migrate_core::engine::{DowntimeRamp, MigrationReport, MigrationStatus, TimeoutAction};

use super::{human, request};

#[derive(Args)]
#[command(group(
    clap::ArgGroup::new("channel")
        .args(["psk_file", "tls_cert", "insecure"])
        .required(true)
))]
pub struct SendArgs {
    /// API socket of the source `vmigrate run`.
    #[arg(long)]
    api_socket: PathBuf,
    /// Destination: `tcp:HOST:PORT` or `unix:PATH`.
    #[arg(long)]
    to: String,
    /// Convergence policy: qemu, auto-converge, xen, xen-legacy, mp, ch,
    /// stall, ramp, dirty-limit (needs a source run with `--dirty-track
    /// ring`; `vmigrate policies` lists each one's settings).
    #[arg(long, default_value = "qemu")]
    policy: String,
    /// A policy setting, `KEY=VALUE` (repeatable; see ARCHITECTURE.md for
    /// each policy's keys).
    #[arg(long = "param", value_name = "KEY=VALUE")]
    params: Vec<String>,
    /// Longest acceptable pause, in milliseconds (the qemu policy's limit).
    #[arg(long, default_value_t = 300)]
    downtime_limit: u64,
    /// Raise the downtime limit from START to END milliseconds in STEPS
    /// steps, one per iteration (instead of --downtime-limit).
    #[arg(
        long,
        value_name = "START:END:STEPS",
        conflicts_with = "downtime_limit"
    )]
    downtime_ramp: Option<String>,
    /// Cap on migration bandwidth, bytes per second (K/M/G suffixes).
    #[arg(long)]
    max_bandwidth: Option<String>,
    /// Page compression: none or zstd.
    #[arg(long, default_value = "none", value_parser = ["none", "zstd"])]
    compress: String,
    /// After this many seconds, do --timeout-action.
    #[arg(long)]
    timeout: Option<f64>,
    /// At the timeout: cancel (the source keeps running) or force (pause
    /// and finish, whatever the downtime).
    #[arg(long, default_value = "cancel", value_parser = ["cancel", "force"])]
    timeout_action: String,
    /// Seconds to wait for the connection to the destination.
    #[arg(long, default_value_t = 10.0)]
    connect_timeout: f64,
    /// Seconds one read or write on the stream may block (a stalled
    /// destination fails the migration after this long).
    #[arg(long, default_value_t = 30.0)]
    io_timeout: f64,
    /// Digest all guest memory on both ends at the switch-over and commit
    /// only if the digests agree (lengthens the downtime by `digest-time`).
    #[arg(long)]
    verify: bool,
    /// Connections carrying the pages, 1 to 16: every pass is split across
    /// them (2 MiB blocks), each with its own compressor, and the
    /// destination applies them in parallel (QEMU's multifd).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=16))]
    channels: u16,
    /// Copy every page out of guest memory before sending it, as before
    /// pages went out straight from guest memory with a CRC each
    /// (ARCHITECTURE.md §4d); for measuring what the direct path saves.
    #[arg(long)]
    copy_pages: bool,
    /// Leave out dirty pages whose content is the copy the destination
    /// already holds (a guest rewriting what its pages hold): a 128-bit
    /// digest of every page sent is kept, 16 bytes a page, and pages are
    /// copied out of guest memory to be hashed (ARCHITECTURE.md §4d).
    #[arg(long)]
    skip_unchanged: bool,
    /// Pre-shared key file, the same as the destination's --psk-file: both
    /// ends prove they hold it and every record is encrypted and authenticated.
    #[arg(long)]
    psk_file: Option<PathBuf>,
    /// TLS 1.3 with this client certificate (PEM); the destination's
    /// certificate must be signed by --tls-ca and name the --to host.
    #[arg(long, requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<PathBuf>,
    /// With --tls-cert: its private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// With --tls-cert: the CA the destination's certificate must be
    /// signed by.
    #[arg(long, requires = "tls_cert")]
    tls_ca: Option<PathBuf>,
    /// Migrate over a plaintext channel (the destination must run with
    /// --insecure too).
    #[arg(long)]
    insecure: bool,
    /// `clone` only: after the clone, checkpoint the guest to the standby
    /// every --epoch-ms (pause, send the pages written since the last
    /// checkpoint and the vCPU state, resume).
    #[arg(long)]
    epochs: bool,
    /// With --epochs: milliseconds between checkpoints.
    #[arg(long, default_value_t = 50, requires = "epochs")]
    epoch_ms: u64,
    /// Print the final report as JSON (QEMU `query-migrate` field names).
    #[arg(long)]
    json: bool,
    /// Return once the handshake succeeded, leaving the migration running
    /// in the VM process (follow it with `status --watch`).
    #[arg(long, conflicts_with = "json")]
    detach: bool,
}

pub fn send(a: SendArgs) -> anyhow::Result<ExitCode> {
    outgoing(a, false)
}

/// `vmigrate clone`: the same options as `send`; the guest runs on here and
/// the destination (`run --incoming --standby`) holds a paused copy.
pub fn clone(a: SendArgs) -> anyhow::Result<ExitCode> {
    outgoing(a, true)
}

fn outgoing(a: SendArgs, clone: bool) -> anyhow::Result<ExitCode> {
    if a.epochs && !clone {
        bail!("--epochs is for vmigrate clone: a migration leaves no standby to checkpoint to");
    }
    let max_bandwidth = a
        .max_bandwidth
        .as_deref()
        .map(harness::parse_size)
        .transpose()
        .context("--max-bandwidth")?;
    let downtime_ramp = a
        .downtime_ramp
        .as_deref()
        .map(str::parse::<DowntimeRamp>)
        .transpose()
        .context("--downtime-ramp")?;
    let mut params = std::collections::BTreeMap::new();
    for p in &a.params {
        let Some((k, v)) = p.split_once('=') else {
            bail!("--param {p:?}: expected KEY=VALUE");
        };
        params.insert(k.trim().to_string(), v.trim().to_string());
    }
    let req = SendRequest {
        to: a.to.clone(),
        policy: a.policy.clone(),
        params,
        downtime_limit: a.downtime_limit,
        downtime_ramp,
        max_bandwidth,
        compress: a.compress.clone(),
        timeout: a.timeout,
        connect_timeout: Some(a.connect_timeout),
        io_timeout: Some(a.io_timeout),
        timeout_action: match a.timeout_action.as_str() {
            "force" => TimeoutAction::Force,
            _ => TimeoutAction::Cancel,
        },
        verify: a.verify,
        channels: a.channels,
        copy_pages: a.copy_pages,
        skip_unchanged: a.skip_unchanged,
        // The VM process reads the key: give it an absolute path.
        psk_file: a
            .psk_file
            .as_deref()
            .map(std::path::absolute)
            .transpose()
            .context("--psk-file")?,
        insecure: a.insecure,
        tls_cert: absolute(a.tls_cert.as_deref()).context("--tls-cert")?,
        tls_key: absolute(a.tls_key.as_deref()).context("--tls-key")?,
        tls_ca: absolute(a.tls_ca.as_deref()).context("--tls-ca")?,
        epoch_ms: a.epochs.then_some(a.epoch_ms),
    };
    let req = if clone {
        ApiRequest::Clone(req)
    } else {
        ApiRequest::Send(req)
    };
    if a.detach {
        return detach(&a.api_socket, req);
    }
    let report = request_with_progress(&a.api_socket, &req, !a.json)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(if report.status == MigrationStatus::Completed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn absolute(p: Option<&Path>) -> std::io::Result<Option<PathBuf>> {
    p.map(std::path::absolute).transpose()
}

/// Start a migration and return after its first progress line (the
/// handshake succeeded); the VM process carries on alone.
fn detach(socket: &Path, req: ApiRequest) -> anyhow::Result<ExitCode> {
    let (what, to) = match &req {
        ApiRequest::Clone(r) => ("live clone", r.to.clone()),
        ApiRequest::Send(r) => ("migration", r.to.clone()),
        _ => ("request", String::new()),
    };
    match request(socket, &req)?.next() {
        Some(Ok(ApiResponse::Progress(_))) => {
            println!("{what} to {to} started; follow it with `vmigrate status --watch`");
            Ok(ExitCode::SUCCESS)
        }
        Some(Ok(ApiResponse::Done(report))) => {
            print_report(&report);
            Ok(if report.status == MigrationStatus::Completed {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Some(Ok(ApiResponse::Error { message })) => bail!("migration refused: {message}"),
        Some(Ok(other)) => bail!("unexpected answer {other:?}"),
        Some(Err(e)) => Err(e),
        None => bail!("the source closed the API socket before the migration started"),
    }
}

/// Run a migration through the API, drawing a progress bar on a terminal.
pub fn send_with_progress(
    socket: &Path,
    req: SendRequest,
    show_progress: bool,
) -> anyhow::Result<MigrationReport> {
    request_with_progress(socket, &ApiRequest::Send(req), show_progress)
}

/// A `send` or `clone` through the API, drawing a progress bar on a
/// terminal; its final report.
fn request_with_progress(
    socket: &Path,
    req: &ApiRequest,
    show_progress: bool,
) -> anyhow::Result<MigrationReport> {
    let bar = (show_progress && std::io::stderr().is_terminal()).then(|| {
        let b = indicatif::ProgressBar::new_spinner();
        b.enable_steady_tick(std::time::Duration::from_millis(120));
        b
    });
    for r in request(socket, req)? {
        match r? {
            ApiResponse::Progress(p) => {
                let line = progress_line(&p);
                match &bar {
                    Some(b) => b.set_message(line),
                    None if show_progress => eprintln!("{line}"),
                    None => {}
                }
            }
            ApiResponse::Done(report) => {
                if let Some(b) = &bar {
                    b.finish_and_clear();
                }
                return Ok(report);
            }
            ApiResponse::Error { message } => bail!("migration refused: {message}"),
            other => bail!("unexpected answer {other:?}"),
        }
    }
    bail!("the source closed the API socket before the migration ended (did it crash?)")
}

fn progress_line(p: &MigrationReport) -> String {
    let last = p.iterations.last();
    format!(
        "iteration {:>3}  dirty rate {:>9.0} pages/s  remaining {:>10}  sent {:>10}  {:>7.0} Mbit/s",
        last.map_or(0, |i| i.iteration),
        p.ram.dirty_pages_rate,
        human(p.ram.remaining),
        human(p.ram.transferred),
        p.ram.mbps
    )
}

pub fn print_report(r: &MigrationReport) {
    println!("mode:           {:?}", r.mode);
    println!("status:         {:?}", r.status);
    if let Some(e) = &r.error {
        println!("error:          {e}");
    }
    println!(
        "policy:         {} ({})",
        r.policy,
        r.stop_reason.as_deref().unwrap_or("-")
    );
    println!("dirty tracking: {}", r.dirty_track);
    println!("total time:     {:.1} ms", r.total_time);
    if let Some(l) = r.downtime_limit {
        println!("downtime limit: {l:.0} ms (at the last decision)");
    }
    match r.downtime {
        Some(d) if r.digest.is_some() => println!(
            "downtime:       {d:.1} ms ({:.1} ms of it digesting memory for --verify)",
            r.digest_time
        ),
        Some(d) => println!("downtime:       {d:.1} ms"),
        None => println!("downtime:       - (guest never paused)"),
    }
    println!("setup time:     {:.1} ms", r.setup_time);
    println!(
        "transferred:    {} ({} pages with data, {} zero pages)",
        human(r.ram.transferred),
        r.ram.normal,
        r.ram.duplicate
    );
    if r.ram.unchanged > 0 {
        println!(
            "left out:       {} dirty pages whose content the destination held",
            r.ram.unchanged
        );
    }
    println!("iterations:     {}", r.iterations.len());
    println!("throughput:     {:.0} Mbit/s while iterating", r.ram.mbps);
    if let Some(d) = &r.digest {
        println!(
            "memory digest:  source {} destination {} ({})",
            d.source,
            d.destination,
            if d.equal { "equal" } else { "DIFFERENT" }
        );
    }
    if let Some(v) = &r.vcpu_digest {
        println!("vCPU digest:    {v} (at the clone point)");
    }
}
