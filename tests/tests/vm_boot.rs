//! Tier 2: the VM on real KVM, without migration: one vCPU, and two vCPUs
//! (the in-kernel irqchip, the AP started by the boot processor's INIT +
//! SIPI, the state of both vCPUs and the irqchip saved and restored).

use std::io::Write;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use e2e::kvm_available;
use kvm_bindings::kvm_segment;
use migrate_core::dirty::DirtyBitmap;
use migrate_core::vm::{Vm, VmConfig, VmEvent};
use vm_memory::{Bytes, GuestAddress};

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
            ram: None,
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

/// BSP, 32-bit flat protected mode at 0x7C00: INIT then SIPI (vector 8,
/// start at 0x8000) to all but itself through the xAPIC ICR, store 0xB0 at
/// 0x21000, print `B`, spin.
const BSP: &[u8] = &[
    0xC7, 0x05, 0x00, 0x03, 0xE0, 0xFE, 0x00, 0x45, 0x0C,
    0x00, // mov dword [0xFEE00300], 0xC4500
    0xC7, 0x05, 0x00, 0x03, 0xE0, 0xFE, 0x08, 0x46, 0x0C,
    0x00, // mov dword [0xFEE00300], 0xC4608
    0xC6, 0x05, 0x00, 0x10, 0x02, 0x00, 0xB0, // mov byte [0x21000], 0xB0
    0x66, 0xBA, 0xF8, 0x03, // mov dx, 0x3f8
    0xB0, b'B', 0xEE, // mov al, 'B'; out dx, al
    0xEB, 0xFE, // jmp $
];

/// AP, real mode at 0800:0000 (0x8000): store 0xA1 at 0x20010, print `A`,
/// spin.
const AP: &[u8] = &[
    0xFA, // cli
    0xB8, 0x00, 0x20, 0x8E, 0xD8, // mov ax, 0x2000; mov ds, ax
    0xC6, 0x06, 0x10, 0x00, 0xA1, // mov byte [0x10], 0xA1
    0xBA, 0xF8, 0x03, // mov dx, 0x3f8
    0xB0, b'A', 0xEE, // mov al, 'A'; out dx, al
    0xEB, 0xFE, // jmp $
];

fn flat(selector: u16, type_: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        db: 1,
        s: 1,
        g: 1,
        ..Default::default()
    }
}

#[test]
fn bsp_starts_ap_with_init_sipi_and_state_round_trips() {
    if !kvm_available("bsp_starts_ap_with_init_sipi_and_state_round_trips") {
        return;
    }
    let _turn = e2e::one_at_a_time();
    let out = Capture::default();
    let (tx, _rx) = mpsc::channel();
    let vm = Vm::new(
        VmConfig {
            mem_size: 16 << 20,
            vcpus: 2,
            serial: Box::new(out.clone()),
            dirty_track: Default::default(),
            ram: None,
        },
        tx,
    )
    .unwrap();
    assert!(vm.has_irqchip());
    let mut dirty = DirtyBitmap::new(4096);
    vm.harvest_dirty_log(&mut dirty).unwrap();
    dirty.clear();
    vm.write_memory(0x8000, AP).unwrap();
    vm.load_boot_image(BSP).unwrap();
    // The BSP starts in 32-bit protected mode, to reach the LAPIC.
    let mut bsp = vm.save_vcpu(0).unwrap();
    bsp.sregs.cs = flat(0x08, 0xb);
    for s in [
        &mut bsp.sregs.ds,
        &mut bsp.sregs.es,
        &mut bsp.sregs.ss,
        &mut bsp.sregs.fs,
        &mut bsp.sregs.gs,
    ] {
        *s = flat(0x10, 0x3);
    }
    bsp.sregs.cr0 |= 1;
    vm.restore_vcpu(0, bsp).unwrap();
    let ap = vm.save_vcpu(1).unwrap();
    assert_eq!(
        ap.mp_state.mp_state,
        kvm_bindings::KVM_MP_STATE_UNINITIALIZED
    );
    assert!(ap.lapic.is_some() && ap.irqchip.is_none());

    vm.resume().unwrap();
    let t0 = Instant::now();
    loop {
        let seen = out.0.lock().unwrap().clone();
        if seen.contains(&b'A') && seen.contains(&b'B') {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "serial so far: {:?}",
            String::from_utf8_lossy(&seen)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    vm.pause().unwrap();
    let byte = |gpa: u64| vm.memory().read_obj::<u8>(GuestAddress(gpa)).unwrap();
    assert_eq!(byte(0x20010), 0xA1, "the AP's store");
    assert_eq!(byte(0x21000), 0xB0, "the BSP's store");
    vm.harvest_dirty_log(&mut dirty).unwrap();
    assert!(dirty.get(0x20) && dirty.get(0x21));

    let states = vm.save_vcpus().unwrap();
    assert_eq!(states.len(), 2);
    let ap = &states[1];
    assert_eq!(ap.mp_state.mp_state, kvm_bindings::KVM_MP_STATE_RUNNABLE);
    assert_eq!(ap.sregs.cs.base, 0x8000, "the AP began at vector 8 × 4 KiB");
    let apic_id = |s: &migrate_core::vm::state::VcpuState| s.lapic.unwrap().regs[0x23];
    assert_eq!((apic_id(&states[0]), apic_id(&states[1])), (0, 1));
    assert!(states[0].irqchip.is_some() && states[1].irqchip.is_none());

    // Blobs round-trip and restore; a blob without its LAPIC is refused.
    let blobs: Vec<Vec<u8>> = states.iter().map(|s| s.encode()).collect();
    let decode = |b: &Vec<u8>| migrate_core::vm::state::VcpuState::decode(b).unwrap();
    vm.restore_vcpus(blobs.iter().map(decode).collect())
        .unwrap();
    let mut bad: Vec<_> = blobs.iter().map(decode).collect();
    bad[1].lapic = None;
    assert!(vm.restore_vcpus(bad).is_err());
    let mut bad: Vec<_> = blobs.iter().map(decode).collect();
    bad[0].irqchip = None;
    assert!(vm.restore_vcpus(bad).is_err());

    // Both run on after the restore.
    let before = vm.save_vcpus().unwrap();
    vm.resume().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    vm.pause().unwrap();
    assert_eq!(before[1].sregs.cs.base, 0x8000);
}

/// A harness workload built for `vcpus`, booted on a fresh VM of 16 MiB.
fn boot_workload(spec: &str, vcpus: u32) -> (Vm, Capture, mpsc::Receiver<VmEvent>) {
    let spec: harness::WorkloadSpec = spec.parse().unwrap();
    let params = harness::BuildParams {
        mem_size: 16 << 20,
        tsc_hz: None,
        vcpus,
    };
    let image = harness::build(&spec, &params).unwrap();
    let out = Capture::default();
    let (tx, rx) = mpsc::channel();
    let vm = Vm::new(
        VmConfig {
            mem_size: 16 << 20,
            vcpus,
            serial: Box::new(out.clone()),
            dirty_track: Default::default(),
            ram: None,
        },
        tx,
    )
    .unwrap();
    vm.load_boot_image(&image.boot).unwrap();
    vm.resume().unwrap();
    (vm, out, rx)
}

/// Waits until `out` holds `n` of each of `marks`.
fn wait_for(out: &Capture, marks: &[u8], n: usize) {
    let t0 = Instant::now();
    loop {
        let seen = out.0.lock().unwrap().clone();
        if marks
            .iter()
            .all(|m| seen.iter().filter(|b| *b == m).count() >= n)
        {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "serial so far: {:?}",
            String::from_utf8_lossy(&seen)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn two_vcpu_sweep_writes_both_halves() {
    if !kvm_available("two_vcpu_sweep_writes_both_halves") {
        return;
    }
    let _turn = e2e::one_at_a_time();
    // [1 MiB, 9 MiB) in two parts: vCPU 0 sweeps [1M, 5M), vCPU 1 [5M, 9M).
    let (vm, out, _rx) = boot_workload("sweep:end=9M", 2);
    wait_for(&out, b"01", 2);
    vm.pause().unwrap();
    let byte = |gpa: u64| vm.memory().read_obj::<u8>(GuestAddress(gpa)).unwrap();
    assert_ne!(byte(1 << 20), 0, "vCPU 0's first page");
    assert_ne!(byte((5 << 20) - 4096), 0, "vCPU 0's last page");
    assert_ne!(byte(5 << 20), 0, "vCPU 1's first page");
    assert_ne!(byte((9 << 20) - 4096), 0, "vCPU 1's last page");
    assert_eq!(byte(9 << 20), 0, "beyond the range");
    let seen = out.0.lock().unwrap().clone();
    assert_eq!(seen.iter().filter(|b| **b == b'B').count(), 2, "two boots");
    assert!(!seen.contains(&b'.'), "no single-vCPU marks");
}

#[test]
fn two_vcpu_verify_catches_damage_in_the_aps_half() {
    if !kvm_available("two_vcpu_verify_catches_damage_in_the_aps_half") {
        return;
    }
    let _turn = e2e::one_at_a_time();
    // vCPU 1 owns [5M, 9M). Damage one of its pages while the VM is paused
    // (as a lost page would): only vCPU 1 reads it, and must catch it.
    let (vm, out, rx) = boot_workload("verify:end=9M", 2);
    wait_for(&out, b"01", 1);
    vm.pause().unwrap();
    let page = GuestAddress(6 << 20);
    let v: u64 = vm.memory().read_obj(page).unwrap();
    vm.write_memory(6 << 20, &(v ^ 1).to_le_bytes()).unwrap();
    vm.resume().unwrap();
    let ev = rx.recv_timeout(Duration::from_secs(60)).unwrap();
    assert_eq!(ev, VmEvent::Exited { status: 0x0F });
    let seen = out.0.lock().unwrap().clone();
    assert_eq!(
        seen.iter().filter(|b| **b == b'X').count(),
        1,
        "{:?}",
        String::from_utf8_lossy(&seen)
    );
}

#[test]
fn two_vcpu_vm_pauses_a_halted_bsp_and_a_never_started_ap() {
    if !kvm_available("two_vcpu_vm_pauses_a_halted_bsp_and_a_never_started_ap") {
        return;
    }
    let _turn = e2e::one_at_a_time();
    let out = Capture::default();
    let (tx, rx) = mpsc::channel();
    let vm = Vm::new(
        VmConfig {
            mem_size: 16 << 20,
            vcpus: 2,
            serial: Box::new(out.clone()),
            dirty_track: Default::default(),
            ram: None,
        },
        tx,
    )
    .unwrap();
    // The one-vCPU guest: prints OK and executes `cli; hlt`, which KVM's
    // in-kernel LAPIC handles (no exit, so no Halted event); the AP is
    // never started.
    vm.load_boot_image(OK_GUEST).unwrap();
    vm.resume().unwrap();
    wait_for(&out, b"OK", 1);
    std::thread::sleep(Duration::from_millis(50));
    vm.pause().unwrap();
    assert!(rx.try_recv().is_err(), "an in-kernel HLT sent an event");
    let states = vm.save_vcpus().unwrap();
    assert_eq!(
        states[0].mp_state.mp_state,
        kvm_bindings::KVM_MP_STATE_HALTED
    );
    assert_eq!(
        states[1].mp_state.mp_state,
        kvm_bindings::KVM_MP_STATE_UNINITIALIZED
    );
    assert_eq!(states[0].regs.rip, 0x7C00 + OK_GUEST.len() as u64);
    vm.restore_vcpus(states).unwrap();
    vm.resume().unwrap();
    vm.pause().unwrap();
    let again = vm.save_vcpus().unwrap();
    assert_eq!(
        again[0].mp_state.mp_state,
        kvm_bindings::KVM_MP_STATE_HALTED
    );
    assert_eq!(
        again[1].mp_state.mp_state,
        kvm_bindings::KVM_MP_STATE_UNINITIALIZED
    );
}
