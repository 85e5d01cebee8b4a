//! MP, the memory-pattern policy: stop early once the guest is
//! memory-intensive and more iterations cannot shrink the final copy.
//!
//! Source: the 2018 NCU master's thesis on KVM live migration (see the
//! project background): KVM's pre-copy never finishes on memory-intensive
//! guests because QEMU has no iteration cap; MP checks the memory status of
//! each iteration, classifies the guest, and enters stop-and-copy early for
//! a memory-intensive one, paying a little more downtime to avoid a long
//! migration and wasted bandwidth. This module makes that idea precise. It
//! has to survive what sank other trend rules: bursts, sawtooth remaining
//! counts (Nova removed a progress timeout because "we were sampling a saw
//! tooth wave"), and rules too tangled to reason about (QEMU's 2024
//! convergence-trend patch). So there are few rules, each testable alone.
//!
//! Terms, for iteration `i` (0 is the full copy): `remaining(i)` =
//! [`IterationStats::remaining_bytes`] (what a stop-and-copy after `i` would
//! send, deferred pages included); `best(i)` = the smallest `remaining` of
//! iterations `0..i`; `sent(i)` = pages it dealt with
//! ([`IterationStats::pages_handled`]: sent, zero, or found unchanged). After every iteration [`MpPolicy`] applies, in order:
//!
//! 1. **Downtime rule** (always first): exactly the [`qemu`](crate::qemu)
//!    rule — when `remaining ≤ bandwidth × downtime_limit` (bandwidth of the
//!    last measured iteration), [`StopReason::DowntimeReached`]. The decision
//!    is delegated to a [`QemuPolicy`], so a guest that converges (beats its
//!    best by `min-gain` every iteration, see rule 3) gets the same
//!    decisions, at the same iteration, with the same reason, as `qemu` —
//!    unless a safety net (rule 5) ends it first.
//! 2. **Memory-intensive** (classification, from iteration 1): iteration `i`
//!    is memory-intensive when
//!    (a) the guest dirtied at least `rate-ratio` (default 0.8) of the pages
//!    the link sent in it: `dirtied_during ≥ 0.8 × sent(i)`. Over the same
//!    duration this is dirty rate ≥ 0.8 × send rate, counted in pages so
//!    that compression and zero ranges do not distort it. Without deferral
//!    `sent(i) = remaining(i−1)`, so failing (a) means the dirty set fell by
//!    more than 20% in one iteration: the guest is recovering, which is what
//!    keeps a single burst from counting (see rule 4). *Why 0.8:* a guest
//!    dirtying at ≥ 80% of the link needs more than 10 iterations for every
//!    10× shrink of its dirty set (0.8¹⁰ ≈ 0.11): the long tail MP exists to
//!    cut; below that it is left to converge. Or
//!    (b) from iteration 2 on, at least `wws-ratio` (default 0.5) of the
//!    pages it sent had been sent in the previous iteration already
//!    (`redirtied_pages / dirty_pages`): the writable working set of Clark
//!    et al. (NSDI 2005). Iteration 1 is skipped because its "previous" set
//!    is the full copy, so its ratio is always 1. *Why 0.5:* "most of what
//!    was sent is sent again". It also classifies the trough iterations of
//!    a guest oscillating over the same pages with trough/peak ≥ 0.5 (swings
//!    up to ±33%), which (a) misses, but not the iteration after a burst
//!    that more than doubled the dirty set (ratio < 0.5). The clause needs
//!    no "and remaining is not shrinking" of its own: that is rule 3, which
//!    a stop requires anyway.
//! 3. **No progress** (from iteration 1): `remaining(i) ≥ (1 − min-gain) ×
//!    best(i)`, `min-gain` default 10%. Compared with the *best* so far, not
//!    the previous iteration: an oscillating guest shows a large gain
//!    against the previous iteration at every trough, but never beats its
//!    earlier troughs (KubeVirt's stall detection compares with the best
//!    value for the same reason). *Why 10%:* below 10% per iteration a 10×
//!    smaller final copy takes more than 21 iterations (0.9²¹ ≈ 0.11), about
//!    the whole budget of the iteration net, while each iteration re-sends
//!    about `remaining` bytes; and per-iteration dirty counts jitter by a
//!    few percent, so a smaller margin would read noise as progress
//!    (KubeVirt's 4% is over a window of at least 40 s, not one iteration).
//! 4. **Stop: memory-intensive without progress.** An iteration where rules
//!    2 and 3 both hold is *stuck*. When the last `confirm` (default 2)
//!    iterations were all stuck, answer [`StopReason::MemoryIntensive`] —
//!    except on a rising edge (`remaining(i) > remaining(i−1)`): then wait
//!    up to `trough-wait` (default 1) more stuck iterations, so that an
//!    oscillating guest is paused at a trough, not a peak (KubeVirt switches
//!    over at a local minimum). *Why confirm = 2:* one stuck iteration may
//!    be a burst (a storm of new pages); the iteration after it sends the
//!    storm's pages and, if the guest is otherwise quiet, falls by more than
//!    20% with few re-sent pages, so rule 2 fails and the count restarts.
//!    Two stuck iterations in a row mean the dirty set did not shrink over
//!    two passes, the second of which re-sent the first's leftovers. Each
//!    extra confirmation costs one more iteration's traffic. So a
//!    non-converging guest (dirties ≥ the link rate) stops after exactly
//!    `confirm + 1` iterations (the full copy and `confirm` stuck ones),
//!    unless a safety net ends it first, or 2 when rule 4d finds it steady.
//!    *Why trough-wait = 1:* one iteration is enough to reach the trough of
//!    a two-iteration oscillation, and a bound keeps a steadily rising
//!    guest from waiting forever.
//!
//!    **4b. Cheap stop** (`cheap-factor`, default 2; 0 turns it off): when
//!    the last iteration is memory-intensive and without progress — for
//!    iteration 0, the full copy, which has no "best" yet: when the guest
//!    dirtied at least `rate-ratio` of the *data* pages it sent (zero
//!    ranges and never-written pages cost no link time) — and the
//!    predicted downtime is at most `cheap-factor × downtime limit`,
//!    answer [`StopReason::MemoryIntensive`] at once, without waiting for
//!    `confirm` iterations. *Why:* the confirmation guards against paying a
//!    long downtime for a burst; when the whole final copy costs at most
//!    twice what the user accepts anyway, a wrong stop costs little, while
//!    each confirming iteration re-sends the whole working set. *Why 2:*
//!    the first study run showed the price of waiting: on a 48 MiB working
//!    set over 1 Gbit/s (a 420 ms final copy against a 300 ms limit) `mp`
//!    took 1.69 s and 0.19 × RAM where `qemu` with a 2 s limit, and QEMU
//!    7.2 itself, stopped after the full copy (0.85 s / 0.98 s, 0.09 ×
//!    RAM); a guest needing more than twice the limit (the 2.2 s copies of
//!    the 256 MiB sweeps and the sawtooth's peaks) still waits for
//!    `confirm`, where a false stop would be expensive.
//!    **4c. Phase wait** (`phase-wait`, default on). Rule 4 does not stop a
//!    guest that has shown, within the last [`PHASE_MEMORY`] iterations, a
//!    quiet phase at least as long as the last iteration, next to storms.
//!    The engine samples the dirty log every 100 ms while it sends
//!    ([`IterationStats::dirty_windows`]); a window is *quiet* when the
//!    pages dirtied in it would go within the downtime limit at the last
//!    measured bandwidth and are at most a quarter ([`PHASE_CONTRAST`]) of
//!    the busiest window's: a steady writer, whose windows differ by a few
//!    percent, has no quiet windows, however small each window's share of a
//!    large working set is. A run of quiet windows (across iteration
//!    boundaries) lasting at least as long as the last iteration means an
//!    iteration can fall entirely inside a quiet phase and leave a final
//!    copy that fits the limit, which rule 1 then takes; stopping in the
//!    storm instead pays the whole storm set as downtime. *Why:* the study's
//!    sawtooth guest (3 s over 256 MiB, 3 s over 16 MiB, 2.2 s iterations at
//!    1 Gbit/s) looked stuck after two storms, and `mp` paid 2.27 s of
//!    downtime where `qemu`, iterating on, stopped in a quiet phase with
//!    0.17 s; the per-iteration counts cannot tell it from a sweep (every
//!    iteration there dirtied all 64 Ki pages), the windows can. A guest
//!    whose quiet phases are shorter than an iteration (the study's burst:
//!    2 s quiet, 2.25 s iterations, which `qemu` never finishes) is not
//!    waited for, so `mp` still stops it after `confirm` iterations; 4b and
//!    the safety nets still apply while waiting. Over loopback iterations are
//!    too short for windows, and nothing changes.
//!    **4d. Steady writer** (`steady-stop`, default on; `steady-gap`,
//!    default 2). Rule 4 needs one
//!    stuck iteration instead of `confirm` when the windows show a steady
//!    writer: each of the last [`PHASE_MEMORY`] iterations (at iteration 1:
//!    the full copy and the stuck one) has windows covering at least half
//!    its length, and no run of quiet windows (4c's definition) among them
//!    is longer than `steady-gap` windows. Rule 4's rising-edge wait still
//!    applies, and so does 4c (a quiet phase is no steady writer). *Why:*
//!    the confirmation exists because a dirty count at an iteration's end
//!    says nothing about what happened inside it (a burst, a phase); the
//!    windows do. A guest that wrote without a quiet stretch through the
//!    full copy and through a stuck iteration after it has shown nothing a
//!    further iteration could catch, and each confirming iteration re-sends
//!    the whole final copy. Added after the study's sweep-1g: 4 iterations,
//!    4.66 s and 4.0 × RAM at 10 Gbit/s (36 s, 4.0 × at 1 Gbit/s), every
//!    iteration leaving all 261,888 pages it sent, with windows of 13–67 k
//!    pages; with the rule 4.06 s / 3.0 × and 27.05 s / 3.0 × (3 runs
//!    each, same downtime). *Why not at the full copy already:* the full
//!    copy alone cannot tell a steady writer from a phase. In all 27
//!    sawtooth-1g runs of the study (every policy) it fell in a storm, left
//!    all 65,536 data pages it sent and had no quiet window (the smallest
//!    ≥ 0.39 × the busiest), exactly like a sweep; the iteration after it
//!    always held the quiet phase (windows of 4,096 pages, at least 1.4 s
//!    long as the phases line up). So `mp` cannot match `qemu` with a 2 s
//!    limit when that one stops after a fast full copy (sweep-1g at
//!    10 Gbit/s: 2.16 s / 2.0 × in 1 of 3 committed runs), only when it
//!    does not.
//!    *Why a gap of 2:* on a shared host a vCPU can stall for a window or
//!    two (sweep-1g at 1 Gbit/s had windows of 0 pages among ones of
//!    60 k), while a quiet phase that could hold an iteration is longer
//!    (sawtooth's ≥ 14 windows after the full copy, burst's 20). A longer
//!    stall only turns the rule off: rule 4 stops as before (1 of 9
//!    sweep-1g runs at 10 Gbit/s on a loaded host). Without windows
//!    (loopback, short iterations, older traces) nothing changes.
//! 5. **Safety nets**, like Xen legacy's: completed iterations ≥
//!    `max-iterations` (default 29: with the final copy, Xen's "30 times
//!    round loop") → [`StopReason::IterationLimit`]; total bytes sent >
//!    `max-sent-factor` (default 3, Xen's `DEF_MAX_FACTOR`) × RAM →
//!    [`StopReason::SentTooMuch`] (skipped when the RAM size is unknown).
//!    They bound guests that never look stuck (oscillations wider than
//!    rule 2b accepts over changing pages) — and a guest that converges
//!    but would need more than 3 × RAM of traffic to do so: that one is
//!    stopped where `qemu` would go on, by design.
//! 6. **Deferral.** From the first stuck iteration whose re-sent ratio met
//!    rule 2b on, [`defer_writable_working_set`](ConvergencePolicy::defer_writable_working_set)
//!    answers true for the rest of the migration (`defer-wws`, default on):
//!    the engine then holds pages dirty in two iterations running for the
//!    final copy instead of sending them again. *Why:* a stuck guest's final
//!    copy contains them anyway, so each re-send was wasted traffic (Clark et
//!    al.), and the shorter iterations may shrink `remaining` enough to reset
//!    the stuck count (rule 3 sees the deferred pages, so deferral cannot
//!    hide anything). Never before a stuck iteration, so converging guests
//!    are never deferred and behave exactly like `qemu`; and not while rule
//!    4c waits for a quiet phase (a final copy taken in a quiet phase must
//!    not carry the storm set held back from earlier): then the answer is
//!    false and the engine sends what it held in the next iteration.
//! 7. **Writer throttle** (`writer-throttle`, default on; `mp/writers.rs`):
//!    a stuck guest whose ring counts show only some vCPUs write gets those
//!    throttled as by `dirty-limit` instead of a stop, for at most
//!    `throttle-patience` iterations; checked after rule 4b, before rule 4.
//!
//! Every stop after rule 1 reports the predicted downtime: `remaining ÷`
//! the bandwidth of the last iteration that sent data pages (as `qemu`'s,
//! except that an iteration which sent no page — e.g. all deferred — is not
//! taken as a measure of the link), `None` without such an iteration.
//! Rules 2–4 are replayed over the whole history at every decision, so a
//! decision depends on the history alone (and the settings).

use std::time::Duration;

use crate::settings::Settings;
use crate::{
    ConvergencePolicy, Decision, IterationStats, MigrationHistory, PolicyError, PolicyParams,
    QemuPolicy, SettingDoc, StopReason,
};

#[cfg(test)]
mod tests;
mod writers;
pub use writers::WriterThrottle;

/// Rule 4c looks at the windows of this many iterations, the last one
/// included: enough for a quiet phase split across two iterations and a
/// storm between.
pub const PHASE_MEMORY: usize = 3;

/// Rule 4c: a quiet window has at most 1/this of the busiest window's
/// pages, so that a steady writer's jitter (a few percent from window to
/// window) is never read as phases.
pub const PHASE_CONTRAST: u64 = 4;

/// The settings of `mp`.
pub const SETTINGS: &[SettingDoc] = &[
    SettingDoc {
        key: "rate-ratio",
        default: "0.8",
        meaning: "memory-intensive when the guest dirties at least this share of the pages the link sends",
    },
    SettingDoc {
        key: "wws-ratio",
        default: "0.5",
        meaning: "memory-intensive when at least this share of the pages sent were sent in the previous iteration too",
    },
    SettingDoc {
        key: "min-gain",
        default: "10%",
        meaning: "no progress unless remaining beats the best so far by this share",
    },
    SettingDoc {
        key: "confirm",
        default: "2",
        meaning: "stop after this many memory-intensive iterations without progress in a row",
    },
    SettingDoc {
        key: "trough-wait",
        default: "1",
        meaning: "on a rising edge, wait up to this many more iterations for a trough",
    },
    SettingDoc {
        key: "cheap-factor",
        default: "2",
        meaning: "stop at once (no confirmation) when stuck and the predicted downtime is at most this × the limit (0: off)",
    },
    SettingDoc {
        key: "phase-wait",
        default: "on",
        meaning: "do not stop a stuck guest that showed a quiet phase as long as an iteration (rule 4c)",
    },
    SettingDoc {
        key: "steady-stop",
        default: "on",
        meaning: "stop after one stuck iteration when the windows show a steady writer (rule 4d)",
    },
    SettingDoc {
        key: "steady-gap",
        default: "2",
        meaning: "rule 4d: longest run of quiet windows (100 ms each) still read as a host stall, not a phase",
    },
    SettingDoc {
        key: "max-iterations",
        default: "29",
        meaning: "safety net: stop once this many iterations ran, the full copy included",
    },
    SettingDoc {
        key: "max-sent-factor",
        default: "3",
        meaning: "safety net: stop once more than this many times the guest's RAM was sent",
    },
    SettingDoc {
        key: "defer-wws",
        default: "on",
        meaning: "hold the writable working set for the final copy once the guest is stuck",
    },
    SettingDoc {
        key: "writer-throttle",
        default: "on",
        meaning: "rule 7: when the dirty ring shows only some vCPUs write, throttle those instead of stopping",
    },
    SettingDoc {
        key: "vcpu-dirty-limit",
        default: "32",
        meaning: "rule 7: MB/s each writing vCPU is throttled down to (as dirty-limit)",
    },
    SettingDoc {
        key: "throttle-patience",
        default: "2",
        meaning: "rule 7: throttled iterations allowed before a still-stuck guest is stopped by rule 4",
    },
];

/// The memory-pattern policy (see the [module docs](self)).
#[derive(Debug, Clone, PartialEq)]
pub struct MpPolicy {
    qemu: QemuPolicy,
    /// Rule 2a: dirtied ÷ sent pages at or above this is memory-intensive.
    pub rate_ratio: f64,
    /// Rule 2b: re-sent ÷ sent pages at or above this is memory-intensive.
    pub wws_ratio: f64,
    /// Rule 3: progress means beating the best remaining by this fraction.
    pub min_gain: f64,
    /// Rule 4: stuck iterations in a row needed to stop (at least 1).
    pub confirm: u32,
    /// Rule 4: extra stuck iterations to wait for a trough on a rising edge.
    pub trough_wait: u32,
    /// Rule 4b: stop without confirmation when the predicted downtime is
    /// at most this multiple of the limit (0: never).
    pub cheap_factor: f64,
    /// Rule 4c: wait for a quiet phase the guest has shown.
    pub phase_wait: bool,
    /// Rule 4d: one stuck iteration stops a steady writer.
    pub steady_stop: bool,
    /// Rule 4d: a run of at most this many quiet windows is a stall of the
    /// host, not a phase.
    pub steady_gap: u32,
    /// Rule 5: iteration cap (completed iterations, iteration 0 included).
    pub max_iterations: u32,
    /// Rule 5: traffic cap, in multiples of the guest's RAM.
    pub max_sent_factor: f64,
    /// Rule 6: whether to ask for writable-working-set deferral.
    pub defer_wws: bool,
    deferring: bool,
    /// Rule 7 (`mp/writers.rs`).
    pub writers: WriterThrottle,
}

/// What rules 2 to 4 make of a history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Assessment {
    /// Stuck iterations (rules 2 and 3) in a row, ending with the last.
    streak: u32,
    /// The last iteration left more than the one before it.
    rising: bool,
    /// Some stuck iteration met rule 2b (starts deferral).
    wws_stuck: bool,
}

impl MpPolicy {
    /// Default of `rate-ratio`.
    pub const DEFAULT_RATE_RATIO: f64 = 0.8;
    /// Default of `wws-ratio`.
    pub const DEFAULT_WWS_RATIO: f64 = 0.5;
    /// Default of `min-gain`.
    pub const DEFAULT_MIN_GAIN: f64 = 0.1;
    /// Default of `confirm`.
    pub const DEFAULT_CONFIRM: u32 = 2;
    /// Default of `trough-wait`.
    pub const DEFAULT_TROUGH_WAIT: u32 = 1;
    /// Default of `cheap-factor`.
    pub const DEFAULT_CHEAP_FACTOR: f64 = 2.0;
    /// Default of `steady-gap` (windows: 200 ms).
    pub const DEFAULT_STEADY_GAP: u32 = 2;
    /// Default of `max-iterations` (Xen legacy's `DEF_MAX_ITERS`).
    pub const DEFAULT_MAX_ITERATIONS: u32 = 29;
    /// Default of `max-sent-factor` (Xen legacy's `DEF_MAX_FACTOR`).
    pub const DEFAULT_MAX_SENT_FACTOR: f64 = 3.0;

    /// The defaults with this downtime limit.
    pub fn new(downtime_limit: Duration) -> Self {
        Self {
            qemu: QemuPolicy::new(downtime_limit),
            rate_ratio: Self::DEFAULT_RATE_RATIO,
            wws_ratio: Self::DEFAULT_WWS_RATIO,
            min_gain: Self::DEFAULT_MIN_GAIN,
            confirm: Self::DEFAULT_CONFIRM,
            trough_wait: Self::DEFAULT_TROUGH_WAIT,
            cheap_factor: Self::DEFAULT_CHEAP_FACTOR,
            phase_wait: true,
            steady_stop: true,
            steady_gap: Self::DEFAULT_STEADY_GAP,
            max_iterations: Self::DEFAULT_MAX_ITERATIONS,
            max_sent_factor: Self::DEFAULT_MAX_SENT_FACTOR,
            defer_wws: true,
            deferring: false,
            writers: WriterThrottle::configured(
                true,
                crate::DirtyLimitPolicy::DEFAULT_LIMIT_MB,
                writers::DEFAULT_PATIENCE,
            ),
        }
    }

    /// Build from `params` (downtime limit and [`SETTINGS`]).
    pub fn from_params(params: &PolicyParams) -> Result<Self, PolicyError> {
        let s = Settings::new("mp", SETTINGS, params)?;
        Ok(Self {
            rate_ratio: s.fraction("rate-ratio", Self::DEFAULT_RATE_RATIO, 0.0, 1.0)?,
            wws_ratio: s.fraction("wws-ratio", Self::DEFAULT_WWS_RATIO, 0.0, 1.0)?,
            min_gain: s.fraction("min-gain", Self::DEFAULT_MIN_GAIN, 0.0, 1.0)?,
            confirm: s.count_at_least("confirm", Self::DEFAULT_CONFIRM, 1)?,
            trough_wait: s.count_u32("trough-wait", Self::DEFAULT_TROUGH_WAIT)?,
            cheap_factor: s.factor("cheap-factor", Self::DEFAULT_CHEAP_FACTOR)?,
            phase_wait: s.switch("phase-wait", true)?,
            steady_stop: s.switch("steady-stop", true)?,
            steady_gap: s.count_u32("steady-gap", Self::DEFAULT_STEADY_GAP)?,
            max_iterations: s.count_u32("max-iterations", Self::DEFAULT_MAX_ITERATIONS)?,
            max_sent_factor: s.factor("max-sent-factor", Self::DEFAULT_MAX_SENT_FACTOR)?,
            defer_wws: s.switch("defer-wws", true)?,
            writers: WriterThrottle::configured(
                s.switch("writer-throttle", true)?,
                s.factor(
                    "vcpu-dirty-limit",
                    crate::DirtyLimitPolicy::DEFAULT_LIMIT_MB,
                )?,
                s.count_at_least("throttle-patience", writers::DEFAULT_PATIENCE, 1)?,
            ),
            ..Self::new(params.downtime_limit)
        })
    }

    /// The downtime limit currently in force.
    pub fn downtime_limit(&self) -> Duration {
        self.qemu.downtime_limit()
    }

    /// Rule 2 for iteration `index` of a history.
    fn intensive(&self, index: usize, it: &IterationStats) -> (bool, bool) {
        let rate = it.dirtied_during as f64 >= self.rate_ratio * it.pages_handled() as f64;
        let wws = index >= 2 && it.redirty_ratio() >= self.wws_ratio;
        (rate, wws)
    }

    /// The longest run of quiet windows (rule 4c) in the last
    /// [`PHASE_MEMORY`] iterations, and those iterations; `None` without a
    /// bandwidth sample.
    fn longest_quiet_run<'h>(
        &self,
        history: &'h MigrationHistory,
    ) -> Option<(u64, &'h [IterationStats])> {
        let sample = history.last_page_sample()?;
        let limit_ms = self.downtime_limit().as_secs_f64() * 1000.0;
        let its = history.iterations();
        let recent = &its[its.len().saturating_sub(PHASE_MEMORY)..];
        let windows = || {
            recent
                .iter()
                .flat_map(|it| it.dirty_windows.iter().copied())
        };
        let storm = windows().max().unwrap_or(0);
        let page_size = history.last()?.page_size;
        let quiet = |pages: u64| {
            pages.saturating_mul(PHASE_CONTRAST) <= storm
                && sample
                    .millis_to_send(pages.saturating_mul(page_size))
                    .is_some_and(|ms| ms <= limit_ms)
        };
        let (mut run, mut longest) = (0u64, 0u64);
        for pages in windows() {
            run = if quiet(pages) { run + 1 } else { 0 };
            longest = longest.max(run);
        }
        Some((longest, recent))
    }

    /// Rule 4c: a quiet phase at least as long as the last iteration was
    /// seen in the windows of the last [`PHASE_MEMORY`] iterations, next to
    /// storms.
    fn quiet_phase_seen(&self, history: &MigrationHistory) -> bool {
        let (Some(last), Some((longest, _))) = (history.last(), self.longest_quiet_run(history))
        else {
            return false;
        };
        crate::DIRTY_WINDOW.as_secs_f64() * longest as f64 >= last.duration.as_secs_f64()
    }

    /// Rule 4d: the last [`PHASE_MEMORY`] iterations (at least two) were
    /// each sampled over half their length or more, with no run of quiet
    /// windows longer than `steady-gap`.
    fn steady_writer(&self, history: &MigrationHistory) -> bool {
        let Some((longest, recent)) = self.longest_quiet_run(history) else {
            return false;
        };
        let window = crate::DIRTY_WINDOW.as_secs_f64();
        let sampled = |it: &IterationStats| {
            !it.dirty_windows.is_empty()
                && 2.0 * window * it.dirty_windows.len() as f64 >= it.duration.as_secs_f64()
        };
        recent.len() >= 2 && recent.iter().all(sampled) && longest <= u64::from(self.steady_gap)
    }

    /// Replay rules 2 to 4 over `iterations`.
    fn assess(&self, iterations: &[IterationStats]) -> Assessment {
        let mut a = Assessment::default();
        let mut best = u64::MAX;
        for (index, it) in iterations.iter().enumerate() {
            let remaining = it.remaining_bytes();
            if index > 0 {
                let no_progress = remaining as f64 >= (1.0 - self.min_gain) * best as f64;
                let (rate, wws) = self.intensive(index, it);
                if no_progress && (rate || wws) {
                    a.streak = a.streak.saturating_add(1);
                    a.wws_stuck |= wws;
                } else {
                    a.streak = 0;
                }
            }
            best = best.min(remaining);
        }
        if let [.., previous, last] = iterations {
            a.rising = last.remaining_bytes() > previous.remaining_bytes();
        }
        a
    }
}

impl Default for MpPolicy {
    /// The defaults, with [`DEFAULT_DOWNTIME_LIMIT`](crate::DEFAULT_DOWNTIME_LIMIT).
    fn default() -> Self {
        Self::new(crate::DEFAULT_DOWNTIME_LIMIT)
    }
}

impl ConvergencePolicy for MpPolicy {
    fn name(&self) -> &'static str {
        "mp"
    }

    fn decide(&mut self, history: &MigrationHistory) -> Decision {
        // Rule 1.
        let stop = self.qemu.decide(history);
        if stop != Decision::Continue {
            return stop;
        }
        let Some(last) = history.last() else {
            return Decision::Continue;
        };
        let a = self.assess(history.iterations());
        let phased = self.phase_wait && self.quiet_phase_seen(history);
        // Rule 6 (not while rule 4c waits for a quiet phase: held pages
        // would make the final copy the storm set whatever phase it is in).
        self.deferring = self.defer_wws && a.wws_stuck && !phased;
        let remaining_bytes = last.remaining_bytes();
        let predicted_downtime_ms = history
            .last_page_sample()
            .and_then(|sample| sample.millis_to_send(remaining_bytes));
        // Rule 4b.
        let stuck_now = if history.len() == 1 {
            last.dirtied_during as f64 >= self.rate_ratio * last.pages_sent as f64
                && last.pages_sent > 0
        } else {
            a.streak >= 1
        };
        let cheap_ms = self.cheap_factor * self.downtime_limit().as_secs_f64() * 1000.0;
        if stuck_now && predicted_downtime_ms.is_some_and(|ms| ms <= cheap_ms) {
            return Decision::StopAndCopy(StopReason::MemoryIntensive {
                iterations: a.streak.max(1),
                remaining_bytes,
                predicted_downtime_ms,
            });
        }
        // Rule 7: throttle the writers, and hold nothing back meanwhile.
        let throttled = self.writers.decide(history, stuck_now);
        if self.writers.active() {
            self.deferring = false;
        }
        if let Some(d) = throttled {
            return d;
        }
        // Rule 4 (one stuck iteration for a steady writer, rule 4d), unless
        // rule 4c waits for a quiet phase.
        let confirm = if self.steady_stop && a.streak >= 1 && self.steady_writer(history) {
            1
        } else {
            self.confirm
        };
        let waited_enough = a.streak >= confirm.saturating_add(self.trough_wait);
        if a.streak >= confirm && (!a.rising || waited_enough) && !phased {
            return Decision::StopAndCopy(StopReason::MemoryIntensive {
                iterations: a.streak,
                remaining_bytes,
                predicted_downtime_ms,
            });
        }
        // Rule 5.
        let iterations = history.completed();
        let sent = history.total_bytes_sent();
        if iterations >= self.max_iterations {
            Decision::StopAndCopy(StopReason::IterationLimit {
                iterations,
                predicted_downtime_ms,
            })
        } else if last.ram_bytes > 0 && sent as f64 > self.max_sent_factor * last.ram_bytes as f64 {
            Decision::StopAndCopy(StopReason::SentTooMuch {
                bytes: sent,
                predicted_downtime_ms,
            })
        } else {
            Decision::Continue
        }
    }

    fn defer_writable_working_set(&self) -> bool {
        self.deferring
    }

    fn set_downtime_limit(&mut self, limit: Duration) {
        self.qemu.set_downtime_limit(limit);
    }
}
