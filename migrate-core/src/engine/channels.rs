//! Several channels for one migration (`--channels N`, in the spirit of
//! QEMU's multifd): the pages of every pass are split across N connections,
//! each with its own sender (and compressor) on the source and its own
//! receiving thread writing straight into guest memory on the destination.
//!
//! Setup, after `Hello`/`HelloAck` negotiated [`FEATURE_CHANNELS`]: the
//! source sends `ChannelJoin{session, 0, N}` on the main connection, opens
//! N − 1 more connections to the same address (each through the same secure
//! channel as the first) and sends `ChannelJoin{session, i, N}` first on
//! each. The destination accepts exactly those, within its I/O timeout.
//!
//! Splitting: page `p` goes to channel `(p / 512) % N`: whole 2 MiB blocks,
//! so every channel reads memory in long runs and gets an equal share of a
//! sweep, and no page is in two channels' shares of one pass.
//!
//! Ordering: a page can be in channel A's share of pass n and in channel
//! B's share of pass n + 1 (its block moves only if N changes, which it
//! never does; but a zero range and a data page of one page may not).
//! It must never happen that B writes the newer copy and A then the older
//! one. So every channel ends every pass with its own `IterationEnd`, and
//! on the destination each channel, having applied its share, waits at a
//! barrier until every channel has applied its share of that pass before
//! it reads anything of the next ([`IterationSync`]). The source needs no
//! barrier: it harvests the dirty log only after every channel has written
//! (and flushed) its share.
//!
//! Failure: a channel that fails marks the barrier failed and shuts every
//! connection of the migration down, so the main thread, blocked in a read
//! or at the barrier, sees it at once; the destination then refuses as for
//! any broken stream and never runs the guest.

use std::io::{BufReader, BufWriter, Write};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use vm_memory::GuestMemoryMmap;

use super::apply::PageApplier;
use super::in_place::read_next;
use super::pages::{PageSender, SentCounts};
use super::written::WrittenPages;
use super::MigrationError;
use crate::dirty::DirtyBitmap;
use crate::transport::{RateLimited, SharedRate, Stream};
use crate::wire::{
    read_message_into, write_message, ChannelJoin, IterationEnd, Limits, Message, Received,
    WireError,
};

/// Pages of one block, which always travels on one channel: 2 MiB.
pub const SHARD_PAGES: usize = 512;

/// How the source opens the further connections of a migration.
pub struct ChannelConnector {
    /// Channels in all (the main connection included), 2..=16.
    pub count: u16,
    /// Opens one more connection to the destination, secured as the first.
    pub connect: Box<dyn Fn() -> Result<Stream, String> + Send + Sync>,
}

/// How the destination accepts the further connections.
pub type ChannelAcceptor<'a> = &'a mut dyn FnMut() -> Result<Stream, String>;

/// Splits `set` into `n` shares by 2 MiB block (see the module docs).
#[must_use]
pub fn shard(set: &DirtyBitmap, n: usize) -> Vec<DirtyBitmap> {
    let pages = set.len();
    let mut out: Vec<DirtyBitmap> = (0..n).map(|_| DirtyBitmap::new(pages)).collect();
    for (block, first) in (0..pages).step_by(SHARD_PAGES).enumerate() {
        let len = SHARD_PAGES.min(pages - first);
        let words = set.words(first, len);
        if words.iter().any(|&w| w != 0) {
            out[block % n].merge_words(first, &words);
        }
    }
    out
}

/// One further channel of the source.
pub(super) struct Lane {
    pub(super) sender: PageSender,
    w: BufWriter<RateLimited<Stream>>,
}

/// Opens the further channels and joins them to `session`.
pub(super) fn open_lanes(
    connector: &ChannelConnector,
    session: u64,
    zstd_level: Option<i32>,
    rate: &SharedRate,
    io_timeout: Duration,
    control: &Arc<super::control::MigrationControl>,
) -> Result<Vec<Lane>, MigrationError> {
    let wire = |source| MigrationError::Wire {
        phase: "opening channels".into(),
        source,
    };
    (1..connector.count)
        .map(|index| {
            let stream = (connector.connect)().map_err(|e| {
                MigrationError::InvalidData(format!("cannot open channel {index}: {e}"))
            })?;
            stream
                .set_timeouts(Some(io_timeout))
                .map_err(|e| wire(e.into()))?;
            let mut w = BufWriter::with_capacity(
                1 << 20,
                RateLimited::shared_split(stream, rate.clone(), u32::from(connector.count)),
            );
            let join = ChannelJoin {
                session,
                index,
                count: connector.count,
            };
            write_message(&mut w, &Message::ChannelJoin(join)).map_err(wire)?;
            w.flush().map_err(|e| wire(e.into()))?;
            let mut sender = PageSender::new(zstd_level)?;
            sender.cancel_with(Some(control.clone()));
            Ok(Lane { sender, w })
        })
        .collect()
}

/// Sends one pass over the main writer and every lane in parallel, each
/// share followed by its `IterationEnd` and a flush (the destination's
/// barrier waits for every channel's end, so none may sit in a buffer).
#[allow(clippy::too_many_arguments)]
pub(super) fn send_sharded<W: Write>(
    main: &mut PageSender,
    w: &mut W,
    lanes: &mut [Lane],
    memory: &GuestMemoryMmap,
    iteration: u32,
    set: &DirtyBitmap,
    written: Option<&DirtyBitmap>,
    phase: &str,
) -> Result<SentCounts, MigrationError> {
    let shares = shard(set, lanes.len() + 1);
    let one = &|sender: &mut PageSender,
                w: &mut dyn Write,
                share: &DirtyBitmap|
     -> Result<SentCounts, MigrationError> {
        let mut w = w;
        let mut sent = sender.send(&mut w, memory, iteration, share, written, phase)?;
        let end = Message::IterationEnd(IterationEnd {
            iteration,
            pages: sent.data_pages + sent.zero_pages,
        });
        let wire = |source| MigrationError::Wire {
            phase: phase.to_string(),
            source,
        };
        sent.bytes += write_message(&mut w, &end).map_err(wire)?;
        w.flush().map_err(|e| wire(e.into()))?;
        Ok(sent)
    };
    let results: Vec<Result<SentCounts, MigrationError>> = std::thread::scope(|s| {
        let handles: Vec<_> = lanes
            .iter_mut()
            .zip(&shares[1..])
            .map(|(lane, share)| s.spawn(move || one(&mut lane.sender, &mut lane.w, share)))
            .collect();
        let mut results = vec![one(main, w, &shares[0])];
        results.extend(handles.into_iter().map(|h| {
            h.join().unwrap_or_else(|_| {
                Err(MigrationError::InvalidData(
                    "a channel's sender panicked".into(),
                ))
            })
        }));
        results
    });
    let mut total = SentCounts::default();
    for r in results {
        total.add(&r?);
    }
    Ok(total)
}

/// The destination's per-pass barrier across channels (see the module
/// docs), which can fail: then every waiter returns the failure.
pub(super) struct IterationSync {
    channels: u32,
    state: Mutex<SyncState>,
    changed: Condvar,
    /// Every connection of the migration, shut down on failure.
    streams: Mutex<Vec<Stream>>,
}

struct SyncState {
    /// Passes every channel has finished.
    passes: u32,
    /// Channels at the barrier of pass `passes`.
    arrived: u32,
    failed: Option<String>,
}

impl IterationSync {
    pub(super) fn new(channels: u32, streams: Vec<Stream>) -> Self {
        Self {
            channels,
            state: Mutex::new(SyncState {
                passes: 0,
                arrived: 0,
                failed: None,
            }),
            changed: Condvar::new(),
            streams: Mutex::new(streams),
        }
    }

    /// Wait until every channel has finished pass `iteration`.
    pub(super) fn wait(&self, iteration: u32) -> Result<(), MigrationError> {
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(why) = &st.failed {
            return Err(MigrationError::InvalidData(why.clone()));
        }
        if st.passes != iteration {
            return Err(MigrationError::InvalidData(format!(
                "a channel ended pass {iteration} while the others are at pass {}",
                st.passes
            )));
        }
        st.arrived += 1;
        if st.arrived == self.channels {
            st.arrived = 0;
            st.passes += 1;
            self.changed.notify_all();
            return Ok(());
        }
        while st.passes == iteration && st.failed.is_none() {
            st = self
                .changed
                .wait(st)
                .unwrap_or_else(PoisonError::into_inner);
        }
        match &st.failed {
            Some(why) if st.passes == iteration => Err(MigrationError::InvalidData(why.clone())),
            _ => Ok(()),
        }
    }

    /// Why the migration failed on some channel, if it did.
    pub(super) fn failure(&self) -> Option<String> {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .failed
            .clone()
    }

    /// Fail the migration on every channel (the first reason wins) and shut
    /// every connection down.
    pub(super) fn fail(&self, why: &str) {
        {
            let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            st.failed.get_or_insert_with(|| why.to_owned());
            self.changed.notify_all();
        }
        for s in self
            .streams
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            s.shutdown();
        }
    }
}

/// The destination's further channels, running.
pub(super) struct Lanes {
    pub(super) sync: Arc<IterationSync>,
    threads: Vec<JoinHandle<()>>,
}

impl Lanes {
    /// Accepts channels 1..count of `join.session` and starts a receiving
    /// thread on each. `main` is a clone of the main connection, shut down
    /// if a channel fails.
    pub(super) fn accept(
        join: ChannelJoin,
        acceptor: ChannelAcceptor<'_>,
        main: Stream,
        memory: &GuestMemoryMmap,
        written: &Arc<WrittenPages>,
        io_timeout: Duration,
        via_mapping: bool,
    ) -> Result<Self, MigrationError> {
        let limits = Limits::default();
        let mut readers = Vec::new();
        let mut clones = vec![main];
        let mut seen = vec![false; usize::from(join.count)];
        for _ in 1..join.count {
            let stream = acceptor()
                .map_err(|e| MigrationError::InvalidData(format!("channel not opened: {e}")))?;
            stream
                .set_timeouts(Some(io_timeout))
                .map_err(|e| wire_err("joining channels", e.into()))?;
            clones.push(
                stream
                    .try_clone()
                    .map_err(|e| wire_err("joining channels", e.into()))?,
            );
            let mut r = BufReader::with_capacity(super::dest::RECEIVE_BUFFER, stream);
            let first = read_message_into(&mut r, &limits, &mut Vec::new())
                .map_err(|e| wire_err("joining channels", e))?;
            let Message::ChannelJoin(j) = first else {
                return Err(MigrationError::Unexpected {
                    phase: "joining channels".into(),
                    got: first.kind(),
                });
            };
            let slot = seen.get_mut(usize::from(j.index));
            if j.session != join.session || j.count != join.count || j.index == 0 {
                return Err(MigrationError::InvalidData(format!(
                    "a connection joined as channel {} of {} of another migration",
                    j.index, j.count
                )));
            }
            match slot {
                Some(s) if !*s => *s = true,
                _ => {
                    return Err(MigrationError::InvalidData(format!(
                        "channel {} joined twice",
                        j.index
                    )))
                }
            }
            readers.push((j.index, r));
        }
        let sync = Arc::new(IterationSync::new(u32::from(join.count), clones));
        let threads = readers
            .into_iter()
            .map(|(index, r)| {
                let sync = sync.clone();
                let memory = memory.clone();
                let written = written.clone();
                std::thread::Builder::new()
                    .name(format!("channel-{index}"))
                    .spawn(move || {
                        if let Err(e) = receive_lane(r, &memory, written, &sync, via_mapping) {
                            sync.fail(&format!(
                                "channel {index}: {}",
                                super::source::error_chain(&e)
                            ));
                        }
                    })
                    .map_err(|e| MigrationError::InvalidData(format!("cannot start thread: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { sync, threads })
    }

    /// Stop (on failure) and wait for every channel thread.
    pub(super) fn finish(self, failure: Option<&str>) {
        if let Some(why) = failure {
            self.sync.fail(why);
        }
        for t in self.threads {
            let _ = t.join();
        }
    }
}

fn wire_err(phase: &str, source: WireError) -> MigrationError {
    MigrationError::Wire {
        phase: phase.to_string(),
        source,
    }
}

/// One further channel of the destination: pages, zero ranges and pass
/// ends, until the source closes it between passes.
fn receive_lane(
    mut r: BufReader<Stream>,
    memory: &GuestMemoryMmap,
    written: Arc<WrittenPages>,
    sync: &IterationSync,
    via_mapping: bool,
) -> Result<(), MigrationError> {
    let mut applier = PageApplier::sharing(written)?.via_mapping(via_mapping);
    let limits = Limits::default();
    let mut iteration = 0u32;
    let mut pages = 0u64;
    let mut started = false;
    loop {
        let phase = format!("iteration {iteration} (channel)");
        let check = |i: u32| {
            if i == iteration {
                Ok(())
            } else {
                Err(MigrationError::InvalidData(format!(
                    "data for iteration {i} while receiving iteration {iteration}"
                )))
            }
        };
        let in_place = applier.in_place();
        let msg = match read_next(&mut r, &limits, &mut applier, memory, in_place) {
            // The source closes its channels after the final pass.
            Err(WireError::ConnectionClosed) if !started => return Ok(()),
            Err(e) => return Err(wire_err(&phase, e)),
            Ok(Received::Message(m)) => m,
            Ok(Received::Placed(b)) => {
                check(b.iteration)?;
                started = true;
                pages += applier.apply_placed(memory, &b)?.0;
                continue;
            }
        };
        match msg {
            Message::Pages(b) => {
                check(b.iteration)?;
                started = true;
                pages += applier.apply_batch(memory, &b)?;
                applier.recycle(b.data);
            }
            Message::CheckedPages(b) => {
                check(b.iteration)?;
                started = true;
                pages += applier.apply_checked(memory, &b)?.0;
                applier.recycle(b.data);
            }
            Message::ZeroPages(z) => {
                check(z.iteration)?;
                started = true;
                pages += applier.apply_zeros(memory, &z)?;
            }
            Message::IterationEnd(end) => {
                check(end.iteration)?;
                if end.pages != pages {
                    return Err(MigrationError::InvalidData(format!(
                        "iteration {} announced {} pages but {pages} arrived",
                        end.iteration, end.pages
                    )));
                }
                sync.wait(iteration)?;
                iteration += 1;
                pages = 0;
                started = false;
            }
            Message::Error(e) => {
                return Err(MigrationError::PeerError {
                    phase,
                    code: e.code,
                    message: e.message,
                })
            }
            other => {
                return Err(MigrationError::Unexpected {
                    phase,
                    got: other.kind(),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_split_by_block_and_cover_the_set_once() {
        let pages = 5 * SHARD_PAGES + 100;
        let mut set = DirtyBitmap::new(pages);
        for p in (0..pages).step_by(7) {
            set.set(p);
        }
        let shares = shard(&set, 3);
        let mut union = DirtyBitmap::new(pages);
        for (i, s) in shares.iter().enumerate() {
            assert_eq!(union.overlap_count(s), 0, "shares overlap");
            union.union_with(s);
            for p in s.iter_ones() {
                assert_eq!((p / SHARD_PAGES) % 3, i);
            }
        }
        assert_eq!(union.count(), set.count());
        assert_eq!(union.overlap_count(&set), set.count());
    }

    #[test]
    fn barrier_releases_only_when_all_arrive_and_fails_everyone() {
        let sync = Arc::new(IterationSync::new(3, Vec::new()));
        let waiters: Vec<_> = (0..2)
            .map(|_| {
                let s = sync.clone();
                std::thread::spawn(move || s.wait(0))
            })
            .collect();
        std::thread::sleep(Duration::from_millis(50));
        assert!(waiters.iter().all(|h| !h.is_finished()));
        sync.wait(0).unwrap();
        for w in waiters {
            w.join().unwrap().unwrap();
        }
        // A pass number out of step is refused.
        assert!(sync.wait(5).is_err());
        let s2 = sync.clone();
        let waiter = std::thread::spawn(move || s2.wait(1));
        std::thread::sleep(Duration::from_millis(20));
        sync.fail("channel 2: broken pipe");
        let err = waiter.join().unwrap().unwrap_err();
        assert!(err.to_string().contains("broken pipe"), "{err}");
        assert!(sync.wait(1).is_err());
    }
}
