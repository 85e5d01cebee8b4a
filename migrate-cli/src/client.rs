//! Client side of the API socket: `send`, `status`, `shutdown`.

use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Args;
use migrate_core::api::{ApiRequest, ApiResponse, SendRequest, VmStatus};
use migrate_core::engine::{MigrationReport, MigrationStatus};

#[derive(Args)]
pub struct SendArgs {
    /// API socket of the source `vmigrate run`.
    #[arg(long)]
    api_socket: PathBuf,
    /// Destination: `tcp:HOST:PORT` or `unix:PATH`.
    #[arg(long)]
    to: String,
    /// Convergence policy: qemu, auto-converge, xen, xen-legacy, mp
    /// (`vmigrate policies` lists each one's settings).
    #[arg(long, default_value = "qemu")]
    policy: String,
    /// A policy setting, `KEY=VALUE` (repeatable; see ARCHITECTURE.md for
    /// each policy's keys).
    #[arg(long = "param", value_name = "KEY=VALUE")]
    params: Vec<String>,
    /// Longest acceptable pause, in milliseconds (the qemu policy's limit).
    #[arg(long, default_value_t = 300)]
    downtime_limit: u64,
    /// Cap on migration bandwidth, bytes per second (K/M/G suffixes).
    #[arg(long)]
    max_bandwidth: Option<String>,
    /// Page compression: none or zstd.
    #[arg(long, default_value = "none", value_parser = ["none", "zstd"])]
    compress: String,
    /// Give up after this many seconds; the source keeps running.
    #[arg(long)]
    timeout: Option<f64>,
    /// Digest all guest memory on both ends at the switch-over and commit
    /// only if the digests agree (lengthens the downtime by `digest-time`).
    #[arg(long)]
    verify: bool,
    /// Print the final report as JSON (QEMU `query-migrate` field names).
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct StatusArgs {
    /// API socket of a `vmigrate run`.
    #[arg(long)]
    api_socket: PathBuf,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct ShutdownArgs {
    /// API socket of a `vmigrate run`.
    #[arg(long)]
    api_socket: PathBuf,
}

/// One request, then a reader over the response lines.
pub fn request(
    socket: &Path,
    req: &ApiRequest,
) -> anyhow::Result<impl Iterator<Item = anyhow::Result<ApiResponse>>> {
    let mut s = UnixStream::connect(socket)
        .with_context(|| format!("cannot connect to API socket {}", socket.display()))?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    s.write_all(&line)?;
    Ok(BufReader::new(s).lines().map(|l| {
        let l = l.context("reading from the API socket")?;
        serde_json::from_str::<ApiResponse>(&l).with_context(|| format!("bad API response {l:?}"))
    }))
}

fn one(socket: &Path, req: &ApiRequest) -> anyhow::Result<ApiResponse> {
    match request(socket, req)?.next() {
        Some(r) => r,
        None => bail!("the VM closed the API socket without answering"),
    }
}

pub fn status(a: StatusArgs) -> anyhow::Result<ExitCode> {
    match one(&a.api_socket, &ApiRequest::Status {})? {
        ApiResponse::Status(s) if a.json => println!("{}", serde_json::to_string_pretty(&s)?),
        ApiResponse::Status(s) => print_status(&s),
        ApiResponse::Error { message } => bail!("{message}"),
        other => bail!("unexpected answer {other:?}"),
    }
    Ok(ExitCode::SUCCESS)
}

fn print_status(s: &VmStatus) {
    println!("state:      {:?}", s.state);
    println!(
        "memory:     {} in {} slot(s)",
        harness::format_size(s.memory),
        s.slots
    );
    println!("vcpus:      {}", s.vcpus);
    println!("uptime:     {:.1} s", s.uptime);
    println!("cpu model:  {}", s.cpu_model);
    println!("dirty log:  {}", s.dirty_log);
    println!("serial:     {} bytes", s.serial_bytes);
    println!(
        "exits:      io-out {} io-in {} mmio {} hlt {} kicked {}",
        s.exits.io_out, s.exits.io_in, s.exits.mmio, s.exits.hlt, s.exits.interrupted
    );
    if let Some(m) = &s.migration {
        println!("migration:  {:?} to {}", m.status, m.destination);
    }
}

pub fn shutdown(a: ShutdownArgs) -> anyhow::Result<ExitCode> {
    match one(&a.api_socket, &ApiRequest::Shutdown {})? {
        ApiResponse::Ok => Ok(ExitCode::SUCCESS),
        ApiResponse::Error { message } => bail!("{message}"),
        other => bail!("unexpected answer {other:?}"),
    }
}

pub fn send(a: SendArgs) -> anyhow::Result<ExitCode> {
    let max_bandwidth = a
        .max_bandwidth
        .as_deref()
        .map(harness::parse_size)
        .transpose()
        .context("--max-bandwidth")?;
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
        downtime_ramp: None,
        max_bandwidth,
        compress: a.compress.clone(),
        timeout: a.timeout,
        verify: a.verify,
    };
    let report = send_with_progress(&a.api_socket, req, !a.json)?;
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

/// Run a migration through the API, drawing a progress bar on a terminal.
pub fn send_with_progress(
    socket: &Path,
    req: SendRequest,
    show_progress: bool,
) -> anyhow::Result<MigrationReport> {
    let bar = (show_progress && std::io::stderr().is_terminal()).then(|| {
        let b = indicatif::ProgressBar::new_spinner();
        b.enable_steady_tick(std::time::Duration::from_millis(120));
        b
    });
    for r in request(socket, &ApiRequest::Send(req))? {
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
    println!("status:         {:?}", r.status);
    if let Some(e) = &r.error {
        println!("error:          {e}");
    }
    println!(
        "policy:         {} ({})",
        r.policy,
        r.stop_reason.as_deref().unwrap_or("-")
    );
    println!("total time:     {:.1} ms", r.total_time);
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
}

/// Ask a VM to shut down, ignoring failures (it may be gone).
pub fn shutdown_quiet(socket: &Path) {
    let _ = one(socket, &ApiRequest::Shutdown {});
}

/// Bytes for people: "63.1 MiB".
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}
