//! Output commit and failover over a live-clone session (the last steps
//! of fault tolerance, after the clone and checkpoint epochs).
//!
//! **Output commit (primary).** With epochs on, the primary's serial
//! output is held back ([`PortBus::hold_serial`]); each epoch takes the
//! serial *mark* (bytes the guest wrote so far) while the guest is paused,
//! sends the held bytes up to it with the epoch, and once the standby's
//! ack is read lets them out ([`PortBus::release_serial`]) and tells the
//! standby how far it got:
//! ```text
//!  primary                                        standby
//!  [pause] mark M(e); pages, VcpuState × N
//!  SerialOutput{released R, start M(e-1), bytes}  --> staged with the epoch
//!  Complete                                       --> apply epoch e, keep the bytes
//!                                                 <-- Accepted
//!  release up to M(e) (one write to the sink)
//!  SerialOutput{released M(e), empty}             --> drop the bytes before M(e)
//! ```
//! **Failover (standby).** The standby's guest, resumed from epoch e,
//! prints what the primary's printed after M(e); what the primary printed
//! before M(e) but may not have released is exactly the standby's kept
//! bytes from the last `released` it heard of. Writing those first, then
//! running the guest, continues the primary's released stream with
//! neither a gap nor a repeat, whether or not the primary read the last
//! ack. The one window left: the primary dies after its release write
//! and before the notice reaches its socket (two system calls apart);
//! the standby then repeats that epoch's bytes (at least once, never
//! lost). `ARCHITECTURE.md` §4c discusses it.
//!
//! [`PortBus::hold_serial`]: crate::vm::ports::PortBus::hold_serial
//! [`PortBus::release_serial`]: crate::vm::ports::PortBus::release_serial

use std::io::Write;
use std::time::Duration;

use super::clone::{CloneSession, StandbySession};
use super::{MigratableVm, MigrationError};
use crate::wire::{write_message, Message, SerialOutput, WireError, MAX_SERIAL_CHUNK};

/// The primary's output-commit state in a clone session.
#[derive(Debug, Default)]
pub(super) struct OutputCommit {
    /// The mark of the last epoch sent: held bytes before it went to the
    /// standby already.
    pub(super) sent: u64,
}

impl CloneSession {
    /// Start output commit: hold the guest's serial output from now on
    /// until the epoch that contains it is acknowledged. False when the
    /// VM has no serial port to hold (nothing to commit).
    pub fn hold_output<V: MigratableVm>(&mut self, vm: &V) -> bool {
        let Some(ports) = vm.serial_ports() else {
            return false;
        };
        self.output = Some(OutputCommit {
            sent: ports.hold_serial(),
        });
        true
    }

    /// Whether output commit is on for this session.
    pub fn output_commit(&self) -> bool {
        self.output.is_some()
    }

    /// Tell the standby the primary is alive (between epochs).
    pub fn heartbeat(&mut self) -> Result<(), MigrationError> {
        let w = &mut self.channel.writer;
        write_message(w, &Message::Heartbeat)
            .and_then(|_| w.flush().map_err(WireError::from))
            .map_err(|source| MigrationError::Wire {
                phase: "clone session heartbeat".into(),
                source,
            })
    }

    /// After the standby acknowledged the epoch whose mark is `mark`: let
    /// the output before it out, then tell the standby so.
    pub(super) fn release_output<V: MigratableVm>(
        &mut self,
        vm: &V,
        mark: u64,
        phase: &str,
    ) -> Result<(), MigrationError> {
        let Some(ports) = vm.serial_ports() else {
            return Ok(());
        };
        let released = ports.release_serial(mark);
        let notice = Message::SerialOutput(SerialOutput {
            released,
            start: released,
            data: Vec::new(),
        });
        let w = &mut self.channel.writer;
        write_message(w, &notice)
            .and_then(|_| w.flush().map_err(WireError::from))
            .map(|_| ())
            .map_err(|source| MigrationError::Wire {
                phase: format!("{phase} output release"),
                source,
            })
    }
}

/// The standby's copy of the primary's held output: bytes `[start,
/// start + data.len())` of the guest's serial stream, as of the last
/// applied epoch, and how far the primary said it released.
#[derive(Debug, Default)]
pub(super) struct HeldTail {
    /// `None` until the first epoch with output arrived (no output commit:
    /// a failover could not keep the output whole, so it is not armed).
    start: Option<u64>,
    data: Vec<u8>,
    released: u64,
}

impl HeldTail {
    /// The primary released everything before `upto`.
    pub(super) fn note_released(&mut self, upto: u64) {
        self.released = self.released.max(upto);
        if let Some(start) = self.start.as_mut() {
            let drop = usize::try_from(self.released.saturating_sub(*start))
                .unwrap_or(usize::MAX)
                .min(self.data.len());
            self.data.drain(..drop);
            *start += drop as u64;
        }
    }

    /// Where the next epoch's output must start.
    pub(super) fn end(&self) -> Option<u64> {
        self.start.map(|s| s + self.data.len() as u64)
    }

    /// Keep an applied epoch's output (checked contiguous when staged).
    pub(super) fn append(&mut self, chunks: &[SerialOutput]) {
        for c in chunks {
            if self.start.is_none() {
                self.start = Some(c.start);
            }
            self.data.extend_from_slice(&c.data);
            self.note_released(c.released);
        }
    }
}

/// Check that staged `chunks` continue `tail` without a gap or overlap.
pub(super) fn check_output(tail: &HeldTail, chunks: &[SerialOutput]) -> Result<(), String> {
    let mut at = tail.end();
    for c in chunks {
        if let Some(at) = at {
            if c.start != at {
                return Err(format!(
                    "serial output at offset {} where {at} was due",
                    c.start
                ));
            }
        }
        at = Some(c.start + c.data.len() as u64);
    }
    Ok(())
}

impl StandbySession {
    /// Whether a failover would keep the output whole: the primary commits
    /// its output and at least one epoch carrying it was applied.
    pub fn failover_armed(&self) -> bool {
        self.output.start.is_some()
    }

    /// The output the primary held for the epochs applied here and has not
    /// said it released: what a standby taking over writes before its
    /// guest runs.
    pub fn unreleased_output(&self) -> &[u8] {
        &self.output.data
    }

    /// Read timeouts on the session: `None` waits forever (no failover
    /// armed), `Some(t)`: a primary silent for `t` counts as gone.
    pub fn set_silence_limit(&self, limit: Option<Duration>) -> Result<(), MigrationError> {
        self.reader
            .get_ref()
            .set_timeouts(limit)
            .map_err(|e| MigrationError::Wire {
                phase: "standby session".into(),
                source: e.into(),
            })
    }
}

/// With the guest stopped: the epoch's serial mark, and the held bytes
/// up to it sent to the standby (at least one message, so that the
/// standby knows output commit is on). `None` without output commit.
pub(super) fn send_output<V: MigratableVm>(
    output: &mut Option<OutputCommit>,
    vm: &V,
    w: &mut impl std::io::Write,
    phase: &str,
) -> Result<Option<(u64, u64)>, MigrationError> {
    let (Some(out), Some(ports)) = (output.as_ref(), vm.serial_ports()) else {
        return Ok(None);
    };
    let mark = ports.serial_mark();
    let released = ports.serial_released();
    let bytes = ports.held_serial(out.sent, mark);
    // What is not held any more was released: start from there.
    let mut start = mark - bytes.len() as u64;
    let mut sent = 0u64;
    let mut one = |start: u64, data: &[u8]| {
        let msg = Message::SerialOutput(SerialOutput {
            released,
            start,
            data: data.to_vec(),
        });
        write_message(w, &msg).map_err(|source| MigrationError::Wire {
            phase: phase.to_string(),
            source,
        })
    };
    if bytes.is_empty() {
        sent += one(start, &[])?;
    }
    for c in bytes.chunks(MAX_SERIAL_CHUNK) {
        sent += one(start, c)?;
        start += c.len() as u64;
    }
    if let Some(out) = output.as_mut() {
        out.sent = mark;
    }
    Ok(Some((mark, sent)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(released: u64, start: u64, data: &[u8]) -> SerialOutput {
        SerialOutput {
            released,
            start,
            data: data.to_vec(),
        }
    }

    #[test]
    fn the_tail_keeps_what_was_not_released() {
        let mut t = HeldTail::default();
        assert_eq!(t.end(), None);
        let e1 = [chunk(10, 10, b"abc")];
        check_output(&t, &e1).unwrap();
        t.append(&e1);
        assert_eq!(t.data, b"abc");
        let e2 = [chunk(10, 13, b"de"), chunk(10, 15, b"f")];
        check_output(&t, &e2).unwrap();
        t.append(&e2);
        assert_eq!(t.data, b"abcdef");
        // The primary released epoch 1.
        t.note_released(13);
        assert_eq!(t.data, b"def");
        assert_eq!(t.end(), Some(16));
        assert!(check_output(&t, &[chunk(13, 17, b"x")]).is_err(), "a gap");
        assert!(
            check_output(&t, &[chunk(13, 15, b"x")]).is_err(),
            "a repeat"
        );
        t.note_released(16);
        assert!(t.data.is_empty());
        assert_eq!(t.end(), Some(16));
    }
}
