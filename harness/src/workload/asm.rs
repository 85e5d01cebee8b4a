//! The shared boot-sector builder: real mode → 32-bit protected mode → long
//! mode with identity-mapped 2 MiB pages, then a workload's 64-bit body.
//!
//! Every workload is one 512-byte boot sector (so the same image boots under
//! our VMM and under QEMU/SeaBIOS). This module owns everything they share:
//! the mode switches, the GDT kept inside the sector, the page tables, the
//! serial-mark and exit helpers, and the final layout of the sector. Code of
//! the three bitnesses is assembled separately with iced-x86 and the pieces'
//! addresses are found by iterating to a fixed point (a later piece's size can
//! depend on an earlier piece's addresses only through branch lengths).
//!
//! Sector layout (offsets from [`BOOT_LOAD_ADDR`](super::BOOT_LOAD_ADDR)):
//! `[16-bit code][GDT, 8-aligned, 32 bytes][32-bit code][64-bit code] … 55 AA`.
//!
//! Memory the prologue writes (and nothing else below 1 MiB):
//! - PML4 at [`PML4_GPA`], PDPT at [`PDPT_GPA`] (both zeroed here first),
//! - page directories from [`PD_GPA`], one per GiB of (rounded-up) guest RAM,
//!   every entry written, so no junk left by a BIOS survives.
//!
//! All entries are created with their Accessed (and for 2 MiB pages, Dirty)
//! bits already set, so the CPU never writes the page tables afterwards: a
//! workload that does not store (idle) really dirties no page after boot.

use std::ops::Range;

use iced_x86::code_asm::*;
use iced_x86::BlockEncoderOptions;

use super::{smp, WorkloadError, BOOT_LOAD_ADDR, BOOT_MARK, GIB};

/// Guest-physical address of the PML4 table.
pub const PML4_GPA: u64 = 0x1_0000;
/// Guest-physical address of the PDPT.
pub const PDPT_GPA: u64 = 0x1_1000;
/// Guest-physical address of the first page directory (one per GiB of RAM).
pub const PD_GPA: u64 = 0x1_2000;
/// Initial stack pointer (grows down below the boot sector; workloads don't
/// use the stack, it only exists so that a stray push has somewhere to go).
pub const STACK_TOP: u64 = BOOT_LOAD_ADDR;
/// COM1 data port: each mark byte is written here.
pub const COM1_DATA: u16 = 0x3F8;
/// COM1 line-status port, polled for "transmitter holding register empty".
pub const COM1_LSR: u16 = 0x3FD;
/// Port that ends the VM with the written byte as exit status (our VMM; QEMU's
/// `isa-debug-exit` device uses the same default address).
pub const EXIT_PORT: u16 = 0x501;

/// GDT selectors.
const SEL_CODE32: u16 = 0x08;
const SEL_DATA: u16 = 0x10;
const SEL_CODE64: u16 = 0x18;
/// Size of the GDT: null (which holds the GDTR pseudo-descriptor), code32,
/// data, code64.
const GDT_LEN: usize = 32;
/// Offset of the 0x55 0xAA signature.
const SIGNATURE_OFFSET: usize = 510;

/// Page-table entry flags.
const PTE_PRESENT_RW_ACCESSED: u32 = 0x1 | 0x2 | 0x20;
/// 2 MiB page: present, writable, accessed, dirty, page-size.
const PDE_2M_FLAGS: u32 = PTE_PRESENT_RW_ACCESSED | 0x40 | 0x80;

/// An assembled boot sector, with where each part lies (for tests).
#[derive(Debug, Clone)]
#[cfg_attr(not(test), allow(dead_code))] // the ranges are for tests
pub(crate) struct Sector {
    /// Exactly 512 bytes, ending in 0x55 0xAA.
    pub bytes: Vec<u8>,
    /// Byte range of the 16-bit code.
    pub code16: Range<usize>,
    /// Byte range of the 32-bit code.
    pub code32: Range<usize>,
    /// Byte range of the 64-bit code (prologue tail and workload body).
    pub code64: Range<usize>,
}

/// Addresses of the pieces; iterated to a fixed point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Layout {
    /// Address right after the CS-normalizing far jump.
    norm: u64,
    gdt: u64,
    pm32: u64,
    lm64: u64,
}

/// Assembles a whole boot sector for a guest with `mem_size` bytes of RAM:
/// the shared prologue (which prints [`BOOT_MARK`] once in long mode), then
/// `body`, which emits the workload's 64-bit code and must never fall off its
/// end. With `smp` the sector also starts the APs and runs on every vCPU,
/// with the vCPU's index in `r8` ([`super::smp`]).
pub(crate) fn boot_sector<F>(mem_size: u64, smp: bool, body: F) -> Result<Sector, WorkloadError>
where
    F: Fn(&mut CodeAssembler) -> Result<(), WorkloadError>,
{
    let base = BOOT_LOAD_ADDR;
    let mut layout = Layout {
        norm: base,
        gdt: base,
        pm32: base,
        lm64: base,
    };
    for _ in 0..16 {
        let (code16, norm) = real_mode(&layout)?;
        let gdt = align_up(base + len(&code16), 8);
        let pm32 = gdt + len(&[0u8; GDT_LEN]);
        let code32 = protected_mode(&layout, mem_size, smp)?;
        let lm64 = pm32 + len(&code32);
        let code64 = long_mode(lm64, smp, &body)?;
        let next = Layout {
            norm,
            gdt,
            pm32,
            lm64,
        };
        if next != layout {
            layout = next;
            continue;
        }
        let gdt_off = offset(gdt);
        let code32_off = offset(pm32);
        let code64_off = offset(lm64);
        let total = code64_off + code64.len();
        if total > SIGNATURE_OFFSET {
            return Err(WorkloadError::ImageTooLarge(total));
        }
        let mut bytes = vec![0u8; 512];
        bytes[..code16.len()].copy_from_slice(&code16);
        bytes[gdt_off..gdt_off + GDT_LEN].copy_from_slice(&gdt_bytes(gdt));
        bytes[code32_off..code32_off + code32.len()].copy_from_slice(&code32);
        bytes[code64_off..total].copy_from_slice(&code64);
        bytes[SIGNATURE_OFFSET] = 0x55;
        bytes[SIGNATURE_OFFSET + 1] = 0xAA;
        return Ok(Sector {
            bytes,
            code16: 0..code16.len(),
            code32: code32_off..code64_off,
            code64: code64_off..total,
        });
    }
    Err(WorkloadError::Assemble(
        "boot sector layout did not converge".into(),
    ))
}

fn len(bytes: &[u8]) -> u64 {
    u64::try_from(bytes.len()).unwrap_or(u64::MAX)
}

fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

/// Offset inside the sector of a guest address in it (addresses in the
/// layout are always within the 512 bytes after `BOOT_LOAD_ADDR`).
fn offset(addr: u64) -> usize {
    usize::try_from(addr - BOOT_LOAD_ADDR).unwrap_or(usize::MAX)
}

/// Converts an address known to be below 4 GiB to an immediate.
fn imm32(v: u64) -> Result<u32, WorkloadError> {
    u32::try_from(v).map_err(|_| WorkloadError::Assemble(format!("{v:#x} does not fit in 32 bits")))
}

/// Converts a value to a sign-extended 32-bit immediate, or fails.
pub(crate) fn imm_i32(v: u64) -> Result<i32, WorkloadError> {
    i32::try_from(v)
        .map_err(|_| WorkloadError::Assemble(format!("{v:#x} does not fit in an imm32")))
}

/// 16-bit code: normalize CS:IP, set segments and stack, load the GDT, enter
/// protected mode. Returns the code and the address after the far jump.
fn real_mode(l: &Layout) -> Result<(Vec<u8>, u64), WorkloadError> {
    let mut a = CodeAssembler::new(16)?;
    let mut norm = a.create_label();
    a.cli()?;
    a.jmp_far(0, imm32(l.norm)?)?;
    a.set_label(&mut norm)?;
    a.xor(ax, ax)?;
    a.mov(ds, ax)?;
    a.mov(es, ax)?;
    a.mov(ss, ax)?;
    a.mov(sp, imm_i32(STACK_TOP)?)?;
    a.lgdt(ptr(l.gdt))?;
    a.mov(eax, cr0)?;
    a.or(al, 1)?; // CR0.PE
    a.mov(cr0, eax)?;
    a.jmp_far(SEL_CODE32, imm32(l.pm32)?)?;
    let res = a.assemble_options(
        BOOT_LOAD_ADDR,
        BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
    )?;
    let norm_ip = res.label_ip(&norm)?;
    Ok((res.inner.code_buffer, norm_ip))
}

/// The GDT; its (never loaded) null descriptor holds the GDTR operand.
fn gdt_bytes(gdt: u64) -> [u8; GDT_LEN] {
    let mut g = [0u8; GDT_LEN];
    let limit = u16::try_from(GDT_LEN - 1).unwrap_or(u16::MAX);
    g[0..2].copy_from_slice(&limit.to_le_bytes());
    g[2..6].copy_from_slice(&u32::try_from(gdt).unwrap_or(0).to_le_bytes());
    // Flat 4 GiB segments: 32-bit code, data, 64-bit code.
    g[8..16].copy_from_slice(&0x00CF_9A00_0000_FFFFu64.to_le_bytes());
    g[16..24].copy_from_slice(&0x00CF_9200_0000_FFFFu64.to_le_bytes());
    g[24..32].copy_from_slice(&0x00AF_9A00_0000_FFFFu64.to_le_bytes());
    g
}

/// Number of GiB the page tables map: guest RAM rounded up to whole GiB, so
/// every page directory is filled completely.
pub(crate) fn mapped_gib(mem_size: u64) -> u64 {
    mem_size.div_ceil(GIB).max(1)
}

/// 32-bit code: segments, page tables, PAE + EFER.LME + paging, far jump to
/// 64-bit code. With `smp`, APs skip the page tables, and the BSP starts
/// the APs once the tables are complete.
fn protected_mode(l: &Layout, mem_size: u64, smp: bool) -> Result<Vec<u8>, WorkloadError> {
    let gib = imm32(mapped_gib(mem_size))?;
    let mut a = CodeAssembler::new(32)?;
    a.mov(eax, u32::from(SEL_DATA))?;
    a.mov(ds, eax)?;
    a.mov(es, eax)?;
    a.mov(ss, eax)?;
    let mut ap_join = a.create_label();
    if smp {
        smp::emit_ap_branch(&mut a, ap_join)?;
    }
    a.cld()?;
    // Zero PML4 and PDPT (2 × 4 KiB = 2048 dwords); edi ends at PD_GPA.
    a.mov(edi, imm32(PML4_GPA)?)?;
    a.xor(eax, eax)?;
    a.mov(ecx, 2048u32)?;
    a.rep().stosd()?;
    a.mov(
        dword_ptr(PML4_GPA),
        imm32(PDPT_GPA)? | PTE_PRESENT_RW_ACCESSED,
    )?;
    // PDE[j] = j * 2 MiB | flags, low and high dwords, for every entry of
    // every page directory (they are not zeroed first).
    a.mov(eax, PDE_2M_FLAGS)?;
    a.xor(edx, edx)?;
    a.mov(ecx, gib * 512)?;
    let mut pd_loop = a.create_label();
    a.set_label(&mut pd_loop)?;
    a.stosd()?;
    a.xchg(eax, edx)?;
    a.stosd()?;
    a.xchg(eax, edx)?;
    a.add(eax, 0x20_0000)?;
    a.adc(edx, 0)?;
    a.loop_(pd_loop)?;
    // PDPT[i] = PD_GPA + i * 4 KiB, for each mapped GiB (high dwords are
    // already zero).
    a.mov(edi, imm32(PDPT_GPA)?)?;
    a.mov(eax, imm32(PD_GPA)? | PTE_PRESENT_RW_ACCESSED)?;
    a.mov(ecx, gib)?;
    let mut pdpt_loop = a.create_label();
    a.set_label(&mut pdpt_loop)?;
    a.stosd()?;
    a.add(edi, 4)?;
    a.add(eax, 0x1000)?;
    a.loop_(pdpt_loop)?;
    if smp {
        smp::emit_start_aps(&mut a)?;
        a.set_label(&mut ap_join)?;
    }
    // Enable long mode.
    a.mov(eax, imm32(PML4_GPA)?)?;
    a.mov(cr3, eax)?;
    a.mov(eax, cr4)?;
    a.or(al, 0x20)?; // CR4.PAE
    a.mov(cr4, eax)?;
    a.mov(ecx, 0xC000_0080u32)?; // IA32_EFER
    a.rdmsr()?;
    a.or(ah, 1)?; // EFER.LME (bit 8)
    a.wrmsr()?;
    a.mov(eax, cr0)?;
    a.bts(eax, 31)?; // CR0.PG
    a.mov(cr0, eax)?;
    a.jmp_far(SEL_CODE64, imm32(l.lm64)?)?;
    Ok(a.assemble(l.pm32)?)
}

/// 64-bit code: stack, [`BOOT_MARK`], (with `smp`, the vCPU index into
/// `r8`), then the workload body.
fn long_mode<F>(ip: u64, smp: bool, body: &F) -> Result<Vec<u8>, WorkloadError>
where
    F: Fn(&mut CodeAssembler) -> Result<(), WorkloadError>,
{
    let mut a = CodeAssembler::new(64)?;
    a.mov(esp, imm32(STACK_TOP)?)?; // zero-extends into rsp
    emit_mark(&mut a, BOOT_MARK)?;
    if smp {
        smp::emit_index_to_r8(&mut a)?;
    }
    body(&mut a)?;
    Ok(a.assemble(ip)?)
}

/// Emits `mov reg, value` in its shortest form: a zero-extending 32-bit
/// move when `value` fits in 32 bits, else a 64-bit immediate.
pub(crate) fn emit_mov_imm(
    a: &mut CodeAssembler,
    reg: AsmRegister64,
    value: u64,
) -> Result<(), WorkloadError> {
    match u32::try_from(value) {
        Ok(v) => {
            let r32 = reg32(reg)?;
            a.mov(r32, v)?;
        }
        Err(_) => a.mov(reg, value)?,
    }
    Ok(())
}

/// The 32-bit register whose writes zero-extend into `reg`.
fn reg32(reg: AsmRegister64) -> Result<AsmRegister32, WorkloadError> {
    const PAIRS: [(AsmRegister64, AsmRegister32); 16] = [
        (rax, eax),
        (rcx, ecx),
        (rdx, edx),
        (rbx, ebx),
        (rsp, esp),
        (rbp, ebp),
        (rsi, esi),
        (rdi, edi),
        (r8, r8d),
        (r9, r9d),
        (r10, r10d),
        (r11, r11d),
        (r12, r12d),
        (r13, r13d),
        (r14, r14d),
        (r15, r15d),
    ];
    PAIRS
        .iter()
        .find(|(r64, _)| *r64 == reg)
        .map(|&(_, r32)| r32)
        .ok_or_else(|| WorkloadError::Assemble("no 32-bit alias".into()))
}

/// Emits code that writes `mark` to COM1 after waiting for the transmitter
/// to be empty. Clobbers `dx` and `al` only; touches no memory.
pub(crate) fn emit_mark(a: &mut CodeAssembler, mark: u8) -> Result<(), WorkloadError> {
    let mut wait = a.create_label();
    a.mov(dx, i32::from(COM1_LSR))?;
    a.set_label(&mut wait)?;
    a.in_(al, dx)?;
    a.test(al, 0x20)?;
    a.jz(wait)?;
    a.mov(dl, i32::from(COM1_DATA & 0xFF))?; // dh is already COM1's 0x03
    a.mov(al, i32::from(mark))?;
    a.out(dx, al)?;
    Ok(())
}

/// Emits code that writes `status` to [`EXIT_PORT`] and then halts forever
/// with interrupts disabled (for when the exit port does nothing, as on QEMU
/// without `isa-debug-exit`).
pub(crate) fn emit_exit_and_halt(a: &mut CodeAssembler, status: u8) -> Result<(), WorkloadError> {
    a.mov(dx, i32::from(EXIT_PORT))?;
    a.mov(al, i32::from(status))?;
    a.out(dx, al)?;
    a.cli()?;
    let mut halt = a.create_label();
    a.set_label(&mut halt)?;
    a.hlt()?;
    a.jmp(halt)?;
    Ok(())
}

/// Emits code that sets `rax` to the full 64-bit TSC (clobbers `rdx`).
pub(crate) fn emit_rdtsc(a: &mut CodeAssembler) -> Result<(), WorkloadError> {
    a.rdtsc()?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)?;
    Ok(())
}
