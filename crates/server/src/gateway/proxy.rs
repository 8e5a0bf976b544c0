//! Forwarding one request to a replica's port and its answer back, streaming both ways: bodies pass frame by frame
//! as they are written (server-sent events, chunked responses), and an upgrade (a websocket) becomes a byte pipe
//! between the client's connection and the replica's.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;

use super::json_error;
use crate::apps::replicas::Lease;

/// HTTP/1.1 to replicas, connections kept for the next request.
pub type Client = hyper_util::client::legacy::Client<HttpConnector, Body>;

/// The header that carries a request's id, both ways.
pub const REQUEST_ID: &str = "x-fal-request-id";
/// How long a request that lost its replica waits to learn why (the engine tells an OOM kill from other deaths).
const DEATH_REASON_WAIT: Duration = Duration::from_secs(3);

pub fn client() -> Client {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        // Below uvicorn's keep-alive (5 s), so the pool drops an idle connection before the replica closes it.
        .pool_idle_timeout(Duration::from_secs(4))
        .build(connector)
}

/// Headers that belong to one connection, not to the request (RFC 9110 7.6.1), the key of the caller (which
/// an app of another user must never see), and the dashboard's session cookie (both ways: see
/// `crate::dashboard::session`).
fn strip(headers: &mut HeaderMap) {
    crate::dashboard::session::strip_session_cookie(headers);
    crate::dashboard::session::drop_session_cookie_sets(headers);
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::try_from(name.trim()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::AUTHORIZATION,
    ] {
        headers.remove(name);
    }
}

/// Sends `request` to the replica `lease` holds, at `path` (its path within the app, with the query), and answers
/// with the replica's response; the lease is given back once the response's body has been sent.
pub async fn forward(client: &Client, mut lease: Lease, mut request: Request<Body>, path: &str) -> Response<Body> {
    let upgrade = request.headers().get(header::UPGRADE).cloned();
    let client_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut request));
    let (mut parts, body) = request.into_parts();
    let uri = match format!("http://{}{path}", lease.address).parse::<http::Uri>() {
        Ok(uri) => uri,
        Err(e) => {
            return json_error(StatusCode::BAD_REQUEST, "bad_path", format!("the request's path is invalid: {e}"))
        }
    };
    strip(&mut parts.headers);
    if let Some(upgrade) = &upgrade {
        parts.headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::UPGRADE, upgrade.clone());
    }
    if let Ok(id) = HeaderValue::try_from(lease.request_id.as_str()) {
        parts.headers.insert(REQUEST_ID, id);
    }
    parts.uri = uri;
    parts.version = Version::HTTP_11;
    let sent = send(client, parts, body, || !lease.has_ended()).await;
    let mut response = match sent {
        Ok(response) => response,
        Err(SendError::Body(error)) => {
            return json_error(
                StatusCode::BAD_REQUEST,
                "bad_body",
                format!("the request's body broke off before it was whole ({error}); send it again"),
            )
        }
        Err(SendError::Replica(error)) => {
            let (status, detail) = match lease.ended(DEATH_REASON_WAIT).await {
                Some(reason) => {
                    (StatusCode::BAD_GATEWAY, format!("the app's replica ended during the request: {reason}"))
                }
                None => (StatusCode::BAD_GATEWAY, format!("the app's replica did not answer: {error}")),
            };
            return json_error(status, "replica_failed", detail);
        }
    };
    let request_id = HeaderValue::try_from(lease.request_id.as_str()).ok();
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(client_upgrade) = client_upgrade {
            let replica_upgrade = hyper::upgrade::on(&mut response);
            tokio::spawn(async move {
                // The replica stays taken while the pipe is open.
                let _lease = lease;
                let (Ok(client), Ok(replica)) = (client_upgrade.await, replica_upgrade.await) else { return };
                let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(client), &mut TokioIo::new(replica)).await;
            });
            let (mut parts, _) = response.into_parts();
            crate::dashboard::session::drop_session_cookie_sets(&mut parts.headers);
            return Response::from_parts(parts, Body::empty());
        }
    }
    let (mut parts, body) = response.into_parts();
    strip(&mut parts.headers);
    if let Some(id) = request_id {
        parts.headers.insert(REQUEST_ID, id);
    }
    Response::from_parts(parts, Body::new(Leased { body, lease: Some(lease) }))
}

/// The largest request body kept so that the request can be sent again (see [`send`]); larger ones, and those
/// of unknown length, stream through once.
const RESENDABLE_BODY: u64 = 1 << 20;

/// Why a request could not be answered by its replica.
enum SendError {
    /// The client's own body broke off before it was whole.
    Body(axum::Error),
    Replica(hyper_util::client::legacy::Error),
}

/// Sends a request to a replica. An idempotent one (RFC 9110 9.2.2: GET, HEAD, OPTIONS, PUT, DELETE...) is sent
/// once more on a new connection if the kept-alive one it went out on turned out closed before any answer came,
/// while the replica lives on (`replica_lives`), and its body could be kept.
///
/// Why: a replica's server may close a kept connection right after a response (uvicorn does after an app raised
/// past Starlette's error middleware, which has sent its 500 already), and a request the pool sent on it in that
/// instant fails with nothing read. Other methods are not sent again: the replica may have read the request and
/// acted on it before closing, and a POST's work must not run twice.
async fn send(
    client: &Client,
    parts: http::request::Parts,
    body: Body,
    replica_lives: impl Fn() -> bool,
) -> Result<Response<Incoming>, SendError> {
    use http_body_util::BodyExt;
    let keepable = parts.method.is_idempotent()
        && hyper::body::Body::size_hint(&body).exact().is_some_and(|size| size <= RESENDABLE_BODY);
    if !keepable {
        return client.request(Request::from_parts(parts, body)).await.map_err(SendError::Replica);
    }
    let bytes = body.collect().await.map_err(SendError::Body)?.to_bytes();
    let again = clone_parts(&parts);
    match client.request(Request::from_parts(parts, Body::from(bytes.clone()))).await {
        Err(error) if closed_before_answer(&error) && replica_lives() => {
            tracing::debug!("a replica closed a kept connection before answering; sending the request again");
            client.request(Request::from_parts(again, Body::from(bytes))).await.map_err(SendError::Replica)
        }
        sent => sent.map_err(SendError::Replica),
    }
}

/// A copy of a request's head (its extensions, which the replica never sees, are left out).
fn clone_parts(parts: &http::request::Parts) -> http::request::Parts {
    let mut request = Request::new(());
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = parts.uri.clone();
    *request.version_mut() = parts.version;
    *request.headers_mut() = parts.headers.clone();
    request.into_parts().0
}

/// Whether the connection closed (or was reset) before any of the response was read.
fn closed_before_answer(error: &hyper_util::client::legacy::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(error);
    while let Some(cause) = source {
        if let Some(hyper_error) = cause.downcast_ref::<hyper::Error>() {
            if hyper_error.is_incomplete_message() {
                return true;
            }
        }
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            if matches!(io.kind(), std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe) {
                return true;
            }
        }
        source = cause.source();
    }
    false
}

/// A replica's response body, holding the replica until it has been read to its end (or dropped).
struct Leased {
    body: Incoming,
    lease: Option<Lease>,
}

impl hyper::body::Body for Leased {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) {
            this.lease = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads one request head (the tests send no bodies).
    async fn read_head(stream: &mut tokio::net::TcpStream) -> bool {
        use tokio::io::AsyncReadExt;
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            match stream.read(&mut byte).await {
                Ok(1) => head.push(byte[0]),
                _ => return false,
            }
        }
        true
    }

    fn get(address: std::net::SocketAddr) -> (http::request::Parts, Body) {
        Request::get(format!("http://{address}/")).body(Body::empty()).unwrap().into_parts()
    }

    #[tokio::test]
    async fn a_kept_connection_closed_before_answering_is_retried_once_on_a_new_one() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let replica = tokio::spawn(async move {
            // First connection: a 500, then the next request on it is read and the connection closed unanswered.
            let (mut first, _) = listener.accept().await.unwrap();
            assert!(read_head(&mut first).await);
            first.write_all(b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n\r\n").await.unwrap();
            assert!(read_head(&mut first).await);
            drop(first);
            let (mut second, _) = listener.accept().await.unwrap();
            assert!(read_head(&mut second).await);
            second.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await.unwrap();
        });
        let client = client();
        let (parts, body) = get(address);
        assert_eq!(send(&client, parts, body, || true).await.ok().unwrap().status(), StatusCode::INTERNAL_SERVER_ERROR);
        let (parts, body) = get(address);
        assert_eq!(send(&client, parts, body, || true).await.ok().unwrap().status(), StatusCode::OK);
        replica.await.unwrap();
    }

    #[tokio::test]
    async fn a_post_is_not_sent_again_since_the_replica_may_have_acted_on_it() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut first, _) = listener.accept().await.unwrap();
            read_head(&mut first).await;
            first.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await.unwrap();
            read_head(&mut first).await;
            drop(first);
            // A second connection would be a second run of the POST: answered, so that the test sees it if made.
            let (mut second, _) = listener.accept().await.unwrap();
            read_head(&mut second).await;
            second.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await.unwrap();
        });
        let client = client();
        let (parts, body) = get(address);
        assert_eq!(send(&client, parts, body, || true).await.ok().unwrap().status(), StatusCode::OK);
        let (mut parts, body) = get(address);
        parts.method = http::Method::POST;
        assert!(send(&client, parts, body, || true).await.is_err());
    }

    #[tokio::test]
    async fn a_request_is_not_sent_again_to_a_replica_that_ended() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut first, _) = listener.accept().await.unwrap();
            read_head(&mut first).await;
            first.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await.unwrap();
            read_head(&mut first).await;
            drop((first, listener));
        });
        let client = client();
        let (parts, body) = get(address);
        assert_eq!(send(&client, parts, body, || false).await.ok().unwrap().status(), StatusCode::OK);
        let (parts, body) = get(address);
        assert!(send(&client, parts, body, || false).await.is_err());
    }

    #[test]
    fn connection_headers_and_the_callers_key_are_not_forwarded() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-private"));
        headers.insert("x-private", HeaderValue::from_static("1"));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Key a:b"));
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        strip(&mut headers);
        assert_eq!(headers.len(), 1);
        assert!(headers.contains_key(header::CONTENT_TYPE));
    }
}
