//! The one-answer subcommands: `status`/`info`, `pause`, `resume`,
//! `memsave`, `query-migrate`, `cancel`, `set-parameters`, `shutdown`.
//! Exit status 0 when the VM carried the command out, 1 when it refused
//! (the message says why), 2 for a bad command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Args;
use migrate_core::api::{
    ApiRequest, ApiResponse, MemsaveRequest, MigrationQuery, SetParameters, VmStatus,
};

use super::{expect_ok, one, print_report};

/// Just the socket.
#[derive(Args)]
pub struct SocketArgs {
    /// API socket of a `vmigrate run`.
    #[arg(long)]
    api_socket: PathBuf,
}

/// `resume`.
#[derive(Args)]
pub struct ResumeArgs {
    /// API socket of a `vmigrate run`.
    #[arg(long)]
    api_socket: PathBuf,
    /// Resume a source whose last migration's outcome is unknown (state
    /// `outcome-unknown`): only once sure the destination does not run the
    /// guest, or it runs twice.
    #[arg(long)]
    force: bool,
}

/// `digest`.
#[derive(Args)]
pub struct DigestArgs {
    /// API socket of a `vmigrate run`.
    #[arg(long)]
    api_socket: PathBuf,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// `status`, `info`, `query-migrate`.
#[derive(Args)]
pub struct StatusArgs {
    /// API socket of a `vmigrate run`.
    #[arg(long)]
    api_socket: PathBuf,
    /// Print JSON.
    #[arg(long, conflicts_with = "watch")]
    json: bool,
    /// Follow the running migration until it ends, one line per iteration;
    /// exit 0 if it completed, 1 if not.
    #[arg(long)]
    watch: bool,
}

#[derive(Args)]
pub struct MemsaveArgs {
    /// API socket of a `vmigrate run`.
    #[arg(long)]
    api_socket: PathBuf,
    /// First guest-physical address: hex `0x…` or decimal (K/M/G suffixes
    /// as --mem).
    #[arg(long)]
    addr: String,
    /// Bytes to save, e.g. `4096`, `99M`, `0x1000`.
    #[arg(long)]
    size: String,
    /// File to write (by the VM process; a relative path is taken from the
    /// current directory here).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
pub struct SetParametersArgs {
    /// API socket of the source `vmigrate run`.
    #[arg(long)]
    api_socket: PathBuf,
    /// New downtime limit in milliseconds, from the next iteration on
    /// (ends a --downtime-ramp).
    #[arg(long)]
    downtime_limit: Option<u64>,
    /// New bandwidth cap, bytes per second (K/M/G suffixes; 0 for none).
    #[arg(long)]
    max_bandwidth: Option<String>,
}

pub fn status(a: StatusArgs) -> anyhow::Result<ExitCode> {
    show_status(a, &ApiRequest::Status {})
}

pub fn info(a: StatusArgs) -> anyhow::Result<ExitCode> {
    show_status(a, &ApiRequest::Info {})
}

fn show_status(a: StatusArgs, req: &ApiRequest) -> anyhow::Result<ExitCode> {
    if a.watch {
        return super::watch::watch(&a.api_socket);
    }
    match one(&a.api_socket, req)? {
        ApiResponse::Status(s) | ApiResponse::Info(s) if a.json => {
            println!("{}", serde_json::to_string_pretty(&s)?)
        }
        ApiResponse::Status(s) | ApiResponse::Info(s) => print_status(&s),
        other => bail!("unexpected answer {other:?}"),
    }
    Ok(ExitCode::SUCCESS)
}

fn print_status(s: &VmStatus) {
    println!("state:      {}", s.state);
    println!(
        "memory:     {} in {} slot(s)",
        harness::format_size(s.memory),
        s.slots
    );
    println!("vcpus:      {}", s.vcpus);
    println!("uptime:     {:.1} s", s.uptime);
    println!("cpu model:  {}", s.cpu_model);
    match s.dirty_ring_entries {
        Some(n) => println!(
            "dirty log:  ring, {n} entries ({}) per vCPU; {} full-ring exits, {} overruns, {} phantom entries resynced",
            harness::format_size(u64::from(n) * 16),
            s.exits.dirty_ring_full,
            s.dirty_ring_overruns.unwrap_or(0),
            s.dirty_ring_resynced.unwrap_or(0),
        ),
        None => println!("dirty log:  bitmap ({})", s.dirty_log),
    }
    println!("serial:     {} bytes", s.serial_bytes);
    println!(
        "exits:      io-out {} io-in {} mmio {} hlt {} kicked {}",
        s.exits.io_out, s.exits.io_in, s.exits.mmio, s.exits.hlt, s.exits.interrupted
    );
    if let Some(m) = &s.migration {
        println!(
            "{:<11} {:?} to {}",
            format!("{:?}:", m.mode).to_lowercase(),
            m.status,
            m.destination
        );
    }
    if let Some(standby) = &s.standby {
        println!("standby:    {standby} (clone session open)");
    }
    if let Some(c) = s.checkpoints.as_ref().filter(|c| c.epoch_ms == 0) {
        // A standby counts the epochs it applied; the primary sets the pace.
        println!(
            "checkpoints: {} epochs applied from the primary{}",
            c.epochs,
            c.ended
                .as_deref()
                .map_or_else(String::new, |e| format!("; ended: {e}"))
        );
    } else if let Some(c) = &s.checkpoints {
        println!(
            "checkpoints: {} epochs (every {} ms), pause p50 {:.2} ms p99 {:.2} ms max {:.2} ms, \
             {} pages, {} bytes{}{}",
            c.epochs,
            c.epoch_ms,
            c.pause.p50,
            c.pause.p99,
            c.pause.max,
            c.pages,
            c.bytes,
            if c.output_commit {
                format!(
                    "; output commit on ({} bytes held until acknowledged)",
                    c.output_held
                )
            } else {
                String::new()
            },
            c.ended
                .as_deref()
                .map_or_else(String::new, |e| format!("; ended: {e}"))
        );
    }
    println!("api:        {}", s.api);
}

/// `digest`: what the VM holds, hashed by the VM process.
pub fn digest(a: DigestArgs) -> anyhow::Result<ExitCode> {
    match one(&a.api_socket, &ApiRequest::Digest {})? {
        ApiResponse::Digest(d) if a.json => println!("{}", serde_json::to_string_pretty(&d)?),
        ApiResponse::Digest(d) => {
            println!("state:  {}", d.state);
            println!("memory: {}", d.memory);
            println!("vcpus:  {}", d.vcpus);
        }
        other => bail!("unexpected answer {other:?}"),
    }
    Ok(ExitCode::SUCCESS)
}

pub fn pause(a: SocketArgs) -> anyhow::Result<ExitCode> {
    expect_ok(&a.api_socket, &ApiRequest::Pause {})?;
    Ok(ExitCode::SUCCESS)
}

pub fn resume(a: ResumeArgs) -> anyhow::Result<ExitCode> {
    expect_ok(&a.api_socket, &ApiRequest::Resume { force: a.force })?;
    Ok(ExitCode::SUCCESS)
}

pub fn shutdown(a: SocketArgs) -> anyhow::Result<ExitCode> {
    expect_ok(&a.api_socket, &ApiRequest::Shutdown {})?;
    Ok(ExitCode::SUCCESS)
}

pub fn cancel(a: SocketArgs) -> anyhow::Result<ExitCode> {
    expect_ok(&a.api_socket, &ApiRequest::MigrateCancel {})?;
    Ok(ExitCode::SUCCESS)
}

pub fn memsave(a: MemsaveArgs) -> anyhow::Result<ExitCode> {
    let addr = harness::parse_size(&a.addr).context("--addr")?;
    let size = harness::parse_size(&a.size).context("--size")?;
    // The VM process writes the file from its own working directory.
    let out = std::path::absolute(&a.out).with_context(|| format!("--out {}", a.out.display()))?;
    let Some(file) = out.to_str() else {
        bail!("--out {}: not UTF-8", out.display());
    };
    let req = MemsaveRequest {
        addr,
        size,
        file: file.to_string(),
    };
    expect_ok(&a.api_socket, &ApiRequest::Memsave(req))?;
    Ok(ExitCode::SUCCESS)
}

pub fn query_migrate(a: StatusArgs) -> anyhow::Result<ExitCode> {
    match one(&a.api_socket, &ApiRequest::QueryMigrate {})? {
        ApiResponse::QueryMigrate(q) if a.json => println!("{}", serde_json::to_string_pretty(&q)?),
        ApiResponse::QueryMigrate(MigrationQuery::Report(r)) => print_report(&r),
        ApiResponse::QueryMigrate(MigrationQuery::None { .. }) => {
            println!("status:         none (no migration ran in this process)")
        }
        other => bail!("unexpected answer {other:?}"),
    }
    Ok(ExitCode::SUCCESS)
}

pub fn set_parameters(a: SetParametersArgs) -> anyhow::Result<ExitCode> {
    let max_bandwidth = a
        .max_bandwidth
        .as_deref()
        .map(harness::parse_size)
        .transpose()
        .context("--max-bandwidth")?;
    if a.downtime_limit.is_none() && max_bandwidth.is_none() {
        bail!("nothing to set: give --downtime-limit and/or --max-bandwidth");
    }
    let req = SetParameters {
        downtime_limit: a.downtime_limit,
        max_bandwidth,
    };
    expect_ok(&a.api_socket, &ApiRequest::MigrateSetParameters(req))?;
    Ok(ExitCode::SUCCESS)
}
