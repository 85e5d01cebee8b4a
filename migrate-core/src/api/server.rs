//! The API socket server and the controller it drives.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{ApiRequest, ApiResponse, ExitSummary, RunState, SendRequest, VmStatus};
use crate::engine::{send_migration, CompressMode, MigrationReport, MigrationStatus, SendOptions};
use crate::transport::{MigrationUri, Stream};
use crate::vm::Vm;

/// Connect timeout for an outgoing migration.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Read/write timeout on the migration stream.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

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

/// Owns the running VM on behalf of the API.
pub struct VmController {
    vm: Arc<Vm>,
    state: Mutex<RunState>,
    started: Instant,
    events: Sender<ProcessEvent>,
    migration: Arc<Mutex<Option<MigrationReport>>>,
    migrating: AtomicBool,
}

impl VmController {
    /// Wrap a running VM; process-level events go to `events`.
    pub fn new(vm: Arc<Vm>, events: Sender<ProcessEvent>) -> Self {
        Self {
            vm,
            state: Mutex::new(RunState::Running),
            started: Instant::now(),
            events,
            migration: Arc::new(Mutex::new(None)),
            migrating: AtomicBool::new(false),
        }
    }

    /// The VM.
    pub fn vm(&self) -> &Arc<Vm> {
        &self.vm
    }

    /// Record that the guest stopped.
    pub fn set_stopped(&self) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = RunState::Stopped;
    }

    /// Current status.
    pub fn status(&self) -> VmStatus {
        let mut exits = ExitSummary::default();
        for c in self.vm.exit_counts() {
            exits.io_out += c.io_out.load(Ordering::Relaxed);
            exits.io_in += c.io_in.load(Ordering::Relaxed);
            exits.mmio += c.mmio.load(Ordering::Relaxed);
            exits.hlt += c.hlt.load(Ordering::Relaxed);
            exits.interrupted += c.interrupted.load(Ordering::Relaxed);
        }
        VmStatus {
            state: *self.state.lock().unwrap_or_else(|e| e.into_inner()),
            memory: self.vm.mem_size(),
            slots: self.vm.slots().len(),
            vcpus: self.vm.vcpu_count(),
            uptime: self.started.elapsed().as_secs_f64(),
            cpu_model: self.vm.cpu_model().to_string(),
            dirty_log: format!("{:?}", self.vm.dirty_log_mode()),
            serial_bytes: self.vm.ports().serial_bytes(),
            exits,
            unhandled_ports: self
                .vm
                .ports()
                .unhandled()
                .iter()
                .map(|(p, n)| format!("{p:#x}:{n}"))
                .collect(),
            migration: self
                .migration
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        }
    }

    /// Run a migration, calling `progress` after each iteration. Refused
    /// while another runs or once the guest has stopped or left.
    pub fn send(
        &self,
        req: &SendRequest,
        mut progress: impl FnMut(&MigrationReport) + Send + 'static,
    ) -> Result<MigrationReport, String> {
        let uri: MigrationUri = req.to.parse().map_err(|e| format!("{e}"))?;
        let params = policy::PolicyParams {
            downtime_limit: Duration::from_millis(req.downtime_limit),
            settings: req.params.clone(),
        };
        let policy = policy::by_name(&req.policy, &params).map_err(|e| e.to_string())?;
        let compress = match req.compress.as_str() {
            "none" => CompressMode::None,
            "zstd" => CompressMode::Zstd(1),
            other => return Err(format!("unknown compression {other:?} (none, zstd)")),
        };
        let timeout = match req.timeout {
            Some(t) if !(t > 0.0 && t.is_finite()) => {
                return Err(format!(
                    "timeout must be a positive number of seconds, got {t}"
                ))
            }
            t => t.map(Duration::from_secs_f64),
        };
        {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if *state != RunState::Running {
                return Err(format!("cannot migrate a VM that is {state:?}"));
            }
            if self.migrating.swap(true, Ordering::SeqCst) {
                return Err("a migration is already running".into());
            }
            *state = RunState::Migrating;
        }
        let live = self.migration.clone();
        let result = Stream::connect(&uri, CONNECT_TIMEOUT).map(|stream| {
            let opts = SendOptions {
                policy,
                compress,
                max_bandwidth: req.max_bandwidth,
                timeout,
                timeout_action: req.timeout_action,
                verify_digest: req.verify,
                io_timeout: IO_TIMEOUT,
                cancel: Arc::new(AtomicBool::new(false)),
                progress: Some(Box::new(move |r: &MigrationReport| {
                    *live.lock().unwrap_or_else(|e| e.into_inner()) = Some(r.clone());
                    progress(r)
                })),
                destination: uri.to_string(),
            };
            send_migration(&*self.vm, stream, opts)
        });
        let report = match result {
            Ok(r) => r,
            Err(e) => {
                self.finish(RunState::Running);
                return Err(crate::engine::error_chain(&e));
            }
        };
        *self.migration.lock().unwrap_or_else(|e| e.into_inner()) = Some(report.clone());
        // After a completed migration, or one whose Commit may have reached
        // the destination, the source must not run the guest again.
        let gone = report.status == MigrationStatus::Completed
            || report
                .error
                .as_deref()
                .is_some_and(|e| e.contains("outcome unknown"));
        if gone {
            self.finish(RunState::Postmigrate);
        } else {
            self.finish(RunState::Running);
        }
        Ok(report)
    }

    fn finish(&self, to: RunState) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if *state == RunState::Migrating {
            *state = to;
        }
        self.migrating.store(false, Ordering::SeqCst);
    }

    fn handle(&self, req: ApiRequest, out: &mut UnixStream) -> std::io::Result<()> {
        match req {
            ApiRequest::Status {} => reply(out, &ApiResponse::Status(self.status())),
            ApiRequest::Shutdown {} => {
                reply(out, &ApiResponse::Ok)?;
                let _ = self.events.send(ProcessEvent::Shutdown);
                Ok(())
            }
            ApiRequest::Send(req) => {
                let mut progress_out = out.try_clone()?;
                let result = self.send(&req, move |r| {
                    let _ = reply(&mut progress_out, &ApiResponse::Progress(r.clone()));
                });
                match result {
                    Ok(report) => {
                        let done = report.status == MigrationStatus::Completed;
                        let r = reply(out, &ApiResponse::Done(report));
                        if done {
                            let _ = self.events.send(ProcessEvent::MigratedAway);
                        }
                        r
                    }
                    Err(message) => reply(out, &ApiResponse::Error { message }),
                }
            }
        }
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

fn serve_client(c: &VmController, conn: UnixStream) {
    let Ok(mut out) = conn.try_clone() else {
        return;
    };
    let reader = BufReader::new(conn);
    for line in reader.lines() {
        let Ok(line) = line else { return };
        if line.trim().is_empty() {
            continue;
        }
        let r = match serde_json::from_str::<ApiRequest>(&line) {
            Ok(req) => c.handle(req, &mut out),
            Err(e) => reply(
                &mut out,
                &ApiResponse::Error {
                    message: format!("bad request: {e}"),
                },
            ),
        };
        if r.is_err() {
            return;
        }
    }
}
