//! Client side of the API socket: one subcommand per command
//! (`docs/API.md`). Each opens its own connection, sends one request and
//! reads the answer; only `send` reads more than one line.

mod control;
mod send;
mod watch;

pub use control::{
    cancel, digest, info, memsave, pause, query_migrate, resume, set_parameters, shutdown, status,
    DigestArgs, MemsaveArgs, ResumeArgs, SetParametersArgs, SocketArgs, StatusArgs,
};
pub use send::{clone, print_report, send, send_with_progress, SendArgs};
pub use watch::{events, EventsArgs};

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use anyhow::{bail, Context};
use migrate_core::api::{ApiRequest, ApiResponse};

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

/// One request, one answer; an `error` answer becomes an `Err` with the
/// server's message.
fn one(socket: &Path, req: &ApiRequest) -> anyhow::Result<ApiResponse> {
    match request(socket, req)?.next() {
        Some(Ok(ApiResponse::Error { message })) => bail!("{message}"),
        Some(r) => r,
        None => bail!("the VM closed the API socket without answering"),
    }
}

/// One request whose answer must be `ok`.
fn expect_ok(socket: &Path, req: &ApiRequest) -> anyhow::Result<()> {
    match one(socket, req)? {
        ApiResponse::Ok => Ok(()),
        other => bail!("unexpected answer {other:?}"),
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
