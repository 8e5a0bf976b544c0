//! The gRPC port's connections: accepted, given TCP_NODELAY and TCP keepalive, and, on a TLS port, put through the
//! TLS handshake, each in a task of its own so a slow or silent client holds up nobody else.
//!
//! A client speaking the wrong protocol is told what to change rather than left with a reset: a plaintext HTTP/2
//! client at a TLS port gets a gRPC error (FAILED_PRECONDITION) on every call saying the server speaks TLS, from a minimal
//! HTTP/2 responder that never reaches the service; a TLS client at a plaintext port is logged and closed (it cannot
//! read anything but TLS). Both are logged.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use fal_proto::{TLS_PROBE_PATH as PROBE_PATH, TLS_REQUIRED_KIND};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::Stream;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// How long a new connection may take to show what it speaks and finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the responder that tells a plaintext client to use TLS keeps its connection.
const TLS_REQUIRED_LINGER: Duration = Duration::from_secs(30);
/// What every HTTP/2 connection starts with, in plaintext.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The first byte of a TLS handshake record (a ClientHello).
const TLS_HANDSHAKE: u8 = 0x16;
/// TCP keepalive on accepted connections: finds peers whose host vanished (HTTP/2 pings find stopped processes).
const TCP_KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
const TCP_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const TCP_KEEPALIVE_RETRIES: u32 = 3;
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// An accepted connection, plaintext or TLS.
pub(crate) enum Conn {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Connected for Conn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        match self {
            Conn::Plain(stream) => stream.connect_info(),
            Conn::Tls(stream) => stream.get_ref().0.connect_info(),
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(stream) => Pin::new(stream).poll_read(cx, buf),
            Conn::Tls(stream) => Pin::new(stream.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(stream) => Pin::new(stream).poll_write(cx, buf),
            Conn::Tls(stream) => Pin::new(stream.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
            Conn::Tls(stream) => Pin::new(stream.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(stream) => stream.is_write_vectored(),
            Conn::Tls(stream) => stream.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(stream) => Pin::new(stream).poll_flush(cx),
            Conn::Tls(stream) => Pin::new(stream.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(stream) => Pin::new(stream).poll_shutdown(cx),
            Conn::Tls(stream) => Pin::new(stream.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The stream of ready connections tonic serves: accepts, and hands over each connection once it is known to
/// speak the port's protocol (and, on a TLS port, has finished its handshake).
pub(crate) struct Incoming {
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    /// Connections being looked at; dropped (and so closed) with the stream when the server stops.
    pending: JoinSet<Option<Conn>>,
    /// After an accept error (out of file descriptors, say), a pause before accepting again rather than a spin.
    backoff: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Incoming {
    pub(crate) fn new(listener: TcpListener, tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>) -> Self {
        Self { listener, tls: tls.map(TlsAcceptor::from), pending: JoinSet::new(), backoff: None }
    }
}

impl Stream for Incoming {
    type Item = io::Result<Conn>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.backoff.as_mut().is_some_and(|sleep| sleep.as_mut().poll(cx).is_ready()) {
            this.backoff = None;
        }
        while this.backoff.is_none() {
            match this.listener.poll_accept(cx) {
                Poll::Ready(Ok((stream, peer))) => {
                    this.pending.spawn(prepare(stream, peer, this.tls.clone()));
                }
                // The connection's own trouble (reset before accepted): nothing to wait for.
                Poll::Ready(Err(error)) if is_connection_error(&error) => {}
                // The server's (out of file descriptors, say): tonic would stop serving on it; wait and try again.
                Poll::Ready(Err(error)) => {
                    tracing::warn!(%error, "cannot accept connections; trying again in {}ms", ACCEPT_BACKOFF.as_millis());
                    let mut sleep = Box::pin(tokio::time::sleep(ACCEPT_BACKOFF));
                    // Registers the waker for the end of the pause.
                    let _ = sleep.as_mut().poll(cx);
                    this.backoff = Some(sleep);
                }
                Poll::Pending => break,
            }
        }
        // Ready(None) from an empty set registers no waker, but the listener's Pending (or the pause) above did.
        while let Poll::Ready(Some(done)) = this.pending.poll_join_next(cx) {
            if let Ok(Some(conn)) = done {
                return Poll::Ready(Some(Ok(conn)));
            }
        }
        Poll::Pending
    }
}

fn is_connection_error(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset | io::ErrorKind::Interrupted
    )
}

/// Sets the socket up, looks at the first bytes to tell TLS from plaintext, and does what the port speaks with it.
async fn prepare(stream: TcpStream, peer: SocketAddr, tls: Option<TlsAcceptor>) -> Option<Conn> {
    // Without TCP_NODELAY a small reply waits for the client's delayed ACK: 40 ms per warm call.
    let _ = stream.set_nodelay(true);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(TCP_KEEPALIVE_IDLE)
        .with_interval(TCP_KEEPALIVE_INTERVAL)
        .with_retries(TCP_KEEPALIVE_RETRIES);
    let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);

    let mut first = [0u8; H2_PREFACE.len()];
    let seen = match tokio::time::timeout(HANDSHAKE_TIMEOUT, stream.peek(&mut first)).await {
        Ok(Ok(0)) | Ok(Err(_)) => return None,
        Ok(Ok(n)) => n,
        Err(_) => {
            tracing::debug!(%peer, "a connection sent nothing for {}s: closed", HANDSHAKE_TIMEOUT.as_secs());
            return None;
        }
    };
    let speaks_tls = first[0] == TLS_HANDSHAKE;
    match tls {
        None if speaks_tls => {
            tracing::warn!(
                %peer,
                "a TLS client connected to this plaintext port: closed. Give the server a certificate (--tls-cert and \
                 --tls-key, or `fal-serverless server init --tls-self-signed NAME`), or point the client at \
                 http://HOST:PORT"
            );
            None
        }
        None => Some(Conn::Plain(stream)),
        Some(acceptor) if speaks_tls => match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
            Ok(Ok(stream)) => Some(Conn::Tls(Box::new(stream))),
            Ok(Err(error)) => {
                handshake_failed(peer, &error);
                None
            }
            Err(_) => {
                tracing::info!(%peer, "a TLS handshake took over {}s: closed", HANDSHAKE_TIMEOUT.as_secs());
                None
            }
        },
        Some(_) if H2_PREFACE.starts_with(&first[..seen]) => {
            tokio::spawn(tls_required(stream, peer));
            None
        }
        Some(_) => {
            tracing::info!(%peer, "a connection that speaks neither TLS nor HTTP/2 came to this TLS port: closed");
            None
        }
    }
}

fn handshake_failed(peer: SocketAddr, error: &io::Error) {
    use tokio_rustls::rustls::{AlertDescription, Error};
    match error.get_ref().and_then(|e| e.downcast_ref::<Error>()) {
        Some(Error::AlertReceived(
            alert @ (AlertDescription::UnknownCA
            | AlertDescription::BadCertificate
            | AlertDescription::CertificateUnknown
            | AlertDescription::DecryptError),
        )) => tracing::warn!(
            %peer,
            "a client refused this server's certificate ({alert:?}): give it the CA that signed the certificate \
             (FAL_SERVERLESS_CA_FILE for fal-serverless clients, GRPC_DEFAULT_SSL_ROOTS_FILE_PATH for grpcio ones), \
             and have it connect to a name the certificate holds"
        ),
        // grpcio (the original client) hangs up without an alert when it does not trust the certificate.
        _ if error.kind() == io::ErrorKind::UnexpectedEof => tracing::warn!(
            %peer,
            "a client hung up during the TLS handshake; if it is the original fal-serverless client (grpcio), it does \
             not trust this server's certificate: set GRPC_DEFAULT_SSL_ROOTS_FILE_PATH to the CA that signed it, and \
             connect to a name the certificate holds"
        ),
        _ => tracing::info!(%peer, %error, "a TLS handshake failed"),
    }
}

/// Answers every call of a plaintext client at a TLS port with FAILED_PRECONDITION and a message saying how to
/// connect.
async fn tls_required(stream: TcpStream, peer: SocketAddr) {
    let logged = std::sync::atomic::AtomicBool::new(false);
    let service = hyper::service::service_fn(|request: http::Request<hyper::body::Incoming>| {
        // Our own client's probe (a loopback host given without a scheme) is how it learns to use TLS: not news.
        if request.uri().path() != PROBE_PATH && !logged.swap(true, std::sync::atomic::Ordering::Relaxed) {
            tracing::warn!(
                %peer,
                "a plaintext gRPC client called this TLS port: its calls are refused with a message telling it to use \
                 TLS (https://HOST:PORT for fal-serverless clients; for the original client, no ISOLATE_TEST_MODE and \
                 GRPC_DEFAULT_SSL_ROOTS_FILE_PATH naming the CA)"
            );
        }
        let authority = request.uri().authority().map(|a| a.to_string()).unwrap_or_else(|| "HOST:PORT".into());
        let message = format!(
            "this fal-serverless server speaks TLS only: connect with https://{authority} (set \
             FAL_SERVERLESS_CA_FILE to its CA file if its certificate is self-signed); with the original \
             fal-serverless client, unset ISOLATE_TEST_MODE and set GRPC_DEFAULT_SSL_ROOTS_FILE_PATH to that CA file"
        );
        async move {
            // A trailers-only gRPC response: status and message in the headers, no body.
            http::Response::builder()
                .status(200)
                .header("content-type", "application/grpc")
                // Not UNAVAILABLE: the original client replaces that one's message with "Could not reach".
                .header("grpc-status", (tonic::Code::FailedPrecondition as i32).to_string())
                .header("grpc-message", percent_encode(&message))
                .header("fal-error-kind", TLS_REQUIRED_KIND)
                .body(http_body_util::Empty::<bytes::Bytes>::new())
        }
    });
    let connection = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    let _ = tokio::time::timeout(TLS_REQUIRED_LINGER, connection).await;
}

/// `grpc-message` is percent-encoded: bytes outside printable ASCII, and `%` itself.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if (0x20..0x7f).contains(&byte) && byte != b'%' {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_messages_are_percent_encoded() {
        assert_eq!(percent_encode("use https://a:1 (100%)"), "use https://a:1 (100%25)");
        assert_eq!(percent_encode("é\n"), "%C3%A9%0A");
    }
}
