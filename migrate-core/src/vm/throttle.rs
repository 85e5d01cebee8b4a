//! vCPU throttling: each vCPU has its own fraction of time held off.
//!
//! auto-converge sets one fraction for every vCPU ([`Throttles::set_all`]);
//! dirty-limit sets one per vCPU ([`Throttles::set_each`]), so a vCPU that
//! only computes keeps its speed while the one that dirties memory slows
//! down. A throttled vCPU thread sleeps `p / (1 - p)` × [`THROTTLE_SLICE`]
//! after every slice it ran (see the `vcpu` module); the [`Ticker`] kicks
//! the throttled vCPUs out of `KVM_RUN` every slice so that a guest that
//! never exits (a store loop) still takes its sleep. The ticker runs while
//! any vCPU is throttled and kicks only those: kicking an unthrottled vCPU
//! would cost it an exit per slice for nothing.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::vcpu::Kickable;

/// Run slice of a throttled vCPU (QEMU's CPU_THROTTLE_TIMESLICE_NS).
pub const THROTTLE_SLICE: Duration = Duration::from_millis(10);

/// One vCPU's throttle, in per-mille of its time held off (0..=990).
#[derive(Debug, Default)]
pub struct Throttle(AtomicU32);

impl Throttle {
    /// Set the fraction of time the vCPU is held off (clamped to 0..=0.99;
    /// NaN counts as 0).
    pub fn set(&self, fraction: f64) {
        let f = if fraction.is_nan() { 0.0 } else { fraction };
        // In range 0..=990 after the clamp: the cast cannot truncate.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let per_mille = (f.clamp(0.0, 0.99) * 1000.0).round() as u32;
        self.0.store(per_mille, Ordering::Relaxed);
    }

    /// The fraction in force.
    pub fn get(&self) -> f64 {
        f64::from(self.0.load(Ordering::Relaxed)) / 1000.0
    }

    /// How long to sleep after a full run slice (`None`: unthrottled).
    pub(super) fn sleep_per_slice(&self) -> Option<Duration> {
        let p = self.get();
        (p > 0.0).then(|| THROTTLE_SLICE.mul_f64(p / (1.0 - p)))
    }
}

/// The throttles of every vCPU of a VM, and the ticker that enforces them.
pub struct Throttles {
    each: Vec<Arc<Throttle>>,
    ticker: Mutex<Option<Ticker>>,
}

impl Throttles {
    /// `vcpus` unthrottled vCPUs.
    pub fn new(vcpus: u32) -> Self {
        Self {
            each: (0..vcpus).map(|_| Arc::new(Throttle::default())).collect(),
            ticker: Mutex::new(None),
        }
    }

    /// vCPU `index`'s throttle, to hand to its thread.
    pub fn of(&self, index: u32) -> Arc<Throttle> {
        self.each[usize::try_from(index).expect("u32 fits usize")].clone()
    }

    /// Every vCPU to `fraction` (0.0 lifts the throttle).
    pub fn set_all(
        &self,
        fraction: f64,
        kick: impl FnOnce() -> Vec<Kickable>,
    ) -> std::io::Result<()> {
        self.each.iter().for_each(|t| t.set(fraction));
        self.ensure_ticker(kick)
    }

    /// vCPU *i* to `fractions[i]`; vCPUs beyond the list are unthrottled.
    pub fn set_each(
        &self,
        fractions: &[f64],
        kick: impl FnOnce() -> Vec<Kickable>,
    ) -> std::io::Result<()> {
        for (i, t) in self.each.iter().enumerate() {
            t.set(fractions.get(i).copied().unwrap_or(0.0));
        }
        self.ensure_ticker(kick)
    }

    /// The highest throttle of any vCPU (what one shared throttle reports).
    pub fn max(&self) -> f64 {
        self.each.iter().map(|t| t.get()).fold(0.0, f64::max)
    }

    /// Every vCPU's throttle, in index order.
    pub fn each(&self) -> Vec<f64> {
        self.each.iter().map(|t| t.get()).collect()
    }

    /// Start the ticker the first time a vCPU is throttled (it idles while
    /// none is, and lives until [`stop`](Self::stop)).
    fn ensure_ticker(&self, kick: impl FnOnce() -> Vec<Kickable>) -> std::io::Result<()> {
        let mut ticker = self.ticker.lock().unwrap_or_else(|e| e.into_inner());
        if ticker.is_none() && self.max() > 0.0 {
            let vcpus = self.each.iter().cloned().zip(kick()).collect();
            *ticker = Some(Ticker::spawn(vcpus)?);
        }
        Ok(())
    }

    /// Stop the ticker (the vCPUs are going away).
    pub fn stop(&self) {
        let ticker = self.ticker.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = ticker {
            t.stop();
        }
    }
}

/// The thread that kicks throttled vCPUs out of KVM_RUN every slice.
pub struct Ticker {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Ticker {
    /// Start kicking each vCPU of `vcpus` every slice while its throttle is
    /// in force.
    pub fn spawn(vcpus: Vec<(Arc<Throttle>, Kickable)>) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("throttle".into())
            .spawn(move || {
                while !stop2.load(Ordering::Relaxed) {
                    for (throttle, vcpu) in &vcpus {
                        if throttle.get() > 0.0 {
                            vcpu.kick();
                        }
                    }
                    std::thread::sleep(THROTTLE_SLICE);
                }
            })?;
        Ok(Self { stop, thread })
    }

    /// Stop the thread and wait for it.
    pub fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_all_and_set_each() {
        let t = Throttles::new(3);
        assert_eq!(t.each(), [0.0, 0.0, 0.0]);
        // No vCPU is throttled: no ticker (nothing to kick).
        t.set_all(0.0, Vec::new).unwrap();
        assert!(t.ticker.lock().unwrap().is_none());
        t.set_each(&[0.5, 0.0], || vec![Kickable::default(); 3])
            .unwrap();
        assert_eq!(t.each(), [0.5, 0.0, 0.0]);
        assert_eq!(t.max(), 0.5);
        assert!(t.ticker.lock().unwrap().is_some());
        t.set_all(0.2, Vec::new).unwrap();
        assert_eq!(t.each(), [0.2, 0.2, 0.2]);
        // Clamped to 99%, NaN is 0.
        t.set_each(&[1.5, f64::NAN, -1.0], Vec::new).unwrap();
        assert_eq!(t.each(), [0.99, 0.0, 0.0]);
        let sleep = t.of(0).sleep_per_slice().unwrap();
        assert!(
            sleep > THROTTLE_SLICE * 98 && sleep <= THROTTLE_SLICE * 99,
            "{sleep:?}"
        );
        assert_eq!(t.of(1).sleep_per_slice(), None);
        t.stop();
        assert!(t.ticker.lock().unwrap().is_none());
    }
}
