//! `verify`: a self-checking guest that detects lost or stale memory and
//! lost registers.
//!
//! Pass `p` (a counter kept only in `r15`, starting at 1) writes, into every
//! 4 KiB page `A` of `[start, end)`, four qwords: at offsets 0, 2048, 4088 and
//! a per-pass offset `(p * 568) mod 4096` (which walks all 512 qword slots
//! over 512 passes). The qword at address `X` gets
//! `value(X, p) = (X ^ (p * K2)) * K1` with `K1`, `K2` odd: distinct for
//! every address in a pass, and different from pass `p - 1`'s value at the
//! same address, so a page left at the previous pass' content (or zeroed, or
//! another page's content) is caught. Then the pass re-reads and checks all of
//! them, recomputing `p * K2` from `r15` (so a corrupted `r15` between the two
//! phases shows up too), and prints [`PASS_MARK`](super::PASS_MARK).
//!
//! From pass 2 on, before overwriting a page the write phase also checks that
//! its first qword still holds the previous pass' value, which catches damage
//! done between two passes (e.g. while the VM was paused for migration) and a
//! pass counter that was reset.
//!
//! On the first mismatch it prints [`MISMATCH_MARK`], writes
//! [`MISMATCH_EXIT_STATUS`] to the exit port and halts with interrupts off.

use iced_x86::code_asm::*;

use super::asm::{emit_exit_and_halt, emit_mark, emit_mov_imm, imm_i32};
use super::smp::{emit_part, emit_pass_mark, PerVcpu};
use super::{WorkloadError, MISMATCH_EXIT_STATUS, MISMATCH_MARK, PAGE_SIZE};

/// Multiplier applied to `address ^ (pass * K2)` (odd → bijective).
const K1: u64 = 0x9E37_79B9_7F4A_7C15;
/// Pass multiplier (odd, fits an imm32).
const K2: i32 = 0x5851_F42D;
/// Step of the per-pass qword offset (8 × an odd number: visits all 512).
const ROVING_STEP: i32 = 568;

/// A deliberate fault built into a `verify` guest, to test that the checker
/// fires (the guest then prints [`MISMATCH_MARK`] and exits).
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerifyFault {
    /// In pass `pass` (1-based), the write phase skips page `page`, leaving
    /// the previous pass' values: caught by that pass' check phase, after
    /// `pass - 1` [`PASS_MARK`](super::PASS_MARK)s.
    SkipWrite {
        /// The pass.
        pass: u64,
        /// Guest-physical address of the page (page-aligned, in range).
        page: u64,
    },
    /// After pass `pass` has checked clean (and printed its mark), the first
    /// qword of page `page` is incremented: caught by the read-before-write
    /// of pass `pass + 1`, after `pass` [`PASS_MARK`](super::PASS_MARK)s.
    CorruptAfterCheck {
        /// The pass.
        pass: u64,
        /// Guest-physical address of the page (page-aligned, in range).
        page: u64,
    },
}

/// The fixed qword offsets (first, middle, last) packed as 16-bit fields
/// 1..3 of the per-pass offset list; field 0 gets the roving offset. The
/// inner loop takes the low field and shifts right by 16 until nothing is
/// left; the top field (4088) is nonzero, so all four are always visited.
const FIXED_OFFSETS_PACKED: u64 = (4088 << 48) | (2048 << 32);

/// Emits the verify loop over `[start, end)` (never returns).
/// Registers: r15 pass, r14 = pass * K2, r13 = K1, r11 = (pass - 1) * K2,
/// r10 = packed offsets, rbp = start, rbx = end, rsi = page size, rdi =
/// page, rdx = offsets being consumed, rcx = qword offset, rax = value,
/// dx/al for marks. With `per_vcpu`, each vCPU checks its own part of
/// `[start, end)` with its own pass counter and prints its own
/// pass mark (see [`super::smp`]); a mismatch on any vCPU prints
/// [`MISMATCH_MARK`] and ends the VM.
pub(crate) fn emit(
    a: &mut CodeAssembler,
    start: u64,
    end: u64,
    fault: Option<VerifyFault>,
    per_vcpu: Option<PerVcpu>,
    seq: bool,
) -> Result<(), WorkloadError> {
    let page_step = imm_i32(PAGE_SIZE)?;
    let mut pass = a.create_label();
    let mut write_page = a.create_label();
    let mut write_qword = a.create_label();
    let mut check_page = a.create_label();
    let mut check_qword = a.create_label();
    let mut fail = a.create_label();

    match per_vcpu {
        None => {
            emit_mov_imm(a, rbx, end)?;
            emit_mov_imm(a, rbp, start)?;
        }
        Some(p) => emit_part(a, rbp, rbx, start, p)?,
    }
    a.mov(r13, K1)?;
    a.mov(esi, page_step)?;
    a.mov(r15d, 1)?;

    // ---- write phase
    a.set_label(&mut pass)?;
    a.imul_3(r14, r15, K2)?;
    a.lea(r11, ptr(r14 - K2))?;
    a.imul_3(eax, r15d, ROVING_STEP)?;
    a.and(eax, 0xFF8)?;
    a.mov(r10, FIXED_OFFSETS_PACKED)?;
    a.or(r10, rax)?;
    a.mov(rdi, rbp)?;
    a.set_label(&mut write_page)?;
    {
        // Read-before-write of the first qword, from pass 2 on.
        let mut fresh = a.create_label();
        a.cmp(r15, 1)?;
        a.je(fresh)?;
        emit_value(a, rdi, r11)?;
        a.cmp(qword_ptr(rdi), rax)?;
        a.jne(fail)?;
        a.set_label(&mut fresh)?;
    }
    let mut next_write = a.create_label();
    if let Some(VerifyFault::SkipWrite { pass, page }) = fault {
        let mut no_fault = a.create_label();
        emit_mov_imm(a, rax, pass)?;
        a.cmp(r15, rax)?;
        a.jne(no_fault)?;
        emit_mov_imm(a, rax, page)?;
        a.cmp(rdi, rax)?;
        a.je(next_write)?;
        a.set_label(&mut no_fault)?;
    }
    a.mov(rdx, r10)?;
    a.set_label(&mut write_qword)?;
    a.movzx(ecx, dx)?;
    a.lea(rax, ptr(rdi + rcx))?;
    emit_mix(a, r14)?;
    a.mov(qword_ptr(rdi + rcx), rax)?;
    a.shr(rdx, 16)?;
    a.jnz(write_qword)?;
    a.set_label(&mut next_write)?;
    a.add(rdi, rsi)?;
    a.cmp(rdi, rbx)?;
    a.jb(write_page)?;

    // ---- check phase (pass-dependent value recomputed from r15)
    a.imul_3(r14, r15, K2)?;
    a.mov(rdi, rbp)?;
    a.set_label(&mut check_page)?;
    a.mov(rdx, r10)?;
    a.set_label(&mut check_qword)?;
    a.movzx(ecx, dx)?;
    a.lea(rax, ptr(rdi + rcx))?;
    emit_mix(a, r14)?;
    a.cmp(qword_ptr(rdi + rcx), rax)?;
    a.jne(fail)?;
    a.shr(rdx, 16)?;
    a.jnz(check_qword)?;
    a.add(rdi, rsi)?;
    a.cmp(rdi, rbx)?;
    a.jb(check_page)?;
    emit_pass_mark(a, per_vcpu.is_some())?;
    if seq {
        emit_pass_number(a)?;
    }
    if let Some(VerifyFault::CorruptAfterCheck { pass, page }) = fault {
        let mut no_fault = a.create_label();
        emit_mov_imm(a, rax, pass)?;
        a.cmp(r15, rax)?;
        a.jne(no_fault)?;
        emit_mov_imm(a, rax, page)?;
        a.inc(qword_ptr(rax))?;
        a.set_label(&mut no_fault)?;
    }
    a.inc(r15)?;
    a.jmp(pass)?;

    // ---- failure
    a.set_label(&mut fail)?;
    emit_mark(a, MISMATCH_MARK)?;
    emit_exit_and_halt(a, MISMATCH_EXIT_STATUS)?;
    Ok(())
}

/// Prints the low 16 bits of the pass counter (`r15`) as 4 lowercase hex
/// digits. Uses r12, r9, rax, rdx (free between passes).
fn emit_pass_number(a: &mut CodeAssembler) -> Result<(), WorkloadError> {
    // Byte-register forms throughout: the boot sector has little room.
    let (lsr, data) = (
        crate::workload::asm::COM1_LSR,
        crate::workload::asm::COM1_DATA,
    );
    let mut digit = a.create_label();
    let mut wait = a.create_label();
    let mut decimal = a.create_label();
    a.mov(r12, r15)?;
    a.shl(r12, 48)?;
    a.push(4)?;
    a.pop(r9)?;
    a.mov(edx, i32::from(lsr))?;
    a.set_label(&mut digit)?;
    a.mov(dl, i32::from(lsr & 0xFF))?; // dh is COM1's 0x03
    a.set_label(&mut wait)?;
    a.in_(al, dx)?;
    a.test(al, 0x20)?;
    a.jz(wait)?;
    a.rol(r12, 4)?;
    a.mov(eax, r12d)?;
    a.and(al, 0xF)?;
    a.cmp(al, 10)?;
    a.jb(decimal)?;
    a.add(al, i32::from(b'a' - b'0' - 10))?;
    a.set_label(&mut decimal)?;
    a.add(al, i32::from(b'0'))?;
    a.mov(dl, i32::from(data & 0xFF))?;
    a.out(dx, al)?;
    a.dec(r9d)?;
    a.jnz(digit)?;
    Ok(())
}

/// `rax = (addr ^ pass_mul) * K1` (K1 in r13).
fn emit_value(
    a: &mut CodeAssembler,
    addr: AsmRegister64,
    pass_mul: AsmRegister64,
) -> Result<(), WorkloadError> {
    a.mov(rax, addr)?;
    emit_mix(a, pass_mul)
}

/// `rax = (rax ^ pass_mul) * K1` (K1 in r13).
fn emit_mix(a: &mut CodeAssembler, pass_mul: AsmRegister64) -> Result<(), WorkloadError> {
    a.xor(rax, pass_mul)?;
    a.imul_2(rax, r13)?;
    Ok(())
}

/// Host-side model of the value the guest stores at `addr` in pass `pass`
/// (for tests and for inspecting a verify guest's memory).
#[must_use]
pub fn expected_value(addr: u64, pass: u64) -> u64 {
    let pass_mul = pass.wrapping_mul(u64::from(K2.unsigned_abs()));
    (addr ^ pass_mul).wrapping_mul(K1)
}
