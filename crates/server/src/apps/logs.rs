//! What an app's replicas print: kept per app (the last [`KEPT_LINES`] lines, in memory) for `GetLogs` and
//! `fal-serverless logs`, sent live to followers, and kept per request (the request a replica was serving when it
//! printed the line) for the queue's `status?logs=1`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use fal_engine::{LogLine, LogSource};
use tokio::sync::broadcast;

/// Lines kept per app; older ones are dropped.
pub const KEPT_LINES: usize = 10_000;
/// Lines kept per request; past it the request's log says how many were left out.
pub const REQUEST_LINES: usize = 2_000;

/// One line an app printed.
#[derive(Debug, Clone)]
pub struct AppLogLine {
    pub time: SystemTime,
    pub source: LogSource,
    pub line: String,
    /// The request its replica was serving (empty: none, or more than one at once).
    pub request_id: String,
}

/// One app's (revision's) lines.
#[derive(Debug)]
pub struct AppLogs {
    kept: Mutex<VecDeque<AppLogLine>>,
    live: broadcast::Sender<AppLogLine>,
}

impl Default for AppLogs {
    fn default() -> Self {
        Self { kept: Mutex::default(), live: broadcast::channel(1024).0 }
    }
}

impl AppLogs {
    pub fn push(&self, line: AppLogLine) {
        {
            let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
            if kept.len() == KEPT_LINES {
                kept.pop_front();
            }
            kept.push_back(line.clone());
        }
        let _ = self.live.send(line);
    }

    /// The last `lines` lines, oldest first, and (subscribed before they were read, so nothing falls between) the
    /// lines printed after them.
    pub fn tail(&self, lines: usize) -> (Vec<AppLogLine>, broadcast::Receiver<AppLogLine>) {
        let kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        let live = self.live.subscribe();
        let skip = kept.len().saturating_sub(lines);
        (kept.iter().skip(skip).cloned().collect(), live)
    }
}

/// The lines of one request, as its replica printed them while serving it.
#[derive(Debug, Default)]
pub struct RequestLogs(Mutex<RequestLines>);

#[derive(Debug, Default)]
struct RequestLines {
    lines: Vec<AppLogLine>,
    dropped: usize,
}

impl RequestLogs {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    pub fn push(&self, line: &AppLogLine) {
        let mut lines = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if lines.lines.len() < REQUEST_LINES {
            lines.lines.push(line.clone());
        } else {
            lines.dropped += 1;
        }
    }

    /// The lines so far, with a last line saying how many were left out, if any were.
    pub fn lines(&self) -> Vec<AppLogLine> {
        let lines = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = lines.lines.clone();
        if lines.dropped > 0 {
            out.push(AppLogLine {
                time: SystemTime::now(),
                source: LogSource::Engine,
                line: format!("... {} more lines left out (a request keeps its first {REQUEST_LINES})", lines.dropped),
                request_id: out.last().map(|l| l.request_id.clone()).unwrap_or_default(),
            });
        }
        out
    }
}

/// An engine log line as an app's, printed during `request_id`.
pub fn app_line(line: LogLine, request_id: &str) -> AppLogLine {
    AppLogLine { time: SystemTime::now(), source: line.source, line: line.line, request_id: request_id.to_string() }
}

/// The name of a line's source in JSON (the queue's logs) and in our CLI.
pub fn source_name(source: LogSource) -> &'static str {
    match source {
        LogSource::Stdout => "stdout",
        LogSource::Stderr => "stderr",
        LogSource::Build => "build",
        LogSource::Engine => "server",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(text: &str) -> AppLogLine {
        app_line(LogLine { source: LogSource::Stdout, line: text.into() }, "r")
    }

    #[test]
    fn an_app_keeps_its_last_lines_and_followers_get_new_ones() {
        let logs = AppLogs::default();
        for i in 0..KEPT_LINES + 5 {
            logs.push(line(&i.to_string()));
        }
        let (tail, mut live) = logs.tail(3);
        let texts: Vec<_> = tail.iter().map(|l| l.line.as_str()).collect();
        let last = KEPT_LINES + 4;
        assert_eq!(texts, [(last - 2).to_string(), (last - 1).to_string(), last.to_string()]);
        logs.push(line("new"));
        assert_eq!(live.try_recv().unwrap().line, "new");
        assert_eq!(logs.tail(usize::MAX).0.len(), KEPT_LINES);
    }

    #[test]
    fn a_request_keeps_its_first_lines_and_says_how_many_it_left_out() {
        let logs = RequestLogs::new();
        for i in 0..REQUEST_LINES + 3 {
            logs.push(&line(&i.to_string()));
        }
        let lines = logs.lines();
        assert_eq!(lines.len(), REQUEST_LINES + 1);
        assert!(lines.last().unwrap().line.contains("3 more lines left out"));
    }
}
