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

/// The VM's port-I/O devices.
pub struct PortBus {
    serial: Mutex<SerialSink>,
    serial_bytes: std::sync::atomic::AtomicU64,
    unhandled: Mutex<BTreeMap<u16, u64>>,
}

impl PortBus {
    /// A bus whose COM1 writes to `serial`.
    pub fn new(serial: SerialSink) -> Self {
        Self {
            serial: Mutex::new(serial),
            serial_bytes: 0.into(),
            unhandled: Mutex::new(BTreeMap::new()),
        }
    }

    /// Handle an `OUT` of `data` to `port`.
    pub fn io_out(&self, port: u16, data: &[u8]) -> PortAction {
        match port {
            COM1 => {
                let mut sink = self.serial.lock().unwrap_or_else(|e| e.into_inner());
                // A sink that fails (closed pipe) must not stop the guest.
                let _ = sink.write_all(data).and_then(|()| sink.flush());
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
        *self.serial.lock().unwrap_or_else(|e| e.into_inner()) = serial;
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
}
