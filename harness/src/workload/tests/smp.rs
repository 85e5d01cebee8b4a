//! Several vCPUs: every image still fits, the APs are started, each vCPU
//! gets its part, and one vCPU builds the single-vCPU sector.

use iced_x86::{Mnemonic, Register};

use super::*;

fn smp_params(mem_size: u64, vcpus: u32) -> BuildParams {
    BuildParams {
        vcpus,
        ..params(mem_size)
    }
}

/// Memory displacements of the 32-bit code of `spec`.
fn displacements32(spec: &WorkloadSpec, p: &BuildParams) -> Vec<u64> {
    let (image, sector) = build_inner(spec, p, None).unwrap();
    decode(&image.boot, &sector.code32, 32)
        .iter()
        .filter(|i| (0..i.op_count()).any(|n| i.op_kind(n) == OpKind::Memory))
        .map(Instruction::memory_displacement64)
        .collect()
}

/// A two-operand instruction whose second operand is an immediate.
fn has_imm(i: &Instruction) -> bool {
    i.op_count() == 2 && !matches!(i.op_kind(1), OpKind::Register | OpKind::Memory)
}

#[test]
fn every_smp_image_is_one_boot_sector() {
    for vcpus in 2..=MAX_SMP_VCPUS {
        for mem in MEM_SIZES {
            for spec in all_specs() {
                let r = build(&spec, &smp_params(mem, vcpus));
                match spec {
                    WorkloadSpec::Burst { .. } => {
                        assert_eq!(r, Err(WorkloadError::SingleVcpuOnly("burst")));
                    }
                    WorkloadSpec::Hotset { .. } if r.is_err() => {
                        assert!(
                            matches!(
                                r,
                                Err(WorkloadError::WssTooLarge { .. }
                                    | WorkloadError::RangeTooSmallForVcpus { .. })
                            ),
                            "{spec} {mem} {vcpus}: {r:?}"
                        );
                    }
                    _ => {
                        let image = r.unwrap_or_else(|e| panic!("{spec} {mem} {vcpus}: {e}"));
                        assert_eq!(image.boot.len(), BOOT_SECTOR_SIZE);
                        assert_eq!(&image.boot[510..], &[0x55, 0xAA]);
                    }
                }
            }
        }
    }
}

#[test]
fn smp_sector_starts_the_aps_and_one_vcpu_does_not() {
    let spec = WorkloadSpec::Verify {
        start: None,
        end: None,
        seq: false,
    };
    let one = displacements32(&spec, &smp_params(256 * MIB, 1));
    assert!(!one.iter().any(|d| *d >= 0xFEE0_0000), "{one:x?}");
    let (image, sector) = build_inner(&spec, &smp_params(256 * MIB, 2), None).unwrap();
    let c32 = decode(&image.boot, &sector.code32, 32);
    // The APIC ID is read first, and an AP skips ahead.
    assert_eq!(c32[4].memory_displacement64(), 0xFEE0_0020);
    assert_eq!(c32[6].mnemonic(), Mnemonic::Jne);
    // The trampoline, then INIT and SIPI (vector 7) through the ICR.
    let imms: Vec<u64> = c32
        .iter()
        .filter(|i| i.mnemonic() == Mnemonic::Mov && has_imm(i))
        .map(|i| i.immediate(1))
        .collect();
    let at = imms
        .iter()
        .position(|v| *v == 0x000B_FDE9)
        .expect("trampoline");
    assert_eq!(
        &imms[at + 1..at + 4],
        &[0xFEE0_0300, 0x000C_4500, 0x000C_4607]
    );
    let tramp = c32
        .iter()
        .find(|i| has_imm(i) && i.immediate(1) == 0x000B_FDE9)
        .unwrap();
    assert_eq!(tramp.memory_displacement64(), AP_TRAMPOLINE_GPA);
    // `jmp near` from 0700:0003 by 0x0BFD lands at 0700:0C00 = 0x7C00.
    assert_eq!(AP_TRAMPOLINE_GPA + 3 + 0x0BFD, BOOT_LOAD_ADDR);
    assert_eq!(u64::from(SIPI_VECTOR) << 12, AP_TRAMPOLINE_GPA);
}

#[test]
fn one_vcpu_builds_the_single_vcpu_sector() {
    for spec in all_specs() {
        // burst (one vCPU only) uses r8 for itself.
        if matches!(spec, WorkloadSpec::Burst { .. }) {
            continue;
        }
        let Ok(one) = build(&spec, &params(256 * MIB)) else {
            continue;
        };
        let c64 = code64(&spec, &params(256 * MIB));
        // No use of r8 (the SMP index) and no LAPIC access.
        assert!(
            !c64.iter().any(|i| (0..i.op_count())
                .any(|n| i.op_kind(n) == OpKind::Register && i.op_register(n) == Register::R8)),
            "{spec}"
        );
        assert_eq!(one.boot.len(), BOOT_SECTOR_SIZE);
    }
}

#[test]
fn smp_errors() {
    let verify = WorkloadSpec::Verify {
        start: None,
        end: Some(MIB + 4 * KIB),
        seq: false,
    };
    for vcpus in [0, MAX_SMP_VCPUS + 1] {
        assert_eq!(
            build(&verify, &smp_params(64 * MIB, vcpus)),
            Err(WorkloadError::BadVcpuCount {
                vcpus,
                max: MAX_SMP_VCPUS
            })
        );
    }
    assert!(build(&verify, &smp_params(64 * MIB, 1)).is_ok());
    assert_eq!(
        build(&verify, &smp_params(64 * MIB, 2)),
        Err(WorkloadError::RangeTooSmallForVcpus {
            len: 4 * KIB,
            vcpus: 2
        })
    );
}

#[test]
fn parts_are_equal_disjoint_and_inside_the_range() {
    let r = MIB..MIB + 10 * PAGE_SIZE + 100;
    assert_eq!(crate::workload::smp::split(&r, 1).unwrap(), None);
    let p = crate::workload::smp::split(&r, 3).unwrap().unwrap();
    assert_eq!(p.chunk, 3 * PAGE_SIZE);
    assert!(r.start + 3 * p.chunk <= r.end);
}

#[test]
fn hotset_writers_idles_the_other_vcpus() {
    let hot = |writers| WorkloadSpec::Hotset {
        wss: 16 * MIB,
        rate: None,
        writers,
    };
    let p2 = smp_params(64 * MIB, 2);
    // writers = every vCPU is the plain split: the same image.
    assert_eq!(build(&hot(Some(2)), &p2), build(&hot(None), &p2));
    // writers = 1 of 1 is the single-vCPU sector.
    let p1 = smp_params(64 * MIB, 1);
    assert_eq!(build(&hot(Some(1)), &p1), build(&hot(None), &p1));
    // One writer of two: vCPU 1 branches to the idle countdown, vCPU 0
    // keeps the whole working set (16 MiB = 4096 pages per pass).
    let c64 = code64(&hot(Some(1)), &p2);
    let at = c64
        .iter()
        .position(|i| i.mnemonic() == Mnemonic::Cmp && i.op_register(0) == Register::R8D)
        .expect("index test");
    assert_eq!(c64[at].immediate(1), 1);
    assert_eq!(c64[at + 1].mnemonic(), Mnemonic::Jae);
    let imms = immediates(&c64);
    assert!(imms.contains(&4096), "{imms:?}");
    // The idle countdown (`dec ecx`) is there only with writers.
    let idles = |c: &[Instruction]| {
        c.iter()
            .any(|i| i.mnemonic() == Mnemonic::Dec && i.op_register(0) == Register::ECX)
    };
    assert!(idles(&c64));
    let plain = code64(&hot(None), &p2);
    assert!(!idles(&plain));
    assert!(immediates(&plain).contains(&2048));
    // 0, or more writers than vCPUs, is refused.
    for w in [0, 3] {
        assert_eq!(
            build(&hot(Some(w)), &p2),
            Err(WorkloadError::BadWriters {
                writers: w,
                vcpus: 2
            })
        );
    }
}
