use super::*;
use crate::{IterationStats, StopReason};

const PAGE: u64 = 4096;
/// Ring entries per second that make 1 MB/s (2^20 B) of 4 KiB pages.
const PER_MB: u64 = 256;

/// A 1 s iteration that sent 100 MB and left 20,000 pages (82 MB): far
/// above the 300 ms threshold (30 MB), so the downtime rule never fires.
/// vCPU *i* logged `mb[i]` MB/s of entries under throttle `t[i]`.
fn it(mb: &[u64], t: &[f64]) -> IterationStats {
    IterationStats {
        bytes_sent: 100_000_000,
        duration: Duration::from_secs(1),
        dirtied_during: 20_000,
        page_size: PAGE,
        ram_bytes: 1 << 30,
        vcpu_dirty_pages: mb.iter().map(|m| m * PER_MB).collect(),
        vcpu_throttles: t.to_vec(),
        ..Default::default()
    }
}

fn decide(p: &mut DirtyLimitPolicy, trace: &[IterationStats]) -> Decision {
    p.decide(&trace.to_vec().into())
}

#[test]
fn only_the_vcpu_over_the_limit_is_throttled() {
    let mut p = DirtyLimitPolicy::default();
    // vCPU 0 at 128 MB/s, four times the 32 MB/s limit: 75%. vCPU 1
    // dirties nothing and stays at 0.
    assert_eq!(
        decide(&mut p, &[it(&[128, 0], &[])]),
        Decision::ThrottleVcpus(vec![0.75, 0.0])
    );
    // vCPU 1 just under the limit is left alone too.
    assert_eq!(
        decide(&mut p, &[it(&[128, 31], &[0.0, 0.0])]),
        Decision::ThrottleVcpus(vec![0.75, 0.0])
    );
    // Both over: each gets its own throttle.
    assert_eq!(
        decide(&mut p, &[it(&[128, 64], &[0.0, 0.0])]),
        Decision::ThrottleVcpus(vec![0.75, 0.5])
    );
}

#[test]
fn throttle_rises_while_over_and_stays_when_under() {
    let mut p = DirtyLimitPolicy::default();
    let mut trace = vec![it(&[128, 0], &[0.0, 0.0])];
    assert_eq!(
        decide(&mut p, &trace),
        Decision::ThrottleVcpus(vec![0.75, 0.0])
    );
    // At 75% it still logs 64 MB/s: unthrottled 256, so 1 − 32/256 = 87.5%.
    trace.push(it(&[64, 0], &[0.75, 0.0]));
    assert_eq!(
        decide(&mut p, &trace),
        Decision::ThrottleVcpus(vec![0.875, 0.0])
    );
    // At the limit, then under it: the throttle stays (no decision).
    trace.push(it(&[32, 0], &[0.875, 0.0]));
    assert_eq!(decide(&mut p, &trace), Decision::Continue);
    trace.push(it(&[16, 0], &[0.875, 0.0]));
    assert_eq!(decide(&mut p, &trace), Decision::Continue);
    // Over again (the guest sped up): raised from where it is.
    // 1 − 32 × 0.125 / 48 = 0.91667.
    trace.push(it(&[48, 0], &[0.875, 0.0]));
    assert_eq!(
        decide(&mut p, &trace),
        Decision::ThrottleVcpus(vec![0.9167, 0.0])
    );
}

#[test]
fn throttle_is_capped_at_99_percent() {
    let mut p = DirtyLimitPolicy::default();
    // 1 GiB/s wants 1 − 32/1024 = 96.875%: under the cap.
    assert_eq!(
        decide(&mut p, &[it(&[1024], &[])]),
        Decision::ThrottleVcpus(vec![0.9688])
    );
    // At the cap and still over: nothing more to do.
    let capped = DirtyLimitPolicy {
        limit: DirtyLimitPolicy::MB,
        ..Default::default()
    };
    assert_eq!(
        capped.throttles(&it(&[1024], &[])),
        Some((vec![0.99], true))
    );
    assert_eq!(
        capped.throttles(&it(&[500], &[0.99])),
        Some((vec![0.99], false))
    );
    let mut capped = capped;
    assert_eq!(
        decide(&mut capped, &[it(&[500], &[0.99])]),
        Decision::Continue
    );
}

#[test]
fn stops_by_the_qemu_rule_first() {
    let mut p = DirtyLimitPolicy::default();
    // 250 pages left at 100 MB/s fit in 300 ms, though vCPU 0 is over.
    let fits = IterationStats {
        dirtied_during: 250,
        ..it(&[128, 0], &[])
    };
    let got = decide(&mut p, &[fits]);
    assert!(
        matches!(
            got,
            Decision::StopAndCopy(StopReason::DowntimeReached { .. })
        ),
        "{got:?}"
    );
    // Raising the downtime limit in flight reaches the rule.
    let h: MigrationHistory = vec![it(&[128, 0], &[])].into();
    ConvergencePolicy::set_downtime_limit(&mut p, Duration::from_secs(60));
    assert_eq!(p.downtime_limit(), Duration::from_secs(60));
    assert!(matches!(p.decide(&h), Decision::StopAndCopy(_)));
}

#[test]
fn no_per_vcpu_counts_is_a_refusal() {
    let mut p = DirtyLimitPolicy::default();
    // The bitmap: no counts, even when the qemu rule would stop.
    let bitmap = IterationStats {
        dirtied_during: 0,
        ..it(&[], &[])
    };
    match decide(&mut p, &[bitmap]) {
        Decision::Abort(why) => assert!(why.contains("--dirty-track ring"), "{why}"),
        d => panic!("{d:?}"),
    }
    // An empty history is not a refusal yet.
    assert_eq!(p.decide(&MigrationHistory::new()), Decision::Continue);
    // A ring with an idle guest (counts all zero) is fine.
    assert_eq!(decide(&mut p, &[it(&[0, 0], &[])]), Decision::Continue);
}

#[test]
fn zero_length_iteration_changes_nothing() {
    let p = DirtyLimitPolicy::default();
    let s = IterationStats {
        duration: Duration::ZERO,
        ..it(&[128, 0], &[0.5, 0.0])
    };
    assert_eq!(p.throttles(&s), Some((vec![0.5, 0.0], false)));
}

#[test]
fn settings() {
    let with = |v: &str| PolicyParams {
        settings: [("vcpu-dirty-limit".to_string(), v.to_string())].into(),
        ..Default::default()
    };
    assert_eq!(
        DirtyLimitPolicy::from_params(&PolicyParams::default()),
        Ok(DirtyLimitPolicy::default())
    );
    let p = DirtyLimitPolicy::from_params(&with("1")).unwrap();
    assert_eq!(p.limit, 1_048_576.0);
    let p = DirtyLimitPolicy::from_params(&with("0.5")).unwrap();
    assert_eq!(p.limit, 524_288.0);
    for bad in ["0", "-1", "x", "1MB"] {
        let err = DirtyLimitPolicy::from_params(&with(bad)).err();
        assert!(
            matches!(&err, Some(PolicyError::BadSetting { policy, key, value, .. })
                if policy == "dirty-limit" && key == "vcpu-dirty-limit" && value == bad),
            "{bad}: {err:?}"
        );
    }
}
