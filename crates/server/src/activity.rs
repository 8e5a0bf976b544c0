//! When the server was last used, for stopping a zero-config server that nobody uses.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct Activity {
    started: Instant,
    last_ms: AtomicU64,
    running: Arc<AtomicUsize>,
}

/// Held while a call runs.
#[derive(Debug)]
pub struct Busy(Arc<AtomicUsize>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Default for Activity {
    fn default() -> Self {
        Self { started: Instant::now(), last_ms: AtomicU64::new(0), running: Arc::default() }
    }
}

impl Activity {
    pub fn touch(&self) {
        self.last_ms.store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    pub fn busy(&self) -> Busy {
        self.running.fetch_add(1, Ordering::Relaxed);
        Busy(self.running.clone())
    }

    /// How long nothing has happened; zero while a call runs.
    pub fn idle_for(&self) -> Duration {
        if self.running.load(Ordering::Relaxed) > 0 {
            return Duration::ZERO;
        }
        self.started.elapsed().saturating_sub(Duration::from_millis(self.last_ms.load(Ordering::Relaxed)))
    }
}
