//! The destination side: a state machine over incoming messages.
//!
//! ```text
//!  AwaitHello --Hello ok--> Memory --Pages/ZeroPages/IterationEnd--> Memory
//!  Memory --VcpuState--> State --VcpuState--> State
//!  State --Complete (all vCPUs)--> Committing (vCPUs restored, Accepted sent)
//!  Committing --Commit--> Done (guest resumed, or kept paused when the
//!                                Hello had FEATURE_GUEST_PAUSED; a standby
//!                                keeps it paused and answers StandbyHeld)
//!  any --Error--> failed (peer aborted);  any --other--> failed (protocol)
//! ```
//! The guest is resumed only on `Commit`; every failure before that drops
//! the VM without having run it.

use std::io::{BufReader, BufWriter, Write};
use std::sync::Arc;

use super::apply::PageApplier;
use super::channels::{ChannelAcceptor, IterationSync, Lanes};
use super::clone::StandbySession;
use super::in_place::read_next;
use super::receive_options::{check_hello, ReceiveOptions, ReceiveOutcome};
use super::source::peer_message;
use super::{memory_digest, MigratableVm, MigrationError, VmOpError};
use crate::transport::Stream;
use crate::wire::{
    read_message, write_message, Accepted, ChannelJoin, ErrorCode, ErrorMessage, Hello, HelloAck,
    Limits, Message, MessageKind, PlacedBatch, Received, FEATURES_KNOWN, FEATURE_CHANNELS,
    FEATURE_GUEST_PAUSED, FEATURE_MEMORY_DIGEST,
};

/// The read buffer of each connection of the destination. Small on
/// purpose: page data is read past it (a batch's buffer, or guest memory
/// in place) once it is drained, and what it holds of a frame's pages when
/// that frame starts is copied once more. It fills when the small parts
/// are read (header, gpas, trailer), so a buffer of 8 KiB takes at most
/// two pages of a 32-page frame; one of 64 KiB took half of them, and one
/// of 1 MiB every page.
pub(super) const RECEIVE_BUFFER: usize = 8 << 10;

/// Where the receiver is in the exchange.
enum Phase {
    /// Pages, zero ranges and iteration ends.
    Memory,
    /// vCPU states after the final pass.
    State,
    /// `Accepted` sent; only `Commit` may follow.
    Committing,
}

impl Phase {
    fn name(&self) -> &'static str {
        match self {
            Phase::Memory => "memory transfer",
            Phase::State => "vCPU state transfer",
            Phase::Committing => "completion",
        }
    }
}

/// Receive one migration on `stream`. `make_vm` builds the VM the `Hello`
/// describes (after the checks here passed). On success the guest runs.
/// A source asking for several channels is refused (see
/// [`receive_migration_with_channels`]).
pub fn receive_migration<V: MigratableVm>(
    stream: Stream,
    opts: &ReceiveOptions,
    make_vm: impl FnOnce(&Hello) -> Result<V, VmOpError>,
) -> Result<ReceiveOutcome<V>, MigrationError> {
    receive_migration_with_channels(stream, opts, None, make_vm)
}

/// [`receive_migration`], accepting the further connections of a
/// multi-channel migration with `acceptor` (see [`super::channels`]).
pub fn receive_migration_with_channels<V: MigratableVm>(
    stream: Stream,
    opts: &ReceiveOptions,
    mut acceptor: Option<ChannelAcceptor<'_>>,
    make_vm: impl FnOnce(&Hello) -> Result<V, VmOpError>,
) -> Result<ReceiveOutcome<V>, MigrationError> {
    let wire = |phase: &str| {
        let phase = phase.to_string();
        move |source| MigrationError::Wire { phase, source }
    };
    stream
        .set_timeouts(Some(opts.io_timeout))
        .map_err(|e| wire("setup")(e.into()))?;
    let writer = stream.try_clone().map_err(|e| wire("setup")(e.into()))?;
    let mut w = BufWriter::new(writer);
    let mut r = BufReader::with_capacity(RECEIVE_BUFFER, stream);
    let limits = Limits::default();

    let hello = match read_message(&mut r, &limits).map_err(wire("handshake"))? {
        Message::Hello(h) => h,
        other => return Err(peer_message("handshake", other)),
    };
    let vm = match check_hello(&hello, opts).and_then(|()| {
        make_vm(&hello).map_err(|source| MigrationError::Vm {
            op: "create VM",
            source,
        })
    }) {
        Ok(vm) => vm,
        Err(e) => {
            refuse(&mut w, &e);
            return Err(e);
        }
    };
    if vm.cpu_model() != hello.cpu_model {
        let e = MigrationError::Incompatible(format!(
            "CPU model differs: source {:?}, destination {:?}",
            hello.cpu_model,
            vm.cpu_model()
        ));
        refuse(&mut w, &e);
        return Err(e);
    }
    let known = if acceptor.is_some() {
        FEATURES_KNOWN
    } else {
        FEATURES_KNOWN & !FEATURE_CHANNELS
    };
    let ack = HelloAck::negotiate(&hello, known);
    write_message(&mut w, &Message::HelloAck(ack)).map_err(wire("handshake"))?;
    w.flush().map_err(|e| wire("handshake")(e.into()))?;

    let mut rx = Receiver {
        applier: PageApplier::new(
            usize::try_from(crate::vm::ram_pages(vm.memory())).expect("page count fits usize"),
        )?
        .via_mapping(vm.ram_prefaulted()),
        phase: Phase::Memory,
        iteration: 0,
        iteration_pages: 0,
        total_pages: 0,
        iterations: 0,
        vcpus: vec![None; usize::try_from(hello.vcpu_count).expect("vCPU count fits usize")],
        digest_wanted: hello.features & FEATURE_MEMORY_DIGEST != 0,
        digest: None,
        channels_allowed: ack.features & FEATURE_CHANNELS != 0,
        sync: None,
        rss_before_resume: None,
    };
    let mut lanes: Option<Lanes> = None;
    let result = receive_loop(
        &vm,
        &mut rx,
        &mut r,
        &mut w,
        &mut lanes,
        &mut acceptor,
        opts,
        &hello,
    );
    if let Some(l) = lanes {
        l.finish(result.as_ref().err().map(|e| e.to_string()).as_deref());
    }
    let torn_pages = rx.applier.written().torn_total();
    let pages_in_place = rx.applier.written().placed_total();
    let (paused, standby) = match result? {
        Ended::Resumed { paused } => (paused, None),
        Ended::Standby => {
            let total_pages = crate::vm::ram_pages(vm.memory());
            let session = StandbySession {
                reader: r,
                writer: w,
                vcpu_count: rx.vcpus.len(),
                applier: rx.applier,
                total_pages,
                epoch: 0,
                output: Default::default(),
            };
            (true, Some(session))
        }
    };
    Ok(ReceiveOutcome {
        vm,
        iterations: rx.iterations,
        pages: rx.total_pages,
        digest: rx.digest,
        rss_before_resume: rx.rss_before_resume,
        torn_pages,
        pages_in_place,
        paused,
        standby,
    })
}

/// How the message loop ended successfully.
enum Ended {
    /// The guest is this side's now (`paused`: it was kept paused).
    Resumed { paused: bool },
    /// A live clone: the copy is held as a standby, paused.
    Standby,
}

/// The message loop after the handshake; returns how it ended.
#[allow(clippy::too_many_arguments)]
fn receive_loop<V: MigratableVm>(
    vm: &V,
    rx: &mut Receiver,
    r: &mut BufReader<Stream>,
    w: &mut BufWriter<Stream>,
    lanes: &mut Option<Lanes>,
    acceptor: &mut Option<ChannelAcceptor<'_>>,
    opts: &ReceiveOptions,
    hello: &Hello,
) -> Result<Ended, MigrationError> {
    let limits = Limits::default();
    let wire = |phase: &str| {
        let phase = phase.to_string();
        move |source| MigrationError::Wire { phase, source }
    };
    loop {
        let phase = rx.phase.name();
        // Pages go in place only while pages are expected.
        let in_place = rx.applier.in_place() && matches!(rx.phase, Phase::Memory);
        let msg = match read_next(r, &limits, &mut rx.applier, vm.memory(), in_place) {
            Ok(Received::Message(m)) => m,
            Ok(Received::Placed(b)) => match rx.placed(vm, &b) {
                Ok(()) => continue,
                Err(e) => {
                    refuse(w, &e);
                    return Err(e);
                }
            },
            Err(e) => {
                // A channel that failed shut this stream down: its reason
                // is the one to give.
                let e = match lanes.as_ref().and_then(|l| l.sync.failure()) {
                    Some(why) => MigrationError::InvalidData(why),
                    None => wire(phase)(e),
                };
                refuse(w, &e);
                return Err(e);
            }
        };
        match rx.step(vm, msg) {
            Ok(Step::Continue) => {}
            Ok(Step::OpenChannels(join)) => {
                let accepted = match acceptor.as_mut() {
                    Some(a) => w
                        .get_ref()
                        .try_clone()
                        .map_err(|e| wire("joining channels")(e.into()))
                        .and_then(|main| {
                            Lanes::accept(
                                join,
                                &mut **a,
                                main,
                                vm.memory(),
                                rx.applier.written(),
                                opts.io_timeout,
                                vm.ram_prefaulted(),
                            )
                        }),
                    None => Err(MigrationError::InvalidData(
                        "several channels were not negotiated".into(),
                    )),
                };
                match accepted {
                    Ok(l) => {
                        rx.sync = Some(l.sync.clone());
                        *lanes = Some(l);
                    }
                    Err(e) => {
                        refuse(w, &e);
                        return Err(e);
                    }
                }
            }
            Ok(Step::Reply(m)) => {
                if let Some(l) = lanes.take() {
                    // Every pass is in (the final one passed the barrier):
                    // the channels are closed or closing.
                    l.finish(None);
                }
                write_message(w, &m).map_err(wire(phase))?;
                w.flush().map_err(|e| wire(phase)(e.into()))?;
                if matches!(m, Message::Accepted(_)) {
                    crate::faults::crash_point("dest-after-accepted");
                }
            }
            Ok(Step::Resume) if opts.standby => {
                // The copy is verified and the primary has let it go: hold
                // it, paused. Only a later failover may run it.
                if let Some(l) = lanes.take() {
                    l.finish(None);
                }
                write_message(w, &Message::StandbyHeld).map_err(wire("clone hand-over"))?;
                w.flush().map_err(|e| wire("clone hand-over")(e.into()))?;
                rx.rss_before_resume = resident_bytes(vm.memory());
                return Ok(Ended::Standby);
            }
            Ok(Step::Resume) => {
                rx.rss_before_resume = resident_bytes(vm.memory());
                // A guest paused on the source stays paused here until
                // the operator resumes it.
                let paused = hello.features & FEATURE_GUEST_PAUSED != 0;
                if !paused {
                    if let Err(source) = vm.resume() {
                        // The guest does not run here: say so, and the
                        // source, which is still paused, resumes it.
                        let e = MigrationError::Vm {
                            op: "resume",
                            source,
                        };
                        refuse(w, &e);
                        return Err(e);
                    }
                }
                crate::faults::crash_point("dest-after-resume");
                // The guest is ours now. If the source cannot hear this it
                // reports the outcome as unknown and stays paused; the guest
                // runs here either way.
                if write_message(w, &Message::Resumed).is_ok() {
                    let _ = w.flush();
                }
                return Ok(Ended::Resumed { paused });
            }
            Err(e) => {
                if !matches!(e, MigrationError::PeerError { .. }) {
                    refuse(w, &e);
                }
                return Err(e);
            }
        }
    }
}

/// Tell the source why we stop (best effort: it may be gone already).
fn refuse<W: Write>(w: &mut W, e: &MigrationError) {
    let code = match e {
        MigrationError::Incompatible(_) => ErrorCode::LayoutMismatch,
        MigrationError::Vm { .. } => ErrorCode::Internal,
        // WrongMode, like every refusal of the stream itself.
        _ => ErrorCode::ProtocolViolation,
    };
    let text = super::source::error_chain(e);
    let text: String = text.chars().take(1000).collect();
    let _ = write_message(w, &Message::Error(ErrorMessage::new(code, text)));
    let _ = w.flush();
}

enum Step {
    Continue,
    /// The source announced further channels: accept them.
    OpenChannels(ChannelJoin),
    Reply(Message),
    Resume,
}

struct Receiver {
    applier: PageApplier,
    phase: Phase,
    iteration: u32,
    iteration_pages: u64,
    total_pages: u64,
    iterations: u32,
    vcpus: Vec<Option<Vec<u8>>>,
    digest_wanted: bool,
    digest: Option<u64>,
    /// `FEATURE_CHANNELS` was negotiated.
    channels_allowed: bool,
    /// The barrier of the further channels, once they joined.
    sync: Option<Arc<IterationSync>>,
    rss_before_resume: Option<u64>,
}

impl Receiver {
    /// `CheckedPages` received in place (`engine/in_place.rs`).
    fn placed<V: MigratableVm>(&mut self, vm: &V, b: &PlacedBatch) -> Result<(), MigrationError> {
        self.check_iteration(b.iteration)?;
        self.iteration_pages += self.applier.apply_placed(vm.memory(), b)?.0;
        Ok(())
    }

    fn step<V: MigratableVm>(&mut self, vm: &V, msg: Message) -> Result<Step, MigrationError> {
        let phase = self.phase.name();
        let unexpected = |got: MessageKind| MigrationError::Unexpected {
            phase: phase.to_string(),
            got,
        };
        match (&self.phase, msg) {
            (_, Message::Error(e)) => Err(MigrationError::PeerError {
                phase: phase.to_string(),
                code: e.code,
                message: e.message,
            }),
            (Phase::Memory, Message::Pages(b)) => {
                self.check_iteration(b.iteration)?;
                self.iteration_pages += self.applier.apply_batch(vm.memory(), &b)?;
                self.applier.recycle(b.data);
                Ok(Step::Continue)
            }
            (Phase::Memory, Message::CheckedPages(b)) => {
                self.check_iteration(b.iteration)?;
                let (pages, _torn) = self.applier.apply_checked(vm.memory(), &b)?;
                self.iteration_pages += pages;
                self.applier.recycle(b.data);
                Ok(Step::Continue)
            }
            (Phase::Memory, Message::ZeroPages(z)) => {
                self.check_iteration(z.iteration)?;
                self.iteration_pages += self.applier.apply_zeros(vm.memory(), &z)?;
                Ok(Step::Continue)
            }
            (Phase::Memory, Message::IterationEnd(end)) => {
                self.check_iteration(end.iteration)?;
                if end.pages != self.iteration_pages {
                    return Err(MigrationError::InvalidData(format!(
                        "iteration {} announced {} pages but {} arrived",
                        end.iteration, end.pages, self.iteration_pages
                    )));
                }
                if let Some(sync) = &self.sync {
                    // Not a page of the next pass before every channel
                    // applied its share of this one.
                    sync.wait(end.iteration)?;
                }
                self.total_pages += self.iteration_pages;
                self.iteration_pages = 0;
                self.iterations += 1;
                self.iteration = end.iteration + 1;
                Ok(Step::Continue)
            }
            (Phase::Memory | Phase::State, Message::VcpuState(s)) => {
                if self.iteration_pages != 0 {
                    return Err(MigrationError::InvalidData(
                        "vCPU state before the last iteration ended".into(),
                    ));
                }
                self.phase = Phase::State;
                let slot = usize::try_from(s.index)
                    .ok()
                    .and_then(|i| self.vcpus.get_mut(i))
                    .ok_or_else(|| {
                        MigrationError::InvalidData(format!("state for unknown vCPU {}", s.index))
                    })?;
                if slot.replace(s.blob).is_some() {
                    return Err(MigrationError::InvalidData(format!(
                        "state for vCPU {} sent twice",
                        s.index
                    )));
                }
                Ok(Step::Continue)
            }
            (Phase::State, Message::VmState(_)) => Ok(Step::Continue),
            (Phase::State, Message::Complete(c)) => {
                let blobs: Option<Vec<Vec<u8>>> = self.vcpus.iter_mut().map(Option::take).collect();
                let blobs = blobs.ok_or_else(|| {
                    MigrationError::InvalidData("Complete before every vCPU's state".into())
                })?;
                let pages = crate::vm::ram_pages(vm.memory());
                if c.total_pages != pages {
                    return Err(MigrationError::InvalidData(format!(
                        "source counts {} pages, destination has {pages}",
                        c.total_pages
                    )));
                }
                if let (n @ 1.., Some(first)) = self.applier.written().torn() {
                    return Err(MigrationError::InvalidData(format!(
                        "{n} pages failed their CRC (changed while sent, or damaged on the way) \
                         and were never sent again; the first is at {:#x}",
                        first as u64 * crate::wire::PAGE_SIZE as u64
                    )));
                }
                let t0 = std::time::Instant::now();
                vm.restore_vcpus(blobs)
                    .map_err(|source| MigrationError::Vm {
                        op: "restore vCPU state",
                        source,
                    })?;
                tracing::debug!(restore = ?t0.elapsed(), "vCPU state restored");
                if self.digest_wanted != c.digest.is_some() {
                    return Err(MigrationError::InvalidData(
                        "digest presence differs from the negotiated features".into(),
                    ));
                }
                self.digest = if self.digest_wanted {
                    Some(memory_digest(
                        vm.memory(),
                        Some(&self.applier.written().snapshot()),
                    )?)
                } else {
                    None
                };
                self.phase = Phase::Committing;
                Ok(Step::Reply(Message::Accepted(Accepted {
                    digest: self.digest,
                })))
            }
            (Phase::Committing, Message::Commit) => {
                // The pages written here are this VM's written set from now
                // on (a later migration of it skips the others).
                vm.note_written(&self.applier.written().snapshot());
                Ok(Step::Resume)
            }
            (Phase::Memory, Message::ChannelJoin(j))
                if self.channels_allowed
                    && self.sync.is_none()
                    && j.index == 0
                    && self.iteration == 0
                    && self.iteration_pages == 0 =>
            {
                Ok(Step::OpenChannels(j))
            }
            (_, Message::Heartbeat) => Ok(Step::Continue),
            (_, other) => Err(unexpected(other.kind())),
        }
    }

    fn check_iteration(&self, iteration: u32) -> Result<(), MigrationError> {
        if iteration != self.iteration {
            return Err(MigrationError::InvalidData(format!(
                "data for iteration {iteration} while receiving iteration {}",
                self.iteration
            )));
        }
        Ok(())
    }
}

/// Memory this process holds, in bytes: its private resident pages
/// (`/proc/self/statm`: resident − shared) plus every page of guest RAM
/// allocated in the memfd behind `memory`. Guest pages written with
/// `pwrite` are in the memfd but not mapped until the guest touches them,
/// so the plain resident count would leave them out.
pub fn resident_bytes(memory: &vm_memory::GuestMemoryMmap) -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let mut fields = statm.split_whitespace().skip(1);
    let resident: u64 = fields.next()?.parse().ok()?;
    let shared: u64 = fields.next()?.parse().ok()?;
    let private = resident.saturating_sub(shared) * 4096;
    Some(private + crate::vm::memory::allocated_bytes(memory).unwrap_or(0))
}
