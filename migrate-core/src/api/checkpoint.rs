//! Fault tolerance in the controller: the primary's checkpoint thread
//! (epochs, heartbeats, output commit) and the standby's follower (apply
//! epochs; take over when the primary is gone).
//!
//! ```text
//!  primary: Running|Paused, standby attached, output held --epochs stop--> output direct
//!  standby: Standby --primary closed / silent > failover timeout--> Running (took over)
//!           Standby --primary said why (shutdown, send)-----------> Standby (held, paused)
//! ```
//! A planned stop of the primary (`shutdown`, a `send`, its guest ending)
//! closes the session with a reason *before* it lets its held output out,
//! so a standby that was told never takes over, and one that was not told
//! never misses output the primary released.

use std::sync::MutexGuard;
use std::time::{Duration, Instant};

use super::controller::VmController;
use super::RunState;
use crate::engine::{
    error_chain, EpochReport, EpochStats, MigratableVm, MigrationError, SessionEnd, StandbySession,
};
use crate::wire::WireError;

/// Between epochs further apart than this, the primary sends heartbeats
/// this often (epochs count as liveness themselves).
pub const HEARTBEAT_EVERY: Duration = Duration::from_millis(100);

/// How a standby stopped following its primary.
#[derive(Debug)]
pub enum StandbyEnd {
    /// The primary was gone (connection closed, broken, or silent for the
    /// failover timeout): the guest runs here now, from the last applied
    /// checkpoint.
    TookOver {
        /// The checkpoint it resumed from.
        epoch: u32,
        /// Serial bytes the primary held back, written here first.
        replayed: usize,
        /// Why the primary counts as gone.
        why: String,
    },
    /// The session ended in a way that does not call for a failover (a
    /// planned stop, a refused stream, no output commit): the copy stays
    /// held, paused.
    Held(SessionEnd),
}

impl VmController {
    /// Checkpoint the guest to the standby every `every_ms` on a thread of
    /// its own, with its serial output held until acknowledged, until the
    /// session ends (an error, a `send`, the guest stopping). Each epoch
    /// holds the state lock while the guest is paused, so
    /// `pause`/`resume`/`send` never race with it; the ack is awaited
    /// without it.
    pub(super) fn start_epochs(self: &std::sync::Arc<Self>, every_ms: u64) {
        let mut report = EpochStats::new(every_ms).report().clone();
        if let Some(s) = self.session().as_mut() {
            report.output_commit = s.hold_output(&*self.vm);
        }
        *self.checkpoints_mut() = Some(report);
        let c = self.clone();
        let spawned = std::thread::Builder::new()
            .name("checkpoints".into())
            .spawn(move || c.checkpoint_loop(every_ms));
        if let Err(e) = spawned {
            self.end_protection(&format!("cannot start the checkpoint thread: {e}"));
        }
    }

    fn checkpoint_loop(&self, every_ms: u64) {
        let every = Duration::from_millis(every_ms);
        let mut stats = EpochStats::new(every_ms);
        let mut last = Instant::now();
        loop {
            // Until the next epoch is due, heartbeats tell the standby the
            // primary lives.
            loop {
                let left = every.saturating_sub(last.elapsed());
                if left.is_zero() {
                    break;
                }
                std::thread::sleep(left.min(HEARTBEAT_EVERY));
                if every.saturating_sub(last.elapsed()).is_zero() {
                    break;
                }
                let mut session = self.session();
                let Some(s) = session.as_mut() else {
                    drop(session);
                    return self.epochs_ended(stats, "the clone session ended");
                };
                if let Err(e) = s.heartbeat() {
                    drop(session);
                    return self.epochs_failed(stats, &e);
                }
            }
            last = Instant::now();
            if self.session().is_none() {
                return self.epochs_ended(stats, "the clone session ended");
            }
            let state = self.state();
            let pause_guest = match *state {
                RunState::Running => true,
                // Stopped by the operator: the checkpoint brings the
                // standby to exactly this state.
                RunState::Paused => false,
                // The engine owns the vCPUs; the send ended the session.
                RunState::Migrating => continue,
                s => {
                    drop(state);
                    return self.epochs_ended(stats, &format!("the guest is {s}"));
                }
            };
            let mut session = self.session();
            let Some(s) = session.as_mut() else {
                drop(session);
                drop(state);
                return self.epochs_ended(stats, "the clone session ended");
            };
            let sent = s.send_checkpoint(&*self.vm, pause_guest, false);
            drop(state);
            match sent.and_then(|sent| s.await_ack(&*self.vm, sent)) {
                Ok(record) => {
                    stats.record(&record);
                    let mut r = stats.report().clone();
                    r.output_commit = s.output_commit();
                    r.output_held = self.vm.ports().serial_held().unwrap_or(0) as u64;
                    *self.checkpoints_mut() = Some(r);
                }
                Err(e) => {
                    drop(session);
                    return self.epochs_failed(stats, &e);
                }
            }
        }
    }

    /// A checkpoint or heartbeat failed: the primary runs on, unprotected;
    /// the standby keeps the last whole checkpoint.
    fn epochs_failed(&self, stats: EpochStats, e: &MigrationError) {
        self.epochs_ended(stats, &format!("checkpoint failed: {}", error_chain(e)));
    }

    fn epochs_ended(&self, stats: EpochStats, why: &str) {
        let mut report = stats.report().clone();
        report.ended = self
            .checkpoints_mut()
            .as_ref()
            .and_then(|r| r.ended.clone());
        *self.checkpoints_mut() = Some(report);
        self.end_protection(why);
    }

    /// End fault tolerance on the primary, for `why`: the session is
    /// closed with the reason first (a standby that hears it does not take
    /// over), then the held output goes out and output is direct again;
    /// `status.checkpoints` says why. Does nothing more once ended.
    pub fn end_protection(&self, why: &str) {
        if let Some(s) = self.end_session() {
            s.close(why);
        }
        let released = self.vm.ports().serial_direct();
        let mut c = self.checkpoints_mut();
        if let Some(r) = c.as_mut() {
            if r.ended.is_none() {
                tracing::warn!(reason = %why, released, "checkpoint epochs stopped");
                r.ended = Some(format!(
                    "{why}; the guest runs unprotected and its output goes out directly"
                ));
            }
            r.output_commit = false;
            r.output_held = 0;
        }
    }

    pub(super) fn checkpoints_mut(&self) -> MutexGuard<'_, Option<EpochReport>> {
        self.checkpoints.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// On a standby: apply the primary's checkpoints as they complete,
    /// each under the state lock (so `digest` sees a whole one), until the
    /// session ends. Once an epoch carrying the primary's held output was
    /// applied, a primary that closes the connection without a reason,
    /// breaks it, or stays silent for `failover_timeout` is taken for dead
    /// and the guest resumes here (see [`StandbyEnd`]).
    pub fn follow_primary(
        &self,
        mut session: StandbySession,
        failover_timeout: Duration,
    ) -> StandbyEnd {
        if let Err(e) = session.set_silence_limit(None) {
            return StandbyEnd::Held(SessionEnd::Failed(e));
        }
        *self.checkpoints_mut() = Some(EpochReport::default());
        loop {
            let staged = match session.receive_epoch() {
                Ok(s) => s,
                Err(end) => return self.session_ended(session, end, failover_timeout),
            };
            let armed = session.failover_armed();
            let state = self.state();
            let applied = session.apply_epoch(&*self.vm, staged);
            drop(state);
            if let Err(end) = applied {
                return self.session_ended(session, end, failover_timeout);
            }
            if !armed && session.failover_armed() {
                if let Err(e) = session.set_silence_limit(Some(failover_timeout)) {
                    return StandbyEnd::Held(SessionEnd::Failed(e));
                }
            }
            if let Some(r) = self.checkpoints_mut().as_mut() {
                r.epochs = u64::from(session.epoch());
            }
        }
    }

    fn session_ended(
        &self,
        session: StandbySession,
        end: SessionEnd,
        failover_timeout: Duration,
    ) -> StandbyEnd {
        let gone = match &end {
            SessionEnd::Closed => {
                Some("the primary closed the clone session without a word".into())
            }
            SessionEnd::Failed(MigrationError::Wire { source, .. }) => Some(match source {
                WireError::Io { source }
                    if matches!(
                        source.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    format!(
                        "nothing from the primary for {} ms",
                        failover_timeout.as_millis()
                    )
                }
                other => format!("the clone session broke: {other}"),
            }),
            _ => None,
        };
        match gone {
            Some(why) if session.failover_armed() => self.take_over(&session, why),
            _ => StandbyEnd::Held(end),
        }
    }

    /// Resume the last applied checkpoint here, after writing the output
    /// the primary held for it and had not said it released.
    fn take_over(&self, session: &StandbySession, why: String) -> StandbyEnd {
        let mut state = self.state();
        let tail = session.unreleased_output();
        self.vm.ports().write_serial(tail);
        if let Err(source) = MigratableVm::resume(&*self.vm) {
            return StandbyEnd::Held(SessionEnd::Failed(MigrationError::Vm {
                op: "resume the standby",
                source,
            }));
        }
        self.transition(&mut state, RunState::Running);
        drop(state);
        let epoch = session.epoch();
        if let Some(r) = self.checkpoints_mut().as_mut() {
            r.ended = Some(format!(
                "took over from checkpoint epoch {epoch}: {why}; the guest runs here"
            ));
        }
        StandbyEnd::TookOver {
            epoch,
            replayed: tail.len(),
            why,
        }
    }
}
