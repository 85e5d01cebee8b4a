//! `idle`: a guest that dirties no memory after boot.
//!
//! The baseline for migration: after the prologue, the only thing running is
//! a register-only countdown loop (no stores, no stack), so every page is
//! clean after the first round of a pre-copy migration. It still prints
//! [`PASS_MARK`] every [`IDLE_ITERATIONS_PER_PASS`] iterations so the harness
//! can measure guest speed (≈ 2 instructions per iteration) before, during
//! and after migration.

use iced_x86::code_asm::*;

use super::smp::emit_pass_mark;
use super::WorkloadError;

/// Loop iterations between two [`PASS_MARK`]s of the idle workload.
pub const IDLE_ITERATIONS_PER_PASS: u32 = 1 << 20;

/// Emits the idle loop (never returns). Uses `ecx`, `dx`, `al` (`eax` with
/// `smp`: each vCPU idles and prints its own marks).
pub(crate) fn emit(a: &mut CodeAssembler, smp: bool) -> Result<(), WorkloadError> {
    let mut pass = a.create_label();
    let mut spin = a.create_label();
    a.set_label(&mut pass)?;
    a.mov(ecx, IDLE_ITERATIONS_PER_PASS)?;
    a.set_label(&mut spin)?;
    a.dec(ecx)?;
    a.jnz(spin)?;
    emit_pass_mark(a, smp)?;
    a.jmp(pass)?;
    Ok(())
}

/// Emits the `halt` body: one pass mark (the guest booted; each vCPU's own
/// with `smp`), every
/// line of both 8259 PICs masked, then `sti; hlt` forever. With interrupts
/// enabled vmigrate parks the vCPU instead of ending the guest, and no
/// interrupt ever comes, so the vCPU takes no host CPU time. The masking is
/// for QEMU, whose firmware leaves the PIT's timer line open: a tick in
/// protected mode without an IDT would reset the guest. Uses `dx`, `al`
/// (`eax` with `smp`).
pub(crate) fn emit_halt(a: &mut CodeAssembler, smp: bool) -> Result<(), WorkloadError> {
    emit_pass_mark(a, smp)?;
    a.mov(al, 0xFFu32)?;
    a.out(0x21, al)?;
    a.out(0xA1, al)?;
    a.sti()?;
    let mut wait = a.create_label();
    a.set_label(&mut wait)?;
    a.hlt()?;
    a.jmp(wait)?;
    Ok(())
}
