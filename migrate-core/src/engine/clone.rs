//! Live clone: pre-copy as in a migration, but at the stop the source
//! resumes as the *primary* and the destination keeps a paused, verified
//! copy (a *standby*).
//!
//! ```text
//!  primary                                   standby (run --incoming --standby)
//!  Hello(features ∋ CLONE, MEMORY_DIGEST) --> refuses unless started --standby
//!                                       <--  HelloAck(∋ CLONE)
//!  pre-copy iterations, any policy      -->  pages applied as in a migration
//!  pause; last dirty pages; VcpuState×N;
//!  Complete(digest)                     -->  restores vCPUs (paused), digests
//!                                       <--  Accepted(digest)
//!  digests equal: resume the guest here
//!  Commit                               -->  the copy is now the standby's
//!                                       <--  StandbyHeld
//!  ... the connection stays open (the clone session) ...
//! ```
//! The dirty-log harvest taken while the primary is paused is the *clone
//! point*: the standby holds exactly the memory and vCPU state of that
//! instant, and from it on KVM logs every page the primary writes, which
//! is what a checkpoint epoch will send over the same session. The
//! connection stays open on both sides for that reason; ending it (either
//! side closing, the primary migrating away) leaves the standby holding the
//! last checkpoint it applied (the clone point if none), still paused.
//! Nothing here ever runs the standby. Checkpoint epochs: `epoch.rs`.

use std::io::{BufReader, BufWriter, Write};

use super::apply::PageApplier;
use super::pages::PageSender;
use super::report::{ms, MigrationReport};
use super::send_options::{CompressMode, SendOptions};
use super::source::{error_chain, send_outgoing, vm_err, Channel, Outgoing};
use super::{MigratableVm, MigrationError};
use crate::dirty::DirtyBitmap;
use crate::transport::Stream;
use crate::vm::ram_pages;
use crate::wire::{read_message, write_message, ErrorCode, ErrorMessage, Limits, Message};

/// What [`live_clone`] returns: the report in every case, and the open
/// session when the standby holds the copy.
pub struct CloneOutcome {
    /// The clone's report (`mode: clone`); status `completed` iff `session`
    /// is `Some`.
    pub report: MigrationReport,
    /// The live session with the standby, when the clone completed.
    pub session: Option<CloneSession>,
}

/// The primary's side of a completed live clone: the channel to the
/// standby, still open, and the primary's dirty tracking since the clone
/// point. Checkpoint epochs (fault tolerance) run over it; dropping it
/// closes the connection, which leaves the standby holding the clone-point
/// copy, paused.
pub struct CloneSession {
    pub(super) channel: Channel,
    standby: String,
    /// Pages the primary wrote since the last checkpoint (the clone point
    /// at first), as harvested so far: KVM's log holds the rest.
    pub(super) dirty: DirtyBitmap,
    report: MigrationReport,
    /// Encodes the checkpoints' pages as the clone's were.
    pub(super) sender: PageSender,
    /// The last checkpoint the standby acknowledged (0: the clone point).
    pub(super) epoch: u32,
    /// Output commit, once on (`failover.rs`).
    pub(super) output: Option<super::failover::OutputCommit>,
    /// An epoch's frames, encoded while the guest is paused and written to
    /// the socket after it resumed (kept from epoch to epoch).
    pub(super) staging: Vec<u8>,
}

impl CloneSession {
    /// The standby's address.
    pub fn standby(&self) -> &str {
        &self.standby
    }

    /// The clone's report.
    pub fn report(&self) -> &MigrationReport {
        &self.report
    }

    /// Pages written since the clone point, after harvesting the dirty log
    /// of `vm` (the primary). Any other harvest of the same log (a
    /// migration of the primary) takes pages away from this set, which is
    /// why a migration ends the session first.
    pub fn dirty_since_clone<V: MigratableVm>(
        &mut self,
        vm: &V,
    ) -> Result<&DirtyBitmap, MigrationError> {
        vm.harvest_dirty_log(&mut self.dirty)
            .map_err(vm_err("dirty log sync"))?;
        Ok(&self.dirty)
    }

    /// End the session, telling the standby why (best effort); it keeps
    /// the clone-point copy, paused.
    pub fn close(mut self, why: &str) {
        let end = ErrorMessage::new(
            ErrorCode::Cancelled,
            why.chars().take(1000).collect::<String>(),
        );
        if write_message(&mut self.channel.writer, &Message::Error(end)).is_ok() {
            let _ = self.channel.writer.flush();
        }
        self.channel.reader.shutdown();
    }
}

/// Clone the running guest of `vm` to the standby at the other end of
/// `stream`: pre-copy under `opts.policy`, then the final pass with the
/// guest paused, both ends' memory digests compared (always: `verify` is
/// forced on), the guest resumed here, and the standby told it holds the
/// copy. On any failure the guest runs on here (a guest the operator had
/// paused stays paused) and the standby drops its partial copy.
pub fn live_clone<V: MigratableVm>(vm: &V, stream: Stream, mut opts: SendOptions) -> CloneOutcome {
    opts.verify_digest = true;
    let standby = opts.destination.clone();
    let zstd = match opts.compress {
        CompressMode::None => None,
        CompressMode::Zstd(level) => Some(level),
    };
    let pages = usize::try_from(ram_pages(vm.memory())).expect("page count fits usize");
    let (mut report, channel) = send_outgoing(vm, stream, opts, Outgoing::Clone);
    let session = match channel.map(|channel| (channel, PageSender::new(zstd))) {
        Some((channel, Ok(mut sender))) => {
            // Checkpoints leave out what the standby holds already.
            if let Some(d) = &channel.digests {
                sender.skip_unchanged(d.clone());
            }
            Some(CloneSession {
                channel,
                standby,
                dirty: DirtyBitmap::new(pages),
                report: report.clone(),
                sender,
                epoch: 0,
                output: None,
                staging: Vec::new(),
            })
        }
        Some((_, Err(e))) => {
            // The standby holds the clone; only the session cannot go on.
            report.error = Some(format!(
                "the clone completed but its session cannot send checkpoints: {}",
                error_chain(&e)
            ));
            None
        }
        None => None,
    };
    CloneOutcome { report, session }
}

/// The end of a clone on the source, once `Accepted` carried an equal
/// digest: resume the guest (the primary's downtime ends here), then
/// `Commit` and the standby's `StandbyHeld`. The guest runs here whatever
/// happens after the resume; a lost answer only fails the report.
pub(super) fn hold_standby<V: MigratableVm, W: Write>(
    vm: &V,
    w: &mut W,
    reader: &mut Stream,
    opts: &SendOptions,
    report: &mut MigrationReport,
    pause_start: std::time::Instant,
    paused: &mut bool,
) -> Result<(), MigrationError> {
    vm.set_throttle(0.0).map_err(vm_err("lift the throttle"))?;
    if !opts.guest_paused {
        vm.resume().map_err(vm_err("resume the primary"))?;
    }
    *paused = false;
    let downtime = ms(pause_start.elapsed());
    report.downtime = Some(downtime);
    if let Some(b) = report.downtime_breakdown.as_mut() {
        // For a clone the last part is resuming the primary.
        let before =
            b.pause + b.harvest + b.final_pass + b.vcpu_save + b.digest + b.flush + b.accept;
        b.commit = (downtime - before).max(0.0);
    }
    report.ram.remaining = 0;
    let phase = "clone hand-over";
    let wire = |source| MigrationError::Wire {
        phase: phase.to_string(),
        source,
    };
    write_message(w, &Message::Commit).map_err(wire)?;
    w.flush().map_err(|e| wire(e.into()))?;
    match read_message(reader, &Limits::default()).map_err(wire)? {
        Message::StandbyHeld => Ok(()),
        other => Err(super::source::peer_message(phase, other)),
    }
}

/// The standby's side of a completed live clone: the channel from the
/// primary, kept open for checkpoint epochs ([`StandbySession::receive_epoch`],
/// [`StandbySession::apply_epoch`]), and what it needs to check them.
pub struct StandbySession {
    pub(super) reader: BufReader<Stream>,
    pub(super) writer: BufWriter<Stream>,
    /// The clone's page writer: its written set, its decompressor.
    pub(super) applier: PageApplier,
    pub(super) vcpu_count: usize,
    pub(super) total_pages: u64,
    /// The last epoch applied (0: the clone point).
    pub(super) epoch: u32,
    /// The primary's held output as of the last applied epoch.
    pub(super) output: super::failover::HeldTail,
}

/// How a standby session ended. In every case the standby still holds the
/// clone-point copy, paused.
#[derive(Debug)]
pub enum SessionEnd {
    /// The primary closed the connection.
    Closed,
    /// The primary ended the session and said why.
    Ended {
        /// The primary's reason.
        reason: String,
    },
    /// The stream failed or carried something a session does not allow.
    Failed(MigrationError),
}

impl StandbySession {
    /// Follow the primary (without a timeout: a primary may stay quiet for
    /// as long as it runs), applying each whole checkpoint as it completes,
    /// until the session ends. The VM is not resumed, ever.
    pub fn follow<V: MigratableVm>(mut self, vm: &V) -> SessionEnd {
        if let Err(e) = self.reader.get_ref().set_timeouts(None) {
            return SessionEnd::Failed(MigrationError::Wire {
                phase: "standby session".into(),
                source: e.into(),
            });
        }
        loop {
            match self.receive_epoch() {
                Ok(staged) => {
                    if let Err(end) = self.apply_epoch(vm, staged) {
                        return end;
                    }
                }
                Err(end) => return end,
            }
        }
    }

    /// Stop reading timeouts on the session (see [`StandbySession::follow`]).
    pub fn wait_forever(&self) -> Result<(), MigrationError> {
        self.reader
            .get_ref()
            .set_timeouts(None)
            .map_err(|e| MigrationError::Wire {
                phase: "standby session".into(),
                source: e.into(),
            })
    }
}
