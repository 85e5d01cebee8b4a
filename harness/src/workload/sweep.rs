//! `sweep`: one store into every 4 KiB page of a range, over and over.
//!
//! The classic migration stress (like QEMU's migration-test guest): each pass
//! stores one byte at the start of every page of `[start, end)` in address
//! order, then prints [`PASS_MARK`](super::PASS_MARK). At ~4 instructions per page the whole
//! range is re-dirtied at the guest's full speed, so the dirty rate is the
//! guest's instruction rate divided by 4 (≈ 250,000 pages/s at 1 MIPS), the
//! same in every mode. What is stored is the [`SweepMode`]:
//!
//! - `inc` (default): `inc byte [page]`. Only the first byte of each page
//!   changes (by +1 per pass), so dirtied pages stay as compressible as they
//!   were, but every pass really changes every page.
//! - `same`: `mov byte [page], 0x5A` ([`SWEEP_SAME_BYTE`]), a writer that
//!   rewrites the same values: from the second pass on every page is dirtied
//!   again but its content no longer changes (a migration that compares
//!   content, or a delta encoder, sends nothing new).
//! - `zero`: `mov byte [page], 0`, a mostly-zero guest: guest RAM our VMM
//!   gives a fresh guest is all zero and `sweep` writes no other byte, so every
//!   dirtied page stays entirely zero (a migration sends them as zero ranges).
//!   Under QEMU, pages the firmware used (e.g. SeaBIOS near the top of RAM)
//!   keep whatever the firmware left there.

use std::fmt;
use std::str::FromStr;

use iced_x86::code_asm::*;

use super::asm::imm_i32;
use super::smp::{emit_part, emit_pass_mark, PerVcpu};
use super::{WorkloadError, PAGE_SIZE};

/// The byte `sweep:mode=same` stores at the start of every page.
pub const SWEEP_SAME_BYTE: u8 = 0x5A;

/// What `sweep` stores into each page (the `mode=` parameter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum SweepMode {
    /// `inc byte [page]`: the page's first byte changes every pass.
    #[default]
    Inc,
    /// The constant [`SWEEP_SAME_BYTE`]: dirty pages whose content is
    /// unchanged after the first pass.
    Same,
    /// Zero: dirty pages that stay all zero.
    Zero,
}

impl SweepMode {
    /// The spec names of the modes, as listed in errors.
    pub const NAMES: &'static str = "inc, same, zero";

    /// The mode's name in a spec (`inc`, `same`, `zero`).
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            SweepMode::Inc => "inc",
            SweepMode::Same => "same",
            SweepMode::Zero => "zero",
        }
    }
}

impl fmt::Display for SweepMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SweepMode {
    type Err = WorkloadError;

    /// Parses a mode name (case-insensitive, surrounding blanks ignored).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "inc" => Ok(SweepMode::Inc),
            "same" => Ok(SweepMode::Same),
            "zero" => Ok(SweepMode::Zero),
            _ => Err(WorkloadError::UnknownMode {
                workload: "sweep",
                mode: s.trim().to_owned(),
                allowed: SweepMode::NAMES,
            }),
        }
    }
}

/// Emits the one store into the page at `rdi` that `mode` does.
pub(crate) fn emit_store(a: &mut CodeAssembler, mode: SweepMode) -> Result<(), WorkloadError> {
    match mode {
        SweepMode::Inc => a.inc(byte_ptr(rdi))?,
        SweepMode::Same => a.mov(byte_ptr(rdi), u32::from(SWEEP_SAME_BYTE))?,
        SweepMode::Zero => a.mov(byte_ptr(rdi), 0u32)?,
    }
    Ok(())
}

/// Emits the sweep loop over `[start, end)` (page-aligned, `end > start`);
/// never returns. Uses `rdi`, `rbx`, `dx`, `al`; with `per_vcpu`, each vCPU
/// sweeps its own part (start kept in `r9`) and prints its own
/// pass mark (see [`super::smp`]).
pub(crate) fn emit(
    a: &mut CodeAssembler,
    start: u64,
    end: u64,
    mode: SweepMode,
    per_vcpu: Option<PerVcpu>,
) -> Result<(), WorkloadError> {
    let mut pass = a.create_label();
    let mut page = a.create_label();
    match per_vcpu {
        None => a.mov(rbx, end)?,
        Some(p) => emit_part(a, r9, rbx, start, p)?,
    }
    a.set_label(&mut pass)?;
    match per_vcpu {
        None => a.mov(rdi, start)?,
        Some(_) => a.mov(rdi, r9)?,
    }
    a.set_label(&mut page)?;
    emit_store(a, mode)?;
    a.add(rdi, imm_i32(PAGE_SIZE)?)?;
    a.cmp(rdi, rbx)?;
    a.jb(page)?;
    emit_pass_mark(a, per_vcpu.is_some())?;
    a.jmp(pass)?;
    Ok(())
}
