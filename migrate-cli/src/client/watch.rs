//! Following a VM from outside: `vmigrate events` (the raw event stream)
//! and `vmigrate status --watch` (a running migration until it ends).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Args;
use migrate_core::api::{ApiRequest, ApiResponse, Event, RunState};
use migrate_core::engine::{MigrationReport, MigrationStatus};

use super::{human, one, request};

#[derive(Args)]
pub struct EventsArgs {
    /// API socket of a `vmigrate run`.
    #[arg(long)]
    api_socket: PathBuf,
}

/// The subscribed event stream, the `ok` already read.
fn subscribe(socket: &Path) -> anyhow::Result<impl Iterator<Item = anyhow::Result<Event>>> {
    let mut lines = request(socket, &ApiRequest::Events {})?;
    match lines.next() {
        Some(Ok(ApiResponse::Ok)) => {}
        Some(Ok(ApiResponse::Error { message })) => bail!("{message}"),
        Some(other) => bail!("unexpected answer to events: {other:?}"),
        None => bail!("the VM closed the API socket without answering"),
    }
    Ok(lines.map(|l| match l? {
        ApiResponse::Event(e) => Ok(e),
        other => bail!("unexpected line on the event stream: {other:?}"),
    }))
}

/// Print every event as one JSON line until the VM process ends.
pub fn events(a: EventsArgs) -> anyhow::Result<ExitCode> {
    for e in subscribe(&a.api_socket)? {
        // The stream ends with the process: a read error after that is
        // the end, not a failure.
        let Ok(e) = e else { break };
        println!("{}", serde_json::to_string(&ApiResponse::Event(e))?);
    }
    Ok(ExitCode::SUCCESS)
}

/// `status --watch`: one line per iteration of the running migration, then
/// its outcome; exit 0 if it completed. Without a running migration: the
/// last one's outcome (0 when there was none or it completed).
pub fn watch(socket: &Path) -> anyhow::Result<ExitCode> {
    // Subscribe first, then look: nothing can end unseen in between.
    let stream = subscribe(socket)?;
    let status = match one(socket, &ApiRequest::Status {})? {
        ApiResponse::Status(s) => s,
        other => bail!("unexpected answer {other:?}"),
    };
    if status.state != RunState::Migrating {
        let Some(m) = status.migration else {
            println!("no migration (VM {})", status.state);
            return Ok(ExitCode::SUCCESS);
        };
        return Ok(outcome(&m));
    }
    for e in stream {
        match e.context("following the migration")? {
            Event::MigrationProgress {
                iteration,
                remaining,
                transferred,
                downtime_limit,
                ..
            } => println!(
                "{}  remaining {:>10}  sent {:>10}  downtime limit {} ms",
                iteration.map_or("handshake done".to_string(), |i| format!(
                    "iteration {i:>3}"
                )),
                human(remaining),
                human(transferred),
                downtime_limit.map_or("-".into(), |l| format!("{l:.0}"))
            ),
            Event::MigrationEnded {
                status,
                error,
                downtime,
                ..
            } => {
                println!(
                    "migration {}{}{}",
                    format!("{status:?}").to_lowercase(),
                    downtime.map_or(String::new(), |d| format!(", downtime {d:.1} ms")),
                    error.map_or(String::new(), |e| format!(": {e}"))
                );
                return Ok(exit_for(status));
            }
            _ => {}
        }
    }
    bail!("the VM closed the API socket before the migration ended")
}

fn outcome(m: &MigrationReport) -> ExitCode {
    println!(
        "last migration: {} to {}{}",
        format!("{:?}", m.status).to_lowercase(),
        m.destination,
        m.error
            .as_deref()
            .map_or(String::new(), |e| format!(": {e}"))
    );
    exit_for(m.status)
}

fn exit_for(s: MigrationStatus) -> ExitCode {
    if s == MigrationStatus::Completed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
