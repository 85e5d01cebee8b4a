//! Rule 4c on made-up traces with the engine's 100 ms windows: a sawtooth
//! whose quiet phase outlasts an iteration is waited for and stops in a
//! quiet iteration; a burst whose quiet phase is shorter and `phase-wait=off`
//! stop as before, and a steady sweep is not read as phases (rule 4d then
//! stops it early: `steady`).

use super::*;

/// Pages dirtied in a storm window (more than the 78,643 pages a 300 ms
/// limit allows at [`LINK`]) and in a quiet one.
const STORM: u64 = 150_000;
const QUIET: u64 = 10_000;

/// Iteration `i` sends `sends[i]` pages at [`LINK`] and leaves `left[i]`,
/// with these windows.
fn phased(sends: &[u64], left: &[u64], windows: &[Vec<u64>]) -> Vec<IterationStats> {
    sends
        .iter()
        .zip(left)
        .zip(windows)
        .enumerate()
        .map(|(i, ((&send, &left), w))| IterationStats {
            iteration: u32::try_from(i).unwrap(),
            dirty_pages: send,
            pages_sent: send,
            bytes_sent: send * PAGE,
            duration: Duration::from_nanos(send * 1_000_000_000 / LINK),
            dirtied_during: left,
            redirtied_pages: if i == 0 { 0 } else { send },
            ram_bytes: RAM_PAGES * PAGE,
            page_size: PAGE,
            dirty_windows: w.clone(),
            ..Default::default()
        })
        .collect()
}

fn w(storm: usize, quiet: usize, storm_first: bool) -> Vec<u64> {
    let s = std::iter::repeat_n(STORM, storm);
    let q = std::iter::repeat_n(QUIET, quiet);
    if storm_first {
        s.chain(q).collect()
    } else {
        q.chain(s).collect()
    }
}

/// Full copy in a storm (1 s), then 200 Ki-page iterations of 0.76 s.
const SET: u64 = 200_000;

fn stop_at(p: &mut MpPolicy, t: &[IterationStats]) -> (usize, Decision) {
    let (d, _) = replay(p, t);
    (d.len() - 1, d.last().unwrap().clone())
}

#[test]
fn a_sawtooth_with_a_long_quiet_phase_is_waited_for() {
    // Quiet phase of 0.8 s (4 + 4 windows across the boundary of
    // iterations 1 and 2) against 0.76 s iterations; iteration 3 falls in
    // the next quiet phase and leaves only the quiet set.
    let t = phased(
        &[RAM_PAGES, SET, SET, SET],
        &[SET, SET, SET, QUIET],
        &[w(10, 0, true), w(3, 4, true), w(3, 4, false), w(0, 7, true)],
    );
    let (at, d) = stop_at(&mut mp_with(300), &t);
    assert_eq!(at, 3, "{d:?}");
    assert!(
        matches!(d, Decision::StopAndCopy(StopReason::DowntimeReached { .. })),
        "{d:?}"
    );
    // Without the rule, the two stuck storms stop it at iteration 2 with
    // the whole storm set as downtime.
    let mut off = mp_with(300);
    off.phase_wait = false;
    let (at, d) = stop_at(&mut off, &t);
    assert_eq!(at, 2);
    assert!(matches!(
        d,
        Decision::StopAndCopy(StopReason::MemoryIntensive { .. })
    ));
}

#[test]
fn a_burst_whose_quiet_phase_is_shorter_than_an_iteration_is_not_waited_for() {
    // Quiet runs of 0.6 s (3 + 3 windows) against 0.76 s iterations: no
    // iteration can fit in one, so waiting cannot help (the study's
    // burst-1g, which `qemu` never finishes).
    let t = phased(
        &[RAM_PAGES, SET, SET, SET],
        &[SET, SET, SET, SET],
        &[w(10, 0, true), w(4, 3, true), w(4, 3, false), w(7, 0, true)],
    );
    let (at, d) = stop_at(&mut mp_with(300), &t);
    assert_eq!(at, 2);
    assert!(matches!(
        d,
        Decision::StopAndCopy(StopReason::MemoryIntensive { .. })
    ));
}

#[test]
fn a_steady_writer_with_small_windows_is_not_read_as_phases() {
    // Every window holds 20,000 pages (each would fit the limit alone), a
    // few percent apart: no window is a quarter of the busiest, so there is
    // no quiet phase, although the iterations leave 200 Ki pages.
    let jitter = |i: u64| 20_000 + (i * 7_919) % 1_500;
    let win = |n: u64| (0..n).map(jitter).collect::<Vec<_>>();
    let t = phased(
        &[RAM_PAGES, SET, SET, SET],
        &[SET, SET, SET, SET],
        &[win(10), win(7), win(7), win(7)],
    );
    // Not waited for (rule 4c): with rule 4d off, rule 4's confirmation
    // stops it at iteration 2, as without windows.
    let mut no_steady = mp_with(300);
    no_steady.steady_stop = false;
    let (at, d) = stop_at(&mut no_steady, &t);
    assert_eq!(at, 2);
    assert!(matches!(
        d,
        Decision::StopAndCopy(StopReason::MemoryIntensive { .. })
    ));
    // With it (the default), the steady windows stop it one iteration
    // earlier.
    let (at, d) = stop_at(&mut mp_with(300), &t);
    assert_eq!(at, 1);
    assert!(matches!(
        d,
        Decision::StopAndCopy(StopReason::MemoryIntensive { iterations: 1, .. })
    ));
}

#[test]
fn phase_wait_is_a_setting() {
    let p = MpPolicy::from_params(&PolicyParams {
        downtime_limit: Duration::from_millis(300),
        settings: [("phase-wait".to_string(), "off".to_string())].into(),
    })
    .unwrap();
    assert!(!p.phase_wait);
    assert!(MpPolicy::default().phase_wait);
}
