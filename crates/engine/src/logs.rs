//! What a call says while it runs: environment build progress, the function's output, engine notices.

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogSource {
    /// A line the function wrote to stdout.
    Stdout,
    /// A line the function wrote to stderr.
    Stderr,
    /// Progress of an environment build (ours and uv's).
    Build,
    /// Something the engine wants the caller to know (limits not applied, a worker replaced).
    Engine,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    pub source: LogSource,
    pub line: String,
}

/// Where the log lines of one call go: a callback that must not block (it runs on the engine's threads), and
/// optionally a [`LogBudget`] that the reader of the lines refills.
#[derive(Clone, Default)]
pub struct LogSink {
    callback: Option<Arc<dyn Fn(LogLine) + Send + Sync>>,
    budget: Option<Arc<LogBudget>>,
}

impl LogSink {
    pub fn new(callback: impl Fn(LogLine) + Send + Sync + 'static) -> Self {
        Self { callback: Some(Arc::new(callback)), budget: None }
    }

    /// A sink whose lines are counted against `budget`: while the reader is that far behind, a worker's output is
    /// not read, so the worker waits on its full pipe (as a program writing to a slow terminal does) and nothing is
    /// lost or held without bound.
    pub fn with_budget(callback: impl Fn(LogLine) + Send + Sync + 'static, budget: Arc<LogBudget>) -> Self {
        Self { callback: Some(Arc::new(callback)), budget: Some(budget) }
    }

    /// A sink that drops everything.
    pub fn discard() -> Self {
        Self::default()
    }

    pub fn send(&self, source: LogSource, line: impl Into<String>) {
        if let Some(callback) = &self.callback {
            let line = line.into();
            if let Some(budget) = &self.budget {
                budget.queued.fetch_add(line.len(), Ordering::AcqRel);
            }
            callback(LogLine { source, line });
        }
    }

    /// Waits until the reader has room for more lines (at once without a budget).
    pub(crate) async fn room(&self) {
        if let Some(budget) = &self.budget {
            budget.room().await;
        }
    }
}

impl fmt::Debug for LogSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.callback.is_some() { "LogSink(..)" } else { "LogSink(discard)" })
    }
}

/// How many bytes of log lines one call may have sent and its reader not yet taken.
#[derive(Debug)]
pub struct LogBudget {
    limit: usize,
    queued: AtomicUsize,
    taken: Notify,
}

impl LogBudget {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self { limit, queued: AtomicUsize::new(0), taken: Notify::new() })
    }

    /// The reader took a line of `bytes` bytes.
    pub fn taken(&self, bytes: usize) {
        let _ = self.queued.fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| Some(q.saturating_sub(bytes)));
        self.taken.notify_waiters();
    }

    async fn room(&self) {
        loop {
            // Made before the check: a `taken` between the check and the wait still wakes it.
            let taken = self.taken.notified();
            if self.queued.load(Ordering::Acquire) < self.limit {
                return;
            }
            taken.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_budget_holds_the_writer_until_the_reader_takes_lines() {
        let budget = LogBudget::new(10);
        let logs = LogSink::with_budget(|_| {}, budget.clone());
        logs.send(LogSource::Stdout, "0123456789");
        let waiting = tokio::time::timeout(std::time::Duration::from_millis(20), logs.room());
        assert!(waiting.await.is_err(), "10 bytes queued of 10: no room");
        let reader = {
            let budget = budget.clone();
            tokio::spawn(async move {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                budget.taken(10);
            })
        };
        tokio::time::timeout(std::time::Duration::from_secs(5), logs.room()).await.expect("room once taken");
        reader.await.unwrap();
        LogSink::discard().room().await;
    }
}
