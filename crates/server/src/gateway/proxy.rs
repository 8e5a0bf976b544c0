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
        .pool_idle_timeout(Duration::from_secs(30))
        .build(connector)
}

/// Headers that belong to one connection, not to the request (RFC 9110 7.6.1), and the key of the caller (which
/// an app of another user must never see).
fn strip(headers: &mut HeaderMap) {
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
    let outbound = Request::from_parts(parts, body);
    let mut response = match client.request(outbound).await {
        Ok(response) => response,
        Err(error) => {
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
            let (parts, _) = response.into_parts();
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
