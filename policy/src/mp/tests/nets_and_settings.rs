//! MP's safety nets, deferral, downtime prediction, degenerate histories
//! and settings.

use super::*;

#[test]
fn safety_nets() {
    // A wide oscillation over changing pages (±44%, a trough re-sends 38%)
    // is never stuck twice in a row, and never fits in 300 ms. The traffic
    // net ends it once more than 3 × RAM was sent: 262,144 + 260,000 +
    // 100,000 + 260,000 pages.
    let t = sawtooth(260_000, 100_000, 40);
    let (got, _) = replay(&mut MpPolicy::default(), &t);
    assert_eq!(got.len(), 4);
    let sent = (262_144 + 260_000 + 100_000 + 260_000) * PAGE;
    assert!(
        matches!(
            got[3],
            Decision::StopAndCopy(StopReason::SentTooMuch {
                bytes,
                predicted_downtime_ms,
            }) if bytes == sent
                && approx(predicted_downtime_ms, 100_000.0 * 1000.0 / LINK as f64)
        ),
        "{got:?}"
    );
    // Without it: the iteration net, after 29 iterations.
    let mut p = MpPolicy {
        max_sent_factor: 100.0,
        ..MpPolicy::default()
    };
    let (got, _) = replay(&mut p, &t);
    assert_eq!(got.len(), 29);
    assert!(matches!(
        got[28],
        Decision::StopAndCopy(StopReason::IterationLimit {
            iterations: 29,
            predicted_downtime_ms: Some(_),
        })
    ));
    // A converging guest that needs more than 3 × RAM: stopped by the net
    // where qemu goes on (by design).
    let t = trace(&geometric(RAM_PAGES * 85 / 100, 85, 40), |_| 100);
    let (got, _) = replay(&mut MpPolicy::default(), &t);
    assert!(matches!(
        got.last(),
        Some(Decision::StopAndCopy(StopReason::SentTooMuch { .. }))
    ));
    let (q, _) = replay(&mut QemuPolicy::default(), &t);
    assert!(q.len() > got.len());
    // Unknown RAM size: no traffic net.
    let unknown: Vec<_> = sawtooth(260_000, 100_000, 10)
        .into_iter()
        .map(|s| IterationStats { ram_bytes: 0, ..s })
        .collect();
    let (got, _) = replay(&mut MpPolicy::default(), &unknown);
    assert!(got.iter().all(|d| *d == Decision::Continue));
}

#[test]
fn deferral() {
    // A stuck iteration whose pages were mostly re-sent starts deferral,
    // which then stays on; `defer-wws=off` never asks.
    let t = sawtooth(195_000, 105_000, 40);
    let mut p = MpPolicy {
        confirm: 3,
        max_sent_factor: 100.0,
        cheap_factor: 0.0,
        ..MpPolicy::default()
    };
    let (_, defers) = replay(&mut p, &t);
    // Iteration 2 is the first stuck one (a peak re-sending everything).
    assert_eq!(defers, [false, false, true, true, true]);
    let params = PolicyParams {
        settings: [("defer-wws".to_string(), "off".to_string())].into(),
        ..Default::default()
    };
    let mut p = MpPolicy {
        confirm: 3,
        max_sent_factor: 100.0,
        ..MpPolicy::from_params(&params).unwrap()
    };
    let (_, defers) = replay(&mut p, &t);
    assert!(defers.iter().all(|d| !d));
}

#[test]
fn predicted_downtime_skips_an_iteration_that_sent_no_page() {
    // A sweep whose iteration 2 was deferred entirely: it sent no page, an
    // end marker in 1 ms, and 250 pages were dirtied meanwhile; everything
    // else is held back. The link is measured by iteration 1 (1 GiB/s),
    // not by 64 bytes in 1 ms.
    let mut t = trace(&[RAM_PAGES; 2], |_| 100);
    t.push(IterationStats {
        iteration: 2,
        dirty_pages: RAM_PAGES,
        pages_sent: 0,
        bytes_sent: 64,
        duration: Duration::from_millis(1),
        dirtied_during: 250,
        redirtied_pages: RAM_PAGES,
        deferred_pages: RAM_PAGES - 250,
        ..t[1].clone()
    });
    let (got, _) = replay(&mut MpPolicy::default(), &t);
    assert_eq!(
        got.last(),
        Some(&Decision::StopAndCopy(StopReason::MemoryIntensive {
            iterations: 2,
            remaining_bytes: RAM_PAGES * PAGE,
            predicted_downtime_ms: Some(1000.0),
        }))
    );
}

#[test]
fn downtime_rule_first_and_raised_in_flight() {
    let sweep = trace(&[RAM_PAGES; 3], |_| 100);
    let h: MigrationHistory = sweep.into();
    let mut p = MpPolicy::default();
    assert!(matches!(
        p.decide(&h),
        Decision::StopAndCopy(StopReason::MemoryIntensive { .. })
    ));
    // 1 GiB at 1 GiB/s fits in a 1 s limit: the normal rule wins.
    ConvergencePolicy::set_downtime_limit(&mut p, Duration::from_secs(1));
    assert_eq!(p.downtime_limit(), Duration::from_secs(1));
    assert_eq!(
        p.decide(&h),
        Decision::StopAndCopy(StopReason::DowntimeReached {
            expected_downtime_ms: 1000.0
        })
    );
}

#[test]
fn degenerate_histories() {
    let mut p = MpPolicy::default();
    assert_eq!(p.decide(&MigrationHistory::new()), Decision::Continue);
    assert!(!p.defer_writable_working_set());
    // Zero-length iterations that sent nothing: no bandwidth, no NaN.
    let zero = IterationStats {
        dirtied_during: 1000,
        ram_bytes: 1 << 30,
        page_size: PAGE,
        ..Default::default()
    };
    let (got, _) = replay(&mut p, &vec![zero; 5]);
    assert_eq!(
        got.last(),
        Some(&Decision::StopAndCopy(StopReason::MemoryIntensive {
            iterations: 2,
            remaining_bytes: 1000 * PAGE,
            predicted_downtime_ms: None,
        }))
    );
    assert_eq!(
        got.last().map(|d| match d {
            Decision::StopAndCopy(r) => r.to_string(),
            _ => String::new(),
        }),
        Some(
            "memory-intensive guest, no progress for 2 iterations: 4096000 bytes left, \
             predicted downtime unknown"
                .to_string()
        )
    );
}

#[test]
fn f_settings() {
    let params = |pairs: &[(&str, &str)]| PolicyParams {
        settings: pairs
            .iter()
            .map(|&(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    };
    let defaults: Vec<_> = SETTINGS.iter().map(|d| (d.key, d.default)).collect();
    assert_eq!(
        MpPolicy::from_params(&params(&defaults)),
        Ok(MpPolicy::default())
    );
    let p = MpPolicy::from_params(&PolicyParams {
        downtime_limit: Duration::from_millis(500),
        ..params(&[
            ("rate-ratio", "90%"),
            ("wws-ratio", "0.6"),
            ("min-gain", "5%"),
            ("confirm", "3"),
            ("trough-wait", "0"),
            ("max-iterations", "10"),
            ("max-sent-factor", "2.5"),
            ("defer-wws", "no"),
        ])
    })
    .unwrap();
    assert_eq!(
        (
            p.rate_ratio,
            p.wws_ratio,
            p.min_gain,
            p.confirm,
            p.trough_wait
        ),
        (0.9, 0.6, 0.05, 3, 0)
    );
    assert_eq!(
        (
            p.max_iterations,
            p.max_sent_factor,
            p.defer_wws,
            p.downtime_limit()
        ),
        (10, 2.5, false, Duration::from_millis(500))
    );
    for (key, value) in [
        ("rate-ratio", "80"),
        ("wws-ratio", "-0.5"),
        ("min-gain", "110%"),
        ("confirm", "0"),
        ("confirm", "two"),
        ("trough-wait", "1.5"),
        ("max-iterations", ""),
        ("max-sent-factor", "3x"),
        ("defer-wws", "sometimes"),
    ] {
        let err = MpPolicy::from_params(&params(&[(key, value)])).err();
        assert!(
            matches!(&err, Some(PolicyError::BadSetting { policy, key: k, value: v, reason })
                if policy == "mp" && k == key && v == value && !reason.is_empty()),
            "{key}={value}: {err:?}"
        );
    }
    let err = MpPolicy::from_params(&params(&[("confirm", "0")])).err();
    assert!(
        matches!(&err, Some(PolicyError::BadSetting { reason, .. }) if reason == "must be at least 1"),
        "{err:?}"
    );
    let err = MpPolicy::from_params(&params(&[("min_gain", "10%")])).err();
    assert!(
        matches!(&err, Some(PolicyError::UnknownSetting { policy, key, known })
            if policy == "mp" && key == "min_gain" && known.contains("min-gain")),
        "{err:?}"
    );
}
