//! Injected time. Actors read the wall clock only through [`Clock`], so tests can drive time
//! with `tokio::time::pause()` ([`TokioClock`]) or set it by hand ([`ManualClock`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::domain::Ms;

/// A source of Unix milliseconds.
pub trait Clock: Send + Sync + 'static {
    fn now_ms(&self) -> Ms;
}

/// Shared clock handle.
pub type SharedClock = Arc<dyn Clock>;

/// Wall-clock time anchored once, then advanced by tokio's monotonic clock. Under
/// `tokio::time::pause()` it advances only when the test advances time.
#[derive(Debug, Clone)]
pub struct TokioClock {
    base_ms: Ms,
    base: tokio::time::Instant,
}

impl TokioClock {
    pub fn new() -> Self {
        let base_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as Ms);
        TokioClock { base_ms, base: tokio::time::Instant::now() }
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for TokioClock {
    fn now_ms(&self) -> Ms {
        self.base_ms + self.base.elapsed().as_millis() as Ms
    }
}

/// A clock set by hand.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    pub fn new(start: Ms) -> Self {
        ManualClock(AtomicI64::new(start))
    }
    pub fn set(&self, ms: Ms) {
        self.0.store(ms, Ordering::SeqCst);
    }
    pub fn advance(&self, ms: Ms) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> Ms {
        self.0.load(Ordering::SeqCst)
    }
}
