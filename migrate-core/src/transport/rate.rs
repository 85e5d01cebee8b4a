//! The bandwidth cap on a migration stream (`--max-bandwidth`,
//! `migrate-set-parameters`): a writer that paces its bytes to a rate
//! shared with the control path, so the cap can change while it runs.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A bandwidth cap that can change while a migration runs
/// (`migrate-set-parameters`): bytes per second, 0 for no cap. Cloned
/// handles share one value; the writer reads it before every write.
#[derive(Debug, Clone, Default)]
pub struct SharedRate(Arc<AtomicU64>);

impl SharedRate {
    /// A cap of `bytes_per_sec` (`None` or `Some(0)`: unlimited).
    pub fn new(bytes_per_sec: Option<u64>) -> Self {
        Self(Arc::new(AtomicU64::new(bytes_per_sec.unwrap_or(0))))
    }

    /// Change the cap for every holder, from their next write on.
    pub fn set(&self, bytes_per_sec: Option<u64>) {
        self.0.store(bytes_per_sec.unwrap_or(0), Ordering::Relaxed);
    }

    /// The cap in force (`None`: unlimited).
    pub fn get(&self) -> Option<u64> {
        Some(self.0.load(Ordering::Relaxed)).filter(|&r| r > 0)
    }
}

/// A writer that keeps its average rate under a cap (token bucket with a
/// burst of 50 ms worth of bytes), for `--max-bandwidth`. The cap is a
/// [`SharedRate`], so the API can change it mid-migration.
pub struct RateLimited<W> {
    inner: W,
    rate: SharedRate,
    /// Connections sharing the cap.
    ways: f64,
    tokens: f64,
    last: Instant,
}

impl<W: Write> RateLimited<W> {
    /// Wrap `inner`; `None` means no cap.
    pub fn new(inner: W, bytes_per_sec: Option<u64>) -> Self {
        Self::shared(inner, SharedRate::new(bytes_per_sec))
    }

    /// Wrap `inner` under a cap others may change.
    pub fn shared(inner: W, rate: SharedRate) -> Self {
        Self::shared_split(inner, rate, 1)
    }

    /// Like [`RateLimited::shared`], for one of `ways` connections that
    /// share the cap: each gets `cap ÷ ways`, so together they hold it.
    pub fn shared_split(inner: W, rate: SharedRate, ways: u32) -> Self {
        Self {
            inner,
            rate,
            ways: f64::from(ways.max(1)),
            tokens: 0.0,
            last: Instant::now(),
        }
    }

    /// Change the cap from now on.
    pub fn set_rate(&mut self, bytes_per_sec: Option<u64>) {
        self.rate.set(bytes_per_sec);
    }

    /// The wrapped writer.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    fn wait_for(&mut self, want: usize) -> usize {
        loop {
            // Re-read every round: a cap lifted while we sleep frees us.
            let Some(rate) = self.rate.get() else {
                self.tokens = 0.0;
                self.last = Instant::now();
                return want;
            };
            let rate = rate as f64 / self.ways;
            let burst = (rate * 0.05).max(4096.0);
            let now = Instant::now();
            self.tokens =
                (self.tokens + now.duration_since(self.last).as_secs_f64() * rate).min(burst);
            self.last = now;
            if self.tokens >= 1.0 {
                // Truncation intended: whole bytes of the tokens available.
                #[allow(clippy::cast_possible_truncation)]
                let n = want.min(self.tokens as usize).max(1);
                self.tokens -= n as f64;
                return n;
            }
            let need = (1.0f64.min(want as f64) - self.tokens) / rate;
            // Sleep at most 50 ms at a time so a new cap applies quickly.
            std::thread::sleep(Duration::from_secs_f64(need.clamp(0.0005, 0.05)));
        }
    }
}

impl<W: Write> Write for RateLimited<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.wait_for(buf.len());
        let written = self.inner.write(&buf[..n])?;
        if self.rate.get().is_some() {
            // Return the tokens of a short write.
            self.tokens += (n - written) as f64;
        }
        Ok(written)
    }

    /// Passes vectored writes through (a page batch and its header in one
    /// system call); under a cap, only as many bytes as the tokens allow.
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let n = self.wait_for(total);
        let written = if n >= total {
            self.inner.write_vectored(bufs)?
        } else {
            let first = bufs
                .iter()
                .find(|b| !b.is_empty())
                .map_or(&[][..], |b| &b[..]);
            self.inner.write(&first[..n.min(first.len())])?
        };
        if self.rate.get().is_some() {
            self.tokens += n.saturating_sub(written) as f64;
        }
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limiter_holds_the_cap() {
        let mut w = RateLimited::new(Vec::new(), Some(2_000_000));
        let start = Instant::now();
        let chunk = vec![0u8; 64 * 1024];
        for _ in 0..8 {
            w.write_all(&chunk).unwrap();
        }
        // 512 KiB at 2 MB/s takes at least ~0.2 s (minus the 50 ms burst).
        assert!(start.elapsed() >= Duration::from_millis(150));
        assert_eq!(w.get_mut().len(), 8 * 64 * 1024);
    }

    #[test]
    fn shared_rate_changes_apply_to_the_writer() {
        let rate = SharedRate::new(Some(1000));
        let mut w = RateLimited::shared(Vec::new(), rate.clone());
        assert_eq!(rate.get(), Some(1000));
        // Lifting the cap from another handle lets a large write through at once.
        rate.set(None);
        let start = Instant::now();
        w.write_all(&vec![0u8; 1 << 20]).unwrap();
        assert!(start.elapsed() < Duration::from_secs(5));
        assert_eq!(rate.get(), None);
        rate.set(Some(0));
        assert_eq!(rate.get(), None, "0 means no cap");
    }
}
