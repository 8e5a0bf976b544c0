//! Webhook deliveries: when a request submitted with `?fal_webhook=URL` ends, its outcome is POSTed to that URL as
//! JSON (`{"request_id", "gateway_request_id", "status": "OK"|"ERROR", "payload", "error"?, "payload_error"?}`), as
//! fal's queue does. A delivery is stored with the request's outcome, in the same transaction, so none is lost to a
//! restart; each attempt (the receiver's status code, or why there was none, and when) is recorded, and a failed one
//! is tried again after a backoff that doubles, up to `[apps] webhook_attempts` attempts. A 2xx answer delivers it.
//!
//! `http://` and `https://` URLs are taken (https trusts the system's roots, which `SSL_CERT_FILE` and
//! `SSL_CERT_DIR` extend). The server posts from its own network, to any address the submitter names, a private
//! one included: who may submit to an app decides who may make it post.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::rustls;

use super::store::{now_ms, Attempt, Delivery, Outcome, QueueStore};

/// The first retry's wait; each next one doubles, up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// One attempt's time, from connecting to the receiver's answer.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(15);
/// The most of a receiver's answer read (it is only looked at for its status).
const MAX_ANSWER: usize = 64 * 1024;

/// How long to wait after the `attempt`-th attempt failed.
pub fn backoff(attempt: u32) -> Duration {
    let doublings = attempt.saturating_sub(1).min(20);
    FIRST_BACKOFF.saturating_mul(1 << doublings).min(MAX_BACKOFF)
}

/// Checks a `fal_webhook` URL as submitted: what the submitter is told at once rather than after the request.
pub fn validate(url: &str) -> Result<Uri, String> {
    let uri: Uri = url.parse().map_err(|e| format!("fal_webhook {url:?} is not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err(format!("fal_webhook {url:?} must be an http:// or https:// URL")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("fal_webhook {url:?} names no host"));
    }
    Ok(uri)
}

/// The JSON a request's webhook posts, from its outcome.
pub fn payload(request_id: &str, outcome: &Outcome) -> Vec<u8> {
    let ok = outcome.error.is_none();
    let mut body = serde_json::json!({
        "request_id": request_id,
        "gateway_request_id": request_id,
        "status": if ok { "OK" } else { "ERROR" },
        "payload": serde_json::Value::Null,
    });
    if outcome.status_code.is_some() {
        match serde_json::from_slice::<serde_json::Value>(&outcome.body) {
            Ok(value) => body["payload"] = value,
            Err(e) => body["payload_error"] = format!("the app's response is not JSON: {e}").into(),
        }
    }
    if let Some(error) = &outcome.error {
        body["error"] = error.clone().into();
    }
    body.to_string().into_bytes()
}

/// Delivers webhooks; one task per delivery.
#[derive(Debug, Clone)]
pub struct Webhooks {
    store: Arc<QueueStore>,
    metrics: Arc<crate::metrics::Metrics>,
    attempts: u32,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl Webhooks {
    pub fn new(store: Arc<QueueStore>, attempts: u32, metrics: Arc<crate::metrics::Metrics>) -> Self {
        Self { store, metrics, attempts: attempts.max(1), tls: client_tls() }
    }

    /// Starts delivering `delivery` (at its due time).
    pub fn spawn(&self, delivery: Delivery) {
        let this = self.clone();
        tokio::spawn(async move { this.deliver(delivery).await });
    }

    /// Resumes the deliveries a stopped server left pending.
    pub async fn resume(&self) {
        match self.store.blocking(|store| store.pending_deliveries()).await {
            Ok(pending) => pending.into_iter().for_each(|delivery| self.spawn(delivery)),
            Err(error) => tracing::warn!(%error, "cannot read the webhooks to deliver"),
        }
    }

    async fn deliver(&self, mut delivery: Delivery) {
        while delivery.attempts < self.attempts {
            let wait = delivery.next_ms - now_ms();
            if wait > 0 {
                tokio::time::sleep(Duration::from_millis(wait as u64)).await;
            }
            delivery.attempts += 1;
            let at_ms = now_ms();
            let (status_code, error) = match tokio::time::timeout(ATTEMPT_TIMEOUT, self.post(&delivery)).await {
                Ok(Ok(status)) if status.is_success() => (Some(status.as_u16()), None),
                Ok(Ok(status)) => (Some(status.as_u16()), Some(format!("the receiver answered {status}"))),
                Ok(Err(error)) => (None, Some(error)),
                Err(_) => (None, Some(format!("no answer within {}s", ATTEMPT_TIMEOUT.as_secs()))),
            };
            let delivered = error.is_none();
            let next_ms = (!delivered && delivery.attempts < self.attempts)
                .then(|| now_ms() + backoff(delivery.attempts).as_millis() as i64);
            let attempt = Attempt { attempt: delivery.attempts, at_ms, status_code, error: error.clone() };
            self.metrics.webhook_attempt(match (delivered, next_ms) {
                (true, _) => "delivered",
                (false, Some(_)) => "retrying",
                (false, None) => "failed",
            });
            match &error {
                None => tracing::debug!(request = %delivery.request_id, "webhook delivered"),
                Some(error) if next_ms.is_some() => {
                    tracing::info!(request = %delivery.request_id, url = %delivery.url, %error, attempt = attempt.attempt,
                        "webhook not delivered; trying again")
                }
                Some(error) => {
                    tracing::warn!(request = %delivery.request_id, url = %delivery.url, %error, attempts = attempt.attempt,
                        "webhook not delivered; giving up")
                }
            }
            let id = delivery.request_id.clone();
            if let Err(e) = self.store.blocking(move |s| s.record_attempt(&id, &attempt, delivered, next_ms)).await {
                tracing::warn!(error = %e, request = %delivery.request_id, "cannot record a webhook attempt");
            }
            match next_ms {
                Some(next) => delivery.next_ms = next,
                None => return,
            }
        }
    }

    /// One POST of the delivery's payload; the receiver's status.
    async fn post(&self, delivery: &Delivery) -> Result<http::StatusCode, String> {
        let uri = validate(&delivery.url)?;
        let host = uri.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']').to_string();
        let https = uri.scheme_str() == Some("https");
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| format!("cannot connect to {host}:{port}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let authority = uri.authority().map(|a| a.as_str().to_string()).unwrap_or_else(|| host.clone());
        let path = uri.path_and_query().map(|p| p.as_str().to_string()).unwrap_or_else(|| "/".into());
        let request = Request::post(path)
            .header(header::HOST, authority)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::USER_AGENT, concat!("fal-serverless/", env!("CARGO_PKG_VERSION")))
            .body(Full::new(Bytes::from(delivery.payload.clone())))
            .map_err(|e| e.to_string())?;
        if https {
            let name = rustls::pki_types::ServerName::try_from(host.clone())
                .map_err(|e| format!("{host:?} is not a name a certificate can be for: {e}"))?;
            let config = self.tls.clone().ok_or("this server cannot make TLS connections (see its log)")?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS with {host}:{port} failed: {e}"))?;
            send(tls, request).await
        } else {
            send(tcp, request).await
        }
    }
}

async fn send<S>(io: S, request: Request<Full<Bytes>>) -> Result<http::StatusCode, String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(io)).await.map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let response = sender.send_request(request).await.map_err(|e| format!("the request failed: {e}"))?;
    let status = response.status();
    // The answer's body is read (a little of it) so the receiver is not cut off mid-write.
    let _ = http_body_util::Limited::new(response.into_body(), MAX_ANSWER).collect().await;
    Ok(status)
}

/// TLS to receivers: the system's roots (with `SSL_CERT_FILE`/`SSL_CERT_DIR`), HTTP/1.1.
fn client_tls() -> Option<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    for error in &found.errors {
        tracing::debug!(%error, "a system root certificate could not be read");
    }
    let (added, _) = roots.add_parsable_certificates(found.certs);
    tracing::debug!(roots = added, "webhook TLS roots");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    match rustls::ClientConfig::builder_with_provider(provider).with_safe_default_protocol_versions() {
        Ok(builder) => Some(Arc::new(builder.with_root_certificates(roots).with_no_client_auth())),
        Err(error) => {
            tracing::warn!(%error, "webhook TLS cannot be set up; https webhooks will fail");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let waits: Vec<_> = (1..=4).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8]);
        assert_eq!(backoff(40), MAX_BACKOFF);
    }

    #[test]
    fn webhook_urls_are_http_or_https_with_a_host() {
        assert!(validate("http://127.0.0.1:8000/hook?x=1").is_ok());
        assert!(validate("https://example.com/hook").is_ok());
        for bad in ["ftp://example.com/", "/relative", "not a url", "http:///x"] {
            assert!(validate(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_payload_is_the_apps_json_or_says_why_not() {
        let ok = Outcome {
            status_code: Some(200),
            content_type: Some("application/json".into()),
            body: br#"{"sum": 3}"#.to_vec(),
            ..Outcome::default()
        };
        let sent: serde_json::Value = serde_json::from_slice(&payload("r1", &ok)).unwrap();
        assert_eq!(
            sent,
            serde_json::json!({"request_id": "r1", "gateway_request_id": "r1", "status": "OK", "payload": {"sum": 3}})
        );
        let text = Outcome { status_code: Some(200), body: b"plain".to_vec(), ..Outcome::default() };
        let sent: serde_json::Value = serde_json::from_slice(&payload("r1", &text)).unwrap();
        assert_eq!(sent["payload"], serde_json::Value::Null);
        assert!(sent["payload_error"].as_str().unwrap().contains("not JSON"));
        let failed = Outcome {
            status_code: Some(500),
            body: br#"{"detail": "boom"}"#.to_vec(),
            error: Some("the app answered 500".into()),
            ..Outcome::default()
        };
        let sent: serde_json::Value = serde_json::from_slice(&payload("r1", &failed)).unwrap();
        assert_eq!((sent["status"].as_str(), sent["error"].as_str()), (Some("ERROR"), Some("the app answered 500")));
        assert_eq!(sent["payload"]["detail"], "boom");
        let cancelled = Outcome { error: Some("cancelled".into()), ..Outcome::default() };
        let sent: serde_json::Value = serde_json::from_slice(&payload("r1", &cancelled)).unwrap();
        assert!(sent.get("payload_error").is_none(), "no answer is not an answer that is not JSON");
    }
}
