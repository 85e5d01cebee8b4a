//! Engine tests on a memory-only fake VM over a Unix socket pair: the
//! protocol and bookkeeping without KVM. (The same engine on real KVM guests
//! is tested end to end in `tests/`.)

use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::transport::Stream;
use crate::vm::memory::{map_memory, slot_layout};

struct FakeVm {
    memory: GuestMemoryMmap,
    dirty: Mutex<DirtyBitmap>,
    running: AtomicBool,
    vcpus: Mutex<Vec<Vec<u8>>>,
    fail_resume: bool,
    throttle: Mutex<f64>,
    /// Held by the "guest" while it writes, taken by `pause`: once paused,
    /// no write is in flight, as with real vCPUs out of KVM_RUN.
    gate: Mutex<()>,
    /// Set by every `pause`, never cleared: a "guest" can stop for good at
    /// the first pause.
    paused_once: AtomicBool,
    /// COM1, for output commit (`tests/failover.rs`).
    ports: crate::vm::ports::PortBus,
    /// Claims RAM allocated ahead, so a destination receives pages in
    /// place (`engine/in_place.rs`).
    prefaulted: bool,
}

impl FakeVm {
    fn new(size: u64) -> Self {
        let memory = map_memory(&slot_layout(size).unwrap()).unwrap();
        let pages = usize::try_from(size / 4096).unwrap();
        Self {
            memory,
            dirty: Mutex::new(DirtyBitmap::new(pages)),
            running: AtomicBool::new(false),
            vcpus: Mutex::new(vec![b"vcpu0-state".to_vec(), b"vcpu1".to_vec()]),
            fail_resume: false,
            throttle: Mutex::new(0.0),
            gate: Mutex::new(()),
            paused_once: AtomicBool::new(false),
            ports: crate::vm::ports::PortBus::new(Box::new(std::io::sink())),
            prefaulted: false,
        }
    }

    /// A VM whose RAM counts as allocated ahead (`--prefault`).
    fn prefaulted(mut self) -> Self {
        self.prefaulted = true;
        self
    }

    /// Run one step of the "guest" if it is running; false once paused.
    fn guest_step(&self, step: impl FnOnce(&Self)) -> bool {
        let _g = self.gate.lock().unwrap();
        if !self.running.load(Ordering::SeqCst) {
            return false;
        }
        step(self);
        true
    }

    /// A "guest" write: changes memory and marks the page dirty, as KVM would.
    fn guest_write(&self, page: usize, value: u64) {
        self.memory
            .write_obj(value, GuestAddress(page as u64 * 4096 + 8))
            .unwrap();
        self.dirty.lock().unwrap().set(page);
    }
}

impl MigratableVm for FakeVm {
    fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }
    fn ram_prefaulted(&self) -> bool {
        self.prefaulted
    }
    fn vcpu_count(&self) -> u32 {
        2
    }
    fn cpu_model(&self) -> String {
        "fake".into()
    }
    fn serial_ports(&self) -> Option<&crate::vm::ports::PortBus> {
        Some(&self.ports)
    }
    fn harvest_dirty_log(&self, into: &mut DirtyBitmap) -> Result<(), VmOpError> {
        let mut d = self.dirty.lock().unwrap();
        into.union_with(&d);
        d.clear();
        Ok(())
    }
    fn pause(&self) -> Result<(), VmOpError> {
        self.running.store(false, Ordering::SeqCst);
        self.paused_once.store(true, Ordering::SeqCst);
        drop(self.gate.lock().unwrap());
        Ok(())
    }
    fn resume(&self) -> Result<(), VmOpError> {
        if self.fail_resume {
            return Err("cannot resume".into());
        }
        self.running.store(true, Ordering::SeqCst);
        Ok(())
    }
    fn set_throttle(&self, fraction: f64) -> Result<(), VmOpError> {
        *self.throttle.lock().unwrap() = fraction;
        Ok(())
    }
    fn throttle(&self) -> f64 {
        *self.throttle.lock().unwrap()
    }
    fn save_vcpus(&self) -> Result<Vec<Vec<u8>>, VmOpError> {
        Ok(self.vcpus.lock().unwrap().clone())
    }
    fn restore_vcpus(&self, blobs: Vec<Vec<u8>>) -> Result<(), VmOpError> {
        *self.vcpus.lock().unwrap() = blobs;
        Ok(())
    }
}

fn options(compress: CompressMode) -> SendOptions {
    SendOptions {
        policy: policy::by_name("xen", &policy::PolicyParams::default()).unwrap(),
        compress,
        timeout: None,
        timeout_action: Default::default(),
        verify_digest: true,
        io_timeout: Duration::from_secs(10),
        downtime_limit: policy::DEFAULT_DOWNTIME_LIMIT,
        control: Arc::new(MigrationControl::new(None)),
        downtime_ramp: None,
        guest_paused: false,
        progress: None,
        destination: "test".into(),
        channels: None,
        copy_pages: false,
        skip_unchanged: false,
    }
}

const SIZE: u64 = 8 << 20;

/// Source with content, a guest thread dirtying pages while it runs.
fn migrate_with_guest(compress: CompressMode) -> (Arc<FakeVm>, MigrationReport, FakeVm) {
    migrate_with_guest_opts(options(compress))
}

/// [`migrate_with_guest`] with these options.
fn migrate_with_guest_opts(opts: SendOptions) -> (Arc<FakeVm>, MigrationReport, FakeVm) {
    let src = Arc::new(FakeVm::new(SIZE));
    for page in (0..2048).step_by(3) {
        src.guest_write(page, page as u64 * 7 + 1);
    }
    src.running.store(true, Ordering::SeqCst);
    let guest_vm = src.clone();
    let guest = std::thread::spawn(move || {
        let mut n = 0u64;
        while guest_vm.guest_step(|vm| {
            n += 1;
            vm.guest_write(usize::try_from(n * 13 % 2048).unwrap(), n);
        }) {}
    });
    let (a, b) = UnixStream::pair().unwrap();
    let dest = std::thread::spawn(move || {
        receive_migration(Stream::Unix(b), &ReceiveOptions::default(), |_| {
            Ok(FakeVm::new(SIZE))
        })
    });
    let report = send_migration(&*src, Stream::Unix(a), opts);
    guest.join().unwrap();
    let outcome = dest.join().unwrap().unwrap();
    (src, report, outcome.vm)
}

fn assert_same_memory(a: &FakeVm, b: &FakeVm) {
    let len = usize::try_from(SIZE).unwrap();
    let mut x = vec![0u8; len];
    let mut y = vec![0u8; len];
    a.memory.read_slice(&mut x, GuestAddress(0)).unwrap();
    b.memory.read_slice(&mut y, GuestAddress(0)).unwrap();
    assert!(x == y, "guest memory differs after migration");
}

#[test]
fn migrates_a_running_guest_byte_identical() {
    for compress in [CompressMode::None, CompressMode::Zstd(1)] {
        let (src, report, dst) = migrate_with_guest(compress);
        assert_eq!(report.status, MigrationStatus::Completed, "{report:?}");
        assert!(
            !src.running.load(Ordering::SeqCst),
            "source must stay paused"
        );
        assert!(dst.running.load(Ordering::SeqCst), "destination must run");
        assert_same_memory(&src, &dst);
        assert_eq!(*dst.vcpus.lock().unwrap(), *src.vcpus.lock().unwrap());
        let digest = report.digest.clone().unwrap();
        assert!(digest.equal);
        assert!(report.iterations.len() >= 2);
        assert!(report.iterations.last().unwrap().final_pass);
        assert_eq!(
            report.ram.duplicate + report.ram.normal,
            report
                .iterations
                .iter()
                .map(|i| i.pages_sent + i.zero_pages)
                .sum::<u64>()
        );
    }
}

#[test]
fn vanished_destination_leaves_source_running() {
    let src = FakeVm::new(SIZE);
    src.running.store(true, Ordering::SeqCst);
    let (a, b) = UnixStream::pair().unwrap();
    // The destination reads the Hello and a little more, then disappears.
    let dest = std::thread::spawn(move || {
        let mut s = Stream::Unix(b);
        let _ = crate::wire::read_message(&mut s, &crate::wire::Limits::default());
    });
    let report = send_migration(&src, Stream::Unix(a), options(CompressMode::None));
    dest.join().unwrap();
    assert_eq!(report.status, MigrationStatus::Failed);
    assert!(
        report.error.as_deref().unwrap().contains("handshake"),
        "{report:?}"
    );
    assert!(src.running.load(Ordering::SeqCst));
}

#[test]
fn destination_refuses_garbage_and_never_resumes() {
    let (mut a, b) = UnixStream::pair().unwrap();
    let dest = std::thread::spawn(move || {
        receive_migration(Stream::Unix(b), &ReceiveOptions::default(), |_| {
            Ok(FakeVm::new(SIZE))
        })
    });
    use std::io::Write;
    a.write_all(&[0x55; 64]).unwrap();
    let err = dest.join().unwrap().err().expect("garbage must fail");
    assert!(matches!(err, MigrationError::Wire { .. }), "{err}");
}

#[test]
fn destination_refuses_a_layout_it_does_not_build() {
    let (a, b) = UnixStream::pair().unwrap();
    let opts = ReceiveOptions {
        expect_mem: Some(SIZE * 2),
        ..Default::default()
    };
    let dest = std::thread::spawn(move || {
        receive_migration(Stream::Unix(b), &opts, |_| Ok(FakeVm::new(SIZE)))
    });
    let src = FakeVm::new(SIZE);
    src.running.store(true, Ordering::SeqCst);
    let report = send_migration(&src, Stream::Unix(a), options(CompressMode::None));
    assert!(matches!(
        dest.join().unwrap(),
        Err(MigrationError::Incompatible(_))
    ));
    assert_eq!(report.status, MigrationStatus::Failed);
    assert!(report.error.unwrap().contains("expects"));
    assert!(src.running.load(Ordering::SeqCst));
}

/// A policy that never stops: QEMU's rule on a guest that never converges.
struct Never;
impl policy::ConvergencePolicy for Never {
    fn name(&self) -> &'static str {
        "never"
    }
    fn decide(&mut self, _: &policy::MigrationHistory) -> policy::Decision {
        policy::Decision::Continue
    }
}

#[test]
fn timeout_fails_the_migration_and_the_source_runs_on() {
    let src = Arc::new(FakeVm::new(SIZE));
    src.running.store(true, Ordering::SeqCst);
    let guest_vm = src.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let guest = std::thread::spawn(move || {
        let mut n = 0u64;
        while !stop2.load(Ordering::SeqCst) {
            n += 1;
            guest_vm.guest_write(usize::try_from(n % 2048).unwrap(), n);
        }
    });
    let (a, b) = UnixStream::pair().unwrap();
    let dest = std::thread::spawn(move || {
        receive_migration(Stream::Unix(b), &ReceiveOptions::default(), |_| {
            Ok(FakeVm::new(SIZE))
        })
    });
    let mut opts = options(CompressMode::None);
    opts.policy = Box::new(Never);
    opts.timeout = Some(Duration::from_millis(300));
    let report = send_migration(&*src, Stream::Unix(a), opts);
    stop.store(true, Ordering::SeqCst);
    guest.join().unwrap();
    assert_eq!(report.status, MigrationStatus::Failed);
    assert!(
        report.error.as_deref().unwrap().contains("timed out"),
        "{report:?}"
    );
    // It iterated until the timeout (how often depends on the machine).
    assert!(!report.iterations.is_empty());
    assert!(report.downtime.is_none(), "the guest was never paused");
    assert!(src.running.load(Ordering::SeqCst));
    // The destination is told why, and never resumes.
    let err = dest.join().unwrap().err().expect("destination must fail");
    assert!(
        matches!(
            err,
            MigrationError::PeerError {
                code: crate::wire::ErrorCode::Timeout,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn timeout_with_force_finishes_byte_identical() {
    let mut opts = options(CompressMode::None);
    opts.policy = Box::new(Never);
    opts.timeout = Some(Duration::from_millis(300));
    opts.timeout_action = TimeoutAction::Force;
    let (src, report, dst) = migrate_with_guest_opts(opts);
    assert_eq!(report.status, MigrationStatus::Completed, "{report:?}");
    assert!(
        report.stop_reason.as_deref().unwrap().contains("forced"),
        "{report:?}"
    );
    assert!(report.downtime.is_some());
    assert!(report.digest.as_ref().unwrap().equal);
    assert_same_memory(&src, &dst);
}

/// Throttles from iteration 1, defers the writable working set, stops after
/// iteration 4: exercises both engine paths.
struct ThrottleAndDefer;
impl policy::ConvergencePolicy for ThrottleAndDefer {
    fn name(&self) -> &'static str {
        "throttle-and-defer"
    }
    fn decide(&mut self, h: &policy::MigrationHistory) -> policy::Decision {
        match h.last().map_or(0, |s| s.iteration) {
            0 => policy::Decision::Continue,
            1..=3 => policy::Decision::Throttle(0.2),
            _ => policy::Decision::StopAndCopy(policy::StopReason::Other("test".into())),
        }
    }
    fn defer_writable_working_set(&self) -> bool {
        true
    }
}

#[test]
fn deferred_pages_and_throttle_still_give_identical_memory() {
    let src = Arc::new(FakeVm::new(SIZE));
    src.running.store(true, Ordering::SeqCst);
    let guest_vm = src.clone();
    let guest = std::thread::spawn(move || {
        // A hot set of 64 pages rewritten all the time, plus a slow sweep.
        let mut n = 0u64;
        while guest_vm.guest_step(|vm| {
            n += 1;
            vm.guest_write(usize::try_from(100 + n % 64).unwrap(), n);
            if n.is_multiple_of(50) {
                vm.guest_write(usize::try_from(300 + (n / 50) % 1500).unwrap(), n);
            }
        }) {}
    });
    let (a, b) = UnixStream::pair().unwrap();
    let dest = std::thread::spawn(move || {
        receive_migration(Stream::Unix(b), &ReceiveOptions::default(), |_| {
            Ok(FakeVm::new(SIZE))
        })
    });
    let mut opts = options(CompressMode::None);
    opts.policy = Box::new(ThrottleAndDefer);
    let report = send_migration(&*src, Stream::Unix(a), opts);
    guest.join().unwrap();
    let dst = dest.join().unwrap().unwrap().vm;
    assert_eq!(report.status, MigrationStatus::Completed, "{report:?}");
    assert_same_memory(&src, &dst);
    assert!((report.cpu_throttle_percentage - 20.0).abs() < 1e-9);
    assert!((*src.throttle.lock().unwrap() - 0.2).abs() < 1e-9);
    // Pages were held back in some iteration, and none was lost for it.
    assert!(
        report.iterations.iter().any(|i| i.deferred_pages > 0),
        "{:?}",
        report.iterations
    );
    assert!(report.digest.unwrap().equal);
}

#[test]
fn digest_skips_unwritten_pages_and_catches_one_wrong_byte() {
    let a = FakeVm::new(SIZE);
    let b = FakeVm::new(SIZE);
    for vm in [&a, &b] {
        vm.guest_write(3, 0xdead);
        vm.guest_write(700, 0xbeef);
    }
    // `b` also "wrote" a page that is zero again: still the same memory.
    b.guest_write(900, 0);
    let pages = usize::try_from(SIZE / 4096).unwrap();
    let mut written = DirtyBitmap::new(pages);
    written.set(3);
    written.set(700);
    let full_a = memory_digest(&a.memory, None).unwrap();
    assert_eq!(full_a, memory_digest(&a.memory, Some(&written)).unwrap());
    assert_eq!(full_a, memory_digest(&b.memory, None).unwrap());
    // The same content one page further on is a different memory.
    let c = FakeVm::new(SIZE);
    c.guest_write(4, 0xdead);
    c.guest_write(700, 0xbeef);
    assert_ne!(full_a, memory_digest(&c.memory, None).unwrap());
    // One flipped byte changes the digest.
    b.memory
        .write_obj(1u8, GuestAddress(700 * 4096 + 100))
        .unwrap();
    assert_ne!(full_a, memory_digest(&b.memory, None).unwrap());
}

/// Records the downtime limit it is given before each decision; stops
/// after `stop_after` iterations.
struct Recording {
    limits: Arc<Mutex<Vec<Duration>>>,
    current: Duration,
    stop_after: usize,
}
impl policy::ConvergencePolicy for Recording {
    fn name(&self) -> &'static str {
        "recording"
    }
    fn decide(&mut self, h: &policy::MigrationHistory) -> policy::Decision {
        self.limits.lock().unwrap().push(self.current);
        if h.len() >= self.stop_after {
            policy::Decision::StopAndCopy(policy::StopReason::Other("enough".into()))
        } else {
            policy::Decision::Continue
        }
    }
    fn set_downtime_limit(&mut self, limit: Duration) {
        self.current = limit;
    }
}

/// Migrate an idle fake guest with `opts`; the destination's outcome.
fn migrate_idle(
    src: &FakeVm,
    opts: SendOptions,
) -> (
    MigrationReport,
    Result<ReceiveOutcome<FakeVm>, MigrationError>,
) {
    let (a, b) = UnixStream::pair().unwrap();
    let dest = std::thread::spawn(move || {
        receive_migration(Stream::Unix(b), &ReceiveOptions::default(), |_| {
            Ok(FakeVm::new(SIZE))
        })
    });
    let report = send_migration(src, Stream::Unix(a), opts);
    (report, dest.join().unwrap())
}

#[test]
fn the_ramp_steps_each_iteration_until_a_set_limit_takes_over() {
    let src = FakeVm::new(SIZE);
    src.running.store(true, Ordering::SeqCst);
    let limits = Arc::new(Mutex::new(Vec::new()));
    let mut opts = options(CompressMode::None);
    opts.policy = Box::new(Recording {
        limits: limits.clone(),
        current: Duration::from_millis(100),
        stop_after: 4,
    });
    opts.downtime_ramp = Some("100:1000:2".parse().unwrap());
    let (report, dest) = migrate_idle(&src, opts);
    assert_eq!(report.status, MigrationStatus::Completed, "{report:?}");
    assert!(dest.is_ok());
    let ms = |v: &[u64]| {
        v.iter()
            .map(|&m| Duration::from_millis(m))
            .collect::<Vec<_>>()
    };
    assert_eq!(*limits.lock().unwrap(), ms(&[100, 550, 1000, 1000]));
    assert_eq!(report.downtime_limit, Some(1000.0));

    // A limit set from outside after iteration 1 wins and ends the ramp.
    let src = FakeVm::new(SIZE);
    src.running.store(true, Ordering::SeqCst);
    let limits = Arc::new(Mutex::new(Vec::new()));
    let mut opts = options(CompressMode::None);
    opts.policy = Box::new(Recording {
        limits: limits.clone(),
        current: Duration::from_millis(100),
        stop_after: 4,
    });
    opts.downtime_ramp = Some("100:1000:2".parse().unwrap());
    let control = opts.control.clone();
    opts.progress = Some(Box::new(move |r: &MigrationReport| {
        if r.iterations.len() == 2 {
            control.set_downtime_limit(Duration::from_millis(5000));
        }
    }));
    let (report, _) = migrate_idle(&src, opts);
    assert_eq!(report.status, MigrationStatus::Completed, "{report:?}");
    assert_eq!(*limits.lock().unwrap(), ms(&[100, 550, 5000, 5000]));
    assert_eq!(report.downtime_limit, Some(5000.0));
}

#[test]
fn cancel_stops_the_migration_tells_the_destination_and_keeps_the_source() {
    let src = Arc::new(FakeVm::new(SIZE));
    src.running.store(true, Ordering::SeqCst);
    let mut opts = options(CompressMode::None);
    opts.policy = Box::new(Never);
    let control = opts.control.clone();
    opts.progress = Some(Box::new(move |r: &MigrationReport| {
        if r.iterations.len() == 2 {
            assert!(control.cancel());
        }
    }));
    let (report, dest) = migrate_idle(&src, opts);
    assert_eq!(report.status, MigrationStatus::Cancelled, "{report:?}");
    assert_eq!(report.iterations.len(), 2, "stopped at the boundary");
    assert!(report.downtime.is_none(), "the guest was never paused");
    assert!(src.running.load(Ordering::SeqCst));
    let err = dest.err().expect("destination must fail");
    assert!(
        matches!(
            err,
            MigrationError::PeerError {
                code: crate::wire::ErrorCode::Cancelled,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn a_paused_guest_arrives_paused_and_is_not_resumed_on_failure() {
    let src = FakeVm::new(SIZE);
    src.guest_write(5, 55);
    let mut opts = options(CompressMode::None);
    opts.guest_paused = true;
    let (report, dest) = migrate_idle(&src, opts);
    assert_eq!(report.status, MigrationStatus::Completed, "{report:?}");
    let outcome = dest.unwrap();
    assert!(outcome.paused);
    assert!(
        !outcome.vm.running.load(Ordering::SeqCst),
        "ran a paused guest"
    );
    assert_same_memory(&src, &outcome.vm);

    // The destination refuses after the final copy: the engine's own pause
    // is not undone, since the guest was paused before the send.
    let src = FakeVm::new(SIZE);
    let mut opts = options(CompressMode::None);
    opts.guest_paused = true;
    let (a, b) = UnixStream::pair().unwrap();
    let dest = std::thread::spawn(move || {
        use crate::wire::{read_message, write_message, ErrorCode, ErrorMessage, HelloAck, Limits};
        let mut s = Stream::Unix(b);
        let limits = Limits::default();
        let Ok(crate::wire::Message::Hello(h)) = read_message(&mut s, &limits) else {
            panic!("no Hello")
        };
        let ack = HelloAck::negotiate(&h, crate::wire::FEATURES_KNOWN);
        write_message(&mut s, &crate::wire::Message::HelloAck(ack)).unwrap();
        while !matches!(
            read_message(&mut s, &limits).unwrap(),
            crate::wire::Message::Complete(_)
        ) {}
        let no = ErrorMessage::new(ErrorCode::Internal, "refused for the test");
        write_message(&mut s, &crate::wire::Message::Error(no)).unwrap();
    });
    let report = send_migration(&src, Stream::Unix(a), opts);
    dest.join().unwrap();
    assert_eq!(report.status, MigrationStatus::Failed, "{report:?}");
    assert!(
        !src.running.load(Ordering::SeqCst),
        "resumed a paused guest"
    );
}

mod bad_streams;
mod channels;
mod clone;
mod completion;
mod direct_pages;
mod failover;
mod unchanged;
mod vcpu_throttle;
mod windows;
