//! MP on traces transcribed from the committed study
//! (`bench-data/results/full/runs.json`, the `mp` rows): the live
//! iterations' counts, bytes and durations exactly as reported. The report
//! keeps only each iteration's smallest and largest window
//! (`window-dirty-min`/`-max`); the windows between are filled in from the
//! workload's definition, and where the run predates the sampler (sweep-1g
//! at 10 Gbit/s, burst-1g) from its profile, as each test says.

use super::*;
use crate::DIRTY_WINDOW;

const GIB: u64 = 1 << 30;

/// A live iteration as reported: dirty-pages, pages-sent, zero-pages,
/// bytes-sent, duration in µs, dirtied-during, redirtied-pages.
type Row = (u64, u64, u64, u64, u64, u64, u64);

/// The rows of a 1 GiB guest, with `windows(iteration, count)` giving each
/// iteration's `count` whole 100 ms windows.
fn transcribe(rows: &[Row], windows: impl Fn(usize, usize) -> Vec<u64>) -> Vec<IterationStats> {
    rows.iter()
        .enumerate()
        .map(
            |(i, &(dirty, sent, zero, bytes, micros, dirtied, redirtied))| {
                let duration = Duration::from_micros(micros);
                let n = (duration.as_millis() / DIRTY_WINDOW.as_millis()) as usize;
                IterationStats {
                    iteration: u32::try_from(i).unwrap(),
                    dirty_pages: dirty,
                    pages_sent: sent,
                    zero_pages: zero,
                    bytes_sent: bytes,
                    duration,
                    dirtied_during: dirtied,
                    redirtied_pages: redirtied,
                    ram_bytes: GIB,
                    page_size: PAGE,
                    dirty_windows: windows(i, n),
                    ..Default::default()
                }
            },
        )
        .collect()
}

fn without_4d() -> MpPolicy {
    MpPolicy {
        steady_stop: false,
        ..MpPolicy::default()
    }
}

fn decisions(p: &mut MpPolicy, t: &[IterationStats]) -> Vec<Decision> {
    replay(p, t).0
}

/// `lo..=hi`, spread over `n` windows with `lo` and `hi` among them.
fn spread(lo: u64, hi: u64, n: usize) -> Vec<u64> {
    (0..n)
        .map(|k| match k {
            0 => hi,
            1 => lo,
            _ => lo + (hi - lo) * ((k as u64 * 37) % 100) / 100,
        })
        .collect()
}

/// sweep-1g, 10 Gbit/s, mp rep 1: 4 iterations (3 live), 4.66 s, 4.0 × RAM,
/// "no progress for 2 iterations". The run predates the sampler; the
/// windows are those of the 1 Gbit/s runs (21–67 k pages), with one stalled
/// window of 0 pages in iteration 1 as seen there.
const SWEEP_10G: [Row; 3] = [
    (262_144, 261_892, 252, 1_074_830_468, 1_295_589, 261_888, 0),
    (
        261_888,
        261_888,
        0,
        1_074_813_955,
        1_156_309,
        261_888,
        261_888,
    ),
    (
        261_888,
        261_888,
        0,
        1_074_813_955,
        1_200_060,
        261_888,
        261_888,
    ),
];

/// sweep-1g, 1 Gbit/s, mp rep 3 (36.0 s, 4.0 × RAM, stopped after
/// iteration 2), with its windows' reported bounds.
const SWEEP_1G: [Row; 3] = [
    (262_144, 261_892, 252, 1_074_830_468, 8_958_205, 261_888, 0),
    (
        261_888,
        261_888,
        0,
        1_074_813_955,
        8_987_727,
        261_888,
        261_888,
    ),
    (
        261_888,
        261_888,
        0,
        1_074_813_955,
        8_996_080,
        261_888,
        261_888,
    ),
];
const SWEEP_1G_WINDOWS: [(u64, u64); 3] = [(59_439, 67_177), (62_937, 65_522), (62_563, 66_340)];

#[test]
fn sweep_1g_stops_after_iteration_1() {
    let t = transcribe(&SWEEP_10G, |i, n| {
        let mut w = spread(21_216, 67_177, n);
        if i == 1 {
            w[5] = 0;
        }
        w
    });
    // Before: stop after iteration 2, as committed.
    let old = decisions(&mut without_4d(), &t);
    assert_eq!(old.len(), 3);
    // Now: after iteration 1, the whole RAM left, 1.15 s predicted at the
    // bandwidth of iteration 1.
    let new = decisions(&mut MpPolicy::default(), &t);
    assert_eq!(new[0], Decision::Continue);
    let predicted = 1_072_693_248.0 * 1_156.309 / 1_074_813_955.0;
    assert!(
        matches!(
            new[..],
            [
                _,
                Decision::StopAndCopy(StopReason::MemoryIntensive {
                    iterations: 1,
                    remaining_bytes: 1_072_693_248,
                    predicted_downtime_ms,
                })
            ] if approx(predicted_downtime_ms, predicted)
        ),
        "{new:?}"
    );
    // The committed run without windows decides as before.
    let bare = transcribe(&SWEEP_10G, |_, _| Vec::new());
    assert_eq!(decisions(&mut MpPolicy::default(), &bare), old);
    // 1 Gbit/s: the same, from its own window bounds.
    let t = transcribe(&SWEEP_1G, |i, n| {
        let (lo, hi) = SWEEP_1G_WINDOWS[i];
        spread(lo, hi, n)
    });
    assert_eq!(decisions(&mut without_4d(), &t).len(), 3);
    let new = decisions(&mut MpPolicy::default(), &t);
    assert!(
        matches!(
            new[..],
            [
                _,
                Decision::StopAndCopy(StopReason::MemoryIntensive { iterations: 1, .. })
            ]
        ),
        "{new:?}"
    );
}

/// burst-1g, 1 Gbit/s, mp rep 1: stopped after iteration 2 (9.03 s,
/// 2287 ms downtime). The run predates the sampler; the windows follow the
/// profile (`burst:quiet=2000,storm=1000,wss=256M`): 20 silent windows,
/// then 10 of the storm, from the full copy's start.
const BURST: [Row; 3] = [
    (262_144, 65_540, 196_604, 268_982_701, 2_219_814, 65_536, 0),
    (65_536, 65_536, 0, 268_966_172, 2_272_975, 65_536, 65_536),
    (65_536, 65_536, 0, 268_966_172, 2_251_688, 65_536, 65_536),
];

#[test]
fn burst_1g_decides_as_before_at_every_phase() {
    let bare = transcribe(&BURST, |_, _| Vec::new());
    let committed = decisions(&mut without_4d(), &bare);
    assert_eq!(committed.len(), 3);
    assert!(matches!(
        committed[2],
        Decision::StopAndCopy(StopReason::MemoryIntensive { iterations: 2, .. })
    ));
    for phase in 0..30 {
        let starts: Vec<usize> = BURST
            .iter()
            .scan(0, |at, r| {
                let s = *at;
                *at += (r.4 / 100_000) as usize;
                Some(s)
            })
            .collect();
        let t = transcribe(&BURST, |i, n| {
            (starts[i]..starts[i] + n)
                .map(|k| if (k + phase) % 30 < 20 { 0 } else { 60_000 })
                .collect()
        });
        assert_eq!(
            decisions(&mut MpPolicy::default(), &t),
            committed,
            "phase {phase}"
        );
    }
}

/// sawtooth-1g, 1 Gbit/s, mp rep 1: stopped by the downtime rule after
/// iteration 4 (145 ms predicted, 169 ms downtime), in a quiet phase. The
/// windows' bounds are as reported; their order follows the profile (3 s
/// storm, 3 s over 16 MiB): the full copy had no quiet window, so it
/// started in a storm, and the storm ended 0.7 s into iteration 1; the
/// quiet phase ran on to 0.75 s before the end of iteration 2; iteration 3
/// was storm (one window caught its end, 8,142 pages); iteration 4 quiet,
/// with one stalled window.
const SAWTOOTH: [Row; 5] = [
    (262_144, 65_540, 196_604, 268_982_701, 2_228_250, 65_536, 0),
    (65_536, 65_536, 0, 268_966_172, 2_255_388, 65_536, 65_536),
    (65_536, 65_536, 0, 268_966_172, 2_254_076, 65_536, 65_536),
    (65_536, 65_536, 0, 268_966_172, 2_246_462, 65_536, 65_536),
    (65_536, 65_536, 0, 268_966_172, 2_322_871, 4_096, 65_536),
];

fn sawtooth_windows(i: usize, n: usize) -> Vec<u64> {
    let storm = |lo: u64, hi: u64, n: usize| spread(lo, hi, n);
    let quiet = |n: usize| vec![4_096; n];
    match i {
        0 => storm(21_549, 46_164, n),
        1 => [storm(40_000, 55_550, 7), quiet(n - 7)].concat(),
        2 => [quiet(n - 7), storm(40_000, 61_003, 7)].concat(),
        3 => [storm(40_000, 61_675, n - 1), vec![8_142]].concat(),
        _ => {
            let mut w = quiet(n);
            w[10] = 0;
            w
        }
    }
}

#[test]
fn sawtooth_1g_still_stops_in_a_quiet_phase() {
    let t = transcribe(&SAWTOOTH, sawtooth_windows);
    let old = decisions(&mut without_4d(), &t);
    let new = decisions(&mut MpPolicy::default(), &t);
    assert_eq!(new, old);
    assert_eq!(new.len(), 5);
    assert!(
        matches!(
            new[4],
            Decision::StopAndCopy(StopReason::DowntimeReached { expected_downtime_ms })
                if expected_downtime_ms < 300.0
        ),
        "{new:?}"
    );
    // Without the phase wait it would stop in the storm after iteration 2,
    // with or without rule 4d: iteration 1 showed the quiet phase, so the
    // writer is not steady there.
    let mut no_wait = MpPolicy {
        phase_wait: false,
        ..MpPolicy::default()
    };
    assert_eq!(decisions(&mut no_wait, &t).len(), 3);
}

/// hotset48m-1g and hotset16m-1g, 1 Gbit/s, mp rep 1: both stop after the
/// full copy (rule 4b with 404.5 ms predicted, rule 1 with 124.5 ms). The
/// runs predate the sampler; windows as a steady writer's (the whole
/// working set in each) change nothing.
const HOTSET48M: [Row; 1] = [(262_144, 12_292, 249_852, 50_447_709, 405_436, 12_288, 0)];
const HOTSET16M: [Row; 1] = [(262_144, 4_100, 258_044, 16_826_941, 124_842, 4_096, 0)];

#[test]
fn converging_hotsets_decide_as_before() {
    for (rows, set) in [(&HOTSET48M, 12_288), (&HOTSET16M, 4_096)] {
        let bare = transcribe(rows, |_, _| Vec::new());
        let sampled = transcribe(rows, |_, n| vec![set; n]);
        let old = decisions(&mut without_4d(), &bare);
        assert_eq!(old.len(), 1);
        assert_eq!(decisions(&mut MpPolicy::default(), &bare), old);
        assert_eq!(decisions(&mut MpPolicy::default(), &sampled), old);
    }
    let d = decisions(
        &mut MpPolicy::default(),
        &transcribe(&HOTSET48M, |_, _| Vec::new()),
    );
    assert!(matches!(
        d[0],
        Decision::StopAndCopy(StopReason::MemoryIntensive { iterations: 1, .. })
    ));
    let d = decisions(
        &mut MpPolicy::default(),
        &transcribe(&HOTSET16M, |_, _| Vec::new()),
    );
    assert!(matches!(
        d[0],
        Decision::StopAndCopy(StopReason::DowntimeReached { .. })
    ));
}
