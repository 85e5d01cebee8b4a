//! Live clone on the fake VM: the source resumes as the primary, the
//! standby holds a paused, identical copy, and each side refuses the other
//! kind of stream.

use std::io::Write;

use super::*;

/// A running source whose "guest" writes until it is paused (and then
/// stops for good, so that its memory stays the clone point's), cloned to a
/// standby. Returns the source, the clone and the standby's result.
pub(super) fn clone_running_guest(
    standby: bool,
) -> (
    Arc<FakeVm>,
    CloneOutcome,
    Result<ReceiveOutcome<FakeVm>, MigrationError>,
) {
    clone_running_guest_with(standby, options(CompressMode::None))
}

/// [`clone_running_guest`] with these send options.
fn clone_running_guest_with(
    standby: bool,
    mut opts: SendOptions,
) -> (
    Arc<FakeVm>,
    CloneOutcome,
    Result<ReceiveOutcome<FakeVm>, MigrationError>,
) {
    let src = Arc::new(FakeVm::new(SIZE));
    for page in (0..2048).step_by(3) {
        src.guest_write(page, page as u64 * 5 + 3);
    }
    src.running.store(true, Ordering::SeqCst);
    let guest_vm = src.clone();
    // Writes until the first pause (the clone point) and never after,
    // even once the primary resumes.
    let guest = std::thread::spawn(move || {
        let mut n = 0u64;
        while !guest_vm.paused_once.load(Ordering::SeqCst) {
            guest_vm.guest_step(|vm| {
                if !vm.paused_once.load(Ordering::SeqCst) {
                    n += 1;
                    vm.guest_write(usize::try_from(n * 17 % 2048).unwrap(), n);
                }
            });
        }
    });
    let (a, b) = UnixStream::pair().unwrap();
    let dest = std::thread::spawn(move || {
        let opts = ReceiveOptions {
            standby,
            ..Default::default()
        };
        receive_migration(Stream::Unix(b), &opts, |_| Ok(FakeVm::new(SIZE)))
    });
    // A clone digests whether asked or not.
    opts.verify_digest = false;
    let outcome = live_clone(&*src, Stream::Unix(a), opts);
    let still_running = src.running.load(Ordering::SeqCst);
    // A clone refused before the pause: stop the guest here.
    src.pause().unwrap();
    guest.join().unwrap();
    src.running.store(still_running, Ordering::SeqCst);
    (src, outcome, dest.join().unwrap())
}

#[test]
fn clone_resumes_the_primary_and_holds_a_paused_identical_standby() {
    let (src, outcome, standby) = clone_running_guest(true);
    let report = &outcome.report;
    assert_eq!(report.status, MigrationStatus::Completed, "{report:?}");
    assert_eq!(report.mode, ReportMode::Clone);
    assert!(
        src.running.load(Ordering::SeqCst),
        "the primary must run on"
    );
    let standby = standby.unwrap();
    assert!(standby.paused);
    assert!(
        !standby.vm.running.load(Ordering::SeqCst),
        "the standby must never run"
    );
    assert_same_memory(&src, &standby.vm);
    assert_eq!(
        *standby.vm.vcpus.lock().unwrap(),
        *src.vcpus.lock().unwrap()
    );
    let digest = report.digest.clone().expect("a clone is always verified");
    assert!(digest.equal);
    let expected = src.vcpu_state_digest(&src.save_vcpus().unwrap()).unwrap();
    assert_eq!(
        report.vcpu_digest.as_deref(),
        Some(format!("{expected:016x}").as_str())
    );
    assert!(report.downtime.is_some());

    // The session stays open; the primary ends it and says why.
    let session = outcome.session.expect("a completed clone has a session");
    assert_eq!(session.standby(), "test");
    let waiter = std::thread::spawn(move || {
        let vm = standby.vm;
        standby.standby.unwrap().follow(&vm)
    });
    session.close("primary shuts down");
    match waiter.join().unwrap() {
        SessionEnd::Ended { reason } => assert_eq!(reason, "primary shuts down"),
        other => panic!("session ended as {other:?}"),
    }
}

#[test]
fn dropped_session_is_a_closed_connection_for_the_standby() {
    let (_src, outcome, standby) = clone_running_guest(true);
    let waiter = std::thread::spawn(move || {
        let s = standby.unwrap();
        s.standby.unwrap().follow(&s.vm)
    });
    drop(outcome.session);
    assert!(matches!(waiter.join().unwrap(), SessionEnd::Closed));
}

#[test]
fn a_migration_destination_refuses_a_clone_and_the_source_runs_on() {
    let (src, outcome, dest) = clone_running_guest(false);
    assert_eq!(outcome.report.status, MigrationStatus::Failed);
    assert!(outcome.session.is_none());
    let error = outcome.report.error.unwrap();
    assert!(error.contains("run --incoming --standby"), "{error}");
    assert!(matches!(dest, Err(MigrationError::WrongMode(_))));
    // The guest ran on (it was stopped by the test only afterwards).
    assert!(src.running.load(Ordering::SeqCst));
}

#[test]
fn a_standby_refuses_a_migration() {
    let (a, b) = UnixStream::pair().unwrap();
    let dest = std::thread::spawn(move || {
        let opts = ReceiveOptions {
            standby: true,
            ..Default::default()
        };
        receive_migration(Stream::Unix(b), &opts, |_| Ok(FakeVm::new(SIZE)))
    });
    let src = FakeVm::new(SIZE);
    src.running.store(true, Ordering::SeqCst);
    let report = send_migration(&src, Stream::Unix(a), options(CompressMode::None));
    assert_eq!(report.status, MigrationStatus::Failed);
    let error = report.error.unwrap();
    assert!(error.contains("takes only a live clone"), "{error}");
    assert!(src.running.load(Ordering::SeqCst));
    let Err(e) = dest.join().unwrap() else {
        panic!("the standby took a migration")
    };
    assert!(matches!(e, MigrationError::WrongMode(_)), "{e}");
}

/// The standby's VM and a thread applying the epochs it receives.
fn follow(standby: ReceiveOutcome<FakeVm>) -> (Arc<FakeVm>, std::thread::JoinHandle<SessionEnd>) {
    let held = Arc::new(standby.vm);
    let vm = held.clone();
    let session = standby.standby.unwrap();
    (held, std::thread::spawn(move || session.follow(&*vm)))
}

#[test]
fn epochs_keep_the_standby_in_step_and_a_torn_epoch_is_never_applied() {
    let (src, outcome, standby) = clone_running_guest(true);
    let mut session = outcome.session.unwrap();
    let (held, follower) = follow(standby.unwrap());
    let mut stats = EpochStats::new(50);
    for round in 1..=3u64 {
        for page in (usize::try_from(round).unwrap()..2048).step_by(7) {
            src.guest_write(page, round * 1000 + page as u64);
        }
        *src.vcpus.lock().unwrap() = vec![format!("cpu0 {round}").into_bytes(), b"cpu1".to_vec()];
        let r = session.run_epoch(&*src, true, true).unwrap();
        assert_eq!(u64::from(r.epoch), round);
        assert!(r.pages > 0 && r.bytes > r.pages * 4096, "{r:?}");
        assert!(src.running.load(Ordering::SeqCst), "the primary resumes");
        // The ack means applied: the standby is the primary's image now.
        assert_same_memory(&src, &held);
        assert_eq!(*held.vcpus.lock().unwrap(), *src.vcpus.lock().unwrap());
        assert!(!held.running.load(Ordering::SeqCst), "the standby ran");
        stats.record(&r);
    }
    assert_eq!(stats.report().epochs, 3);
    assert!(stats.report().pause.max >= stats.report().pause.p50);

    // Half an epoch, then the primary vanishes: none of it is applied.
    let mut before = vec![0u8; usize::try_from(SIZE).unwrap()];
    held.memory
        .read_slice(&mut before, GuestAddress(0))
        .unwrap();
    src.guest_write(5, 0xdead_beef);
    let mut dirty = DirtyBitmap::new(usize::try_from(SIZE / 4096).unwrap());
    src.harvest_dirty_log(&mut dirty).unwrap();
    let w = &mut session.channel.writer;
    super::super::source::send_iteration(&mut session.sender, w, &*src, 4, &dirty, None, "torn")
        .unwrap();
    w.flush().unwrap();
    drop(session);
    let end = follower.join().unwrap();
    assert!(matches!(end, SessionEnd::Failed(_)), "{end:?}");
    let mut after = vec![0u8; before.len()];
    held.memory.read_slice(&mut after, GuestAddress(0)).unwrap();
    assert!(before == after, "a torn epoch reached the standby's memory");
}

/// Checkpoints after a clone with `skip_unchanged` leave out the pages the
/// standby holds already, and the standby still matches the primary.
#[test]
fn epochs_leave_out_pages_the_standby_holds() {
    let mut opts = options(CompressMode::None);
    opts.skip_unchanged = true;
    let (src, outcome, standby) = clone_running_guest_with(true, opts);
    assert_eq!(outcome.report.page_path, "copy");
    let mut session = outcome.session.unwrap();
    let (held, follower) = follow(standby.unwrap());
    let value = |page: usize| 0x5150_0000 + page as u64;
    let mut stats = EpochStats::new(50);
    // (pages rewritten as they are, pages changed) -> (sent, left out)
    for (same, changed, want) in [(0..0, 0..64, (64, 0)), (0..64, 100..110, (10, 64))] {
        same.chain(changed)
            .for_each(|p| src.guest_write(p, value(p)));
        let r = session.run_epoch(&*src, true, true).unwrap();
        assert_eq!((r.pages, r.unchanged_pages), want, "{r:?}");
        assert_same_memory(&src, &held);
        stats.record(&r);
    }
    assert_eq!(stats.report().unchanged_pages, 64);
    drop(session);
    assert!(matches!(
        follower.join().unwrap(),
        SessionEnd::Closed | SessionEnd::Failed(_)
    ));
}
