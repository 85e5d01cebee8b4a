//! `sweep`: one store into every 4 KiB page of a range, over and over.
//!
//! The classic migration stress (like QEMU's migration-test guest): each pass
//! does `inc byte [page]` for every page of `[start, end)` in address order,
//! then prints [`PASS_MARK`]. At ~4 instructions per page the whole range is
//! re-dirtied at the guest's full speed, so the dirty rate is the guest's
//! instruction rate divided by 4 (≈ 250,000 pages/s at 1 MIPS). Only the
//! first byte of each page changes (by +1 per pass), so dirtied pages stay
//! as compressible as they were.

use iced_x86::code_asm::*;

use super::asm::{emit_mark, imm_i32};
use super::{WorkloadError, PAGE_SIZE, PASS_MARK};

/// Emits the sweep loop over `[start, end)` (page-aligned, `end > start`);
/// never returns. Uses `rdi`, `rbx`, `dx`, `al`.
pub(crate) fn emit(a: &mut CodeAssembler, start: u64, end: u64) -> Result<(), WorkloadError> {
    let mut pass = a.create_label();
    let mut page = a.create_label();
    a.mov(rbx, end)?;
    a.set_label(&mut pass)?;
    a.mov(rdi, start)?;
    a.set_label(&mut page)?;
    a.inc(byte_ptr(rdi))?;
    a.add(rdi, imm_i32(PAGE_SIZE)?)?;
    a.cmp(rdi, rbx)?;
    a.jb(page)?;
    emit_mark(a, PASS_MARK)?;
    a.jmp(pass)?;
    Ok(())
}
