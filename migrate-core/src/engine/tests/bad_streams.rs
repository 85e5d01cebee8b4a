//! The destination fed malformed migration streams by a scripted source:
//! each is refused with a typed error, answered with an `Error` frame that
//! says why, and never resumes a guest. (Frame-level garbage — magic,
//! checksums, lengths, zstd — is covered in `wire/tests/`; here are the
//! streams whose every frame is well formed but whose sequence or content
//! is not.)

use std::io::Write;

use super::*;
use crate::wire::{
    read_message, write_message, Complete, IterationEnd, Limits, Message, PageBatch, VcpuState,
    ZeroPages, ZeroRange,
};

const PAGES: u64 = SIZE / 4096;

fn hello() -> Message {
    let regions = slot_layout(SIZE)
        .unwrap()
        .iter()
        .map(|s| crate::wire::MemoryRegion {
            gpa: s.gpa,
            size: s.size,
        })
        .collect();
    Message::Hello(crate::wire::Hello::new(0, 2, "fake", regions))
}

fn page(iteration: u32, gpa: u64) -> Message {
    Message::Pages(PageBatch::raw(iteration, vec![gpa], vec![7; 4096]).unwrap())
}

fn end(iteration: u32, pages: u64) -> Message {
    Message::IterationEnd(IterationEnd { iteration, pages })
}

fn vcpu(index: u32) -> Message {
    Message::VcpuState(VcpuState {
        index,
        blob: vec![1, 2, 3],
    })
}

fn complete() -> Message {
    Message::Complete(Complete {
        digest: None,
        total_pages: PAGES,
    })
}

/// A whole, valid iteration 0 (one data page, the rest zero), then the
/// final pass and both vCPUs: what a correct source sends up to `Complete`.
fn valid_prefix() -> Vec<Message> {
    let mut zeros = ZeroPages::new(0);
    zeros.ranges.push(ZeroRange {
        gpa: 4096,
        pages: PAGES - 1,
    });
    vec![
        hello(),
        page(0, 0),
        Message::ZeroPages(zeros),
        end(0, PAGES),
        end(1, 0),
        vcpu(0),
        vcpu(1),
    ]
}

/// Feed `msgs` to a real receiver; its error and what it answered.
fn feed(msgs: Vec<Message>) -> (MigrationError, Vec<Message>) {
    let (a, b) = UnixStream::pair().unwrap();
    let dest = std::thread::spawn(move || {
        receive_migration(Stream::Unix(b), &ReceiveOptions::default(), |_| {
            Ok(FakeVm::new(SIZE))
        })
    });
    let mut w = a.try_clone().unwrap();
    for m in &msgs {
        if write_message(&mut w, m).is_err() {
            break; // refused and closed early
        }
    }
    let _ = w.flush();
    let _ = a.shutdown(std::net::Shutdown::Write);
    let outcome = dest.join().unwrap();
    let mut r = a;
    let mut answers = Vec::new();
    while let Ok(m) = read_message(&mut r, &Limits::default()) {
        answers.push(m);
    }
    match outcome {
        Ok(_) => panic!("the receiver accepted a bad stream: {msgs:?}"),
        Err(e) => (e, answers),
    }
}

/// The receiver refused with `InvalidData`/`Unexpected` containing `what`,
/// told the source with an `Error`, and never sent `Resumed`.
fn assert_refused(msgs: Vec<Message>, what: &str) {
    let (err, answers) = feed(msgs);
    let text = error_chain(&err);
    assert!(
        matches!(
            err,
            MigrationError::InvalidData(_) | MigrationError::Unexpected { .. }
        ),
        "{what}: {text}"
    );
    assert!(text.contains(what), "{text:?} should mention {what:?}");
    assert!(
        matches!(answers.last(), Some(Message::Error(_))),
        "{what}: the source must be told why: {answers:?}"
    );
    assert!(!answers.iter().any(|m| matches!(m, Message::Resumed)));
}

#[test]
fn a_page_outside_guest_memory() {
    let mut s = valid_prefix();
    s.insert(1, page(0, SIZE));
    assert_refused(s, "outside guest memory");
}

#[test]
fn a_zero_range_running_past_the_end() {
    let mut zeros = ZeroPages::new(0);
    zeros.ranges.push(ZeroRange {
        gpa: SIZE - 4096,
        pages: 2,
    });
    assert_refused(
        vec![hello(), Message::ZeroPages(zeros)],
        "outside guest memory",
    );
}

#[test]
fn pages_of_the_wrong_iteration() {
    assert_refused(vec![hello(), page(1, 0)], "iteration");
}

#[test]
fn an_iteration_end_with_the_wrong_count() {
    assert_refused(vec![hello(), page(0, 0), end(0, 2)], "announced 2 pages");
}

#[test]
fn vcpu_state_in_the_middle_of_an_iteration() {
    assert_refused(
        vec![hello(), page(0, 0), vcpu(0)],
        "before the last iteration ended",
    );
}

#[test]
fn vcpu_state_twice_or_for_an_unknown_vcpu() {
    let mut s = valid_prefix();
    s.push(vcpu(1));
    assert_refused(s, "sent twice");
    let mut s = valid_prefix();
    s.push(vcpu(2));
    assert_refused(s, "unknown vCPU 2");
}

#[test]
fn complete_before_every_vcpu() {
    let mut s = valid_prefix();
    s.pop();
    s.push(complete());
    assert_refused(s, "before every vCPU");
}

#[test]
fn complete_with_the_wrong_page_count() {
    let mut s = valid_prefix();
    s.push(Message::Complete(Complete {
        digest: None,
        total_pages: PAGES + 1,
    }));
    assert_refused(s, "pages");
}

#[test]
fn duplicated_completion_and_commit_out_of_order() {
    let mut s = valid_prefix();
    s.push(complete());
    s.push(complete());
    assert_refused(s, "Complete");
    let mut s = valid_prefix();
    s.push(Message::Commit);
    assert_refused(s, "Commit");
    assert_refused(vec![hello(), Message::Commit], "Commit");
    // A second Hello is as out of place.
    assert_refused(vec![hello(), hello()], "Hello");
}

#[test]
fn a_truncated_stream_is_a_wire_error_and_never_resumes() {
    // Everything up to Complete, then the source vanishes.
    let (err, answers) = feed(valid_prefix());
    assert!(matches!(err, MigrationError::Wire { .. }), "{err}");
    assert!(!answers.iter().any(|m| matches!(m, Message::Resumed)));
}

/// A `CheckedPages` page whose data does not match its CRC (the guest
/// changed it while it was sent).
fn torn_page(iteration: u32, gpa: u64) -> Message {
    let mut b = crate::wire::CheckedBatch::new(iteration, vec![gpa], vec![7; 4096]).unwrap();
    b.data[100] ^= 1;
    Message::CheckedPages(b)
}

#[test]
fn a_torn_page_never_sent_again_fails_at_complete() {
    let mut s = valid_prefix();
    s[1] = torn_page(0, 0);
    s.push(complete());
    assert_refused(s, "failed their CRC");
}

/// A torn page is left out of guest memory, and a copy sent again in a
/// later iteration (as data, or as a zero range) makes the stream whole.
#[test]
fn a_torn_page_sent_again_is_written_and_accepted() {
    for resend in [page(1, 0), {
        let mut z = ZeroPages::new(1);
        z.ranges.push(ZeroRange { gpa: 0, pages: 1 });
        Message::ZeroPages(z)
    }] {
        let mut s = valid_prefix();
        s[1] = torn_page(0, 0);
        s.insert(4, resend.clone());
        s[5] = end(1, 1);
        s.push(complete());
        s.push(Message::Commit);
        let (a, b) = UnixStream::pair().unwrap();
        let dest = std::thread::spawn(move || {
            receive_migration(Stream::Unix(b), &ReceiveOptions::default(), |_| {
                Ok(FakeVm::new(SIZE))
            })
        });
        let mut w = a.try_clone().unwrap();
        let mut r = a;
        for m in &s {
            write_message(&mut w, m).unwrap();
        }
        w.flush().unwrap();
        // HelloAck, Accepted, Resumed.
        for _ in 0..3 {
            read_message(&mut r, &Limits::default()).unwrap();
        }
        let outcome = dest.join().unwrap().unwrap();
        assert_eq!(outcome.torn_pages, 1);
        let mut got = vec![0u8; 4096];
        outcome
            .vm
            .memory
            .read_slice(&mut got, GuestAddress(0))
            .unwrap();
        let want = if matches!(resend, Message::Pages(_)) {
            7
        } else {
            0
        };
        assert!(got.iter().all(|&b| b == want), "{resend:?}");
    }
}
