//! Outgoing streams from the API: `send` (a migration) and `clone` (a live
//! clone to a standby), which share every check and differ in what the
//! engine does at the stop and in the state the VM is left in; and
//! `digest`, which a standby answers to show what it holds.
//!
//! ```text
//!  Running|Paused --clone--> Migrating --completed--> Running|Paused, standby attached
//!                            Migrating --failed/cancelled--> Running|Paused (as before)
//! ```
//! After a live clone the session with the standby stays open in the
//! controller (`status` shows it as `standby`): checkpoints will run over
//! it. A second `clone` is refused while it is open; a `send` ends it
//! first (the migration's harvests would take pages away from the
//! session's dirty tracking), which leaves the standby holding the
//! clone-point copy.

use std::sync::{Arc, MutexGuard};
use std::time::Duration;

use super::channel::channel_security;
use super::controller::{ControlError, VmController};
use super::events::Event;
use super::{RunState, SendRequest, StateDigest};
use crate::engine::{
    live_clone, memory_digest, send_migration, ChannelConnector, CloneSession, CompressMode,
    MigratableVm, MigrationControl, MigrationReport, MigrationStatus, SendOptions,
};
use crate::transport::{ChannelError, MigrationUri, Stream, TransportError};

/// Connect timeout for an outgoing stream.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Read/write timeout on the stream.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// What an outgoing request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outgoing {
    Migration,
    Clone,
}

impl Outgoing {
    fn command(self) -> &'static str {
        match self {
            Outgoing::Migration => "send",
            Outgoing::Clone => "clone",
        }
    }
}

impl VmController {
    /// Run a migration, calling `progress` after each iteration. Refused
    /// while another runs or once the guest has stopped or left. A paused
    /// guest travels paused and stays paused on the destination.
    pub fn send(
        &self,
        req: &SendRequest,
        progress: impl FnMut(&MigrationReport) + Send + 'static,
    ) -> Result<MigrationReport, ControlError> {
        if req.epoch_ms.is_some() {
            return Err(ControlError::BadSend(
                "epoch-ms is for clone: a migration leaves no standby to checkpoint to".into(),
            ));
        }
        self.outgoing(req, Outgoing::Migration, progress)
    }

    /// Live-clone the guest to a standby, calling `progress` after each
    /// iteration: the guest runs on here; on success the session stays
    /// open (see the module docs). Refused as `send` is, and while a
    /// standby is attached.
    pub fn clone_to(
        self: &Arc<Self>,
        req: &SendRequest,
        progress: impl FnMut(&MigrationReport) + Send + 'static,
    ) -> Result<MigrationReport, ControlError> {
        let epoch_ms = match req.epoch_ms {
            Some(0) => return Err(ControlError::BadSend("epoch-ms must be at least 1".into())),
            e => e,
        };
        let report = self.outgoing(req, Outgoing::Clone, progress)?;
        if let Some(every) = epoch_ms {
            if self.session().is_some() {
                self.start_epochs(every);
            }
        }
        Ok(report)
    }

    /// `digest`: memory and vCPU-state digests computed now, from this VM.
    /// Only while the vCPUs are stopped (a running guest's digest is stale
    /// before it is read).
    pub fn digest(&self) -> Result<StateDigest, ControlError> {
        let state = self.state();
        let now = *state;
        if !matches!(
            now,
            RunState::Paused | RunState::Standby | RunState::Postmigrate
        ) {
            return Err(ControlError::BadState {
                command: "digest",
                state: now,
            });
        }
        // The state lock is held: nobody resumes the vCPUs meanwhile.
        let vm = &*self.vm;
        let memory = memory_digest(vm.memory(), None).map_err(|e| ControlError::Digest {
            what: "guest memory",
            source: Box::new(e),
        })?;
        let blobs = MigratableVm::save_vcpus(vm)
            .and_then(|b| vm.vcpu_state_digest(&b))
            .map_err(|source| ControlError::Digest {
                what: "the vCPU state",
                source,
            })?;
        Ok(StateDigest {
            state: now,
            memory: format!("{memory:016x}"),
            vcpus: format!("{blobs:016x}"),
        })
    }

    pub(super) fn session(&self) -> MutexGuard<'_, Option<CloneSession>> {
        self.clone_session.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn standby_addr(&self) -> MutexGuard<'_, Option<String>> {
        self.standby_addr.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Take the session away (it waits for a checkpoint in flight).
    pub(super) fn end_session(&self) -> Option<CloneSession> {
        let s = self.session().take();
        self.standby_addr().take();
        s
    }

    /// A migration or a live clone (`kind`): the request's checks, the
    /// state machine, the connection, the engine, the state after.
    fn outgoing(
        &self,
        req: &SendRequest,
        kind: Outgoing,
        mut progress: impl FnMut(&MigrationReport) + Send + 'static,
    ) -> Result<MigrationReport, ControlError> {
        let command = kind.command();
        let uri: MigrationUri = req
            .to
            .parse()
            .map_err(|e: TransportError| ControlError::BadSend(e.to_string()))?;
        if let Some(r) = &req.downtime_ramp {
            r.validate().map_err(ControlError::BadRamp)?;
            if req.policy == "ramp" {
                // Two schedules for one limit: the per-iteration ramp would
                // keep overriding the policy's time-based one.
                return Err(ControlError::BadSend(
                    "downtime-ramp steps the limit per iteration; the ramp policy has its own \
                     time-based schedule (--param start/end/steps): use one of them"
                        .into(),
                ));
            }
        }
        if req.downtime_limit == 0 {
            return Err(ControlError::ZeroDowntime);
        }
        if !(1..=crate::wire::MAX_CHANNELS).contains(&req.channels) {
            return Err(ControlError::BadSend(format!(
                "channels must be 1 to {}, got {}",
                crate::wire::MAX_CHANNELS,
                req.channels
            )));
        }
        let security = channel_security(req)?;
        let downtime_limit =
            Duration::from_millis(req.downtime_ramp.map_or(req.downtime_limit, |r| r.start_ms));
        let params = policy::PolicyParams {
            downtime_limit,
            settings: req.params.clone(),
        };
        let policy = policy::by_name(&req.policy, &params)
            .map_err(|e| ControlError::BadSend(e.to_string()))?;
        let compress = match req.compress.as_str() {
            "none" => CompressMode::None,
            "zstd" => CompressMode::Zstd(1),
            other => {
                return Err(ControlError::BadSend(format!(
                    "unknown compression {other:?} (none, zstd)"
                )))
            }
        };
        let seconds = |what: &str, t: Option<f64>| match t {
            Some(t) if !(t > 0.0 && t.is_finite() && t < 1e9) => Err(ControlError::BadSend(
                format!("{what} must be a positive number of seconds, got {t}"),
            )),
            t => Ok(t.map(Duration::from_secs_f64)),
        };
        let timeout = seconds("timeout", req.timeout)?;
        let connect_timeout =
            seconds("connect-timeout", req.connect_timeout)?.unwrap_or(CONNECT_TIMEOUT);
        let io_timeout = seconds("io-timeout", req.io_timeout)?.unwrap_or(IO_TIMEOUT);
        let control = Arc::new(MigrationControl::new(req.max_bandwidth));
        let (before, previous) = {
            let mut state = self.state();
            let before = match *state {
                s @ (RunState::Running | RunState::Paused) => s,
                RunState::Migrating => return Err(ControlError::MigrationRunning { command }),
                s => return Err(ControlError::BadState { command, state: s }),
            };
            if kind == Outgoing::Clone {
                if let Some(standby) = self.standby_addr().clone() {
                    return Err(ControlError::StandbyAttached { standby });
                }
            }
            self.transition(&mut state, RunState::Migrating);
            *self.current.lock().unwrap_or_else(|e| e.into_inner()) = Some(control.clone());
            let compression = match compress {
                CompressMode::None => "none".to_string(),
                CompressMode::Zstd(l) => format!("zstd:{l}"),
            };
            // query-migrate shows `setup` until the handshake is done.
            let previous = self
                .migration
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .replace(MigrationReport::new(
                    &req.policy,
                    &uri.to_string(),
                    &compression,
                    self.vm.mem_size(),
                ));
            (before, previous)
        };
        let stream = match Stream::connect(&uri, connect_timeout) {
            Ok(s) => s,
            Err(e) => {
                // Nothing started: the last migration stays the last one.
                *self.migration.lock().unwrap_or_else(|e| e.into_inner()) = previous;
                self.finish(before);
                return Err(ControlError::Connect(e));
            }
        };
        let stream = match stream
            .set_timeouts(Some(IO_TIMEOUT))
            .map_err(|source| ChannelError::Io {
                step: "setting the stream timeouts",
                source,
            })
            .and_then(|()| stream.secure_connect(&security, &uri))
        {
            Ok(s) => s,
            Err(source) => {
                *self.migration.lock().unwrap_or_else(|e| e.into_inner()) = previous;
                self.finish(before);
                return Err(ControlError::Channel {
                    uri: uri.to_string(),
                    source,
                });
            }
        };
        let live = self.migration.clone();
        let bus = self.bus.clone();
        let opts = SendOptions {
            policy,
            compress,
            timeout,
            timeout_action: req.timeout_action,
            verify_digest: req.verify,
            io_timeout,
            downtime_limit,
            control,
            downtime_ramp: req.downtime_ramp,
            guest_paused: before == RunState::Paused,
            progress: Some(Box::new(move |r: &MigrationReport| {
                *live.lock().unwrap_or_else(|e| e.into_inner()) = Some(r.clone());
                bus.emit(Event::progress(r));
                progress(r)
            })),
            destination: uri.to_string(),
            copy_pages: req.copy_pages,
            skip_unchanged: req.skip_unchanged,
            channels: (req.channels > 1).then(|| {
                let (uri, security) = (uri.clone(), security.clone());
                ChannelConnector {
                    count: req.channels,
                    connect: Box::new(move || {
                        let s =
                            Stream::connect(&uri, connect_timeout).map_err(|e| e.to_string())?;
                        s.set_timeouts(Some(IO_TIMEOUT))
                            .map_err(|e| e.to_string())?;
                        s.secure_connect(&security, &uri).map_err(|e| e.to_string())
                    }),
                }
            }),
        };
        let report = match kind {
            Outgoing::Migration => {
                // The migration takes the dirty log over: the standby's
                // session cannot follow the guest any more.
                self.end_protection("the primary migrates away; the clone session ends");
                send_migration(&*self.vm, stream, opts)
            }
            Outgoing::Clone => {
                let outcome = live_clone(&*self.vm, stream, opts);
                *self.standby_addr() = outcome.session.as_ref().map(|s| s.standby().into());
                *self.session() = outcome.session;
                outcome.report
            }
        };
        *self.migration.lock().unwrap_or_else(|e| e.into_inner()) = Some(report.clone());
        self.bus.emit(Event::ended(&report));
        // After a completed migration, or one whose Commit may have reached
        // the destination, the source must not run the guest again on its
        // own.
        self.finish(if kind == Outgoing::Clone {
            // The primary runs on (or stays paused, if it was) either way.
            before
        } else if report.status == MigrationStatus::Completed {
            RunState::Postmigrate
        } else if report.outcome_unknown() {
            RunState::OutcomeUnknown
        } else {
            before
        });
        Ok(report)
    }

    fn finish(&self, to: RunState) {
        let mut state = self.state();
        if *state == RunState::Migrating {
            self.transition(&mut state, to);
        }
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}
