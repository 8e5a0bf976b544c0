//! What the server lets in, decided before it reads a request's body: the key (an unknown client cannot make the
//! server decode, and hold, a GiB message), connections (at most `max_connections` open; more wait to be accepted),
//! and requests in flight, overall and per key (a call holds its place from arrival to its last message, queued
//! time included).
//!
//! Before authentication a client can still make the server buffer what HTTP/2 flow control lets it send ahead: at
//! most one connection window (32 MiB) per open connection, so `max_connections` bounds that too.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use fal_proto::{AUTH_KEY_ID, AUTH_KEY_SECRET};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_stream::{Stream, StreamExt};
use tonic::service::Interceptor;
use tonic::transport::server::Connected;
use tonic::{Request, Status};

use crate::activity::Activity;
use crate::service::{store_status, NO_KEY};
use crate::store::{Caller, Store};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdmissionLimits {
    pub max_connections: usize,
    /// Requests in flight on the whole server.
    pub max_requests: usize,
    /// Requests in flight with one key.
    pub max_requests_per_key: usize,
}

impl Default for AdmissionLimits {
    fn default() -> Self {
        Self { max_connections: 256, max_requests: 4096, max_requests_per_key: 256 }
    }
}

/// Checks each request's key and counts what is in flight; [`Interceptor`] of every RPC.
#[derive(Debug, Clone)]
pub(crate) struct Admission {
    store: Arc<Store>,
    activity: Arc<Activity>,
    limits: AdmissionLimits,
    in_flight: Arc<Mutex<InFlight>>,
}

#[derive(Debug, Default)]
struct InFlight {
    total: usize,
    per_key: HashMap<String, usize>,
}

/// What a request that was let in carries (in its extensions): who made it, and its place in flight, given back
/// when the last clone goes (a call keeps one until it ends).
#[derive(Debug, Clone)]
pub(crate) struct Admitted {
    pub caller: Caller,
    pub place: Arc<Place>,
}

#[derive(Debug)]
pub(crate) struct Place {
    key_id: String,
    in_flight: Arc<Mutex<InFlight>>,
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        in_flight.total = in_flight.total.saturating_sub(1);
        if let Some(count) = in_flight.per_key.get_mut(&self.key_id) {
            *count -= 1;
            if *count == 0 {
                in_flight.per_key.remove(&self.key_id);
            }
        }
    }
}

impl Admission {
    pub fn new(store: Arc<Store>, activity: Arc<Activity>, limits: AdmissionLimits) -> Self {
        Self { store, activity, limits, in_flight: Arc::default() }
    }

    fn admit(&self, id: &str, secret: &str) -> Result<Admitted, Status> {
        // A cached statement on a small local database: microseconds, and it must come before the body.
        let caller = self.store.verify(id, secret).map_err(store_status)?;
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        if in_flight.total >= self.limits.max_requests {
            return Err(Status::resource_exhausted(format!(
                "the server has {} requests in flight, its limit ([limits] max_requests): try again shortly",
                in_flight.total
            )));
        }
        let for_key = in_flight.per_key.entry(caller.key_id.clone()).or_default();
        if *for_key >= self.limits.max_requests_per_key {
            return Err(Status::resource_exhausted(format!(
                "key {} has {} requests in flight, the limit per key ([limits] max_requests_per_key): wait for some \
                 to finish, or spread the calls over more keys",
                caller.key_id, for_key
            )));
        }
        *for_key += 1;
        in_flight.total += 1;
        let place = Arc::new(Place { key_id: caller.key_id.clone(), in_flight: self.in_flight.clone() });
        Ok(Admitted { caller, place })
    }
}

impl Interceptor for Admission {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        self.activity.touch();
        let metadata = request.metadata();
        let id = metadata.get(AUTH_KEY_ID).and_then(|v| v.to_str().ok()).filter(|v| !v.is_empty());
        let secret = metadata.get(AUTH_KEY_SECRET).and_then(|v| v.to_str().ok()).filter(|v| !v.is_empty());
        let (Some(id), Some(secret)) = (id, secret) else {
            return Err(Status::unauthenticated(NO_KEY));
        };
        let admitted = self.admit(id, secret)?;
        request.extensions_mut().insert(admitted);
        Ok(request)
    }
}

/// A connection that holds one of the server's `max_connections` places while it is open.
#[derive(Debug)]
pub(crate) struct Limited<C> {
    stream: C,
    _place: OwnedSemaphorePermit,
}

/// Connections from `incoming`, taken only while fewer than `max` are open: the next waits in the kernel's
/// backlog, as on any busy server, rather than costing memory here.
pub(crate) fn limited<C, S>(incoming: S, max: usize) -> impl Stream<Item = std::io::Result<Limited<C>>>
where
    S: Stream<Item = std::io::Result<C>> + Unpin,
{
    let places = Arc::new(Semaphore::new(max));
    futures_util::stream::unfold((incoming, places), |(mut incoming, places)| async move {
        let place = places.clone().acquire_owned().await.ok()?;
        let next = incoming.next().await?;
        Some((next.map(|stream| Limited { stream, _place: place }), (incoming, places)))
    })
}

impl<C: Connected> Connected for Limited<C> {
    type ConnectInfo = C::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

impl<C: AsyncRead + Unpin> AsyncRead for Limited<C> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl<C: AsyncWrite + Unpin> AsyncWrite for Limited<C> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Scope;

    fn admission(limits: AdmissionLimits) -> (Admission, String, String, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state.sqlite3")).unwrap();
        let (key, secret) = store.create_key("alice", Scope::Api, "").unwrap();
        (Admission::new(Arc::new(store), Arc::default(), limits), key.key_id, secret, dir)
    }

    fn request(id: &str, secret: &str) -> Request<()> {
        let mut request = Request::new(());
        request.metadata_mut().insert(AUTH_KEY_ID, id.parse().unwrap());
        request.metadata_mut().insert(AUTH_KEY_SECRET, secret.parse().unwrap());
        request
    }

    #[test]
    fn a_request_without_a_good_key_is_refused_before_its_body() {
        let (mut admission, id, _, _dir) = admission(AdmissionLimits::default());
        assert_eq!(admission.call(Request::new(())).unwrap_err().code(), tonic::Code::Unauthenticated);
        assert_eq!(admission.call(request(&id, "wrong")).unwrap_err().code(), tonic::Code::Unauthenticated);
    }

    #[test]
    fn requests_in_flight_are_limited_per_key_and_given_back() {
        let limits = AdmissionLimits { max_requests_per_key: 2, ..Default::default() };
        let (mut admission, id, secret, _dir) = admission(limits);
        let first = admission.call(request(&id, &secret)).unwrap();
        let second = admission.call(request(&id, &secret)).unwrap();
        let refused = admission.call(request(&id, &secret)).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(refused.message().contains("max_requests_per_key"), "{}", refused.message());
        drop(first);
        let third = admission.call(request(&id, &secret)).unwrap();
        drop((second, third));
        assert_eq!(admission.in_flight.lock().unwrap().total, 0);
        assert!(admission.in_flight.lock().unwrap().per_key.is_empty());
    }
}
