//! Port I/O: COM1 to the serial sink, the exit port, everything else counted.
//!
//! The guests we run are boot sectors that talk to the world through two
//! ports only. COM1 is the minimum of a 16550 a polling guest needs: the data
//! register takes bytes, the line-status register always reports the
//! transmitter empty. A write to [`EXIT_PORT`] ends the VM with the written
//! value as exit status (the convention of QEMU's `isa-debug-exit`, at the
//! port our guests use). Any other port reads as all ones and is counted,
//! never fatal: an unknown port must not kill a guest mid-migration.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Mutex;

/// COM1 base port (data register).
pub const COM1: u16 = 0x3F8;
/// COM1 line-status register.
pub const COM1_LSR: u16 = COM1 + 5;
/// Line status: transmitter holding register and shift register empty.
const LSR_TX_EMPTY: u8 = 0x60;
/// Interrupt identification: no interrupt pending.
const IIR_NONE: u8 = 0x01;
/// Writing here ends the VM with the written value as exit status.
pub const EXIT_PORT: u16 = 0x501;

/// Where guest serial output goes.
pub type SerialSink = Box<dyn Write + Send>;

/// What the vCPU loop should do after a port access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortAction {
    /// Keep running.
    Continue,
    /// The guest asked to end the VM with this status.
    Exit(u32),
}

/// The serial sink and, with output commit on, the bytes held back from
/// it. Offsets count every byte the guest ever wrote to COM1.
struct Serial {
    sink: SerialSink,
    /// Bytes the guest wrote, held or not.
    written: u64,
    /// `Some`: output commit is on; bytes `[released, written)` wait here.
    held: Option<Vec<u8>>,
}

impl Serial {
    fn released(&self) -> u64 {
        self.written - self.held.as_ref().map_or(0, |h| h.len() as u64)
    }

    fn write_out(&mut self, data: &[u8]) {
        // A sink that fails (closed pipe) must not stop the guest.
        let _ = self.sink.write_all(data).and_then(|()| self.sink.flush());
    }
}

/// The VM's port-I/O devices.
pub struct PortBus {
    serial: Mutex<Serial>,
    serial_bytes: std::sync::atomic::AtomicU64,
    unhandled: Mutex<BTreeMap<u16, u64>>,
}

impl PortBus {
    /// A bus whose COM1 writes to `serial`.
    pub fn new(serial: SerialSink) -> Self {
        Self {
            serial: Mutex::new(Serial {
                sink: serial,
                written: 0,
                held: None,
            }),
            serial_bytes: 0.into(),
            unhandled: Mutex::new(BTreeMap::new()),
        }
    }

    /// Handle an `OUT` of `data` to `port`.
    pub fn io_out(&self, port: u16, data: &[u8]) -> PortAction {
        match port {
            COM1 => {
                let mut serial = self.serial();
                serial.written += data.len() as u64;
                match serial.held.as_mut() {
                    Some(held) => held.extend_from_slice(data),
                    None => serial.write_out(data),
                }
                self.serial_bytes
                    .fetch_add(data.len() as u64, std::sync::atomic::Ordering::Relaxed);
                PortAction::Continue
            }
            EXIT_PORT => {
                let mut v = [0u8; 4];
                let n = data.len().min(4);
                v[..n].copy_from_slice(&data[..n]);
                PortAction::Exit(u32::from_le_bytes(v))
            }
            p if (COM1 + 1..COM1 + 8).contains(&p) => PortAction::Continue,
            p => {
                self.count(p);
                PortAction::Continue
            }
        }
    }

    /// Handle an `IN` from `port` into `data`.
    pub fn io_in(&self, port: u16, data: &mut [u8]) {
        let value = match port {
            COM1_LSR => LSR_TX_EMPTY,
            p if p == COM1 + 2 => IIR_NONE,
            p if (COM1..COM1 + 8).contains(&p) => 0,
            p => {
                self.count(p);
                0xFF
            }
        };
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
        if value == 0xFF {
            data.fill(0xFF);
        }
    }

    /// Replace the serial sink (the destination of a migration writes to its
    /// own).
    pub fn set_serial(&self, serial: SerialSink) {
        self.serial().sink = serial;
    }

    /// Output commit on: from now on COM1 output is held back until
    /// [`PortBus::release_serial`] lets it out (a primary under checkpoint
    /// epochs must not show the world output its standby could not
    /// reproduce). Returns the offset the holding starts at.
    pub fn hold_serial(&self) -> u64 {
        let mut s = self.serial();
        if s.held.is_none() {
            s.held = Some(Vec::new());
        }
        s.released()
    }

    /// The serial offset now: bytes the guest ever wrote (held or not).
    /// Taken while the vCPUs are stopped, it is the mark of a checkpoint.
    pub fn serial_mark(&self) -> u64 {
        self.serial().written
    }

    /// How far output has been let out to the sink.
    pub fn serial_released(&self) -> u64 {
        self.serial().released()
    }

    /// The held bytes `[from, to)`, clipped to what is still held.
    pub fn held_serial(&self, from: u64, to: u64) -> Vec<u8> {
        let s = self.serial();
        let Some(held) = s.held.as_ref() else {
            return Vec::new();
        };
        let base = s.released();
        let lo = from.max(base).min(s.written);
        let hi = to.max(lo).min(s.written);
        let at = |o: u64| usize::try_from(o - base).expect("held bytes fit in memory");
        held[at(lo)..at(hi)].to_vec()
    }

    /// Write the held bytes before `mark` to the sink (in one write, so a
    /// process killed around it leaves all of them out or none, as far as
    /// a file sink goes); returns how far output is released now.
    pub fn release_serial(&self, mark: u64) -> u64 {
        let mut s = self.serial();
        let base = s.released();
        let upto = mark.clamp(base, s.written);
        let n = usize::try_from(upto - base).expect("held bytes fit in memory");
        if let Some(mut held) = s.held.take() {
            let out: Vec<u8> = held.drain(..n).collect();
            s.write_out(&out);
            s.held = Some(held);
        }
        s.released()
    }

    /// Output commit off: let everything held out and write directly
    /// again. Returns the bytes that were held.
    pub fn serial_direct(&self) -> usize {
        let mut s = self.serial();
        let held = s.held.take().unwrap_or_default();
        s.write_out(&held);
        held.len()
    }

    /// Whether output is held back (output commit on).
    pub fn serial_held(&self) -> Option<usize> {
        self.serial().held.as_ref().map(Vec::len)
    }

    /// Write `data` straight to the sink (a standby taking over writes the
    /// output its primary held back). Not the guest's output here: counted
    /// neither in [`PortBus::serial_bytes`] nor in the serial offsets.
    pub fn write_serial(&self, data: &[u8]) {
        self.serial().write_out(data);
    }

    fn serial(&self) -> std::sync::MutexGuard<'_, Serial> {
        self.serial.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes the guest wrote to COM1.
    pub fn serial_bytes(&self) -> u64 {
        self.serial_bytes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Accesses to ports no device claims, by port.
    pub fn unhandled(&self) -> BTreeMap<u16, u64> {
        self.unhandled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn count(&self, port: u16) {
        *self
            .unhandled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(port)
            .or_default() += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn serial_exit_and_unknown_ports() {
        let out = Shared::default();
        let bus = PortBus::new(Box::new(out.clone()));
        assert_eq!(bus.io_out(COM1, b"hi"), PortAction::Continue);
        assert_eq!(&*out.0.lock().unwrap(), b"hi");
        assert_eq!(bus.serial_bytes(), 2);
        let mut lsr = [0u8];
        bus.io_in(COM1_LSR, &mut lsr);
        assert_eq!(lsr[0] & 0x20, 0x20);
        assert_eq!(bus.io_out(EXIT_PORT, &[7]), PortAction::Exit(7));
        assert_eq!(bus.io_out(0x80, &[1]), PortAction::Continue);
        let mut w = [0u8; 2];
        bus.io_in(0x60, &mut w);
        assert_eq!(w, [0xFF, 0xFF]);
        assert_eq!(bus.unhandled().get(&0x80), Some(&1));
        assert_eq!(bus.unhandled().get(&0x60), Some(&1));
    }

    #[test]
    fn held_serial_goes_out_only_when_released() {
        let out = Shared::default();
        let bus = PortBus::new(Box::new(out.clone()));
        bus.io_out(COM1, b"ab");
        assert_eq!(bus.hold_serial(), 2);
        bus.io_out(COM1, b"cde");
        let mark = bus.serial_mark();
        assert_eq!(mark, 5);
        bus.io_out(COM1, b"fg");
        assert_eq!(&*out.0.lock().unwrap(), b"ab", "held bytes went out");
        assert_eq!(bus.held_serial(2, mark), b"cde");
        assert_eq!(
            bus.held_serial(0, 100),
            b"cdefg",
            "clipped to the held bytes"
        );
        assert_eq!(bus.release_serial(mark), 5);
        assert_eq!(&*out.0.lock().unwrap(), b"abcde");
        assert_eq!(bus.held_serial(0, 100), b"fg");
        assert_eq!(bus.release_serial(3), 5, "never backwards");
        assert_eq!(bus.serial_held(), Some(2));
        assert_eq!(bus.serial_direct(), 2);
        bus.io_out(COM1, b"h");
        assert_eq!(&*out.0.lock().unwrap(), b"abcdefgh");
        assert_eq!(bus.serial_held(), None);
        assert_eq!(bus.serial_mark(), 8);
    }
}
