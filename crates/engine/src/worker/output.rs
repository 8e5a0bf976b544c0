//! A worker's stdout or stderr: a non-blocking pipe cut into lines.

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

#[derive(Debug)]
pub(crate) struct OutputPipe {
    fd: AsyncFd<OwnedFd>,
    source: LogSource,
    partial: Vec<u8>,
    open: bool,
}

impl OutputPipe {
    pub fn new(fd: OwnedFd, source: LogSource) -> std::io::Result<Self> {
        // SAFETY: an OwnedFd is a valid descriptor that stays open, and refers to the same pipe, until dropped.
        let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }.map_err(std::io::Error::from)?;
        Ok(Self { fd, source, partial: Vec::new(), open: true })
    }

    pub fn is_open(&self) -> bool {
        self.open
    }

    /// Waits until the pipe is readable, then forwards what it holds. Cancel-safe: bytes are only read after the
    /// wait, synchronously.
    pub async fn forward(&mut self, logs: &LogSink) {
        loop {
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

    /// Reads everything the pipe holds right now and forwards whole lines. Returns whether anything happened
    /// (bytes read or end of stream).
    pub fn drain(&mut self, logs: &LogSink) -> bool {
        let mut progressed = false;
        let mut chunk = [0u8; 16 * 1024];
        while self.open {
            // SAFETY: reads into a stack buffer of the given length from a descriptor we own.
            let n = unsafe { libc::read(self.fd.get_ref().as_raw_fd(), chunk.as_mut_ptr().cast(), chunk.len()) };
            match n {
                0 => {
                    self.open = false;
                    progressed = true;
                }
                n if n > 0 => {
                    self.partial.extend_from_slice(&chunk[..n as usize]);
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
        self.send_lines(logs);
        progressed
    }

    fn send_lines(&mut self, logs: &LogSink) {
        let Some(last) = self.partial.iter().rposition(|&b| b == b'\n') else { return };
        let rest = self.partial.split_off(last + 1);
        for line in self.partial[..last].split(|&b| b == b'\n') {
            logs.send(self.source, String::from_utf8_lossy(line).into_owned());
        }
        self.partial = rest;
    }

    /// Forwards a last line that has no newline yet (the call ended mid-line).
    pub fn flush_partial(&mut self, logs: &LogSink) {
        if !self.partial.is_empty() {
            logs.send(self.source, String::from_utf8_lossy(&self.partial).into_owned());
            self.partial.clear();
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
