//! Spec parsing, rejection of bad specs, build errors against RAM.

use super::*;

#[test]
fn parses_good_specs() {
    let cases: &[(&str, WorkloadSpec)] = &[
        ("idle", WorkloadSpec::Idle),
        ("halt", WorkloadSpec::Halt),
        (
            "sweep",
            WorkloadSpec::Sweep {
                start: None,
                end: None,
                mode: SweepMode::Inc,
            },
        ),
        (
            "sweep:start=1M,end=512M",
            WorkloadSpec::Sweep {
                start: Some(MIB),
                end: Some(512 * MIB),
                mode: SweepMode::Inc,
            },
        ),
        (
            " sweep : end = 0x4000000 ",
            WorkloadSpec::Sweep {
                start: None,
                end: Some(64 * MIB),
                mode: SweepMode::Inc,
            },
        ),
        (
            "hotset",
            WorkloadSpec::Hotset {
                wss: DEFAULT_HOTSET_WSS,
                rate: None,
                writers: None,
            },
        ),
        (
            "hotset:wss=256M,rate=50000",
            WorkloadSpec::Hotset {
                wss: 256 * MIB,
                rate: Some(50_000),
                writers: None,
            },
        ),
        (
            "HOTSET:RATE=0x10",
            WorkloadSpec::Hotset {
                wss: DEFAULT_HOTSET_WSS,
                rate: Some(16),
                writers: None,
            },
        ),
        (
            "verify:start=1M,end=64M",
            WorkloadSpec::Verify {
                seq: false,
                start: Some(MIB),
                end: Some(64 * MIB),
            },
        ),
        (
            "verify:end=8M",
            WorkloadSpec::Verify {
                seq: false,
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
            end: Some(512 * MIB),
            mode: SweepMode::Inc,
        }
        .to_string(),
        "sweep:start=1M,end=512M"
    );
    assert_eq!(
        WorkloadSpec::Hotset {
            wss: 256 * MIB,
            rate: Some(50_000),
            writers: None,
        }
        .to_string(),
        "hotset:wss=256M,rate=50000"
    );
    assert_eq!(
        WorkloadSpec::Verify {
            seq: false,
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
        "unknown parameter `size` for workload `sweep` (allowed: start, end, mode)"
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
        vcpus: 1,
    };
    assert!(matches!(
        build(&"hotset:rate=100".parse().unwrap(), &unpaced),
        Err(E::MissingTscHz)
    ));
    assert!(build(&"hotset".parse().unwrap(), &unpaced).is_ok());
    let slow_tsc = BuildParams {
        mem_size: 256 * MIB,
        tsc_hz: Some(1000),
        vcpus: 1,
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
        mode: SweepMode::Inc,
    };
    assert!(matches!(build(&low, &p), Err(E::StartBelowMin { .. })));
}

#[test]
fn parses_new_spec_forms() {
    let cases: &[(&str, WorkloadSpec, &str)] = &[
        (
            "sweep:mode=same",
            WorkloadSpec::Sweep {
                start: None,
                end: None,
                mode: SweepMode::Same,
            },
            "sweep:mode=same",
        ),
        (
            " Sweep : Mode = ZERO , end = 64M , start = 2M ",
            WorkloadSpec::Sweep {
                start: Some(2 * MIB),
                end: Some(64 * MIB),
                mode: SweepMode::Zero,
            },
            "sweep:start=2M,end=64M,mode=zero",
        ),
        (
            "sweep:mode=inc",
            WorkloadSpec::Sweep {
                start: None,
                end: None,
                mode: SweepMode::Inc,
            },
            "sweep",
        ),
        (
            "burst",
            burst(None, None, None),
            "burst:quiet=3000,storm=1000",
        ),
        (
            "burst:cycles=0",
            burst(None, None, None),
            "burst:quiet=3000,storm=1000",
        ),
        (
            "burst:storm=250,wss=1G,cycles=0x10,quiet=500",
            WorkloadSpec::Burst {
                start: None,
                end: None,
                wss: Some(GIB),
                quiet_ms: 500,
                quiet_wss: None,
                storm_ms: 250,
                cycles: 16,
            },
            "burst:wss=1G,quiet=500,storm=250,cycles=16",
        ),
        (
            "BURST:END=0x2000000,START=2M,STORM=2000",
            WorkloadSpec::Burst {
                start: Some(2 * MIB),
                end: Some(32 * MIB),
                wss: None,
                quiet_ms: 3000,
                quiet_wss: None,
                storm_ms: 2000,
                cycles: 0,
            },
            "burst:start=2M,end=32M,quiet=3000,storm=2000",
        ),
        (
            "burst:quiet-wss=16M,wss=256M,quiet=3000",
            WorkloadSpec::Burst {
                start: None,
                end: None,
                wss: Some(256 * MIB),
                quiet_ms: 3000,
                quiet_wss: Some(16 * MIB),
                storm_ms: 1000,
                cycles: 0,
            },
            "burst:wss=256M,quiet=3000,quiet-wss=16M,storm=1000",
        ),
        (
            "burst:start=4M,wss=12K",
            burst(Some(4 * MIB), None, Some(12 * KIB)),
            "burst:start=4M,wss=12K,quiet=3000,storm=1000",
        ),
    ];
    for (s, want, canonical) in cases {
        let got: WorkloadSpec = s.parse().unwrap_or_else(|e| panic!("{s}: {e}"));
        assert_eq!(got, *want, "{s}");
        assert_eq!(got.to_string(), *canonical, "{s}");
        assert_eq!(canonical.parse::<WorkloadSpec>(), Ok(got), "{s}");
        let json = serde_json::to_string(&got).unwrap();
        assert_eq!(json, format!("\"{canonical}\""));
        assert_eq!(serde_json::from_str::<WorkloadSpec>(&json).unwrap(), got);
    }
    // Every spec of the image tests round-trips through Display too.
    for spec in all_specs() {
        assert_eq!(spec.to_string().parse::<WorkloadSpec>(), Ok(spec), "{spec}");
    }
    // Existing canonical forms are unchanged.
    for s in [
        "idle",
        "sweep",
        "sweep:start=1M,end=512M",
        "hotset:wss=64M",
        "hotset:wss=256M,rate=50000",
        "verify",
        "verify:end=1G",
    ] {
        assert_eq!(s.parse::<WorkloadSpec>().unwrap().to_string(), s);
    }
    for mode in [SweepMode::Inc, SweepMode::Same, SweepMode::Zero] {
        assert_eq!(mode.to_string().parse::<SweepMode>(), Ok(mode));
    }
    assert_eq!(SweepMode::default(), SweepMode::Inc);
}

#[test]
fn rejects_bad_new_specs() {
    use WorkloadError as E;
    let err = |s: &str| s.parse::<WorkloadSpec>().unwrap_err();
    assert!(matches!(
        err("sweep:mode=fast"),
        E::UnknownMode { workload: "sweep", ref mode, .. } if mode == "fast"
    ));
    assert_eq!(
        err("sweep:mode=fast").to_string(),
        "unknown mode `fast` for workload `sweep` (allowed: inc, same, zero)"
    );
    assert!(matches!(err("sweep:mode="), E::MalformedParam(_)));
    assert!(matches!(
        err("sweep:mode=zero,mode=same"),
        E::DuplicateKey(_)
    ));
    assert!(matches!(
        err("sweep:mode=same,start=512K"),
        E::StartBelowMin { .. }
    ));
    assert!(matches!(
        err("verify:mode=zero"),
        E::UnknownKey {
            workload: "verify",
            allowed: "start, end, seq",
            ..
        }
    ));
    assert!(matches!(
        err("hotset:mode=zero"),
        E::UnknownKey {
            workload: "hotset",
            ..
        }
    ));
    assert!(matches!(
        err("burst:rate=5"),
        E::UnknownKey {
            workload: "burst",
            allowed: "start, end, wss, quiet, quiet-wss, storm, cycles",
            ..
        }
    ));
    assert!(matches!(err("burst:quiet-wss=0"), E::WssZero));
    assert!(matches!(
        err("burst:quiet-wss=5000"),
        E::NotPageAligned { value: 5000, .. }
    ));
    assert!(matches!(
        err("burst:mode=zero"),
        E::UnknownKey {
            workload: "burst",
            ..
        }
    ));
    assert!(matches!(
        err("burst:end=8M,wss=4M"),
        E::ConflictingKeys {
            workload: "burst",
            first: "end",
            second: "wss"
        }
    ));
    assert_eq!(
        err("burst:wss=4M,end=8M").to_string(),
        "parameters `end` and `wss` of workload `burst` exclude each other"
    );
    assert!(matches!(
        err("burst:quiet=0"),
        E::BadNumber { key: "quiet", .. }
    ));
    assert!(matches!(
        err("burst:storm=0"),
        E::BadNumber { key: "storm", .. }
    ));
    assert!(matches!(
        err("burst:storm=1s"),
        E::BadNumber { key: "storm", .. }
    ));
    assert!(matches!(
        err("burst:quiet=-5"),
        E::BadNumber { key: "quiet", .. }
    ));
    assert_eq!(
        err("burst:quiet=0").to_string(),
        "bad value `0` for `quiet`: expected a positive integer"
    );
    assert_eq!(
        err("burst:cycles=-1").to_string(),
        "bad value `-1` for `cycles`: expected a non-negative integer"
    );
    assert!(matches!(
        err("burst:cycles=many"),
        E::BadNumber { key: "cycles", .. }
    ));
    assert!(matches!(err("burst:wss=0"), E::WssZero));
    assert!(matches!(err("burst:wss=1000"), E::NotPageAligned { .. }));
    assert!(matches!(
        err("burst:wss=big"),
        E::BadSize { key: "wss", .. }
    ));
    assert!(matches!(err("burst:start=512K"), E::StartBelowMin { .. }));
    assert!(matches!(err("burst:start=8M,end=8M"), E::EmptyRange { .. }));
    assert!(matches!(
        err("burst:end=0x100100"),
        E::NotPageAligned { what: "end", .. }
    ));
    assert!(matches!(err("burst:quiet=1,quiet=2"), E::DuplicateKey(_)));
    assert!(matches!(err("bursty"), E::UnknownWorkload(_)));
    assert!(err("bursty").to_string().contains("burst"));
    let serde_err = serde_json::from_str::<WorkloadSpec>(r#""sweep:mode=bogus""#).unwrap_err();
    assert!(
        serde_err.to_string().contains("unknown mode `bogus`"),
        "{serde_err}"
    );
}

/// The ranges the performance study uses: hotset working sets of 16 MiB to
/// 1 GiB, paced at 1,000 to 250,000 pages/s, at plausible TSC rates.
#[test]
fn hotset_covers_the_study_range() {
    for (wss, mem) in [
        (16 * MIB, 32 * MIB),
        (16 * MIB, 17 * MIB),
        (GIB, GIB + MIB),
        (GIB, 2 * GIB),
        (GIB, 8 * GIB),
    ] {
        let pages = wss / PAGE_SIZE;
        let mask = pages.next_power_of_two() - 1;
        for rate in [None, Some(1000), Some(250_000)] {
            for tsc_hz in [1_000_000_000, 2_000_000_000, 4_000_000_000] {
                let spec = WorkloadSpec::Hotset {
                    wss,
                    rate,
                    writers: None,
                };
                let p = BuildParams {
                    mem_size: mem,
                    tsc_hz: Some(tsc_hz),
                    vcpus: 1,
                };
                let image = build(&spec, &p).unwrap_or_else(|e| panic!("{spec} {mem}: {e}"));
                assert_eq!(image.boot.len(), BOOT_SECTOR_SIZE);
                assert_eq!(&image.boot[510..], &[0x55, 0xAA]);
                assert_eq!(image.dirty_range, Some(MIB..MIB + wss));
                assert_eq!(image.fills.len(), 1);
                assert_eq!(image.fills[0].len, wss);
                let imms = immediates(&code64(&spec, &p));
                assert!(imms.contains(&pages), "{spec}: page count");
                assert!(imms.contains(&mask), "{spec}: LCG mask");
                if let Some(rate) = rate {
                    assert!(imms.contains(&(tsc_hz / rate)), "{spec}: ticks per page");
                    let lag = (tsc_hz / 1000 * HOTSET_MAX_CATCH_UP_MS).max(tsc_hz / rate);
                    assert!(imms.contains(&lag), "{spec}: max lag");
                }
                assert_eq!(spec.to_string().parse::<WorkloadSpec>(), Ok(spec));
            }
        }
    }
    for s in ["hotset:wss=16M,rate=1000", "hotset:wss=1G,rate=250000"] {
        let spec: WorkloadSpec = s.parse().unwrap();
        assert_eq!(spec.to_string(), s);
    }
    // A working set needs 1 MiB more RAM than its size.
    assert!(matches!(
        build(&"hotset:wss=1G".parse().unwrap(), &params(GIB)),
        Err(WorkloadError::WssTooLarge { .. })
    ));
}

#[test]
fn hotset_writers_parses_and_prints() {
    let spec: WorkloadSpec = "hotset:wss=16M,writers=1".parse().unwrap();
    assert_eq!(
        spec,
        WorkloadSpec::Hotset {
            wss: 16 * MIB,
            rate: None,
            writers: Some(1),
        }
    );
    assert_eq!(spec.to_string(), "hotset:wss=16M,writers=1");
    assert_eq!(spec.to_string().parse::<WorkloadSpec>().unwrap(), spec);
    // Absent, it is not printed: existing specs keep their form.
    assert_eq!(
        "hotset:wss=16M"
            .parse::<WorkloadSpec>()
            .unwrap()
            .to_string(),
        "hotset:wss=16M"
    );
    for bad in [
        "hotset:writers=0",
        "hotset:writers=x",
        "hotset:writers=4294967296",
    ] {
        assert!(
            matches!(
                bad.parse::<WorkloadSpec>(),
                Err(WorkloadError::BadNumber { key: "writers", .. })
            ),
            "{bad}"
        );
    }
}
