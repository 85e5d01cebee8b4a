//! `burst`: a phased writer, quiet then a storm of page stores, repeating.
//!
//! Models a guest whose dirty rate changes over time (a batch job, a
//! periodic flush, a garbage collector): the dirty rate a migration measures
//! in one iteration says little about the next. Timing uses `rdtsc`, with the
//! TSC frequency from [`BuildParams::tsc_hz`](super::BuildParams), which
//! `burst` requires. One cycle is:
//!
//! 1. **Quiet** for `quiet` ms: a register-only loop polling the TSC (no
//!    store, no stack), so the guest dirties no page. When the time is up it
//!    prints one [`PASS_MARK`]. With `quiet-wss = Q`, the quiet phase
//!    instead keeps sweeping the first `Q` bytes of the range, in chunks of
//!    [`BURST_CHECK_PAGES`] pages between TSC checks, with its own position
//!    (no marks per pass): the dirty rate then alternates between a small
//!    and a large working set, a sawtooth of remaining bytes rather than an
//!    on/off burst (the case that broke Nova's progress timeout).
//! 2. **Storm** for `storm` ms: `inc byte [page]` into one page after
//!    another of `[start, end)`, in address order, wrapping around from `end`
//!    to `start` (the same 4-instruction-per-page loop as `sweep`, so at
//!    ≈ 250,000 pages/s at 1 MIPS). Each time the sweep reaches `end`, i.e.
//!    after every complete pass over the range, it prints one [`PASS_MARK`].
//!    The TSC is checked after every [`BURST_CHECK_PAGES`] pages and at the
//!    end of each pass, and the storm stops at the first check that finds
//!    `storm` ms elapsed. The sweep position is kept from one storm to the
//!    next (a pass may span several storms), so every page of the range gets
//!    dirtied even when one storm is too short to cover it.
//!
//! Cycles repeat forever, or, with `cycles = N`, the guest stays quiet after
//! the N-th storm (still printing one [`PASS_MARK`] per `quiet` ms).
//!
//! So the serial output is: one mark per `quiet` ms while quiet, and
//! `storm ms × (pages/s) / pages` marks (one per pass) spread over each storm.
//! Phase durations are measured as an unsigned difference from the TSC at
//! the phase start: a TSC that jumps forward (the VM was paused) or backward
//! (a TSC reset) ends the current phase at the next check.

use iced_x86::code_asm::*;

use super::asm::{emit_mark, emit_mov_imm, emit_rdtsc, imm_i32};
use super::{WorkloadError, PAGE_SIZE, PASS_MARK};

/// Default length of a quiet phase, in milliseconds.
pub const DEFAULT_BURST_QUIET_MS: u64 = 3000;
/// Default length of a storm, in milliseconds.
pub const DEFAULT_BURST_STORM_MS: u64 = 1000;
/// A storm checks the TSC after this many pages (≈ 0.26 ms at 250,000
/// pages/s), and at the end of each pass.
pub const BURST_CHECK_PAGES: u64 = 64;

/// Phase lengths in TSC ticks (both nonzero).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    pub quiet_ticks: u64,
    pub storm_ticks: u64,
}

/// Emits the burst loop over `[start, end)` (page-aligned, `end > start`);
/// `quiet_end`: the quiet phases sweep `[start, quiet_end)` (`None`: they
/// store nothing); `cycles` storms, 0 for forever. Never returns. Registers:
/// rbx = end, rbp = start, rdi = sweep position, rsi = end of the current
/// chunk, r8/r9 = quiet/storm ticks, r12 = storms left, r13/r14 = quiet
/// sweep position/end, r15 = TSC at the phase start, rax and rdx for
/// `rdtsc` and marks.
pub(crate) fn emit(
    a: &mut CodeAssembler,
    start: u64,
    end: u64,
    quiet_end: Option<u64>,
    timing: Timing,
    cycles: u64,
) -> Result<(), WorkloadError> {
    let chunk = imm_i32(BURST_CHECK_PAGES * PAGE_SIZE)?;
    let mut cycle = a.create_label();
    let mut quiet = a.create_label();
    let mut storm_chunk = a.create_label();
    let mut page = a.create_label();
    let mut check_time = a.create_label();

    emit_mov_imm(a, rbx, end)?;
    emit_mov_imm(a, rbp, start)?;
    a.mov(rdi, rbp)?;
    emit_mov_imm(a, r8, timing.quiet_ticks)?;
    emit_mov_imm(a, r9, timing.storm_ticks)?;
    if cycles > 0 {
        emit_mov_imm(a, r12, cycles)?;
    }
    if let Some(q) = quiet_end {
        a.mov(r13, rbp)?;
        emit_mov_imm(a, r14, q)?;
    }

    // ---- quiet: poll the TSC, registers only (or sweep the quiet range)
    a.set_label(&mut cycle)?;
    emit_rdtsc(a)?;
    a.mov(r15, rax)?;
    a.set_label(&mut quiet)?;
    if quiet_end.is_some() {
        let mut quiet_page = a.create_label();
        let mut quiet_check = a.create_label();
        a.lea(rsi, ptr(r13 + chunk))?;
        a.cmp(rsi, r14)?;
        a.cmova(rsi, r14)?;
        a.set_label(&mut quiet_page)?;
        a.inc(byte_ptr(r13))?;
        a.add(r13, imm_i32(PAGE_SIZE)?)?;
        a.cmp(r13, rsi)?;
        a.jb(quiet_page)?;
        a.cmp(r13, r14)?;
        a.jb(quiet_check)?;
        a.mov(r13, rbp)?;
        a.set_label(&mut quiet_check)?;
    }
    emit_rdtsc(a)?;
    a.sub(rax, r15)?;
    a.cmp(rax, r8)?;
    a.jb(quiet)?;
    emit_mark(a, PASS_MARK)?;
    if cycles > 0 {
        a.test(r12, r12)?;
        a.jz(cycle)?; // all storms done: quiet forever
        a.dec(r12)?;
    }

    // ---- storm: sweep chunk by chunk, checking the time in between
    emit_rdtsc(a)?;
    a.mov(r15, rax)?;
    a.set_label(&mut storm_chunk)?;
    a.lea(rsi, ptr(rdi + chunk))?;
    a.cmp(rsi, rbx)?;
    a.cmova(rsi, rbx)?;
    a.set_label(&mut page)?;
    a.inc(byte_ptr(rdi))?;
    a.add(rdi, imm_i32(PAGE_SIZE)?)?;
    a.cmp(rdi, rsi)?;
    a.jb(page)?;
    a.cmp(rdi, rbx)?;
    a.jb(check_time)?;
    emit_mark(a, PASS_MARK)?;
    a.mov(rdi, rbp)?;
    a.set_label(&mut check_time)?;
    emit_rdtsc(a)?;
    a.sub(rax, r15)?;
    a.cmp(rax, r9)?;
    a.jb(storm_chunk)?;
    a.jmp(cycle)?;
    Ok(())
}
