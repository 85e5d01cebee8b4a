//! Tier 2: the VM on real KVM, without migration.

use std::io::Write;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use e2e::kvm_available;
use migrate_core::dirty::DirtyBitmap;
use migrate_core::vm::{Vm, VmConfig, VmEvent};

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);
impl Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Real mode: store 1 at 0x20000, print "OK" on COM1, `cli; hlt`.
const OK_GUEST: &[u8] = &[
    0xFA, // cli
    0xB8, 0x00, 0x20, // mov ax, 0x2000
    0x8E, 0xC0, // mov es, ax
    0x26, 0xC6, 0x06, 0x00, 0x00, 0x01, // mov byte [es:0], 1
    0xBA, 0xF8, 0x03, // mov dx, 0x3f8
    0xB0, b'O', 0xEE, // mov al,'O'; out dx,al
    0xB0, b'K', 0xEE, // mov al,'K'; out dx,al
    0xF4, // hlt
];

#[test]
fn boot_sector_prints_dirties_and_halts() {
    if !kvm_available("boot_sector_prints_dirties_and_halts") {
        return;
    }
    let out = Capture::default();
    let (tx, rx) = mpsc::channel();
    let vm = Vm::new(
        VmConfig {
            mem_size: 16 << 20,
            vcpus: 1,
            serial: Box::new(out.clone()),
            dirty_track: Default::default(),
        },
        tx,
    )
    .unwrap();
    let mut dirty = DirtyBitmap::new(4096);
    vm.harvest_dirty_log(&mut dirty).unwrap();
    dirty.clear();
    vm.load_boot_image(OK_GUEST).unwrap();
    vm.resume().unwrap();
    let ev = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(ev, VmEvent::Halted { vcpu: 0 });
    assert_eq!(&*out.0.lock().unwrap(), b"OK");
    vm.harvest_dirty_log(&mut dirty).unwrap();
    assert!(dirty.get(0x20), "page 0x20000 must be dirty");
    vm.pause().unwrap();
    let state = vm.save_vcpu(0).unwrap();
    assert_eq!(state.regs.rip, 0x7C00 + OK_GUEST.len() as u64);
    let blob = state.encode();
    let back = migrate_core::vm::state::VcpuState::decode(&blob).unwrap();
    assert_eq!(back.regs, state.regs);
}
