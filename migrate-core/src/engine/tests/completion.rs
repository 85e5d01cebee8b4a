//! The completion exchange against a scripted destination: what the source
//! does when `Resumed` comes, when an `Error` comes instead, and when
//! nothing comes.

use super::*;
use crate::wire::{
    read_message, write_message, Accepted, ErrorCode, ErrorMessage, HelloAck, Limits, Message,
};

/// What the scripted destination does once it has read `Commit`.
#[derive(Clone, Copy)]
enum AfterCommit {
    Resume,
    Refuse,
    Vanish,
}

/// A destination that accepts everything (echoing the source's digest) and
/// then does `after` when `Commit` arrives.
fn scripted_destination(stream: UnixStream, after: AfterCommit) {
    let mut r = stream.try_clone().unwrap();
    let mut w = stream;
    let limits = Limits::default();
    loop {
        let Ok(msg) = read_message(&mut r, &limits) else {
            return;
        };
        let reply = match msg {
            Message::Hello(h) => Message::HelloAck(HelloAck::negotiate(&h, h.features)),
            Message::Complete(c) => Message::Accepted(Accepted { digest: c.digest }),
            Message::Commit => match after {
                AfterCommit::Resume => Message::Resumed,
                AfterCommit::Refuse => {
                    Message::Error(ErrorMessage::new(ErrorCode::Internal, "resume failed"))
                }
                AfterCommit::Vanish => return,
            },
            _ => continue,
        };
        write_message(&mut w, &reply).unwrap();
    }
}

fn migrate_to(after: AfterCommit) -> (FakeVm, MigrationReport) {
    let src = FakeVm::new(SIZE);
    src.guest_write(5, 55);
    src.running.store(true, Ordering::SeqCst);
    let (a, b) = UnixStream::pair().unwrap();
    let dest = std::thread::spawn(move || scripted_destination(b, after));
    let report = send_migration(&src, Stream::Unix(a), options(CompressMode::None));
    dest.join().unwrap();
    (src, report)
}

#[test]
fn resumed_completes_the_migration() {
    let (src, report) = migrate_to(AfterCommit::Resume);
    assert_eq!(report.status, MigrationStatus::Completed, "{report:?}");
    assert!(
        !src.running.load(Ordering::SeqCst),
        "the source stays paused"
    );
}

#[test]
fn an_error_after_commit_resumes_the_source() {
    let (src, report) = migrate_to(AfterCommit::Refuse);
    assert_eq!(report.status, MigrationStatus::Failed);
    let err = report.error.as_deref().unwrap();
    assert!(err.contains("resume failed"), "{err}");
    assert!(!err.contains("outcome unknown"), "{err}");
    assert!(
        src.running.load(Ordering::SeqCst),
        "the destination refused: the guest must run here again"
    );
    assert!(report.downtime.is_some());
}

#[test]
fn silence_after_commit_is_an_unknown_outcome_and_the_source_stays_paused() {
    let (src, report) = migrate_to(AfterCommit::Vanish);
    assert_eq!(report.status, MigrationStatus::Failed);
    let err = report.error.as_deref().unwrap();
    assert!(err.contains("outcome unknown"), "{err}");
    assert!(err.contains("never confirmed"), "{err}");
    assert!(
        !src.running.load(Ordering::SeqCst),
        "the destination may run the guest: the source must not"
    );
}

#[test]
fn a_destination_that_refuses_mid_stream_is_heard_not_just_a_broken_pipe() {
    // The destination answers the Hello, reads one frame, says why it
    // stops and hangs up while the source is still writing the full copy.
    let src = FakeVm::new(SIZE);
    for page in 0..2048 {
        src.guest_write(page, page as u64 + 1);
    }
    src.running.store(true, Ordering::SeqCst);
    let (a, b) = UnixStream::pair().unwrap();
    let dest = std::thread::spawn(move || {
        let mut r = b.try_clone().unwrap();
        let mut w = b;
        let limits = Limits::default();
        if let Ok(Message::Hello(h)) = read_message(&mut r, &limits) {
            let ack = Message::HelloAck(HelloAck::negotiate(&h, h.features));
            write_message(&mut w, &ack).unwrap();
        }
        let _ = read_message(&mut r, &limits);
        let refusal = ErrorMessage::new(ErrorCode::ProtocolViolation, "page 0x1000 refused");
        write_message(&mut w, &Message::Error(refusal)).unwrap();
    });
    let report = send_migration(&src, Stream::Unix(a), options(CompressMode::None));
    dest.join().unwrap();
    assert_eq!(report.status, MigrationStatus::Failed);
    let err = report.error.as_deref().unwrap();
    assert!(err.contains("page 0x1000 refused"), "{err}");
    assert!(src.running.load(Ordering::SeqCst));
}
