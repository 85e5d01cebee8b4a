//! `events`: connections that subscribed receive one JSON line per event,
//! each with a timestamp (seconds since the Unix epoch, as a float).
//!
//! Events are written synchronously by whoever causes them, with a short
//! write timeout: by the time a migration's `done` line goes out, every
//! subscriber has its `migration-ended` line, even if the process exits
//! right after (a source after a completed migration does). A subscriber
//! that does not read is dropped rather than allowed to stall the VM.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::{ApiResponse, RunState};
use crate::engine::{MigrationReport, MigrationStatus};

/// How long one event write may block on a subscriber.
const WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// One event (`{"response":"event","event":KIND,"timestamp":…,…}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(
    tag = "event",
    rename_all = "kebab-case",
    rename_all_fields = "kebab-case"
)]
pub enum Event {
    /// The VM's run state changed.
    StateChanged {
        /// Seconds since the Unix epoch.
        timestamp: f64,
        /// State before.
        from: RunState,
        /// State now.
        to: RunState,
    },
    /// A migration finished its handshake (`iteration` absent) or an
    /// iteration (`iteration` = its number).
    MigrationProgress {
        /// Seconds since the Unix epoch.
        timestamp: f64,
        /// The iteration just finished (`None`: handshake done).
        iteration: Option<u32>,
        /// Bytes still dirty.
        remaining: u64,
        /// Bytes sent so far.
        transferred: u64,
        /// Downtime limit in force, ms.
        downtime_limit: Option<f64>,
    },
    /// A migration ended: `completed`, `failed` or `cancelled`.
    MigrationEnded {
        /// Seconds since the Unix epoch.
        timestamp: f64,
        /// Outcome.
        status: MigrationStatus,
        /// Why it failed, if it did.
        error: Option<String>,
        /// Milliseconds the guest was paused, if it was.
        downtime: Option<f64>,
    },
    /// The guest stopped by itself (HLT with interrupts off, the exit
    /// port, a vCPU failure).
    GuestStopped {
        /// Seconds since the Unix epoch.
        timestamp: f64,
        /// What happened.
        reason: String,
    },
}

/// Seconds since the Unix epoch, now.
pub fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl Event {
    /// The progress event for a live report.
    pub fn progress(r: &MigrationReport) -> Self {
        Event::MigrationProgress {
            timestamp: now(),
            iteration: r.iterations.last().map(|i| i.iteration),
            remaining: r.ram.remaining,
            transferred: r.ram.transferred,
            downtime_limit: r.downtime_limit,
        }
    }

    /// The end event for a final report.
    pub fn ended(r: &MigrationReport) -> Self {
        Event::MigrationEnded {
            timestamp: now(),
            status: r.status,
            error: r.error.clone(),
            downtime: r.downtime,
        }
    }
}

/// The subscribed connections.
#[derive(Debug, Default)]
pub struct EventBus {
    subscribers: Mutex<Vec<UnixStream>>,
}

impl EventBus {
    /// Add a connection; it receives every later event.
    pub fn subscribe(&self, conn: UnixStream) -> std::io::Result<()> {
        conn.set_write_timeout(Some(WRITE_TIMEOUT))?;
        self.subscribers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(conn);
        Ok(())
    }

    /// Write `event` to every subscriber, dropping those that fail.
    pub fn emit(&self, event: Event) {
        let mut subs = self.subscribers.lock().unwrap_or_else(|e| e.into_inner());
        if subs.is_empty() {
            return;
        }
        let Ok(mut line) = serde_json::to_vec(&ApiResponse::Event(event)) else {
            return;
        };
        line.push(b'\n');
        subs.retain_mut(|s| s.write_all(&line).is_ok());
    }
}
