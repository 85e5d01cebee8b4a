//! The controller: what each API command does to the VM.
//!
//! State machine of the VM as the API sees it (anything else is refused
//! with [`ControlError`], never waited on):
//! ```text
//!  Running --pause--> Paused --resume--> Running
//!  Running|Paused --send--> Migrating --completed--> Postmigrate
//!                           Migrating --failed/cancelled--> Running|Paused (as before)
//!  any --guest halts or exits--> Stopped
//! ```
//! `pause`/`resume` are refused while a migration runs: the engine owns the
//! vCPUs then (it pauses them for the switch-over and resumes them on
//! failure); cancel the migration first.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use super::events::{self, Event, EventBus};
use super::{
    ExitSummary, MemsaveRequest, MigrationQuery, NoMigration, ProcessEvent, RunState,
    SetParameters, VmStatus, API_VERSION,
};
use crate::engine::{CloneSession, EpochReport, MigrationControl, MigrationReport, RampError};
use crate::transport::{ChannelError, TransportError};
use crate::vm::{Vm, VmError};

/// `memsave` copies guest memory through a buffer this large.
const MEMSAVE_CHUNK: u64 = 1 << 20;

/// Why a command was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The command is not valid in the VM's state.
    #[error("cannot {command}: the VM is {state}")]
    BadState {
        /// The command.
        command: &'static str,
        /// The state it met.
        state: RunState,
    },
    /// `pause` of a paused VM.
    #[error("cannot pause: the VM is already paused")]
    AlreadyPaused,
    /// `resume` without `force` of a source whose migration outcome is
    /// unknown.
    #[error(
        "cannot resume: the last migration's outcome is unknown (the destination may run the \
         guest); check that it does not, then resume with force"
    )]
    OutcomeUnknown,
    /// `force` given where no migration outcome is in doubt.
    #[error("resume --force is only for a source whose migration outcome is unknown (the VM is {state})")]
    ForceNotNeeded {
        /// The state.
        state: RunState,
    },
    /// `resume` of a running VM.
    #[error("cannot resume: the VM is running, not paused")]
    NotPaused,
    /// A command that needs the vCPUs to itself, or a second `send`.
    #[error("cannot {command}: a migration is running (migrate-cancel stops it)")]
    MigrationRunning {
        /// The command.
        command: &'static str,
    },
    /// `migrate-cancel`/`migrate-set-parameters` with nothing to act on.
    #[error("cannot {command}: no migration is running")]
    NoMigration {
        /// The command.
        command: &'static str,
    },
    /// `migrate-cancel` once `Commit` is being sent: the destination may
    /// already run the guest, so cancelling could run it twice.
    #[error(
        "too late to cancel: Commit is being sent (the destination may already run the guest)"
    )]
    TooLate,
    /// A `send` field is invalid (address, policy, compression, timeout).
    #[error("bad send request: {0}")]
    BadSend(String),
    /// The downtime ramp is invalid.
    #[error("bad send request")]
    BadRamp(#[source] RampError),
    /// `migrate-set-parameters` without a parameter.
    #[error("migrate-set-parameters needs downtime-limit and/or max-bandwidth")]
    NothingToSet,
    /// A downtime limit of 0 ms.
    #[error("downtime-limit must be at least 1 ms")]
    ZeroDowntime,
    /// The destination could not be reached.
    #[error("cannot start the migration")]
    Connect(#[source] TransportError),
    /// A `send` with neither `psk-file` nor `insecure`.
    #[error(
        "bad send request: the migration channel needs a credential: psk-file (the \
         destination's pre-shared key), tls-cert + tls-key + tls-ca, or insecure: true for \
         plaintext"
    )]
    NoCredential,
    /// The pre-shared key or the TLS files could not be loaded.
    #[error("bad send request")]
    Key(#[source] ChannelError),
    /// The secure-channel handshake with the destination failed.
    #[error("cannot start the migration: secure channel with {uri} refused")]
    Channel {
        /// The destination.
        uri: String,
        /// Why.
        #[source]
        source: ChannelError,
    },
    /// `memsave` of 0 bytes.
    #[error("memsave size is 0")]
    ZeroSize,
    /// `memsave` of a range that leaves guest RAM.
    #[error(
        "memsave of {size:#x} bytes at {addr:#x} runs past the end of guest memory ({mem_size:#x} bytes)"
    )]
    OutOfRange {
        /// First byte asked for.
        addr: u64,
        /// Length asked for.
        size: u64,
        /// Guest RAM size.
        mem_size: u64,
    },
    /// `memsave` to a relative path.
    #[error(
        "memsave file {path:?} is not absolute (the VM process's working directory is not yours)"
    )]
    RelativePath {
        /// The path given.
        path: PathBuf,
    },
    /// Creating or writing the `memsave` file failed.
    #[error("cannot write memsave file {path}")]
    File {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Reading guest memory failed.
    #[error("cannot read guest memory at {gpa:#x}")]
    ReadMemory {
        /// Where.
        gpa: u64,
        /// vm-memory's error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// `clone` while a standby is attached already.
    #[error("cannot clone: a standby is attached already ({standby}); one standby per primary")]
    StandbyAttached {
        /// The attached standby's address.
        standby: String,
    },
    /// `digest` could not read or hash what it covers.
    #[error("cannot digest {what}")]
    Digest {
        /// Memory or vCPU state.
        what: &'static str,
        /// The cause.
        #[source]
        source: crate::engine::VmOpError,
    },
    /// A VM operation failed.
    #[error("VM operation {op} failed")]
    Vm {
        /// The operation.
        op: &'static str,
        /// The cause.
        #[source]
        source: VmError,
    },
}

/// Owns the VM on behalf of the API.
pub struct VmController {
    pub(super) vm: Arc<Vm>,
    pub(super) state: Mutex<RunState>,
    pub(super) started: Instant,
    pub(super) events: Sender<ProcessEvent>,
    /// The running migration's latest report, or the last one's final one.
    pub(super) migration: Arc<Mutex<Option<MigrationReport>>>,
    /// Steering handle of the running migration (`None`: none runs).
    pub(super) current: Mutex<Option<Arc<MigrationControl>>>,
    /// Connections that asked for `events`.
    pub(super) bus: Arc<EventBus>,
    /// The open session with this VM's standby after a live clone.
    pub(super) clone_session: Mutex<Option<CloneSession>>,
    /// The attached standby's address while `clone_session` is open, kept
    /// apart so that `status` never waits for a checkpoint in flight.
    pub(super) standby_addr: Mutex<Option<String>>,
    /// Checkpoint figures (primary: sent; standby: applied).
    pub(super) checkpoints: Mutex<Option<EpochReport>>,
}

impl VmController {
    /// Wrap a running VM; process-level events go to `events`.
    pub fn new(vm: Arc<Vm>, events: Sender<ProcessEvent>) -> Self {
        Self::with_state(vm, events, RunState::Running)
    }

    /// Wrap a VM whose vCPUs are stopped (a paused guest that arrived).
    pub fn new_paused(vm: Arc<Vm>, events: Sender<ProcessEvent>) -> Self {
        Self::with_state(vm, events, RunState::Paused)
    }

    /// Wrap the paused copy a live clone left here (state `standby`).
    pub fn new_standby(vm: Arc<Vm>, events: Sender<ProcessEvent>) -> Self {
        Self::with_state(vm, events, RunState::Standby)
    }

    fn with_state(vm: Arc<Vm>, events: Sender<ProcessEvent>, state: RunState) -> Self {
        Self {
            vm,
            state: Mutex::new(state),
            started: Instant::now(),
            events,
            migration: Arc::new(Mutex::new(None)),
            current: Mutex::new(None),
            bus: Arc::new(EventBus::default()),
            clone_session: Mutex::new(None),
            standby_addr: Mutex::new(None),
            checkpoints: Mutex::new(None),
        }
    }

    /// The VM.
    pub fn vm(&self) -> &Arc<Vm> {
        &self.vm
    }

    /// Where process-level events go.
    pub(super) fn events(&self) -> &Sender<ProcessEvent> {
        &self.events
    }

    /// Subscribers of `events`.
    pub fn bus(&self) -> &EventBus {
        &self.bus
    }

    pub(super) fn state(&self) -> std::sync::MutexGuard<'_, RunState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Change the state (the caller holds the lock) and tell subscribers.
    pub(super) fn transition(&self, state: &mut RunState, to: RunState) {
        let from = std::mem::replace(state, to);
        if from != to {
            self.bus.emit(Event::StateChanged {
                timestamp: events::now(),
                from,
                to,
            });
        }
    }

    /// Record that the guest stopped by itself, and why.
    pub fn set_stopped(&self, reason: &str) {
        self.bus.emit(Event::GuestStopped {
            timestamp: events::now(),
            reason: reason.to_string(),
        });
        let mut state = self.state();
        self.transition(&mut state, RunState::Stopped);
    }

    /// Current status (`status` and `info`).
    pub fn status(&self) -> VmStatus {
        let mut exits = ExitSummary::default();
        for c in self.vm.exit_counts() {
            exits.io_out += c.io_out.load(Ordering::Relaxed);
            exits.io_in += c.io_in.load(Ordering::Relaxed);
            exits.mmio += c.mmio.load(Ordering::Relaxed);
            exits.hlt += c.hlt.load(Ordering::Relaxed);
            exits.interrupted += c.interrupted.load(Ordering::Relaxed);
            exits.dirty_ring_full += c.dirty_ring_full.load(Ordering::Relaxed);
        }
        VmStatus {
            state: *self.state(),
            api: API_VERSION,
            memory: self.vm.mem_size(),
            slots: self.vm.slots().len(),
            vcpus: self.vm.vcpu_count(),
            uptime: self.started.elapsed().as_secs_f64(),
            cpu_model: self.vm.cpu_model().to_string(),
            dirty_log: format!("{:?}", self.vm.dirty_log_mode()),
            dirty_track: self.vm.dirty_track().to_string(),
            dirty_ring_entries: self.vm.dirty_ring_entries(),
            dirty_ring_harvested: self.vm.dirty_ring_harvested(),
            dirty_ring_overruns: self.vm.dirty_ring_overruns(),
            dirty_ring_resynced: self.vm.dirty_ring_resynced(),
            serial_bytes: self.vm.ports().serial_bytes(),
            exits,
            unhandled_ports: self
                .vm
                .ports()
                .unhandled()
                .iter()
                .map(|(p, n)| format!("{p:#x}:{n}"))
                .collect(),
            migration: self.last_report(),
            standby: self
                .standby_addr
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            checkpoints: self
                .checkpoints
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        }
    }

    /// The running migration's report brought up to now, or the last one.
    fn last_report(&self) -> Option<MigrationReport> {
        let mut r = self
            .migration
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()?;
        if let Some(c) = self.current() {
            c.refresh(&mut r);
        }
        Some(r)
    }

    /// `pause`: stop the vCPUs (Running → Paused).
    pub fn pause(&self) -> Result<(), ControlError> {
        let mut state = self.state();
        match *state {
            RunState::Running => {}
            RunState::Paused => return Err(ControlError::AlreadyPaused),
            RunState::Migrating => return Err(ControlError::MigrationRunning { command: "pause" }),
            s => {
                return Err(ControlError::BadState {
                    command: "pause",
                    state: s,
                })
            }
        }
        self.vm.pause().map_err(|source| ControlError::Vm {
            op: "pause",
            source,
        })?;
        self.transition(&mut state, RunState::Paused);
        Ok(())
    }

    /// `resume`: start the vCPUs (Paused → Running; OutcomeUnknown →
    /// Running only with `force`).
    pub fn resume(&self, force: bool) -> Result<(), ControlError> {
        let mut state = self.state();
        match (*state, force) {
            (RunState::Paused, false) | (RunState::OutcomeUnknown, true) => {}
            (RunState::OutcomeUnknown, false) => return Err(ControlError::OutcomeUnknown),
            (_, true) => return Err(ControlError::ForceNotNeeded { state: *state }),
            (RunState::Running, _) => return Err(ControlError::NotPaused),
            (RunState::Migrating, _) => {
                return Err(ControlError::MigrationRunning { command: "resume" })
            }
            (s, _) => {
                return Err(ControlError::BadState {
                    command: "resume",
                    state: s,
                })
            }
        }
        self.vm.resume().map_err(|source| ControlError::Vm {
            op: "resume",
            source,
        })?;
        self.transition(&mut state, RunState::Running);
        Ok(())
    }

    /// `memsave`: write `[addr, addr + size)` of guest-physical memory to
    /// the file. In any state; a running guest may change the memory while
    /// it is copied, so pause it first for a consistent image.
    pub fn memsave(&self, req: &MemsaveRequest) -> Result<(), ControlError> {
        let mem_size = self.vm.mem_size();
        if req.size == 0 {
            return Err(ControlError::ZeroSize);
        }
        if req
            .addr
            .checked_add(req.size)
            .is_none_or(|end| end > mem_size)
        {
            return Err(ControlError::OutOfRange {
                addr: req.addr,
                size: req.size,
                mem_size,
            });
        }
        let path = Path::new(&req.file);
        if !path.is_absolute() {
            return Err(ControlError::RelativePath {
                path: path.to_path_buf(),
            });
        }
        let file_err = |source| ControlError::File {
            path: path.to_path_buf(),
            source,
        };
        // Owner-only, as guest memory may hold the guest's secrets.
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .map_err(file_err)?;
        let mut out = std::io::BufWriter::new(file);
        let mut buf = vec![0u8; usize::try_from(MEMSAVE_CHUNK).expect("1 MiB fits usize")];
        let mut done = 0u64;
        while done < req.size {
            let n = (req.size - done).min(MEMSAVE_CHUNK);
            let chunk = &mut buf[..usize::try_from(n).expect("chunk fits usize")];
            let gpa = req.addr + done;
            self.vm
                .memory()
                .read_slice(chunk, GuestAddress(gpa))
                .map_err(|source| ControlError::ReadMemory { gpa, source })?;
            out.write_all(chunk).map_err(file_err)?;
            done += n;
        }
        out.flush().map_err(file_err)?;
        out.get_ref().sync_all().map_err(file_err)?;
        Ok(())
    }

    /// `query-migrate`.
    pub fn query_migrate(&self) -> MigrationQuery {
        match self.last_report() {
            Some(r) => MigrationQuery::Report(Box::new(r)),
            None => MigrationQuery::None {
                status: NoMigration::None,
            },
        }
    }

    fn current(&self) -> Option<Arc<MigrationControl>> {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// `migrate-cancel`: the migration stops before its next page batch;
    /// its `send` gets a `cancelled` report and the source keeps the guest.
    pub fn cancel(&self) -> Result<(), ControlError> {
        let command = "migrate-cancel";
        let control = self
            .current()
            .ok_or(ControlError::NoMigration { command })?;
        if control.cancel() {
            Ok(())
        } else {
            Err(ControlError::TooLate)
        }
    }

    /// `migrate-set-parameters` on the running migration.
    pub fn set_parameters(&self, p: &SetParameters) -> Result<(), ControlError> {
        if p.downtime_limit.is_none() && p.max_bandwidth.is_none() {
            return Err(ControlError::NothingToSet);
        }
        if p.downtime_limit == Some(0) {
            return Err(ControlError::ZeroDowntime);
        }
        let control = self.current().ok_or(ControlError::NoMigration {
            command: "migrate-set-parameters",
        })?;
        if let Some(ms) = p.downtime_limit {
            control.set_downtime_limit(Duration::from_millis(ms));
        }
        if let Some(bw) = p.max_bandwidth {
            control.set_max_bandwidth(Some(bw));
        }
        Ok(())
    }
}
