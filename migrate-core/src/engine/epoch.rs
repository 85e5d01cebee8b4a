//! Checkpoint epochs over a live-clone session (the second step of fault
//! tolerance, after the clone; output commit and failover: `failover.rs`).
//!
//! Every epoch the primary pauses, harvests the dirty log (the pages written
//! since the last checkpoint), sends them, saves and sends every vCPU, and
//! resumes; the standby *stages* the whole epoch and applies it only when
//! `Complete` arrived and every part checked out, then acknowledges:
//! ```text
//!  primary                                   standby
//!  [pause] harvest
//!  Pages/ZeroPages{iteration: epoch} ... --> staged (checked: inside RAM, decompressed)
//!  IterationEnd{epoch, pages}            --> staged page count must match
//!  VcpuState × N                         --> staged
//!  SerialOutput × k (output commit)      --> staged
//!  Complete{digest?, total_pages}        --> every vCPU present → apply pages, restore vCPUs
//!  [resume]                              <-- Accepted{digest?}
//! ```
//! The same messages as a migration's, numbered by epoch (1, 2, …): no
//! new wire kinds. A stream that breaks or carries anything wrong in the
//! middle of an epoch drops the staged part, so the standby always holds
//! the last *whole* checkpoint, never a torn one. The primary encodes the
//! epoch into a staging buffer while paused (up to [`STAGING_LIMIT`]),
//! resumes, then writes it to the socket and waits for the ack while the
//! guest runs (one epoch in flight); with output commit, the guest's
//! serial output of the epoch waits for the ack (`failover.rs`).

use std::io::Write;
use std::time::Instant;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use super::clone::{CloneSession, SessionEnd, StandbySession};
use super::pages::PageSender;
use super::report::ms;
use super::source::{peer_message, send_iteration, vm_err};
use super::{memory_digest, MigratableVm, MigrationError};
use crate::dirty::DirtyBitmap;
use crate::vm::ram_pages;
use crate::wire::{
    read_message, write_message, Accepted, Complete, Limits, Message, PageBatch, SerialOutput,
    VcpuState, ZeroPages, PAGE_SIZE_U64,
};

/// Largest epoch (bytes of dirty pages) encoded into memory while the guest
/// is paused; a bigger one is written straight to the socket. 64 MiB keeps
/// the buffer a small share of any guest we run and covers every epoch of
/// the FT benchmark (at most 27 MB).
const STAGING_LIMIT: u64 = 64 << 20;

/// One checkpoint as the primary saw it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct EpochRecord {
    /// Epoch number (1 for the first after the clone).
    pub epoch: u32,
    /// Milliseconds the guest was paused for it (0 when it was paused
    /// anyway): harvest, pages read and encoded, vCPUs saved.
    pub pause_ms: f64,
    /// Milliseconds from the resume to the standby's ack.
    pub ack_ms: f64,
    /// Pages sent with data.
    pub pages: u64,
    /// Pages sent as zero ranges.
    pub zero_pages: u64,
    /// Bytes written for the epoch (frames included).
    pub bytes: u64,
    /// Dirty pages left out: the standby holds their content already
    /// (`clone --skip-unchanged`).
    #[serde(default)]
    pub unchanged_pages: u64,
}

/// Pause times over the epochs so far, in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct PauseSummary {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Longest.
    pub max: f64,
    /// Mean.
    pub mean: f64,
}

/// The primary's checkpoint figures (`status.checkpoints`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct EpochReport {
    /// Milliseconds between epochs.
    pub epoch_ms: u64,
    /// Epochs sent and acknowledged.
    pub epochs: u64,
    /// Pause time distribution over the epochs that paused the guest
    /// (hdrhistogram, microsecond resolution).
    pub pause: PauseSummary,
    /// Pages sent with data, all epochs.
    pub pages: u64,
    /// Bytes sent, all epochs.
    pub bytes: u64,
    /// Dirty pages left out as unchanged, all epochs.
    #[serde(default)]
    pub unchanged_pages: u64,
    /// The last epoch.
    pub last: Option<EpochRecord>,
    /// Why the epochs stopped, once they did.
    pub ended: Option<String>,
    /// Output commit: true while the guest's serial output is held until
    /// the epoch that produced it is acknowledged; false once the epochs
    /// stopped (output goes out directly again) or on a standby.
    #[serde(default)]
    pub output_commit: bool,
    /// Serial bytes held back at the last look (primary, output commit).
    #[serde(default)]
    pub output_held: u64,
}

/// Accumulates [`EpochRecord`]s into an [`EpochReport`].
pub struct EpochStats {
    pauses_us: Histogram<u64>,
    report: EpochReport,
}

impl EpochStats {
    /// Figures for epochs every `epoch_ms`.
    pub fn new(epoch_ms: u64) -> Self {
        Self {
            // 1 µs to 1 h, 3 significant digits.
            pauses_us: Histogram::new_with_bounds(1, 3_600_000_000, 3)
                .expect("valid histogram bounds"),
            report: EpochReport {
                epoch_ms,
                ..Default::default()
            },
        }
    }

    /// Add one acknowledged epoch.
    pub fn record(&mut self, r: &EpochRecord) {
        // Truncating to whole microseconds is the histogram's resolution.
        #[allow(clippy::cast_possible_truncation)]
        let us = (r.pause_ms * 1000.0).round().max(1.0) as u64;
        // Epochs of a guest that was stopped anyway paused nothing.
        if r.pause_ms > 0.0 {
            self.pauses_us.saturating_record(us);
        }
        let q = |p: f64| self.pauses_us.value_at_quantile(p) as f64 / 1000.0;
        let rep = &mut self.report;
        rep.epochs += 1;
        rep.pages += r.pages;
        rep.bytes += r.bytes;
        rep.unchanged_pages += r.unchanged_pages;
        rep.pause = PauseSummary {
            p50: q(0.5),
            p99: q(0.99),
            max: self.pauses_us.max() as f64 / 1000.0,
            mean: self.pauses_us.mean() / 1000.0,
        };
        rep.last = Some(r.clone());
    }

    /// Note why the epochs stopped.
    pub fn end(&mut self, why: String) {
        self.report.ended = Some(why);
    }

    /// The figures so far.
    pub fn report(&self) -> &EpochReport {
        &self.report
    }
}

/// A checkpoint sent, its ack not read yet.
pub struct SentEpoch {
    record: EpochRecord,
    digest: Option<u64>,
    resumed: Instant,
    /// The epoch's serial mark, with output commit.
    serial_mark: Option<u64>,
}

impl CloneSession {
    /// Run one checkpoint: pause the guest (unless `pause_guest` is false
    /// because it is stopped anyway), send what it wrote since the last
    /// checkpoint and its vCPU state, resume it, wait for the standby's
    /// ack. With `verify`, both ends digest all memory (while paused, here)
    /// and the epoch fails unless they agree. Any error ends the session:
    /// the standby keeps the last whole checkpoint.
    pub fn run_epoch<V: MigratableVm>(
        &mut self,
        vm: &V,
        pause_guest: bool,
        verify: bool,
    ) -> Result<EpochRecord, MigrationError> {
        let sent = self.send_checkpoint(vm, pause_guest, verify)?;
        self.await_ack(vm, sent)
    }

    /// The first half of [`CloneSession::run_epoch`], the part the guest
    /// waits for: pause (if `pause_guest`), harvest, pages, vCPUs,
    /// `Complete`, resume, flush. Callers that must keep others off the
    /// VM (the API) hold their lock for this half only.
    pub fn send_checkpoint<V: MigratableVm>(
        &mut self,
        vm: &V,
        pause_guest: bool,
        verify: bool,
    ) -> Result<SentEpoch, MigrationError> {
        let epoch = self.epoch + 1;
        let phase = format!("checkpoint epoch {epoch}");
        let t0 = Instant::now();
        if pause_guest {
            vm.pause().map_err(vm_err("pause for a checkpoint"))?;
        }
        // The epoch is encoded into memory while the guest is stopped and
        // written to the socket once it runs again: the pause then costs a
        // copy of the dirty pages, not their trip through the socket (Remus
        // buffers its checkpoints the same way). An epoch of more than
        // STAGING_LIMIT bytes of pages goes straight to the socket instead,
        // so the buffer never doubles a write-heavy guest's memory.
        let mut staging = std::mem::take(&mut self.staging);
        staging.clear();
        let sent = vm
            .harvest_dirty_log(&mut self.dirty)
            .map_err(vm_err("dirty log sync"))
            .and_then(|()| {
                if self.dirty.count() * PAGE_SIZE_U64 > STAGING_LIMIT {
                    self.send_epoch_to(vm, None, epoch, verify, &phase)
                } else {
                    self.send_epoch_to(vm, Some(&mut staging), epoch, verify, &phase)
                }
            });
        if pause_guest {
            // Resume whatever happened: a failed epoch only ends the session.
            vm.resume().map_err(vm_err("resume after a checkpoint"))?;
        }
        let pause_ms = if pause_guest { ms(t0.elapsed()) } else { 0.0 };
        let w = &mut self.channel.writer;
        let written = sent.and_then(|sent| {
            w.write_all(&staging)
                .and_then(|()| w.flush())
                .map_err(|e| MigrationError::Wire {
                    phase: phase.clone(),
                    source: e.into(),
                })?;
            Ok(sent)
        });
        self.staging = staging;
        let (counts, digest, serial_mark) = written?;
        Ok(SentEpoch {
            record: EpochRecord {
                epoch,
                pause_ms,
                ack_ms: 0.0,
                pages: counts.data_pages,
                zero_pages: counts.zero_pages,
                bytes: counts.bytes,
                unchanged_pages: counts.unchanged_pages,
            },
            digest,
            resumed: Instant::now(),
            serial_mark,
        })
    }

    /// The second half of [`CloneSession::run_epoch`]: the standby's ack
    /// (the guest runs meanwhile), then, with output commit, the epoch's
    /// output let out.
    pub fn await_ack<V: MigratableVm>(
        &mut self,
        vm: &V,
        sent: SentEpoch,
    ) -> Result<EpochRecord, MigrationError> {
        let SentEpoch {
            mut record,
            digest,
            resumed,
            serial_mark,
        } = sent;
        let phase = format!("checkpoint epoch {}", record.epoch);
        let wire = |source| MigrationError::Wire {
            phase: phase.clone(),
            source,
        };
        match read_message(&mut self.channel.reader, &Limits::default()).map_err(wire)? {
            Message::Accepted(Accepted { digest: theirs }) => {
                if let (Some(ours), Some(theirs)) = (digest, theirs) {
                    if ours != theirs {
                        return Err(MigrationError::DigestMismatch {
                            source_digest: ours,
                            dest_digest: theirs,
                        });
                    }
                } else if digest.is_some() {
                    return Err(MigrationError::InvalidData(
                        "the standby acknowledged a checkpoint without its digest".into(),
                    ));
                }
            }
            other => return Err(peer_message(&phase, other)),
        }
        self.epoch = record.epoch;
        record.ack_ms = ms(resumed.elapsed());
        if let Some(mark) = serial_mark {
            self.release_output(vm, mark, &phase)?;
        }
        Ok(record)
    }

    /// Harvest, pages, vCPUs and `Complete` into the send buffer (the
    /// guest is stopped).
    fn send_epoch_to<V: MigratableVm>(
        &mut self,
        vm: &V,
        staging: Option<&mut Vec<u8>>,
        epoch: u32,
        verify: bool,
        phase: &str,
    ) -> Result<EpochSent, MigrationError> {
        let parts = EpochParts {
            sender: &mut self.sender,
            dirty: &mut self.dirty,
            output: &mut self.output,
        };
        match staging {
            Some(buf) => parts.encode(vm, buf, epoch, verify, phase),
            None => parts.encode(vm, &mut self.channel.writer, epoch, verify, phase),
        }
    }
}

/// The session state an epoch's encoding uses, borrowed apart from the
/// socket so that the epoch can go to either the socket or the staging
/// buffer.
struct EpochParts<'a> {
    sender: &'a mut PageSender,
    dirty: &'a mut DirtyBitmap,
    output: &'a mut Option<super::failover::OutputCommit>,
}

/// What an encoded epoch sent: counts, the memory digest (if verified), the
/// serial mark (with output commit).
type EpochSent = (super::pages::SentCounts, Option<u64>, Option<u64>);

impl EpochParts<'_> {
    /// Pages (of the set harvested), vCPUs, held output and `Complete`
    /// into `w` (the guest is stopped).
    fn encode<V: MigratableVm, W: Write>(
        self,
        vm: &V,
        w: &mut W,
        epoch: u32,
        verify: bool,
        phase: &str,
    ) -> Result<EpochSent, MigrationError> {
        let mut counts = send_iteration(self.sender, w, vm, epoch, self.dirty, None, phase)?;
        self.dirty.clear();
        let wire = |source| MigrationError::Wire {
            phase: phase.to_string(),
            source,
        };
        let blobs = vm.save_vcpus().map_err(vm_err("save vCPU state"))?;
        for (index, blob) in (0u32..).zip(blobs) {
            counts.bytes +=
                write_message(w, &Message::VcpuState(VcpuState { index, blob })).map_err(wire)?;
        }
        let serial_mark =
            super::failover::send_output(self.output, vm, w, phase)?.map(|(mark, bytes)| {
                counts.bytes += bytes;
                mark
            });
        let digest = if verify {
            Some(memory_digest(vm.memory(), vm.written_pages().as_ref())?)
        } else {
            None
        };
        let complete = Complete {
            digest,
            total_pages: ram_pages(vm.memory()),
        };
        counts.bytes += write_message(w, &Message::Complete(complete)).map_err(wire)?;
        Ok((counts, digest, serial_mark))
    }
}

/// A whole epoch, received and checked, not applied yet.
pub struct StagedEpoch {
    epoch: u32,
    parts: Vec<StagedPart>,
    vcpus: Vec<Vec<u8>>,
    digest_wanted: bool,
    /// The primary's held serial output up to the epoch's mark.
    output: Vec<SerialOutput>,
}

impl StagedEpoch {
    /// The epoch's number.
    pub fn epoch(&self) -> u32 {
        self.epoch
    }
}

enum StagedPart {
    /// Raw (decompressed) pages.
    Pages(PageBatch),
    Zeros(ZeroPages),
}

impl StandbySession {
    /// Read the next epoch up to its `Complete` and check every part of it,
    /// without touching the VM: a stream that ends or fails on the way
    /// leaves the standby exactly as it was (the staged part is dropped).
    pub fn receive_epoch(&mut self) -> Result<StagedEpoch, SessionEnd> {
        let epoch = self.epoch + 1;
        let phase = format!("checkpoint epoch {epoch}");
        let mut parts = Vec::new();
        let mut pages = 0u64;
        let mut ended = false;
        let mut vcpus: Vec<Option<Vec<u8>>> = vec![None; self.vcpu_count];
        let mut output = Vec::new();
        loop {
            let msg = match read_message(&mut self.reader, &Limits::default()) {
                Ok(m) => m,
                Err(crate::wire::WireError::ConnectionClosed) if pages == 0 && !ended => {
                    return Err(SessionEnd::Closed)
                }
                Err(source) => {
                    return Err(SessionEnd::Failed(MigrationError::Wire { phase, source }))
                }
            };
            let bad = |why: String| SessionEnd::Failed(MigrationError::InvalidData(why));
            match msg {
                Message::Heartbeat => {}
                // Between epochs: how far the primary let its output out.
                Message::SerialOutput(o) if !ended && parts.is_empty() && o.data.is_empty() => {
                    self.output.note_released(o.released);
                }
                Message::SerialOutput(o) if ended => output.push(o),
                Message::Error(e) => return Err(SessionEnd::Ended { reason: e.message }),
                Message::Pages(b) if !ended && b.iteration == epoch => {
                    let raw = self.applier.stage_batch(b).map_err(SessionEnd::Failed)?;
                    pages += raw.gpas.len() as u64;
                    parts.push(StagedPart::Pages(raw));
                }
                Message::ZeroPages(z) if !ended && z.iteration == epoch => {
                    self.applier.check_zeros(&z).map_err(SessionEnd::Failed)?;
                    pages += z.page_count();
                    parts.push(StagedPart::Zeros(z));
                }
                Message::IterationEnd(e) if !ended && e.iteration == epoch => {
                    if e.pages != pages {
                        return Err(bad(format!(
                            "epoch {epoch} announced {} pages but {pages} arrived",
                            e.pages
                        )));
                    }
                    ended = true;
                }
                Message::VcpuState(s) if ended => {
                    let slot = usize::try_from(s.index)
                        .ok()
                        .and_then(|i| vcpus.get_mut(i))
                        .ok_or_else(|| bad(format!("state for unknown vCPU {}", s.index)))?;
                    if slot.replace(s.blob).is_some() {
                        return Err(bad(format!("state for vCPU {} sent twice", s.index)));
                    }
                }
                Message::Complete(c) if ended => {
                    if c.total_pages != self.total_pages {
                        return Err(bad(format!(
                            "primary counts {} pages, standby has {}",
                            c.total_pages, self.total_pages
                        )));
                    }
                    let vcpus: Option<Vec<Vec<u8>>> = vcpus.into_iter().collect();
                    let vcpus = vcpus
                        .ok_or_else(|| bad(format!("epoch {epoch} ended without every vCPU")))?;
                    super::failover::check_output(&self.output, &output)
                        .map_err(|why| bad(format!("epoch {epoch}: {why}")))?;
                    return Ok(StagedEpoch {
                        epoch,
                        parts,
                        vcpus,
                        digest_wanted: c.digest.is_some(),
                        output,
                    });
                }
                other => {
                    // Out of place, or of another epoch.
                    let e = MigrationError::Unexpected {
                        phase,
                        got: other.kind(),
                    };
                    self.refuse(&e);
                    return Err(SessionEnd::Failed(e));
                }
            }
        }
    }

    /// Apply a whole staged epoch to the (paused) standby VM and
    /// acknowledge it. The caller keeps others off the VM meanwhile.
    pub fn apply_epoch<V: MigratableVm>(
        &mut self,
        vm: &V,
        staged: StagedEpoch,
    ) -> Result<(), SessionEnd> {
        let failed = SessionEnd::Failed;
        for part in &staged.parts {
            match part {
                StagedPart::Pages(b) => self.applier.apply_batch(vm.memory(), b).map(|_| ()),
                StagedPart::Zeros(z) => self.applier.apply_zeros(vm.memory(), z).map(|_| ()),
            }
            .map_err(failed)?;
        }
        vm.restore_vcpus(staged.vcpus).map_err(|source| {
            failed(MigrationError::Vm {
                op: "restore vCPU state",
                source,
            })
        })?;
        vm.note_written(&self.applier.written().snapshot());
        let digest = if staged.digest_wanted {
            Some(
                memory_digest(vm.memory(), Some(&self.applier.written().snapshot()))
                    .map_err(failed)?,
            )
        } else {
            None
        };
        // Applied and acknowledged together: from here on a failover
        // resumes from this epoch, so its held output is kept with it.
        self.epoch = staged.epoch;
        self.output.append(&staged.output);
        let ack = Message::Accepted(Accepted { digest });
        write_message(&mut self.writer, &ack)
            .and_then(|_| self.writer.flush().map_err(Into::into))
            .map_err(|source| {
                failed(MigrationError::Wire {
                    phase: format!("checkpoint epoch {} ack", staged.epoch),
                    source,
                })
            })
    }

    /// The last epoch applied (0: the clone point).
    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    fn refuse(&mut self, e: &MigrationError) {
        let text: String = super::error_chain(e).chars().take(1000).collect();
        let msg = crate::wire::ErrorMessage::new(crate::wire::ErrorCode::ProtocolViolation, text);
        let _ = write_message(&mut self.writer, &Message::Error(msg));
        let _ = self.writer.flush();
    }
}
