//! `hotset`: random stores into an incompressible working set.
//!
//! Models a guest whose hot memory is data that compresses badly (a cache,
//! encrypted or already compressed data): the working set `[1 MiB, 1 MiB + wss)`
//! is filled by the VMM before boot with pseudo-random bytes (a
//! [`MemoryFill`](super::MemoryFill), seed [`HOTSET_FILL_SEED`]), and the guest
//! stores one changing qword at the start of one page after another, in
//! pseudo-random order: a full-period LCG modulo 2^k ≥ pages (multiplier
//! 1664525, increment 1013904223), skipping indices ≥ pages. One LCG cycle
//! touches every page exactly once, so [`PASS_MARK`](super::PASS_MARK) is printed after every
//! `pages` stores. Each stored value differs from the last (a running sum
//! of an odd constant), so a re-dirtied page never becomes compressible.
//!
//! With `rate`, stores are paced with `rdtsc` to that many pages per second
//! (the TSC frequency comes from [`BuildParams::tsc_hz`](super::BuildParams));
//! after a stall (e.g. a migration pause) the deficit is not caught up beyond
//! [`HOTSET_MAX_CATCH_UP_MS`] ms worth of stores, so the guest does not burst.
//!
//! With `writers=N` on more than N vCPUs, vCPUs `0..N` share the working set
//! and the others branch to the `idle` loop (no stores, their own marks):
//! a guest where some vCPUs dirty memory and others only compute.

use iced_x86::code_asm::*;

use super::asm::{emit_rdtsc, imm_i32};
use super::idle;
use super::smp::{emit_part_start, emit_pass_mark, PerVcpu};
use super::{WorkloadError, PAGE_SIZE};

/// Seed of the pseudo-random content of the hotset working set.
pub const HOTSET_FILL_SEED: u64 = 0x686F_7473_6574_0001;
/// A paced hotset catches up at most this much lost time after a stall.
pub const HOTSET_MAX_CATCH_UP_MS: u64 = 10;

/// LCG multiplier (≡ 1 mod 4) and increment (odd): full period modulo 2^k.
const LCG_A: i32 = 1_664_525;
const LCG_C: i32 = 1_013_904_223;
/// Added to the stored value at every store (odd, so values never repeat
/// within 2^64 stores).
const VALUE_STEP: u64 = 0x9E37_79B9_7F4A_7C15;

/// Pacing: TSC ticks between two stores, and the largest lag tolerated
/// before the schedule is reset to "now".
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pacing {
    pub ticks_per_page: u64,
    pub max_lag_ticks: u64,
}

/// TSC pacing for `rate` pages/s.
pub(crate) fn pacing(rate: u64, tsc_hz: Option<u64>) -> Result<Pacing, WorkloadError> {
    if rate == 0 {
        return Err(WorkloadError::BadNumber {
            key: "rate",
            value: "0".into(),
            expected: "a positive integer",
        });
    }
    let tsc_hz = tsc_hz.ok_or(WorkloadError::MissingTscHz)?;
    let ticks_per_page = tsc_hz / rate;
    if ticks_per_page == 0 {
        return Err(WorkloadError::RateTooHigh { rate, tsc_hz });
    }
    let max_lag_ticks = (tsc_hz / 1000 * HOTSET_MAX_CATCH_UP_MS).max(ticks_per_page);
    Ok(Pacing {
        ticks_per_page,
        max_lag_ticks,
    })
}

/// Emits the hotset loop over `pages` pages from `base` (never returns).
/// Uses rax, rcx, rdx, rsi, rdi, rbx, rbp, r11–r15. With `per_vcpu`, `pages`
/// is each vCPU's share and vCPU *i* works on the part at `base + i ×
/// chunk`, printing its own pass mark (see [`super::smp`]). With
/// `idle_from` = N, vCPUs with index ≥ N (in `r8`) run the idle loop
/// instead.
pub(crate) fn emit(
    a: &mut CodeAssembler,
    base: u64,
    pages: u64,
    pacing: Option<Pacing>,
    per_vcpu: Option<PerVcpu>,
    idle_from: Option<u32>,
) -> Result<(), WorkloadError> {
    let pages32 = imm_i32(pages)?;
    let k = 64 - pages.saturating_sub(1).leading_zeros();
    let mask = imm_i32((1u64 << k) - 1)?;
    let shift = PAGE_SIZE.trailing_zeros();

    let mut next = a.create_label();
    let mut idle_loop = a.create_label();
    if let Some(n) = idle_from {
        a.cmp(r8d, n)?;
        a.jae(idle_loop)?;
    }
    match per_vcpu {
        None => a.mov(rbx, base)?,
        Some(p) => emit_part_start(a, rbx, base, p)?,
    }
    a.mov(r12, HOTSET_FILL_SEED)?;
    a.mov(r14, VALUE_STEP)?;
    a.xor(esi, esi)?;
    a.mov(r13d, pages32)?;
    if let Some(p) = pacing {
        emit_rdtsc(a)?;
        a.mov(r15, rax)?;
        a.mov(rbp, p.ticks_per_page)?;
        a.mov(r11, p.max_lag_ticks)?;
    }
    a.set_label(&mut next)?;
    a.imul_3(rsi, rsi, LCG_A)?;
    a.add(rsi, LCG_C)?;
    a.and(rsi, mask)?;
    a.cmp(rsi, pages32)?;
    a.jae(next)?;
    a.mov(rdi, rsi)?;
    a.shl(rdi, shift)?;
    a.add(r12, r14)?;
    a.mov(qword_ptr(rbx + rdi), r12)?;
    if pacing.is_some() {
        let mut wait = a.create_label();
        let mut on_time = a.create_label();
        a.add(r15, rbp)?; // next deadline
        a.set_label(&mut wait)?;
        emit_rdtsc(a)?;
        a.mov(rcx, rax)?;
        a.sub(rcx, r15)?; // now - deadline
        a.js(wait)?;
        a.cmp(rcx, r11)?;
        a.jbe(on_time)?;
        a.mov(r15, rax)?; // too far behind: restart the schedule from now
        a.set_label(&mut on_time)?;
    }
    a.dec(r13)?;
    a.jnz(next)?;
    emit_pass_mark(a, per_vcpu.is_some())?;
    a.mov(r13d, pages32)?;
    a.jmp(next)?;
    if idle_from.is_some() {
        a.set_label(&mut idle_loop)?;
        // The idle loop labels its own first instruction (one label each).
        a.nop()?;
        idle::emit(a, true)?;
    }
    Ok(())
}

/// Measures the host TSC frequency (ticks per second) against the monotonic
/// clock over about 50 ms. Under KVM without TSC scaling the guest's TSC runs
/// at this rate; pass it as [`BuildParams::tsc_hz`](super::BuildParams).
#[cfg(target_arch = "x86_64")]
#[must_use]
pub fn measure_tsc_hz() -> u64 {
    use std::time::{Duration, Instant};
    let t0 = Instant::now();
    let c0 = read_tsc();
    while t0.elapsed() < Duration::from_millis(50) {
        std::hint::spin_loop();
    }
    let c1 = read_tsc();
    let nanos = t0.elapsed().as_nanos().max(1);
    let hz = u128::from(c1.wrapping_sub(c0)) * 1_000_000_000 / nanos;
    u64::try_from(hz).unwrap_or(u64::MAX)
}

/// Reads the time-stamp counter.
#[cfg(target_arch = "x86_64")]
#[allow(unused_unsafe)] // `_rdtsc` may become a safe fn in later Rust versions
fn read_tsc() -> u64 {
    // SAFETY: RDTSC only reads the time-stamp counter into registers: it has
    // no memory effects and no preconditions on x86_64 (always available).
    unsafe { core::arch::x86_64::_rdtsc() }
}
