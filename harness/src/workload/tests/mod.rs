//! Unit tests of the workload images: shared helpers here; image shape and
//! code in `shape`, spec parsing and build errors in `specs`.

use iced_x86::{Decoder, DecoderOptions, Instruction, Mnemonic, OpKind};

use super::*;
use crate::size::KIB;

const MEM_SIZES: [u64; 5] = [2 * MIB, 256 * MIB, 3 * GIB + 2 * MIB, 4 * GIB, 64 * GIB];

fn all_specs() -> Vec<WorkloadSpec> {
    vec![
        WorkloadSpec::Idle,
        WorkloadSpec::Halt,
        WorkloadSpec::Sweep {
            start: None,
            end: None,
            mode: SweepMode::Inc,
        },
        WorkloadSpec::Hotset {
            wss: 4096,
            rate: None,
            writers: None,
        },
        WorkloadSpec::Hotset {
            wss: MIB,
            rate: Some(50_000),
            writers: None,
        },
        WorkloadSpec::Verify {
            seq: false,
            start: None,
            end: None,
        },
        WorkloadSpec::Sweep {
            start: None,
            end: None,
            mode: SweepMode::Same,
        },
        WorkloadSpec::Sweep {
            start: None,
            end: None,
            mode: SweepMode::Zero,
        },
        burst(None, None, None),
        WorkloadSpec::Burst {
            start: None,
            end: None,
            wss: Some(MIB),
            quiet_ms: 1,
            quiet_wss: None,
            storm_ms: 1,
            cycles: 3,
        },
        // The largest burst: every parameter a 64-bit immediate (on guests
        // of at least 64 GiB; smaller ones reject the range).
        WorkloadSpec::Burst {
            start: Some(60 * GIB),
            end: Some(64 * GIB),
            wss: None,
            quiet_ms: 100_000,
            quiet_wss: Some(2 * GIB),
            storm_ms: 100_000,
            cycles: 1 << 40,
        },
    ]
}

/// A burst with default timing.
fn burst(start: Option<u64>, end: Option<u64>, wss: Option<u64>) -> WorkloadSpec {
    WorkloadSpec::Burst {
        start,
        end,
        wss,
        quiet_ms: DEFAULT_BURST_QUIET_MS,
        quiet_wss: None,
        storm_ms: DEFAULT_BURST_STORM_MS,
        cycles: 0,
    }
}

fn params(mem_size: u64) -> BuildParams {
    BuildParams {
        mem_size,
        tsc_hz: Some(2_000_000_000),
        vcpus: 1,
    }
}

/// Decodes `range` of the sector as `bitness` code, asserting every
/// instruction is valid and the range is decoded exactly.
fn decode(bytes: &[u8], range: &Range<usize>, bitness: u32) -> Vec<Instruction> {
    let ip = BOOT_LOAD_ADDR + range.start as u64;
    let mut d = Decoder::with_ip(bitness, &bytes[range.clone()], ip, DecoderOptions::NONE);
    let mut out = Vec::new();
    while d.can_decode() {
        let i = d.decode();
        assert!(
            !i.is_invalid(),
            "invalid {bitness}-bit instruction at {:#x}",
            i.ip()
        );
        out.push(i);
    }
    assert_eq!(d.position(), range.len());
    out
}

/// Instructions of the 64-bit code that access memory (not `lea`).
fn memory_accesses(c64: &[Instruction]) -> Vec<Instruction> {
    c64.iter()
        .filter(|i| i.mnemonic() != Mnemonic::Lea)
        .filter(|i| (0..i.op_count()).any(|n| i.op_kind(n) == OpKind::Memory))
        .copied()
        .collect()
}

/// Decodes the 64-bit code of `spec` built for `p`.
fn code64(spec: &WorkloadSpec, p: &BuildParams) -> Vec<Instruction> {
    let (image, sector) = build_inner(spec, p, None).unwrap_or_else(|e| panic!("{spec}: {e}"));
    decode(&image.boot, &sector.code64, 64)
}

/// All immediates of `code` (64-bit value of every immediate operand).
fn immediates(code: &[Instruction]) -> Vec<u64> {
    code.iter()
        .flat_map(|i| {
            (0..i.op_count())
                .filter(|&n| {
                    !matches!(
                        i.op_kind(n),
                        OpKind::Register
                            | OpKind::Memory
                            | OpKind::NearBranch16
                            | OpKind::NearBranch32
                            | OpKind::NearBranch64
                    )
                })
                .map(|n| i.immediate(n))
                .collect::<Vec<_>>()
        })
        .collect()
}

mod shape;
mod smp;
mod specs;
