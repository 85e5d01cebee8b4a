//! Workloads on several vCPUs: starting the APs and giving each vCPU its part.
//!
//! With `vcpus` = N > 1 ([`BuildParams::vcpus`](super::BuildParams)) the boot
//! sector runs on every vCPU. The boot processor goes through the prologue
//! as with one vCPU; in 32-bit protected mode, once the page tables are
//! built, it writes a three-byte real-mode trampoline (`jmp near` to
//! 0700:0C00 = 0x7C00) at [`AP_TRAMPOLINE_GPA`] and starts the application processors the way a
//! PC does: INIT, then a start-up IPI with vector [`SIPI_VECTOR`] (so they
//! begin at 0700:0000 = the trampoline), both through its xAPIC's ICR at
//! 0xFEE00300 to "all excluding self". The VMM's in-kernel irqchip does the
//! rest. Each AP then runs the same sector: real mode, protected mode, long
//! mode with the same page tables.
//!
//! Every vCPU reads its APIC ID from the xAPIC (0xFEE00020) first thing in
//! protected mode (paging is still off; the identity map covers RAM only)
//! and keeps it as its index, in `ebp`, then `r8` (KVM gives vCPU *i* APIC
//! ID *i*, so the BSP's is 0). A nonzero ID makes an AP skip the page
//! tables (the BSP's are already live) and the wake-up. Each prints [`BOOT_MARK`] once in
//! long mode, then its own pass mark: the digit of its index (`0`, `1`, …,
//! at most [`MAX_SMP_VCPUS`]), where one vCPU prints [`PASS_MARK`]; a
//! `verify` mismatch still prints [`MISMATCH_MARK`] and ends the VM.
//!
//! The workload's range is split into N equal page-aligned parts (what does
//! not divide is left out); vCPU *i* works on part *i*: `start + i × chunk`,
//! computed in the guest from `r8`.
//!
//! [`BOOT_MARK`]: super::BOOT_MARK
//! [`PASS_MARK`]: super::PASS_MARK
//! [`MISMATCH_MARK`]: super::MISMATCH_MARK

use std::ops::Range;

use iced_x86::code_asm::*;

use super::asm::{emit_mark, emit_mov_imm, COM1_DATA, COM1_LSR};
use super::{WorkloadError, PAGE_SIZE, PASS_MARK};

/// Most vCPUs a workload runs on (their pass marks are the digits 0–7).
pub const MAX_SMP_VCPUS: u32 = 8;
/// Where the boot processor writes the APs' real-mode trampoline.
pub const AP_TRAMPOLINE_GPA: u64 = 0x7000;
/// Start-up IPI vector: APs begin at `SIPI_VECTOR × 4 KiB` (the trampoline).
pub const SIPI_VECTOR: u8 = 7;
/// Pass mark of vCPU 0 with several vCPUs; vCPU *i* prints this + *i*.
pub const VCPU_MARK_BASE: u8 = b'0';

/// xAPIC registers (physical addresses, default APIC base).
const LAPIC_ID: u64 = 0xFEE0_0020;
const LAPIC_ICR_LOW: u64 = 0xFEE0_0300;
/// ICR: delivery mode INIT (5), level assert, shorthand "all excluding self".
const ICR_INIT_ALL_BUT_SELF: u32 = 0x000C_4500;
/// ICR: delivery mode start-up (6), shorthand "all excluding self".
const ICR_SIPI_ALL_BUT_SELF: u32 = 0x000C_4600 | SIPI_VECTOR as u32;
/// The trampoline: `jmp near 0x0C00` (E9 FD 0B, then a zero byte): the AP
/// starts with CS = 0x0700, IP = 0, so this lands at 0700:0C00 = 0x7C00,
/// where the sector's first `cli; jmp far 0000:…` normalises CS.
const TRAMPOLINE_DWORD: u32 = 0x000B_FDE9;

/// How a workload shares its range among vCPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PerVcpu {
    /// Bytes of each vCPU's part (page-aligned, nonzero).
    pub chunk: u64,
}

/// The per-vCPU split of `range` over `vcpus` (`None` for one vCPU).
pub(crate) fn split(range: &Range<u64>, vcpus: u32) -> Result<Option<PerVcpu>, WorkloadError> {
    check_vcpus(vcpus)?;
    if vcpus == 1 {
        return Ok(None);
    }
    let pages = (range.end - range.start) / PAGE_SIZE / u64::from(vcpus);
    if pages == 0 {
        return Err(WorkloadError::RangeTooSmallForVcpus {
            len: range.end - range.start,
            vcpus,
        });
    }
    Ok(Some(PerVcpu {
        chunk: pages * PAGE_SIZE,
    }))
}

/// The split of `range` among the first `writers` vCPUs of several (the
/// others do not use it): always a [`PerVcpu`], even for one writer, since
/// the image is a several-vCPU one.
pub(crate) fn split_among(range: &Range<u64>, writers: u32) -> Result<PerVcpu, WorkloadError> {
    let pages = (range.end - range.start) / PAGE_SIZE / u64::from(writers.max(1));
    if pages == 0 {
        return Err(WorkloadError::RangeTooSmallForVcpus {
            len: range.end - range.start,
            vcpus: writers,
        });
    }
    Ok(PerVcpu {
        chunk: pages * PAGE_SIZE,
    })
}

/// The split of `range` when only vCPUs `0..writers` write (`hotset`'s
/// `writers`), and the first vCPU that idles instead. All of them writing
/// (or `None`) is the plain [`split`], so the image is the same as
/// without the option.
pub(crate) fn split_writers(
    range: &Range<u64>,
    vcpus: u32,
    writers: Option<u32>,
) -> Result<(Option<PerVcpu>, Option<u32>), WorkloadError> {
    match writers {
        Some(w) if w == 0 || w > vcpus => Err(WorkloadError::BadWriters { writers: w, vcpus }),
        Some(w) if w < vcpus => Ok((Some(split_among(range, w)?), Some(w))),
        _ => Ok((split(range, vcpus)?, None)),
    }
}

/// Refuses a vCPU count the workloads cannot run on.
pub(crate) fn check_vcpus(vcpus: u32) -> Result<(), WorkloadError> {
    if (1..=MAX_SMP_VCPUS).contains(&vcpus) {
        Ok(())
    } else {
        Err(WorkloadError::BadVcpuCount {
            vcpus,
            max: MAX_SMP_VCPUS,
        })
    }
}

/// 32-bit, before the page tables: `ebp` = APIC ID (the vCPU index; the
/// BSP's is 0), and an AP jumps to `join`.
pub(crate) fn emit_ap_branch(a: &mut CodeAssembler, join: CodeLabel) -> Result<(), WorkloadError> {
    a.mov(ebp, dword_ptr(LAPIC_ID))?;
    a.shr(ebp, 24)?;
    a.jnz(join)?;
    Ok(())
}

/// 32-bit, BSP only, after the page tables: trampoline, INIT, SIPI.
pub(crate) fn emit_start_aps(a: &mut CodeAssembler) -> Result<(), WorkloadError> {
    a.mov(dword_ptr(AP_TRAMPOLINE_GPA), TRAMPOLINE_DWORD)?;
    a.mov(edi, imm_u32(LAPIC_ICR_LOW))?;
    a.mov(dword_ptr(edi), ICR_INIT_ALL_BUT_SELF)?;
    a.mov(dword_ptr(edi), ICR_SIPI_ALL_BUT_SELF)?;
    Ok(())
}

fn imm_u32(v: u64) -> u32 {
    u32::try_from(v).expect("xAPIC addresses are below 4 GiB")
}

/// 64-bit, after the boot mark: keep the index in `r8`.
pub(crate) fn emit_index_to_r8(a: &mut CodeAssembler) -> Result<(), WorkloadError> {
    a.mov(r8d, ebp)?;
    Ok(())
}

/// `dst = start + r8 × chunk` (clobbers `rax`).
pub(crate) fn emit_part_start(
    a: &mut CodeAssembler,
    dst: AsmRegister64,
    start: u64,
    p: PerVcpu,
) -> Result<(), WorkloadError> {
    emit_mov_imm(a, dst, p.chunk)?;
    a.imul_2(dst, r8)?;
    emit_mov_imm(a, rax, start)?;
    a.add(dst, rax)?;
    Ok(())
}

/// `start_reg = start + r8 × chunk`, `end_reg = start_reg + chunk`
/// (clobbers `rax`).
pub(crate) fn emit_part(
    a: &mut CodeAssembler,
    start_reg: AsmRegister64,
    end_reg: AsmRegister64,
    start: u64,
    p: PerVcpu,
) -> Result<(), WorkloadError> {
    emit_part_start(a, start_reg, start, p)?;
    emit_mov_imm(a, end_reg, p.chunk)?;
    a.add(end_reg, start_reg)?;
    Ok(())
}

/// The pass mark: [`PASS_MARK`] with one vCPU, else the digit of the vCPU's
/// index (`r8`). Clobbers `dx` and `al` (one vCPU) or `eax` (several).
pub(crate) fn emit_pass_mark(a: &mut CodeAssembler, smp: bool) -> Result<(), WorkloadError> {
    if !smp {
        return emit_mark(a, PASS_MARK);
    }
    let mut wait = a.create_label();
    a.mov(dx, i32::from(COM1_LSR))?;
    a.set_label(&mut wait)?;
    a.in_(al, dx)?;
    a.test(al, 0x20)?;
    a.jz(wait)?;
    a.mov(dl, i32::from(COM1_DATA & 0xFF))?;
    a.lea(eax, ptr(r8 + i32::from(VCPU_MARK_BASE)))?;
    a.out(dx, al)?;
    Ok(())
}
