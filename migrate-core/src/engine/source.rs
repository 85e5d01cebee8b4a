//! The source side: pre-copy iterations, stop-and-copy, completion.

use std::io::{BufWriter, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use policy::IterationStats;

use super::channels;
use super::pages::{PageSender, SentCounts};
use super::report::{ms, DigestReport, DowntimeBreakdown, MigrationReport, MigrationStatus};
use super::send_options::{CompressMode, SendOptions};
use super::unchanged::SentDigests;
use super::{memory_digest, precopy, MigratableVm, MigrationError};
use crate::dirty::DirtyBitmap;
use crate::transport::{RateLimited, Stream};
use crate::vm::ram_pages;
use crate::wire::{
    read_message, write_message, ChannelJoin, Complete, ErrorCode, ErrorMessage, Hello,
    IterationEnd, Limits, MemoryRegion, Message, VcpuState, FEATURE_CHANNELS, FEATURE_CLONE,
    FEATURE_GUEST_PAUSED, FEATURE_MEMORY_DIGEST, FEATURE_PAGE_CHECKSUMS, FEATURE_ZSTD,
    PAGE_SIZE_U64,
};

/// What an outgoing stream is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outgoing {
    /// The destination takes the guest over; the source stops for good.
    Migration,
    /// The destination keeps a paused copy; the source resumes.
    Clone,
}

/// Both halves of the channel to the peer, as the source used them, kept
/// open after a live clone for the checkpoints that follow it.
pub(super) struct Channel {
    /// The sending half (buffered, rate-limited by the control's cap).
    pub writer: BufWriter<RateLimited<Stream>>,
    /// The receiving half.
    pub reader: Stream,
    /// The digests of the pages sent (`skip_unchanged`), which the
    /// checkpoints of a clone go on from.
    pub digests: Option<Arc<SentDigests>>,
}

/// Migrate `vm` over `stream`. Returns the report whatever the outcome; the
/// report's status says whether the destination took over. On any failure
/// before the final `Commit` the source guest is running when this returns.
pub fn send_migration<V: MigratableVm>(
    vm: &V,
    stream: Stream,
    opts: SendOptions,
) -> MigrationReport {
    send_outgoing(vm, stream, opts, Outgoing::Migration).0
}

/// A migration or a live clone; the channel comes back when it completed
/// (a clone's session goes on over it).
pub(super) fn send_outgoing<V: MigratableVm>(
    vm: &V,
    stream: Stream,
    mut opts: SendOptions,
    mode: Outgoing,
) -> (MigrationReport, Option<Channel>) {
    let compression = match opts.compress {
        CompressMode::None => "none".to_string(),
        CompressMode::Zstd(l) => format!("zstd:{l}"),
    };
    let ram_total = ram_pages(vm.memory()) * PAGE_SIZE_U64;
    let mut report = MigrationReport::new(
        opts.policy.name(),
        &opts.destination,
        &compression,
        ram_total,
    );
    report.dirty_track = vm.dirty_track().to_string();
    let start = Instant::now();
    opts.control.start_clock(start);
    if mode == Outgoing::Clone {
        report.mode = super::report::ReportMode::Clone;
    }
    let mut paused = false;
    let result = run(vm, stream, &mut opts, &mut report, start, &mut paused, mode);
    report.total_time = ms(start.elapsed());
    match result {
        Ok(channel) => {
            report.status = MigrationStatus::Completed;
            return (report, Some(channel));
        }
        Err(e) => {
            report.status = match e {
                MigrationError::Cancelled => MigrationStatus::Cancelled,
                _ => MigrationStatus::Failed,
            };
            report.error = Some(error_chain(&e));
            if !matches!(e, MigrationError::OutcomeUnknown(_)) {
                // The source runs on: at full speed again.
                let _ = vm.set_throttle(0.0);
            }
            // A guest the operator paused stays paused: only our own pause
            // is undone.
            if paused && !opts.guest_paused && !matches!(e, MigrationError::OutcomeUnknown(_)) {
                if let Err(re) = vm.resume() {
                    report.error = Some(format!(
                        "{}; and resuming the source failed too: {re}",
                        error_chain(&e)
                    ));
                }
            }
        }
    }
    (report, None)
}

/// The error and its causes on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

fn run<V: MigratableVm>(
    vm: &V,
    stream: Stream,
    opts: &mut SendOptions,
    report: &mut MigrationReport,
    start: Instant,
    paused: &mut bool,
    mode: Outgoing,
) -> Result<Channel, MigrationError> {
    let memory = vm.memory();
    stream
        .set_timeouts(Some(opts.io_timeout))
        .map_err(|e| MigrationError::Wire {
            phase: "setup".into(),
            source: e.into(),
        })?;
    let mut reader = stream.try_clone().map_err(|e| MigrationError::Wire {
        phase: "setup".into(),
        source: e.into(),
    })?;
    let mut w = BufWriter::with_capacity(
        1 << 20,
        RateLimited::shared(stream, opts.control.rate().clone()),
    );
    let limits = Limits::default();
    let wire = |phase: &str| {
        let phase = phase.to_string();
        move |source| MigrationError::Wire { phase, source }
    };

    // Handshake.
    let mut features = 0;
    if let CompressMode::Zstd(_) = opts.compress {
        features |= FEATURE_ZSTD;
    }
    if opts.verify_digest {
        features |= FEATURE_MEMORY_DIGEST;
    }
    if opts.guest_paused {
        features |= FEATURE_GUEST_PAUSED;
    }
    if opts.channels.is_some() {
        features |= FEATURE_CHANNELS;
    }
    if mode == Outgoing::Clone {
        features |= FEATURE_CLONE;
    }
    if !opts.copy_pages {
        features |= FEATURE_PAGE_CHECKSUMS;
    }
    let regions = vm_regions(memory);
    let hello = Hello::new(features, vm.vcpu_count(), vm.cpu_model(), regions);
    write_message(&mut w, &Message::Hello(hello)).map_err(wire("handshake"))?;
    w.flush().map_err(|e| wire("handshake")(e.into()))?;
    let direct_pages;
    match read_message(&mut reader, &limits).map_err(wire("handshake"))? {
        Message::HelloAck(ack) => {
            direct_pages = ack.features & FEATURE_PAGE_CHECKSUMS != 0;
            if opts.verify_digest && ack.features & FEATURE_MEMORY_DIGEST == 0 {
                return Err(MigrationError::Incompatible(
                    "destination does not support memory digests".into(),
                ));
            }
            if opts.channels.is_some() && ack.features & FEATURE_CHANNELS == 0 {
                return Err(MigrationError::Incompatible(
                    "destination does not accept several channels".into(),
                ));
            }
            if opts.guest_paused && ack.features & FEATURE_GUEST_PAUSED == 0 {
                // It would run the guest the operator paused.
                return Err(MigrationError::Incompatible(
                    "destination cannot keep a paused guest paused".into(),
                ));
            }
            if mode == Outgoing::Clone && ack.features & FEATURE_CLONE == 0 {
                // It would treat the clone as a migration and run the guest.
                return Err(MigrationError::Incompatible(
                    "destination does not take live clones".into(),
                ));
            }
        }
        other => return Err(peer_message("handshake", other)),
    }
    report.setup_time = ms(start.elapsed());
    report.status = MigrationStatus::Active;
    report.downtime_limit = Some(ms(opts.downtime_limit));
    report.max_bandwidth = opts.control.rate().get();
    // One report before the first (long) iteration, so that watchers see
    // `active` rather than `setup` for all of the full copy.
    // Live reports carry the time so far; the final one is set at the end.
    report.total_time = ms(start.elapsed());
    if let Some(p) = opts.progress.as_mut() {
        p(report);
    }

    let result = transfer(
        vm,
        &mut w,
        &mut reader,
        opts,
        report,
        start,
        paused,
        (mode, direct_pages),
    );
    if let Err(e) = &result {
        tell_peer(&mut w, e);
    }
    match result {
        Ok(digests) => Ok(Channel {
            writer: w,
            reader,
            digests,
        }),
        Err(e) => Err(why_the_peer_left(e, &mut reader)),
    }
}

/// A write that failed because the destination hung up usually follows an
/// `Error` it sent saying why (a refused page, a failed integrity check),
/// which the source, busy writing, never read. Look for it briefly and
/// report the destination's reason instead of "broken pipe".
fn why_the_peer_left(e: MigrationError, reader: &mut Stream) -> MigrationError {
    let MigrationError::Wire { phase, .. } = &e else {
        return e;
    };
    let phase = phase.clone();
    if reader
        .set_timeouts(Some(Duration::from_millis(200)))
        .is_err()
    {
        return e;
    }
    match read_message(reader, &Limits::default()) {
        Ok(Message::Error(m)) => MigrationError::PeerError {
            phase,
            code: m.code,
            message: m.message,
        },
        _ => e,
    }
}

/// Best effort: tell the destination why the migration stops, so it can say
/// so instead of reporting a closed connection.
fn tell_peer<W: Write>(w: &mut W, e: &MigrationError) {
    let code = match e {
        // The peer spoke last, or the stream is gone, or it was told already.
        MigrationError::PeerError { .. }
        | MigrationError::Wire { .. }
        | MigrationError::OutcomeUnknown(_)
        | MigrationError::DigestMismatch { .. } => return,
        MigrationError::Timeout { .. } => ErrorCode::Timeout,
        MigrationError::Cancelled | MigrationError::PolicyAbort(_) => ErrorCode::Cancelled,
        _ => ErrorCode::Internal,
    };
    let _ = write_message(w, &Message::Error(ErrorMessage::new(code, error_chain(e))));
    let _ = w.flush();
}

/// Everything after the handshake: iterations, stop-and-copy, completion.
#[allow(clippy::too_many_arguments)]
fn transfer<V: MigratableVm, W: Write>(
    vm: &V,
    mut w: &mut W,
    mut reader: &mut Stream,
    opts: &mut SendOptions,
    report: &mut MigrationReport,
    start: Instant,
    paused: &mut bool,
    (mode, direct_pages): (Outgoing, bool),
) -> Result<Option<Arc<SentDigests>>, MigrationError> {
    let memory = vm.memory();
    let limits = Limits::default();
    let wire = |phase: &str| {
        let phase = phase.to_string();
        move |source| MigrationError::Wire { phase, source }
    };

    let mut sender = PageSender::new(match opts.compress {
        CompressMode::None => None,
        CompressMode::Zstd(l) => Some(l),
    })?;
    // A cancel is honoured between page batches, the final pass's too: up
    // to `Commit` the destination cannot have run the guest.
    sender.cancel_with(Some(opts.control.clone()));
    if let Some(connector) = &opts.channels {
        let session = session_id();
        let join = Message::ChannelJoin(ChannelJoin {
            session,
            index: 0,
            count: connector.count,
        });
        write_message(&mut w, &join).map_err(wire("opening channels"))?;
        w.flush().map_err(|e| wire("opening channels")(e.into()))?;
        sender.lanes = channels::open_lanes(
            connector,
            session,
            match opts.compress {
                CompressMode::None => None,
                CompressMode::Zstd(l) => Some(l),
            },
            opts.control.rate(),
            opts.io_timeout,
            &opts.control,
        )?;
    }
    let digests = opts.skip_unchanged.then(|| {
        let pages = usize::try_from(ram_pages(memory)).expect("page count fits usize");
        Arc::new(SentDigests::new(pages))
    });
    if let Some(d) = &digests {
        sender.skip_unchanged(d.clone());
    }
    sender.send_direct(direct_pages);
    report.page_path = sender.page_path().to_string();
    let end = precopy::run(vm, &mut w, &mut sender, opts, report, start)?;
    if !opts.control.begin_switchover() {
        return Err(MigrationError::Cancelled);
    }
    let mut syncs = end.syncs;
    let mut iteration = end.iteration;
    let mut next = end.dirty;

    // Stop and copy.
    report.status = MigrationStatus::Device;
    let pause_start = Instant::now();
    vm.pause().map_err(vm_err("pause"))?;
    *paused = true;
    let paused_at = pause_start.elapsed();
    iteration += 1;
    let phase = "stop-and-copy".to_string();
    let t0 = Instant::now();
    vm.harvest_dirty_log(&mut next)
        .map_err(vm_err("dirty log sync"))?;
    syncs += 1;
    next.union_with(&end.deferred);
    let final_set = next;
    let harvested_at = pause_start.elapsed();
    let sent = send_iteration(&mut sender, &mut w, vm, iteration, &final_set, None, &phase)?;
    // The further channels carry nothing after the final pass: closing
    // them lets the destination's channel threads end.
    sender.lanes.clear();
    let sent_at = pause_start.elapsed();
    let blobs = vm.save_vcpus().map_err(vm_err("save vCPU state"))?;
    if mode == Outgoing::Clone {
        let digest = vm
            .vcpu_state_digest(&blobs)
            .map_err(vm_err("digest vCPU state"))?;
        report.vcpu_digest = Some(format!("{digest:016x}"));
    }
    let saved_at = pause_start.elapsed();
    for (index, blob) in (0u32..).zip(blobs) {
        write_message(&mut w, &Message::VcpuState(VcpuState { index, blob }))
            .map_err(wire(&phase))?;
    }
    let digest_start = Instant::now();
    let digest = if opts.verify_digest {
        Some(memory_digest(memory, vm.written_pages().as_ref())?)
    } else {
        None
    };
    report.digest_time = ms(digest_start.elapsed());
    let total_pages = ram_pages(memory);
    write_message(
        &mut w,
        &Message::Complete(Complete {
            digest,
            total_pages,
        }),
    )
    .map_err(wire(&phase))?;
    w.flush().map_err(|e| wire(&phase)(e.into()))?;
    let stats = IterationStats {
        iteration,
        dirty_pages: final_set.count(),
        pages_sent: sent.data_pages,
        zero_pages: sent.zero_pages,
        bytes_sent: sent.bytes,
        duration: t0.elapsed(),
        dirtied_during: 0,
        redirtied_pages: end.last_found.overlap_count(&final_set),
        deferred_pages: 0,
        throttle: vm.throttle(),
        ram_bytes: report.ram.total,
        page_size: PAGE_SIZE_U64,
        unchanged_pages: sent.unchanged_pages,
        ..Default::default()
    };
    report.record_iteration(&stats, true);
    report.ram.dirty_sync_count = syncs;

    let flushed_at = pause_start.elapsed();
    // Completion.
    let phase = "completion";
    let answer = read_message(&mut reader, &limits).map_err(wire(phase))?;
    let accepted_at = pause_start.elapsed();
    let gap = |a: Duration, b: Duration| ms(b.saturating_sub(a));
    report.downtime_breakdown = Some(DowntimeBreakdown {
        pause: ms(paused_at),
        harvest: gap(paused_at, harvested_at),
        final_pass: gap(harvested_at, sent_at),
        vcpu_save: gap(sent_at, saved_at),
        digest: report.digest_time,
        flush: (gap(saved_at, flushed_at) - report.digest_time).max(0.0),
        accept: gap(flushed_at, accepted_at),
        commit: 0.0,
    });
    match answer {
        Message::Accepted(acc) => {
            if let (Some(s), Some(d)) = (digest, acc.digest) {
                report.digest = Some(DigestReport {
                    source: format!("{s:016x}"),
                    destination: format!("{d:016x}"),
                    equal: s == d,
                });
                if s != d {
                    let _ = write_message(
                        &mut w,
                        &Message::Error(ErrorMessage::new(
                            ErrorCode::ProtocolViolation,
                            "memory digest mismatch; the source resumes",
                        )),
                    );
                    let _ = w.flush();
                    return Err(MigrationError::DigestMismatch {
                        source_digest: s,
                        dest_digest: d,
                    });
                }
            } else if digest.is_some() {
                return Err(MigrationError::InvalidData(
                    "destination accepted without a digest".into(),
                ));
            }
        }
        other => return Err(peer_message(phase, other)),
    }
    // A cancel up to here is honoured: the destination never got Commit.
    if !opts.control.begin_commit() {
        return Err(MigrationError::Cancelled);
    }
    if mode == Outgoing::Clone {
        return super::clone::hold_standby(vm, w, reader, opts, report, pause_start, paused)
            .map(|()| digests);
    }
    // Point of no return: once Commit may have reached the destination, the
    // source must never run the guest again.
    let committed = write_message(&mut w, &Message::Commit)
        .map_err(|e| e.to_string())
        .and_then(|_| w.flush().map_err(|e| e.to_string()));
    report.downtime = Some(ms(pause_start.elapsed()));
    if let Some(b) = report.downtime_breakdown.as_mut() {
        b.commit = ms(pause_start.elapsed().saturating_sub(accepted_at));
    }
    report.ram.remaining = 0;
    committed.map_err(|e| {
        MigrationError::OutcomeUnknown(format!("the final Commit could not be sent ({e})"))
    })?;
    crate::faults::crash_point("source-after-commit");
    // Only the destination's `Resumed` says the guest runs there. An
    // `Error` says it does not (it failed to resume and dropped its copy),
    // so this side may run it again; anything else leaves it unknown.
    match read_message(&mut reader, &limits) {
        Ok(Message::Resumed) => Ok(digests),
        Ok(Message::Error(e)) => Err(MigrationError::PeerError {
            phase: "resume on the destination".to_string(),
            code: e.code,
            message: e.message,
        }),
        Ok(other) => Err(MigrationError::OutcomeUnknown(format!(
            "the destination answered Commit with {} instead of Resumed",
            other.kind()
        ))),
        Err(e) => Err(MigrationError::OutcomeUnknown(format!(
            "Commit was sent but the destination never confirmed it resumed the guest ({})",
            error_chain(&e)
        ))),
    }
}

pub(super) fn send_iteration<V: MigratableVm, W: Write>(
    sender: &mut PageSender,
    w: &mut W,
    vm: &V,
    iteration: u32,
    set: &DirtyBitmap,
    written: Option<&DirtyBitmap>,
    phase: &str,
) -> Result<SentCounts, MigrationError> {
    if !sender.lanes.is_empty() {
        let mut lanes = std::mem::take(&mut sender.lanes);
        let sent = channels::send_sharded(
            sender,
            w,
            &mut lanes,
            vm.memory(),
            iteration,
            set,
            written,
            phase,
        );
        sender.lanes = lanes;
        return sent;
    }
    let mut sent = sender.send(w, vm.memory(), iteration, set, written, phase)?;
    let end = Message::IterationEnd(IterationEnd {
        iteration,
        pages: sent.data_pages + sent.zero_pages,
    });
    sent.bytes += write_message(w, &end).map_err(|source| MigrationError::Wire {
        phase: phase.to_string(),
        source,
    })?;
    Ok(sent)
}

fn vm_regions(memory: &vm_memory::GuestMemoryMmap) -> Vec<MemoryRegion> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    memory
        .iter()
        .map(|r| MemoryRegion {
            gpa: r.start_addr().0,
            size: r.len(),
        })
        .collect()
}

pub(super) fn vm_err(op: &'static str) -> impl Fn(super::VmOpError) -> MigrationError {
    move |source| MigrationError::Vm { op, source }
}

/// A session number for the channels of one migration: unique enough to
/// tell two migrations to one address apart (the channel's authentication,
/// not this number, keeps strangers out).
fn session_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    h.finish()
}

/// Turn a message that is not the expected answer into an error.
pub(super) fn peer_message(phase: &str, msg: Message) -> MigrationError {
    match msg {
        Message::Error(e) => MigrationError::PeerError {
            phase: phase.to_string(),
            code: e.code,
            message: e.message,
        },
        other => MigrationError::Unexpected {
            phase: phase.to_string(),
            got: other.kind(),
        },
    }
}
