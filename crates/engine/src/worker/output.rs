//! A worker's stdout or stderr: a non-blocking pipe cut into lines.
//!
//! Bounded and linear: a line is held up to [`MAX_LINE`] bytes (the rest of a longer one is counted, dropped and
//! marked), each byte is looked at once, one read of the pipe takes at most [`DRAIN_LIMIT`] bytes, and the pipe is
//! not read while the call's reader is behind (see [`LogSink::with_budget`]). A `\r` ends a line too, so a progress
//! bar's updates (tqdm's) stream as they are written; `\r\n` is one line end.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::logs::{LogSink, LogSource};

/// Creates a pipe; returns (read end for us, non-blocking; write end for the child).
pub(crate) fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into `fds`, which we then own.
    unsafe {
        if libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let (read, write) = (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]));
        let flags = libc::fcntl(fds[0], libc::F_GETFL);
        if flags < 0 || libc::fcntl(fds[0], libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok((read, write))
    }
}

/// The longest line forwarded whole; the rest of a longer line is dropped and marked.
pub(crate) const MAX_LINE: usize = 64 * 1024;
/// The most one drain reads: a writer that never stops cannot keep the engine reading for ever.
const DRAIN_LIMIT: usize = 1 << 20;
/// The most the drain before a reply reads: more than a TCP stream's receive buffer holds (Linux's default
/// `tcp_rmem` maximum is 6 MiB). A cluster job's agent sends its reply once the server's host has acknowledged all
/// it printed before it, so that drain reads it whole.
const HELD_LIMIT: usize = 8 << 20;

#[derive(Debug)]
pub(crate) struct OutputPipe {
    fd: AsyncFd<OwnedFd>,
    source: LogSource,
    line: LineCutter,
    open: bool,
}

/// Cuts bytes into lines at `\n` and `\r`, holding at most [`MAX_LINE`] bytes of the current one.
#[derive(Debug, Default)]
struct LineCutter {
    partial: Vec<u8>,
    /// Bytes of the current line beyond `MAX_LINE`, dropped.
    dropped: u64,
    /// The last byte seen was a `\r`: a `\n` right after it ends nothing more.
    after_cr: bool,
    /// ... and it ended an empty line, not forwarded (yet: `\r\n` on its own is an empty line).
    after_empty_cr: bool,
}

impl LineCutter {
    fn push(&mut self, mut bytes: &[u8], mut line: impl FnMut(String)) {
        while !bytes.is_empty() {
            if self.after_cr && bytes[0] == b'\n' {
                if self.after_empty_cr {
                    line(String::new());
                }
                bytes = &bytes[1..];
            }
            (self.after_cr, self.after_empty_cr) = (false, false);
            let end = bytes.iter().position(|&b| b == b'\n' || b == b'\r');
            let (piece, rest) = match end {
                Some(i) => (&bytes[..i], Some((bytes[i], &bytes[i + 1..]))),
                None => (bytes, None),
            };
            let room = MAX_LINE - self.partial.len();
            self.partial.extend_from_slice(&piece[..piece.len().min(room)]);
            self.dropped += piece.len().saturating_sub(room) as u64;
            let Some((terminator, rest)) = rest else { return };
            // A `\r` with nothing before it (tqdm starts each update with one) is no line.
            let empty = self.is_empty();
            if terminator == b'\n' || !empty {
                line(self.take());
            }
            self.after_cr = terminator == b'\r';
            self.after_empty_cr = self.after_cr && empty;
            bytes = rest;
        }
    }

    fn take(&mut self) -> String {
        let mut text = String::from_utf8_lossy(&self.partial).into_owned();
        if self.dropped > 0 {
            text.push_str(&format!(" [line cut: {} more bytes without a line end were dropped]", self.dropped));
        }
        self.partial.clear();
        self.dropped = 0;
        text
    }

    fn is_empty(&self) -> bool {
        self.partial.is_empty() && self.dropped == 0
    }
}

impl OutputPipe {
    pub fn new(fd: OwnedFd, source: LogSource) -> std::io::Result<Self> {
        // SAFETY: an OwnedFd is a valid descriptor that stays open, and refers to the same pipe, until dropped.
        let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }.map_err(std::io::Error::from)?;
        Ok(Self { fd, source, line: LineCutter::default(), open: true })
    }

    pub fn is_open(&self) -> bool {
        self.open
    }

    /// Waits until the call's reader has room and the pipe is readable, then forwards what it holds. Cancel-safe:
    /// bytes are only read after the waits, synchronously.
    pub async fn forward(&mut self, logs: &LogSink) {
        loop {
            logs.room().await;
            let Ok(mut guard) = self.fd.readable().await else {
                self.open = false;
                return;
            };
            guard.clear_ready();
            drop(guard);
            if self.drain(logs) {
                return;
            }
        }
    }

    /// Reads what the pipe holds right now (up to [`DRAIN_LIMIT`]) and forwards whole lines. Returns whether
    /// anything happened (bytes read or end of stream).
    pub fn drain(&mut self, logs: &LogSink) -> bool {
        self.drain_up_to(logs, DRAIN_LIMIT)
    }

    /// [`Self::drain`] before a reply is taken: all the pipe (or stream) holds, up to [`HELD_LIMIT`].
    pub fn drain_held(&mut self, logs: &LogSink) -> bool {
        self.drain_up_to(logs, HELD_LIMIT)
    }

    fn drain_up_to(&mut self, logs: &LogSink, limit: usize) -> bool {
        let mut progressed = false;
        let mut chunk = [0u8; 16 * 1024];
        let mut read = 0;
        while self.open && read < limit {
            // SAFETY: reads into a stack buffer of the given length from a descriptor we own.
            let n = unsafe { libc::read(self.fd.get_ref().as_raw_fd(), chunk.as_mut_ptr().cast(), chunk.len()) };
            match n {
                0 => {
                    self.open = false;
                    progressed = true;
                }
                n if n > 0 => {
                    let source = self.source;
                    self.line.push(&chunk[..n as usize], |line| logs.send(source, line));
                    read += n as usize;
                    progressed = true;
                }
                _ => {
                    let err = std::io::Error::last_os_error();
                    match err.kind() {
                        std::io::ErrorKind::WouldBlock => break,
                        std::io::ErrorKind::Interrupted => continue,
                        // The stream's end too (a Slurm job's TCP stream timed out by keepalive, say): unless it
                        // counts as progress, `forward` would wait on a descriptor that stays readable, forever.
                        _ => {
                            self.open = false;
                            progressed = true;
                        }
                    }
                }
            }
        }
        progressed
    }

    /// Forwards a last line that has no newline yet (the call ended mid-line).
    pub fn flush_partial(&mut self, logs: &LogSink) {
        if !self.line.is_empty() {
            logs.send(self.source, self.line.take());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logs::LogLine;

    #[tokio::test]
    async fn lines_are_cut_at_newlines_and_partial_lines_wait() {
        let (read, write) = pipe().unwrap();
        let mut pipe = OutputPipe::new(read, LogSource::Stdout).unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let logs = LogSink::new(move |line| drop(tx.send(line)));
        let mut writer = std::fs::File::from(write);
        std::io::Write::write_all(&mut writer, b"one\n\ntwo\nthr").unwrap();
        assert!(pipe.drain(&logs));
        std::io::Write::write_all(&mut writer, b"ee\n").unwrap();
        pipe.forward(&logs).await;
        drop(writer);
        pipe.drain(&logs);
        assert!(!pipe.is_open());
        let mut lines = Vec::new();
        while let Ok(LogLine { line, .. }) = rx.try_recv() {
            lines.push(line);
        }
        assert_eq!(lines, ["one", "", "two", "three"]);
    }

    fn cut(pieces: &[&[u8]]) -> Vec<String> {
        let mut cutter = LineCutter::default();
        let mut lines = Vec::new();
        for piece in pieces {
            cutter.push(piece, |line| lines.push(line));
        }
        if !cutter.is_empty() {
            lines.push(cutter.take());
        }
        lines
    }

    #[test]
    fn carriage_returns_end_progress_updates_and_crlf_is_one_line_end() {
        assert_eq!(
            cut(&[b"\r 10%|#", b"  |\r 20%|##  |", b"\r100%|####|\n"]),
            [" 10%|#  |", " 20%|##  |", "100%|####|"]
        );
        assert_eq!(cut(&[b"a\r", b"\nb\r\n\r\nc"]), ["a", "b", "", "c"]);
    }

    #[test]
    fn a_long_line_is_cut_at_the_limit_and_marked_however_it_arrives() {
        let long = vec![b'x'; MAX_LINE + 1000];
        let whole = cut(&[&long, b"\nnext\n"]);
        let chunked: Vec<&[u8]> = long.chunks(777).chain([&b"\nnext\n"[..]]).collect();
        assert_eq!(cut(&chunked), whole);
        assert_eq!(whole.len(), 2);
        assert!(whole[0].starts_with(&"x".repeat(MAX_LINE)));
        assert!(
            whole[0].ends_with(" [line cut: 1000 more bytes without a line end were dropped]"),
            "{}",
            &whole[0][MAX_LINE..]
        );
        assert_eq!(whole[1], "next");
    }

    #[test]
    fn a_line_without_end_is_held_within_the_limit() {
        let mut cutter = LineCutter::default();
        let chunk = vec![b'y'; 1 << 20];
        for _ in 0..64 {
            cutter.push(&chunk, |_| panic!("no line end yet"));
        }
        assert!(cutter.partial.capacity() <= 2 * MAX_LINE, "held {} bytes", cutter.partial.capacity());
        assert_eq!(cutter.dropped, (64 << 20) - MAX_LINE as u64);
    }

    #[test]
    fn a_stream_that_fails_ends_forwarding() {
        // A TCP stream (as a Slurm job's) whose peer resets it: reading fails with ECONNRESET, as with ETIMEDOUT
        // when keepalive gives up on a node.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (ours, _) = listener.accept().unwrap();
        ours.set_nonblocking(true).unwrap();
        socket2::SockRef::from(&peer).set_linger(Some(std::time::Duration::ZERO)).unwrap();
        drop(peer);
        // On a thread of its own: a forward() that never returns never yields either, so no timeout in its own
        // runtime could end it; this one is simply left behind when the test fails.
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async {
                let mut pipe = OutputPipe::new(OwnedFd::from(ours), LogSource::Stdout).unwrap();
                pipe.forward(&LogSink::new(|_| {})).await;
                let _ = done.send(pipe.is_open());
            });
        });
        let open = finished.recv_timeout(std::time::Duration::from_secs(10));
        assert_eq!(open, Ok(false), "forward() kept waiting on a failed stream");
    }
}
