//! Output commit over a clone session on the fake VM: the primary lets an
//! epoch's output out only once it is acknowledged, and a standby that
//! applied an epoch whose ack the primary never read keeps that epoch's
//! output to write itself.

use super::*;
use crate::vm::ports::COM1;

/// A sink the test can read.
#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Shared {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn output_waits_for_the_ack_and_an_unread_ack_leaves_it_to_the_standby() {
    let (src, outcome, standby) = super::clone::clone_running_guest(true);
    let mut session = outcome.session.unwrap();
    let standby = standby.unwrap();
    let held = Arc::new(standby.vm);
    let out = Shared::default();
    src.ports.set_serial(Box::new(out.clone()));
    src.ports.io_out(COM1, b"before");
    assert!(session.hold_output(&*src));
    let follower = {
        let held = held.clone();
        let mut s = standby.standby.unwrap();
        std::thread::spawn(move || loop {
            let end = match s.receive_epoch() {
                Ok(staged) => match s.apply_epoch(&*held, staged) {
                    Ok(()) => continue,
                    Err(end) => end,
                },
                Err(end) => end,
            };
            return (s, end);
        })
    };

    // Epoch 1: held until its ack, then out.
    src.ports.io_out(COM1, b"-one");
    let sent = session.send_checkpoint(&*src, true, false).unwrap();
    src.ports.io_out(COM1, b"-two");
    assert_eq!(
        &*out.0.lock().unwrap(),
        b"before",
        "output went out before its ack"
    );
    session.await_ack(&*src, sent).unwrap();
    assert_eq!(&*out.0.lock().unwrap(), b"before-one");

    // Epoch 2 is sent and applied, but the primary dies before reading
    // the ack: it never let "-two" out, so the standby must write it.
    let _sent = session.send_checkpoint(&*src, true, false).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    drop(session);
    let (s, end) = follower.join().unwrap();
    // Closed, or reset (the unread ack was still in the primary's socket).
    assert!(
        matches!(
            end,
            SessionEnd::Closed | SessionEnd::Failed(MigrationError::Wire { .. })
        ),
        "{end:?}"
    );
    assert_eq!(s.epoch(), 2);
    assert!(s.failover_armed());
    assert_eq!(s.unreleased_output(), b"-two");
    assert_eq!(&*out.0.lock().unwrap(), b"before-one");
}
