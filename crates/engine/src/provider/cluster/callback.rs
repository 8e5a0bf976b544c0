//! The listener a cluster's workers connect back to. A worker opens three TCP streams to it (frames, stdout,
//! stderr), each first saying `<token> <stream>\n`, the one-time token its start was given; the start waiting for
//! that token gets them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use rand::RngCore;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// TCP keepalive on workers' streams: a node that vanished (powered off, cut off the network) without closing
/// them fails its call within about a minute instead of leaving it to its timeout. Idle time before the first
/// probe, time between probes, probes unanswered before the stream is closed.
const TCP_KEEPALIVE: (Duration, Duration, u32) = (Duration::from_secs(15), Duration::from_secs(5), 3);
/// How long anything sent (data, or those probes) may go unacknowledged before the stream is closed: covers data
/// in flight to a vanished node, where keepalive does not probe. Linux lets it override keepalive's count, so it
/// is keepalive's own total (15 s + 3 x 5 s).
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a new connection has to say who it is.
const GREETING_TIMEOUT: Duration = Duration::from_secs(10);
/// How long accepting pauses after an error that retrying at once would repeat (out of descriptors, say).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Stream {
    Frames,
    Stdout,
    Stderr,
}

/// The listener, and which start waits for which token.
#[derive(Debug)]
pub(crate) struct Callback {
    pub address: SocketAddr,
    waiting: Mutex<HashMap<String, mpsc::UnboundedSender<(Stream, TcpStream)>>>,
}

impl Callback {
    /// Listens on `asked` (port 0: any free port) and accepts until the returned callback is dropped.
    pub async fn listen(asked: SocketAddr) -> std::io::Result<Arc<Self>> {
        let listener = TcpListener::bind(asked).await?;
        let callback = Arc::new(Self { address: listener.local_addr()?, waiting: Mutex::default() });
        tokio::spawn(accept(listener, Arc::downgrade(&callback)));
        Ok(callback)
    }

    /// A new token, and the streams that arrive with it, until the returned [`Expected`] is dropped.
    pub fn expect(&self) -> Expected<'_> {
        let token = token();
        let (sender, streams) = mpsc::unbounded_channel();
        self.waiting().insert(token.clone(), sender);
        Expected { callback: self, token, streams }
    }

    fn waiting(&self) -> std::sync::MutexGuard<'_, HashMap<String, mpsc::UnboundedSender<(Stream, TcpStream)>>> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One start's token and the streams that name it; the token is forgotten when this is dropped.
pub(crate) struct Expected<'a> {
    callback: &'a Callback,
    pub token: String,
    pub streams: mpsc::UnboundedReceiver<(Stream, TcpStream)>,
}

impl Drop for Expected<'_> {
    fn drop(&mut self) {
        self.callback.waiting().remove(&self.token);
    }
}

/// Accepts workers' connections: each names its token and stream on its first line.
async fn accept(listener: TcpListener, callback: Weak<Callback>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                if callback.strong_count() == 0 {
                    return;
                }
                // Out of descriptors (EMFILE, ENFILE) or memory: the pending connection stays queued, so accepting
                // again at once fails again at once. A pause lets the server close something first.
                if !is_per_connection(&error) {
                    tracing::warn!(%error, "cannot accept a worker's connection; retrying shortly");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
                continue;
            }
        };
        if callback.strong_count() == 0 {
            return;
        }
        set_tcp_keepalive(&stream);
        let callback = callback.clone();
        tokio::spawn(async move {
            let mut stream = stream;
            let greeted = tokio::time::timeout(GREETING_TIMEOUT, greeting(&mut stream)).await;
            let Ok(Ok(Some((token, kind)))) = greeted else { return };
            let Some(callback) = callback.upgrade() else { return };
            let waiting = callback.waiting().get(&token).cloned();
            if let Some(sender) = waiting {
                let _ = sender.send((kind, stream));
            }
        });
    }
}

/// Whether an accept error was that one connection's (it is gone; the next one may be fine), not the listener's
/// or the process's.
fn is_per_connection(error: &std::io::Error) -> bool {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionReset, Interrupted};
    matches!(error.kind(), ConnectionAborted | ConnectionReset | Interrupted)
        || matches!(error.raw_os_error(), Some(libc::EPROTO | libc::ENETDOWN | libc::EHOSTUNREACH | libc::ENETUNREACH))
}

/// Sets TCP keepalive and a user timeout on a worker's stream (the worker's end, bash's `/dev/tcp` say, may not
/// be able to; its agent sets keepalive on the frames stream itself).
fn set_tcp_keepalive(stream: &TcpStream) {
    let (idle, interval, retries) = TCP_KEEPALIVE;
    let keepalive = socket2::TcpKeepalive::new().with_time(idle).with_interval(interval).with_retries(retries);
    let socket = socket2::SockRef::from(stream);
    if let Err(error) =
        socket.set_tcp_keepalive(&keepalive).and_then(|()| socket.set_tcp_user_timeout(Some(TCP_USER_TIMEOUT)))
    {
        tracing::debug!(%error, "cannot set TCP keepalive on a worker's stream");
    }
}

/// Reads `<token> <stream>\n` byte by byte, so nothing after it is consumed.
async fn greeting(stream: &mut TcpStream) -> std::io::Result<Option<(String, Stream)>> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 128 {
        if stream.read(&mut byte).await? == 0 {
            return Ok(None);
        }
        if byte[0] == b'\n' {
            let text = String::from_utf8_lossy(&line).to_string();
            let Some((token, kind)) = text.split_once(' ') else { return Ok(None) };
            let kind = match kind {
                "frames" => Stream::Frames,
                "stdout" => Stream::Stdout,
                "stderr" => Stream::Stderr,
                _ => return Ok(None),
            };
            return Ok(Some((token.to_string(), kind)));
        }
        line.push(byte[0]);
    }
    Ok(None)
}

/// A one-time secret a worker proves itself with.
fn token() -> String {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn worker_streams_get_tcp_keepalive() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(address), listener.accept());
        let (_client, (stream, _)) = (client.unwrap(), accepted.unwrap());
        let socket = socket2::SockRef::from(&stream);
        assert!(!socket.keepalive().unwrap());
        set_tcp_keepalive(&stream);
        assert!(socket.keepalive().unwrap());
        assert_eq!(socket.tcp_keepalive_time().unwrap(), TCP_KEEPALIVE.0);
        assert_eq!(socket.tcp_keepalive_retries().unwrap(), TCP_KEEPALIVE.2);
        assert_eq!(socket.tcp_user_timeout().unwrap(), Some(TCP_USER_TIMEOUT));
    }

    #[tokio::test]
    async fn streams_reach_the_start_that_expects_their_token_and_no_other() {
        let callback = Callback::listen("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let mut expected = callback.expect();
        let mut stranger = TcpStream::connect(callback.address).await.unwrap();
        stranger.write_all(b"0123 frames\n").await.unwrap();
        for (kind, name) in [(Stream::Stdout, "stdout"), (Stream::Frames, "frames")] {
            let mut stream = TcpStream::connect(callback.address).await.unwrap();
            stream.write_all(format!("{} {name}\nafter", expected.token).as_bytes()).await.unwrap();
            let (got, mut accepted) = expected.streams.recv().await.unwrap();
            assert_eq!(got, kind);
            // The greeting alone was read: what follows it is the stream's.
            let mut rest = [0u8; 5];
            accepted.read_exact(&mut rest).await.unwrap();
            assert_eq!(&rest, b"after");
        }
        let token = expected.token.clone();
        drop(expected);
        assert!(callback.waiting().get(&token).is_none(), "a dropped start's token is forgotten");
    }

    #[test]
    fn only_a_connections_own_failure_is_retried_at_once() {
        let os = std::io::Error::from_raw_os_error;
        assert!(is_per_connection(&os(libc::ECONNABORTED)));
        assert!(is_per_connection(&os(libc::EPROTO)));
        assert!(!is_per_connection(&os(libc::EMFILE)), "out of descriptors: accepting again at once spins");
        assert!(!is_per_connection(&os(libc::ENFILE)));
        assert!(!is_per_connection(&os(libc::ENOMEM)));
    }
}
