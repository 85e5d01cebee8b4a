//! Image shape, disassembly sanity, the code each workload runs.

use iced_x86::{Code, Mnemonic, OpKind};

use super::*;

#[test]
fn every_image_is_one_boot_sector() {
    for mem in MEM_SIZES {
        for spec in all_specs() {
            let Ok(image) = build(&spec, &params(mem)) else {
                // Only the hotset and burst specs can be too large for a
                // 2 MiB guest, and the largest burst for any but 64 GiB.
                let may_fail = match spec {
                    WorkloadSpec::Hotset { .. } => mem == 2 * MIB,
                    WorkloadSpec::Burst { start, .. } => {
                        mem == 2 * MIB || (start.is_some() && mem < 64 * GIB)
                    }
                    _ => false,
                };
                assert!(may_fail, "{spec} {mem}");
                continue;
            };
            assert_eq!(image.boot.len(), BOOT_SECTOR_SIZE, "{spec} {mem}");
            assert_eq!(&image.boot[510..], &[0x55, 0xAA], "{spec} {mem}");
        }
    }
}

#[test]
fn disassembles_into_a_sane_mode_switch() {
    for mem in MEM_SIZES {
        for spec in all_specs() {
            let Ok((image, sector)) = build_inner(&spec, &params(mem), None) else {
                continue;
            };
            let b = &image.boot;
            let c16 = decode(b, &sector.code16, 16);
            let c32 = decode(b, &sector.code32, 32);
            let c64 = decode(b, &sector.code64, 64);

            // Real mode: cli, then a far jump to CS=0 and the next instruction.
            assert_eq!(c16[0].mnemonic(), Mnemonic::Cli);
            assert_eq!(c16[1].code(), Code::Jmp_ptr1616);
            assert_eq!(c16[1].far_branch_selector(), 0);
            assert_eq!(u64::from(c16[1].far_branch16()), c16[2].ip());
            // lgdt points at a GDTR inside the sector describing the GDT.
            let lgdt = c16
                .iter()
                .find(|i| i.mnemonic() == Mnemonic::Lgdt)
                .expect("lgdt");
            let gdtr = usize::try_from(lgdt.memory_displacement64() - BOOT_LOAD_ADDR).unwrap();
            assert_eq!(u16::from_le_bytes([b[gdtr], b[gdtr + 1]]), 31);
            let base = u32::from_le_bytes(b[gdtr + 2..gdtr + 6].try_into().unwrap());
            assert_eq!(u64::from(base), BOOT_LOAD_ADDR + gdtr as u64);
            assert_eq!(
                &b[gdtr + 24..gdtr + 32],
                &0x00AF_9A00_0000_FFFFu64.to_le_bytes()
            );
            // Far jump into the 32-bit code, then into the 64-bit code.
            let last16 = c16.last().unwrap();
            assert_eq!(last16.code(), Code::Jmp_ptr1616);
            assert_eq!(
                (
                    last16.far_branch_selector(),
                    u64::from(last16.far_branch16())
                ),
                (0x08, c32[0].ip())
            );
            let last32 = c32.last().unwrap();
            assert_eq!(last32.code(), Code::Jmp_ptr1632);
            assert_eq!(
                (
                    last32.far_branch_selector(),
                    u64::from(last32.far_branch32())
                ),
                (0x18, c64[0].ip())
            );
            assert!(c32.iter().any(|i| i.mnemonic() == Mnemonic::Wrmsr));
            // The PDE loop count covers all of RAM in whole GiB.
            let counts: Vec<u64> = c32
                .iter()
                .filter(|i| {
                    i.op0_register() == iced_x86::Register::ECX
                        && i.op1_kind() == OpKind::Immediate32
                })
                .filter(|i| i.immediate32() != 0xC000_0080)
                .map(|i| i.immediate32().into())
                .collect();
            assert_eq!(
                counts,
                vec![2048, mem.div_ceil(GIB) * 512, mem.div_ceil(GIB)],
                "{spec}"
            );
            // 64-bit code prints the boot mark first and never runs off its end.
            assert!(c64.iter().any(|i| i.mnemonic() == Mnemonic::Out));
            let last = c64.last().unwrap();
            assert_eq!(
                last.mnemonic(),
                Mnemonic::Jmp,
                "{spec}: ends with {:?}",
                last.mnemonic()
            );
        }
    }
}

#[test]
fn idle_loop_touches_no_memory() {
    let (image, sector) = build_inner(&WorkloadSpec::Idle, &params(GIB), None).unwrap();
    let c64 = decode(&image.boot, &sector.code64, 64);
    assert!(c64
        .iter()
        .all(|i| (0..i.op_count()).all(|n| i.op_kind(n) != OpKind::Memory)));
    let stack = [
        Mnemonic::Push,
        Mnemonic::Pop,
        Mnemonic::Call,
        Mnemonic::Ret,
        Mnemonic::Pushfq,
        Mnemonic::Popfq,
    ];
    assert!(!c64.iter().any(|i| stack.contains(&i.mnemonic())));
}

#[test]
fn images_describe_their_memory() {
    let p = params(256 * MIB);
    let sweep = build(
        &WorkloadSpec::Sweep {
            start: None,
            end: None,
            mode: SweepMode::Inc,
        },
        &p,
    )
    .unwrap();
    assert_eq!(sweep.dirty_range, Some(MIB..256 * MIB));
    assert!(sweep.fills.is_empty() && !sweep.needs_vmm_content);
    let verify = build(
        &WorkloadSpec::Verify {
            seq: false,
            start: None,
            end: None,
        },
        &p,
    )
    .unwrap();
    assert_eq!(verify.dirty_range, Some(MIB..64 * MIB));
    let small = build(
        &WorkloadSpec::Verify {
            seq: false,
            start: None,
            end: None,
        },
        &params(16 * MIB),
    )
    .unwrap();
    assert_eq!(small.dirty_range, Some(MIB..16 * MIB));
    assert_eq!(build(&WorkloadSpec::Idle, &p).unwrap().dirty_range, None);
    let hot = build(&"hotset:wss=8M".parse().unwrap(), &p).unwrap();
    assert!(hot.needs_vmm_content);
    assert_eq!(hot.dirty_range, Some(MIB..9 * MIB));
    assert_eq!(
        hot.fills,
        vec![MemoryFill {
            gpa: MIB,
            len: 8 * MIB,
            content: FillContent::PseudoRandom {
                seed: HOTSET_FILL_SEED
            }
        }]
    );
    // Parameters are baked in: different RAM sizes give different images.
    let other = build(
        &WorkloadSpec::Sweep {
            start: None,
            end: None,
            mode: SweepMode::Inc,
        },
        &params(512 * MIB),
    )
    .unwrap();
    assert_ne!(sweep.boot, other.boot);
}

#[test]
fn fault_injection_changes_only_verify() {
    let p = params(64 * MIB);
    let spec = WorkloadSpec::Verify {
        seq: false,
        start: None,
        end: None,
    };
    let sweep = WorkloadSpec::Sweep {
        start: None,
        end: None,
        mode: SweepMode::Inc,
    };
    for fault in [
        VerifyFault::SkipWrite {
            pass: 2,
            page: 2 * MIB,
        },
        VerifyFault::CorruptAfterCheck {
            pass: 1 << 40,
            page: 48 * GIB,
        },
    ] {
        // Fits in the sector even with 64-bit immediates.
        let faulty = build_with_verify_fault(&spec, &params(64 * GIB), fault).unwrap();
        assert_ne!(build(&spec, &params(64 * GIB)).unwrap(), faulty);
        assert_eq!(
            build(&sweep, &p).unwrap(),
            build_with_verify_fault(&sweep, &p, fault).unwrap()
        );
    }
}

#[test]
fn verify_values_depend_on_address_and_pass() {
    for pass in 1..200u64 {
        for addr in (MIB..MIB + 64 * 4096).step_by(8) {
            assert_ne!(
                verify_expected_value(addr, pass),
                verify_expected_value(addr, pass + 1)
            );
            assert_ne!(
                verify_expected_value(addr, pass),
                verify_expected_value(addr + 4096, pass)
            );
        }
    }
}

#[test]
fn serde_uses_the_spec_string() {
    let spec: WorkloadSpec = "hotset:wss=256M,rate=50000".parse().unwrap();
    let json = serde_json::to_string(&spec).unwrap();
    assert_eq!(json, r#""hotset:wss=256M,rate=50000""#);
    assert_eq!(serde_json::from_str::<WorkloadSpec>(&json).unwrap(), spec);
    let err = serde_json::from_str::<WorkloadSpec>(r#""sweep:bogus=1""#).unwrap_err();
    assert!(
        err.to_string().contains("unknown parameter `bogus`"),
        "{err}"
    );
}

#[test]
fn sweep_modes_store_what_they_say() {
    let p = params(256 * MIB);
    for (mode, want) in [
        (SweepMode::Inc, (Mnemonic::Inc, None)),
        (SweepMode::Same, (Mnemonic::Mov, Some(0x5A))),
        (SweepMode::Zero, (Mnemonic::Mov, Some(0))),
    ] {
        let spec = WorkloadSpec::Sweep {
            start: None,
            end: None,
            mode,
        };
        let c64 = code64(&spec, &p);
        // Exactly one memory access: a byte store at [rdi].
        let mem = memory_accesses(&c64);
        assert_eq!(mem.len(), 1, "{spec}");
        let store = mem[0];
        assert_eq!(store.op0_kind(), OpKind::Memory, "{spec}");
        assert_eq!(store.memory_base(), iced_x86::Register::RDI);
        assert_eq!(store.memory_size(), iced_x86::MemorySize::UInt8);
        assert_eq!(store.memory_displacement64(), 0);
        assert_eq!(store.mnemonic(), want.0, "{spec}");
        if let Some(byte) = want.1 {
            assert_eq!(store.op1_kind(), OpKind::Immediate8);
            assert_eq!(store.immediate8(), byte);
        }
        // Same loop otherwise: the images differ only in the store.
        let image = build(&spec, &p).unwrap();
        assert_eq!(image.dirty_range, Some(MIB..256 * MIB));
        assert!(image.fills.is_empty() && !image.needs_vmm_content);
    }
    assert_eq!(SWEEP_SAME_BYTE, 0x5A);
}

#[test]
fn burst_code_shape() {
    let tsc_hz = 2_000_000_000;
    let spec: WorkloadSpec = "burst:wss=16M,quiet=3000,storm=1000".parse().unwrap();
    let c64 = code64(&spec, &params(256 * MIB));
    // The only memory access is the storm's byte increment; the quiet phase
    // and everything else work in registers (and no stack either).
    let mem = memory_accesses(&c64);
    assert_eq!(mem.len(), 1);
    assert_eq!(mem[0].mnemonic(), Mnemonic::Inc);
    assert_eq!(mem[0].memory_base(), iced_x86::Register::RDI);
    assert_eq!(mem[0].memory_size(), iced_x86::MemorySize::UInt8);
    assert!(!c64.iter().any(|i| matches!(
        i.mnemonic(),
        Mnemonic::Push | Mnemonic::Pop | Mnemonic::Call | Mnemonic::Ret
    )));
    // Four TSC reads: quiet start, quiet poll, storm start, storm check.
    let count = |m| c64.iter().filter(|i| i.mnemonic() == m).count();
    assert_eq!(count(Mnemonic::Rdtsc), 4);
    // Marks: boot, end of quiet phase, end of sweep pass.
    assert_eq!(count(Mnemonic::Out), 3);
    // No cycle counter when cycles = 0.
    assert_eq!(count(Mnemonic::Dec), 0);
    // Range, phase lengths in ticks and the check interval are baked in.
    let imms = immediates(&c64);
    for v in [MIB, 17 * MIB, 3 * tsc_hz, tsc_hz] {
        assert!(imms.contains(&v), "{v:#x} not in {imms:x?}");
    }
    let lea = c64.iter().find(|i| i.mnemonic() == Mnemonic::Lea).unwrap();
    assert_eq!(lea.memory_displacement64(), BURST_CHECK_PAGES * PAGE_SIZE);
    assert_eq!(lea.memory_base(), iced_x86::Register::RDI);

    let cycles: WorkloadSpec = "burst:wss=16M,cycles=5".parse().unwrap();
    let c64 = code64(&cycles, &params(256 * MIB));
    assert!(immediates(&c64).contains(&5));
    assert_eq!(
        c64.iter().filter(|i| i.mnemonic() == Mnemonic::Dec).count(),
        1
    );

    // With quiet-wss the quiet phase sweeps the start of the range through
    // its own register (r13, bounded by r14 = start + 4 MiB), marks nothing
    // per pass, and the storm is unchanged.
    let saw: WorkloadSpec = "burst:wss=16M,quiet-wss=4M".parse().unwrap();
    let c64 = code64(&saw, &params(256 * MIB));
    let mem = memory_accesses(&c64);
    let bases: Vec<_> = mem.iter().map(|i| i.memory_base()).collect();
    assert_eq!(
        bases,
        [iced_x86::Register::R13, iced_x86::Register::RDI],
        "{mem:?}"
    );
    assert!(mem.iter().all(|i| i.mnemonic() == Mnemonic::Inc));
    assert!(immediates(&c64).contains(&(5 * MIB)));
    let count = |m| c64.iter().filter(|i| i.mnemonic() == m).count();
    assert_eq!(count(Mnemonic::Rdtsc), 4);
    assert_eq!(count(Mnemonic::Out), 3);
}

#[test]
fn burst_images_describe_their_memory() {
    let p = params(256 * MIB);
    let b = |s: &str| build(&s.parse().unwrap(), &p).unwrap();
    for (s, range) in [
        ("burst", MIB..65 * MIB),
        ("burst:wss=4M", MIB..5 * MIB),
        ("burst:start=2M,wss=4M", 2 * MIB..6 * MIB),
        ("burst:start=2M", 2 * MIB..66 * MIB),
        ("burst:end=32M", MIB..32 * MIB),
        ("burst:start=128M,end=256M", 128 * MIB..256 * MIB),
    ] {
        let image = b(s);
        assert_eq!(image.dirty_range, Some(range), "{s}");
        assert!(image.fills.is_empty() && !image.needs_vmm_content, "{s}");
    }
    // Timing is baked in: different TSC rates give different images.
    let spec: WorkloadSpec = "burst".parse().unwrap();
    let other = BuildParams {
        mem_size: 256 * MIB,
        tsc_hz: Some(3_000_000_000),
        vcpus: 1,
    };
    assert_ne!(
        build(&spec, &p).unwrap().boot,
        build(&spec, &other).unwrap().boot
    );
}

#[test]
fn burst_build_errors() {
    use WorkloadError as E;
    let p = params(64 * MIB);
    let b = |s: &str| build(&s.parse().unwrap(), &p);
    // Default range [1M, 65M) does not fit a 64 MiB guest; 63M does.
    assert!(matches!(b("burst"), Err(E::RangeOutsideRam { end, .. }) if end == 65 * MIB));
    assert!(b("burst:wss=63M").is_ok());
    // The quiet sweep lies inside the range.
    assert!(b("burst:wss=32M,quiet-wss=32M").is_ok());
    assert!(matches!(
        b("burst:wss=32M,quiet-wss=36M"),
        Err(E::WssTooLarge { wss, available }) if wss == 36 * MIB && available == 32 * MIB
    ));
    assert!(matches!(
        b("burst:end=128M"),
        Err(E::RangeOutsideRam { .. })
    ));
    assert!(matches!(
        b("burst:start=64M"),
        Err(E::RangeOutsideRam { .. })
    ));
    let no_tsc = BuildParams {
        mem_size: 256 * MIB,
        tsc_hz: None,
        vcpus: 1,
    };
    assert!(matches!(
        build(&"burst".parse().unwrap(), &no_tsc),
        Err(E::MissingTscHz)
    ));
    // 1 ms of a 500 Hz TSC is no tick at all; a huge duration overflows.
    let slow = BuildParams {
        mem_size: 256 * MIB,
        tsc_hz: Some(500),
        vcpus: 1,
    };
    assert!(matches!(
        build(&"burst:quiet=1".parse().unwrap(), &slow),
        Err(E::DurationOutOfRange {
            key: "quiet",
            ms: 1,
            tsc_hz: 500
        })
    ));
    assert!(build(&"burst:quiet=2".parse().unwrap(), &slow).is_ok());
    assert!(matches!(
        build(
            &"burst:storm=0xFFFFFFFFFFFFFFFF".parse().unwrap(),
            &params(256 * MIB)
        ),
        Err(E::DurationOutOfRange { key: "storm", .. })
    ));
    // Hand-built specs get the checks the parser does.
    let hand = |f: &dyn Fn(&mut WorkloadSpec)| {
        let mut spec = burst(None, None, None);
        f(&mut spec);
        build(&spec, &params(256 * MIB))
    };
    assert!(matches!(
        hand(&|s| if let WorkloadSpec::Burst { end, wss, .. } = s {
            *end = Some(8 * MIB);
            *wss = Some(4 * MIB);
        }),
        Err(E::ConflictingKeys { .. })
    ));
    assert!(matches!(
        hand(&|s| if let WorkloadSpec::Burst { quiet_ms, .. } = s {
            *quiet_ms = 0;
        }),
        Err(E::BadNumber { key: "quiet", .. })
    ));
    assert!(matches!(
        hand(&|s| if let WorkloadSpec::Burst { wss, .. } = s {
            *wss = Some(0);
        }),
        Err(E::WssZero)
    ));
    assert!(matches!(
        hand(&|s| if let WorkloadSpec::Burst { start, .. } = s {
            *start = Some(4096);
        }),
        Err(E::StartBelowMin { .. })
    ));
}

#[test]
fn knows_which_specs_need_the_tsc() {
    let needs = |s: &str| s.parse::<WorkloadSpec>().unwrap().needs_tsc_hz();
    assert!(needs("burst"));
    assert!(needs("hotset:rate=1000"));
    for s in ["idle", "sweep", "sweep:mode=zero", "hotset", "verify"] {
        assert!(!needs(s), "{s}");
        // ... and indeed build without one.
        let p = BuildParams {
            mem_size: 256 * MIB,
            tsc_hz: None,
            vcpus: 1,
        };
        assert!(build(&s.parse().unwrap(), &p).is_ok(), "{s}");
    }
}
