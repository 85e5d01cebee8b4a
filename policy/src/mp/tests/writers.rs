//! Rule 7 on simulated 2-vCPU guests: vCPU 0 rewrites a working set, vCPU 1
//! writes little or as much; the simulation applies each `ThrottleVcpus`
//! to the next iterations, as the engine does.

use super::*;

/// Working set of the writer: 256 MiB.
const SET: u64 = 65_536;

/// Runs `p` on a guest whose vCPUs log `entries[i]` ring entries per second
/// unthrottled (vCPU 0's land in [`SET`] pages), over a link of `link`
/// pages/s; returns the decisions up to the stop and the last throttles.
fn simulate(p: &mut MpPolicy, link: u64, entries: [u64; 2]) -> (Vec<Decision>, Vec<f64>) {
    let mut h = MigrationHistory::new();
    let mut throttles = vec![0.0, 0.0];
    let mut to_send = RAM_PAGES;
    let mut decisions = Vec::new();
    for i in 0..40u32 {
        let secs = to_send as f64 / link as f64;
        // Truncation intended: whole entries.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let logged: Vec<u64> = (0..2)
            .map(|v| (entries[v] as f64 * (1.0 - throttles[v]) * secs) as u64)
            .collect();
        let dirtied = logged[0].min(SET) + logged[1].min(1024);
        h.push(IterationStats {
            iteration: i,
            dirty_pages: to_send,
            pages_sent: to_send,
            bytes_sent: to_send * PAGE,
            duration: Duration::from_secs_f64(secs),
            dirtied_during: dirtied,
            redirtied_pages: if i == 0 { 0 } else { to_send.min(SET) },
            ram_bytes: RAM_PAGES * PAGE,
            page_size: PAGE,
            vcpu_dirty_pages: logged,
            vcpu_throttles: throttles.clone(),
            ..Default::default()
        });
        let d = p.decide(&h);
        decisions.push(d.clone());
        match d {
            Decision::StopAndCopy(_) => break,
            Decision::ThrottleVcpus(t) => throttles = t,
            _ => {}
        }
        to_send = dirtied;
    }
    (decisions, throttles)
}

/// 256 MiB/s: the writer's set (1 s to send) never fits a 300 ms limit
/// unthrottled; the writer logs 1 GiB/s of entries, vCPU 1 almost none.
const LINK_256M: u64 = 65_536;
const WRITER: [u64; 2] = [262_144, 100];

#[test]
fn a_lone_writer_is_throttled_and_the_guest_converges_with_a_short_downtime() {
    let (d, throttles) = simulate(&mut mp_with(300), LINK_256M, WRITER);
    let throttled = d
        .iter()
        .position(|d| matches!(d, Decision::ThrottleVcpus(_)))
        .expect("a throttle");
    assert_eq!(throttled, 1, "after the first stuck iteration: {d:?}");
    assert!(throttles[0] > 0.9 && throttles[1] == 0.0, "{throttles:?}");
    match d.last() {
        Some(Decision::StopAndCopy(StopReason::DowntimeReached {
            expected_downtime_ms,
            ..
        })) => {
            assert!(*expected_downtime_ms <= 300.0, "{d:?}")
        }
        other => panic!("should converge by rule 1: {other:?}"),
    }
    // Without the rule: a memory-intensive stop with the whole set.
    let mut off = mp_with(300);
    off.writers.enabled = false;
    let (d, throttles) = simulate(&mut off, LINK_256M, WRITER);
    assert!(throttles.iter().all(|&t| t == 0.0));
    assert!(
        matches!(
            d.last(),
            Some(Decision::StopAndCopy(StopReason::MemoryIntensive { predicted_downtime_ms: Some(ms), .. })) if *ms > 900.0
        ),
        "{d:?}"
    );
}

#[test]
fn a_link_too_slow_for_the_throttled_writer_is_stopped_after_the_patience() {
    // 8 MiB/s: below what a 97%-throttled writer still logs (32 MB/s).
    let (d, _) = simulate(&mut mp_with(300), 2_048, WRITER);
    let first = d
        .iter()
        .position(|d| matches!(d, Decision::ThrottleVcpus(_)))
        .expect("a throttle");
    assert!(
        matches!(
            d.last(),
            Some(Decision::StopAndCopy(StopReason::MemoryIntensive { .. }))
        ),
        "{d:?}"
    );
    let after = d.len() - 1 - first;
    assert!(
        (1..=super::super::writers::DEFAULT_PATIENCE as usize + 1).contains(&after),
        "stopped {after} iterations after the throttle: {d:?}"
    );
}

#[test]
fn vcpus_that_all_write_are_not_throttled() {
    let both = [262_144, 131_072];
    let (on, t) = simulate(&mut mp_with(300), LINK_256M, both);
    let mut off = mp_with(300);
    off.writers.enabled = false;
    let (want, _) = simulate(&mut off, LINK_256M, both);
    assert_eq!(on, want);
    assert!(t.iter().all(|&t| t == 0.0));
}

#[test]
fn a_converging_guest_with_a_lone_writer_is_left_alone() {
    // 1 GiB/s: the writer's set is sent in 250 ms, within the limit.
    let (d, t) = simulate(&mut mp_with(300), LINK, WRITER);
    assert!(t.iter().all(|&t| t == 0.0), "{d:?}");
    assert!(matches!(
        d.last(),
        Some(Decision::StopAndCopy(StopReason::DowntimeReached { .. }))
    ));
}

#[test]
fn settings_reach_the_rule() {
    let p = MpPolicy::from_params(&PolicyParams {
        downtime_limit: Duration::from_millis(300),
        settings: [
            ("writer-throttle".to_string(), "off".to_string()),
            ("vcpu-dirty-limit".to_string(), "64".to_string()),
            ("throttle-patience".to_string(), "3".to_string()),
        ]
        .into(),
    })
    .unwrap();
    assert!(!p.writers.enabled);
    assert_eq!(p.writers.patience, 3);
    assert!((p.writers.limiter.limit - 64.0 * 1_048_576.0).abs() < 1.0);
}
