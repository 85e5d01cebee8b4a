//! Unit tests: image shape, disassembly sanity, spec parsing, build errors.

use iced_x86::{Code, Decoder, DecoderOptions, Instruction, Mnemonic, OpKind};

use super::*;
use crate::size::KIB;

const MEM_SIZES: [u64; 5] = [2 * MIB, 256 * MIB, 3 * GIB + 2 * MIB, 4 * GIB, 64 * GIB];

fn all_specs() -> Vec<WorkloadSpec> {
    vec![
        WorkloadSpec::Idle,
        WorkloadSpec::Sweep {
            start: None,
            end: None,
        },
        WorkloadSpec::Hotset {
            wss: 4096,
            rate: None,
        },
        WorkloadSpec::Hotset {
            wss: MIB,
            rate: Some(50_000),
        },
        WorkloadSpec::Verify {
            start: None,
            end: None,
        },
    ]
}

fn params(mem_size: u64) -> BuildParams {
    BuildParams {
        mem_size,
        tsc_hz: Some(2_000_000_000),
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

#[test]
fn every_image_is_one_boot_sector() {
    for mem in MEM_SIZES {
        for spec in all_specs() {
            let Ok(image) = build(&spec, &params(mem)) else {
                // Only the hotset specs can be too large for a 2 MiB guest.
                assert!(
                    matches!(spec, WorkloadSpec::Hotset { .. }) && mem == 2 * MIB,
                    "{spec}"
                );
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
fn parses_good_specs() {
    let cases: &[(&str, WorkloadSpec)] = &[
        ("idle", WorkloadSpec::Idle),
        (
            "sweep",
            WorkloadSpec::Sweep {
                start: None,
                end: None,
            },
        ),
        (
            "sweep:start=1M,end=512M",
            WorkloadSpec::Sweep {
                start: Some(MIB),
                end: Some(512 * MIB),
            },
        ),
        (
            " sweep : end = 0x4000000 ",
            WorkloadSpec::Sweep {
                start: None,
                end: Some(64 * MIB),
            },
        ),
        (
            "hotset",
            WorkloadSpec::Hotset {
                wss: DEFAULT_HOTSET_WSS,
                rate: None,
            },
        ),
        (
            "hotset:wss=256M,rate=50000",
            WorkloadSpec::Hotset {
                wss: 256 * MIB,
                rate: Some(50_000),
            },
        ),
        (
            "HOTSET:RATE=0x10",
            WorkloadSpec::Hotset {
                wss: DEFAULT_HOTSET_WSS,
                rate: Some(16),
            },
        ),
        (
            "verify:start=1M,end=64M",
            WorkloadSpec::Verify {
                start: Some(MIB),
                end: Some(64 * MIB),
            },
        ),
        (
            "verify:end=8M",
            WorkloadSpec::Verify {
                start: None,
                end: Some(8 * MIB),
            },
        ),
    ];
    for (s, want) in cases {
        let got: WorkloadSpec = s.parse().unwrap_or_else(|e| panic!("{s}: {e}"));
        assert_eq!(got, *want, "{s}");
        // Display is canonical and parses back.
        assert_eq!(got.to_string().parse::<WorkloadSpec>(), Ok(got));
    }
    assert_eq!(
        WorkloadSpec::Sweep {
            start: Some(MIB),
            end: Some(512 * MIB)
        }
        .to_string(),
        "sweep:start=1M,end=512M"
    );
    assert_eq!(
        WorkloadSpec::Hotset {
            wss: 256 * MIB,
            rate: Some(50_000)
        }
        .to_string(),
        "hotset:wss=256M,rate=50000"
    );
    assert_eq!(
        WorkloadSpec::Verify {
            start: None,
            end: Some(GIB)
        }
        .to_string(),
        "verify:end=1G"
    );
}

#[test]
fn rejects_bad_specs() {
    use WorkloadError as E;
    let err = |s: &str| s.parse::<WorkloadSpec>().unwrap_err();
    assert!(matches!(err("bogus"), E::UnknownWorkload(n) if n == "bogus"));
    assert!(matches!(err(""), E::UnknownWorkload(_)));
    assert!(matches!(
        err("sweep:size=1M"),
        E::UnknownKey {
            workload: "sweep",
            ..
        }
    ));
    assert!(matches!(
        err("idle:start=1M"),
        E::UnknownKey {
            workload: "idle",
            ..
        }
    ));
    assert!(matches!(
        err("hotset:start=1M"),
        E::UnknownKey {
            workload: "hotset",
            ..
        }
    ));
    assert!(matches!(err("sweep:"), E::MalformedParam(_)));
    assert!(matches!(err("sweep:start"), E::MalformedParam(_)));
    assert!(matches!(err("sweep:start="), E::MalformedParam(_)));
    assert!(matches!(
        err("sweep:start=2M,,end=4M"),
        E::MalformedParam(_)
    ));
    assert!(matches!(err("sweep:end=4M,end=8M"), E::DuplicateKey(_)));
    assert!(matches!(
        err("sweep:end=lots"),
        E::BadSize { key: "end", .. }
    ));
    assert!(matches!(
        err("hotset:rate=fast"),
        E::BadNumber { key: "rate", .. }
    ));
    assert!(matches!(
        err("hotset:rate=0"),
        E::BadNumber { key: "rate", .. }
    ));
    assert!(matches!(
        err("hotset:rate=5K"),
        E::BadNumber { key: "rate", .. }
    ));
    assert!(matches!(err("hotset:wss=0"), E::WssZero));
    assert!(matches!(err("hotset:wss=1000"), E::NotPageAligned { .. }));
    assert!(matches!(err("sweep:start=512K"), E::StartBelowMin { start } if start == 512 * KIB));
    assert!(matches!(err("sweep:start=4M,end=4M"), E::EmptyRange { .. }));
    assert!(matches!(err("verify:end=1M"), E::EmptyRange { .. }));
    assert!(matches!(
        err("verify:start=0x100100"),
        E::NotPageAligned { what: "start", .. }
    ));
    // Errors read well.
    assert_eq!(
        err("sweep:size=1M").to_string(),
        "unknown parameter `size` for workload `sweep` (allowed: start, end)"
    );
}

#[test]
fn build_checks_against_ram() {
    use WorkloadError as E;
    let p = params(256 * MIB);
    let b = |s: &str| build(&s.parse().unwrap(), &p);
    assert!(
        matches!(b("sweep:end=512M"), Err(E::RangeOutsideRam { end, mem_size }) if end == 512 * MIB && mem_size == 256 * MIB)
    );
    assert!(matches!(b("verify:start=300M"), Err(E::EmptyRange { .. })));
    assert!(matches!(b("hotset:wss=256M"), Err(E::WssTooLarge { .. })));
    assert!(b("hotset:wss=255M").is_ok());
    let unpaced = BuildParams {
        mem_size: 256 * MIB,
        tsc_hz: None,
    };
    assert!(matches!(
        build(&"hotset:rate=100".parse().unwrap(), &unpaced),
        Err(E::MissingTscHz)
    ));
    assert!(build(&"hotset".parse().unwrap(), &unpaced).is_ok());
    let slow_tsc = BuildParams {
        mem_size: 256 * MIB,
        tsc_hz: Some(1000),
    };
    assert!(matches!(
        build(&"hotset:rate=5000".parse().unwrap(), &slow_tsc),
        Err(E::RateTooHigh { .. })
    ));
    for bad in [0, MIB, 2 * MIB + 1, 65 * GIB] {
        assert!(
            matches!(
                build(&WorkloadSpec::Idle, &params(bad)),
                Err(E::BadMemSize(_))
            ),
            "{bad}"
        );
    }
    // Hand-built specs get the same checks as parsed ones.
    let low = WorkloadSpec::Sweep {
        start: Some(0),
        end: None,
    };
    assert!(matches!(build(&low, &p), Err(E::StartBelowMin { .. })));
}

#[test]
fn images_describe_their_memory() {
    let p = params(256 * MIB);
    let sweep = build(
        &WorkloadSpec::Sweep {
            start: None,
            end: None,
        },
        &p,
    )
    .unwrap();
    assert_eq!(sweep.dirty_range, Some(MIB..256 * MIB));
    assert!(sweep.fills.is_empty() && !sweep.needs_vmm_content);
    let verify = build(
        &WorkloadSpec::Verify {
            start: None,
            end: None,
        },
        &p,
    )
    .unwrap();
    assert_eq!(verify.dirty_range, Some(MIB..64 * MIB));
    let small = build(
        &WorkloadSpec::Verify {
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
        start: None,
        end: None,
    };
    let sweep = WorkloadSpec::Sweep {
        start: None,
        end: None,
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
