//! What a call says while it runs: environment build progress, the function's output, engine notices.

use std::fmt;
use std::sync::Arc;

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

/// Where the log lines of one call go: a callback that must not block (it runs on the engine's threads).
#[derive(Clone, Default)]
pub struct LogSink(Option<Arc<dyn Fn(LogLine) + Send + Sync>>);

impl LogSink {
    pub fn new(callback: impl Fn(LogLine) + Send + Sync + 'static) -> Self {
        Self(Some(Arc::new(callback)))
    }

    /// A sink that drops everything.
    pub fn discard() -> Self {
        Self(None)
    }

    pub fn send(&self, source: LogSource, line: impl Into<String>) {
        if let Some(callback) = &self.0 {
            callback(LogLine { source, line: line.into() });
        }
    }
}

impl fmt::Debug for LogSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() { "LogSink(..)" } else { "LogSink(discard)" })
    }
}
