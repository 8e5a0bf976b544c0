//! The server's one port, connection by connection: HTTP/1.1 and HTTP/2 (hyper-util's auto builder, with upgrades,
//! so websockets reach apps), each request routed by its content type: `application/grpc` to the
//! `IsolateController` service, everything else to the gateway (apps, the queue, the REST routes).
//!
//! One port for both keeps deployment simple (one address, one certificate, one firewall rule) and lets the original
//! client's REST calls (`rest.<host>`, the same port) and gRPC calls reach the same server.

use std::future::Future;
use std::time::Duration;

use axum::Router;
use fal_proto::{CONNECTION_WINDOW, KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT, STREAM_WINDOW};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_stream::{Stream, StreamExt};
use tower::ServiceExt;

/// How long an HTTP/1.1 client may take to send a request's headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Whether a request is a gRPC call.
fn is_grpc<B>(request: &http::Request<B>) -> bool {
    request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// The host and port a client reached the server by (an HTTP/2 request's `:authority`, an HTTP/1.1 request's
/// `Host`), in the request's extensions: a worker is given the same name for the server (`nested/`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ClientAuthority(pub String);

impl ClientAuthority {
    fn of<B>(request: &http::Request<B>) -> Option<Self> {
        let authority = match request.uri().authority() {
            Some(authority) => authority.as_str().to_string(),
            None => request.headers().get(http::header::HOST)?.to_str().ok()?.to_string(),
        };
        Some(Self(authority))
    }
}

/// Serves each connection of `incoming` until `stop` resolves, then lets the open ones finish (HTTP/2 clients get
/// a GOAWAY, HTTP/1.1 connections close after their request) and returns once they have.
pub(crate) async fn serve<C>(
    incoming: impl Stream<Item = std::io::Result<C>>,
    grpc: Router,
    gateway: Router,
    stop: impl Future<Output = ()>,
) where
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http2()
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        // A client that vanished without closing (host gone, process stopped) stops answering pings: its
        // connection is closed, which ends its calls and frees their workers and capacity.
        .keep_alive_interval(Some(KEEPALIVE_INTERVAL))
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .timer(TokioTimer::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
    let service = tower::service_fn(move |mut request: http::Request<Incoming>| {
        if let Some(authority) = ClientAuthority::of(&request) {
            request.extensions_mut().insert(authority);
        }
        let router = if is_grpc(&request) { grpc.clone() } else { gateway.clone() };
        router.oneshot(request)
    });
    let graceful = GracefulShutdown::new();
    let mut incoming = std::pin::pin!(incoming);
    let mut stop = std::pin::pin!(stop);
    loop {
        let connection = tokio::select! {
            connection = incoming.next() => connection,
            () = &mut stop => break,
        };
        match connection {
            Some(Ok(connection)) => {
                let serving = builder
                    .serve_connection_with_upgrades(TokioIo::new(connection), TowerToHyperService::new(service.clone()))
                    .into_owned();
                let serving = graceful.watch(serving);
                tokio::spawn(async move {
                    if let Err(error) = serving.await {
                        tracing::debug!(%error, "a connection ended with an error");
                    }
                });
            }
            Some(Err(error)) => tracing::debug!(%error, "a connection could not be accepted"),
            None => break,
        }
    }
    graceful.shutdown().await;
}
