//! The API socket server: one thread per client, one request at a time per
//! connection, answers as JSON lines.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::controller::{ControlError, VmController};
use super::request::{parse_request, ApiRequest, COMMANDS};
use super::{ApiResponse, VersionInfo, API_VERSION};
use crate::engine::{error_chain, MigrationStatus};
use crate::wire::PROTOCOL_VERSION;

/// Errors from setting up the API socket.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The socket path exists: another VM may own it.
    #[error(
        "API socket path {path} already exists (another vmigrate running? remove it if stale)"
    )]
    PathExists {
        /// The path.
        path: PathBuf,
    },
    /// Binding failed.
    #[error("cannot listen on API socket {path}")]
    Bind {
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// What the process main loop reacts to.
#[derive(Debug)]
pub enum ProcessEvent {
    /// The guest stopped.
    Guest(crate::vm::VmEvent),
    /// A migration completed: the destination runs the guest now.
    MigratedAway,
    /// `shutdown` was requested.
    Shutdown,
}

/// Carry out one request, writing its answer lines to `out`.
fn handle(c: &Arc<VmController>, req: ApiRequest, out: &mut UnixStream) -> std::io::Result<()> {
    let done = |out: &mut UnixStream, r: Result<(), ControlError>| match r {
        Ok(()) => reply(out, &ApiResponse::Ok),
        Err(e) => reply(out, &error(&e)),
    };
    match req {
        ApiRequest::Version {} => reply(
            out,
            &ApiResponse::Version(VersionInfo {
                api: API_VERSION,
                vmigrate: env!("CARGO_PKG_VERSION").into(),
                wire_protocol: PROTOCOL_VERSION,
                commands: COMMANDS.iter().map(|s| s.to_string()).collect(),
            }),
        ),
        ApiRequest::Status {} => reply(out, &ApiResponse::Status(c.status())),
        ApiRequest::Info {} => reply(out, &ApiResponse::Info(c.status())),
        ApiRequest::Pause {} => done(out, c.pause()),
        ApiRequest::Resume { force } => done(out, c.resume(force)),
        ApiRequest::Memsave(m) => done(out, c.memsave(&m)),
        ApiRequest::QueryMigrate {} => reply(out, &ApiResponse::QueryMigrate(c.query_migrate())),
        ApiRequest::MigrateCancel {} => done(out, c.cancel()),
        ApiRequest::MigrateSetParameters(p) => done(out, c.set_parameters(&p)),
        ApiRequest::Events {} => {
            reply(out, &ApiResponse::Ok)?;
            c.bus().subscribe(out.try_clone()?)
        }
        ApiRequest::Shutdown {} => {
            reply(out, &ApiResponse::Ok)?;
            let _ = c.events().send(ProcessEvent::Shutdown);
            Ok(())
        }
        ApiRequest::Digest {} => match c.digest() {
            Ok(d) => reply(out, &ApiResponse::Digest(d)),
            Err(e) => reply(out, &error(&e)),
        },
        ApiRequest::Clone(req) => {
            let mut progress_out = out.try_clone()?;
            let result = c.clone_to(&req, move |r| {
                let _ = reply(&mut progress_out, &ApiResponse::Progress(r.clone()));
            });
            match result {
                Ok(report) => reply(out, &ApiResponse::Done(report)),
                Err(e) => reply(out, &error(&e)),
            }
        }
        ApiRequest::Send(req) => {
            let mut progress_out = out.try_clone()?;
            let result = c.send(&req, move |r| {
                let _ = reply(&mut progress_out, &ApiResponse::Progress(r.clone()));
            });
            match result {
                Ok(report) => {
                    let completed = report.status == MigrationStatus::Completed;
                    let r = reply(out, &ApiResponse::Done(report));
                    if completed {
                        let _ = c.events().send(ProcessEvent::MigratedAway);
                    }
                    r
                }
                Err(e) => reply(out, &error(&e)),
            }
        }
    }
}

fn error(e: &ControlError) -> ApiResponse {
    ApiResponse::Error {
        message: error_chain(e),
    }
}

fn reply(out: &mut UnixStream, r: &ApiResponse) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(r).map_err(std::io::Error::other)?;
    line.push(b'\n');
    out.write_all(&line)
}

/// A bound API socket.
pub struct ApiServer {
    listener: UnixListener,
    path: PathBuf,
}

impl ApiServer {
    /// Listen on `path`, which must not exist.
    pub fn bind(path: &Path) -> Result<Self, ApiError> {
        if path.exists() {
            return Err(ApiError::PathExists {
                path: path.to_path_buf(),
            });
        }
        let listener = UnixListener::bind(path).map_err(|source| ApiError::Bind {
            path: path.to_path_buf(),
            source,
        })?;
        // Whoever can connect can pause the guest, read its memory and send
        // it anywhere: owner only. (Connecting needs write permission on the
        // socket; nothing is accepted before this returns.)
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(
            |source| {
                let _ = std::fs::remove_file(path);
                ApiError::Bind {
                    path: path.to_path_buf(),
                    source,
                }
            },
        )?;
        Ok(Self {
            listener,
            path: path.to_path_buf(),
        })
    }

    /// Serve connections on a background thread, one thread per client.
    pub fn spawn(self, controller: Arc<VmController>) -> std::io::Result<()> {
        std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                for conn in self.listener.incoming() {
                    let Ok(conn) = conn else { continue };
                    let c = controller.clone();
                    let _ = std::thread::Builder::new()
                        .name("api-client".into())
                        .spawn(move || serve_client(&c, conn));
                }
            })?;
        Ok(())
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn serve_client(c: &Arc<VmController>, conn: UnixStream) {
    let Ok(mut out) = conn.try_clone() else {
        return;
    };
    let reader = BufReader::new(conn);
    for line in reader.lines() {
        let Ok(line) = line else { return };
        if line.trim().is_empty() {
            continue;
        }
        let r = match parse_request(&line) {
            Ok(req) => {
                // After `events` this connection only carries events.
                let subscribed = matches!(req, ApiRequest::Events {});
                let r = handle(c, req, &mut out);
                if subscribed {
                    return;
                }
                r
            }
            Err(e) => reply(
                &mut out,
                &ApiResponse::Error {
                    message: e.to_string(),
                },
            ),
        };
        if r.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn the_socket_is_owner_only_and_never_taken_over() {
        let dir = std::env::temp_dir().join(format!("vmigrate-api-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vm.sock");
        let _ = std::fs::remove_file(&path);
        let server = ApiServer::bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
        assert!(matches!(
            ApiServer::bind(&path),
            Err(ApiError::PathExists { .. })
        ));
        drop(server);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
