//! The server's REST side as a client sees it (users' storage, `/files/...`): one HTTP/1.1 request per connection,
//! on the server's own port, over TLS when the gRPC connection is (the same roots: the system's plus
//! `FAL_SERVERLESS_CA_FILE`), with `Authorization: Key id:secret`. Bodies stream both ways.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_rustls::rustls;

use crate::{ClientError, Target, CA_FILE_VARIABLE};

/// A request or response body.
pub type Body = BoxBody<Bytes, std::io::Error>;

/// The REST side of one server, with a key.
#[derive(Debug, Clone)]
pub struct Rest {
    /// `http://host:port` or `https://host:port`.
    uri: String,
    authorization: String,
}

/// A body of `bytes`.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    http_body_util::Full::new(bytes.into()).map_err(|never| match never {}).boxed()
}

fn connect_error(uri: &str, message: impl std::fmt::Display) -> ClientError {
    ClientError::Connect { uri: uri.to_string(), message: message.to_string() }
}

fn tls_connector(uri: &str) -> Result<tokio_rustls::TlsConnector, ClientError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    if let Some(path) = std::env::var_os(CA_FILE_VARIABLE).filter(|p| !p.is_empty()) {
        let path = std::path::PathBuf::from(path);
        let ca_error = |message: String| ClientError::CaFile { path: path.clone(), message };
        let pem = std::fs::read(&path).map_err(|e| ca_error(e.to_string()))?;
        let mut reader = std::io::Cursor::new(pem);
        for cert in rustls_pemfile_certs(&mut reader).map_err(ca_error)? {
            roots.add(cert).map_err(|e| ca_error(e.to_string()))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| connect_error(uri, e))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// The certificates of a PEM file (rustls' own PEM reader).
fn rustls_pemfile_certs(
    reader: &mut std::io::Cursor<Vec<u8>>,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_reader_iter(reader).collect::<Result<Vec<_>, _>>().map_err(|e| e.to_string())
}

impl Rest {
    /// The REST side of the server `uri` names (as [`crate::Client::uri`] gives it), with `target`'s key.
    pub fn new(uri: &str, target: &Target) -> Self {
        Self {
            uri: uri.trim_end_matches('/').to_string(),
            authorization: format!("Key {}:{}", target.key_id, target.key_secret),
        }
    }

    /// Sends one request (`path` with its query) and returns the response, whatever its status.
    pub async fn send(
        &self,
        method: http::Method,
        path: &str,
        body: Body,
        length: Option<u64>,
    ) -> Result<http::Response<Incoming>, ClientError> {
        let (tls, authority) = match (self.uri.strip_prefix("https://"), self.uri.strip_prefix("http://")) {
            (Some(authority), _) => (true, authority),
            (None, Some(authority)) => (false, authority),
            _ => return Err(connect_error(&self.uri, "not an http:// or https:// address")),
        };
        let stream = TcpStream::connect(authority).await.map_err(|e| connect_error(&self.uri, e))?;
        let mut request = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, authority)
            .header(http::header::AUTHORIZATION, &self.authorization);
        if let Some(length) = length {
            request = request.header(http::header::CONTENT_LENGTH, length);
        }
        let request = request.body(body).map_err(|e| connect_error(&self.uri, e))?;
        let failed = |e: hyper::Error| connect_error(&self.uri, e);
        if tls {
            let host = authority.rsplit_once(':').map_or(authority, |(host, _)| host).trim_matches(['[', ']']);
            let name =
                rustls::pki_types::ServerName::try_from(host.to_string()).map_err(|e| connect_error(&self.uri, e))?;
            let stream =
                tls_connector(&self.uri)?.connect(name, stream).await.map_err(|e| connect_error(&self.uri, e))?;
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(failed)?;
            tokio::spawn(connection);
            sender.send_request(request).await.map_err(failed)
        } else {
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(failed)?;
            tokio::spawn(connection);
            sender.send_request(request).await.map_err(failed)
        }
    }

    /// Sends one request and reads a JSON answer; an error status becomes the server's message.
    pub async fn json(
        &self,
        method: http::Method,
        path: &str,
        body: Body,
        length: Option<u64>,
    ) -> Result<serde_json::Value, ClientError> {
        let response = self.send(method, path, body, length).await?;
        let status = response.status();
        let bytes = response.into_body().collect().await.map_err(|e| connect_error(&self.uri, e))?.to_bytes();
        if !status.is_success() {
            return Err(error_of(status, &bytes));
        }
        serde_json::from_slice(&bytes)
            .map_err(|e| connect_error(&self.uri, format!("the server's answer is not JSON: {e}")))
    }
}

/// The server's JSON error (`{"detail": ...}`) as a [`ClientError`].
pub fn error_of(status: http::StatusCode, body: &[u8]) -> ClientError {
    let detail = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("detail").and_then(|d| d.as_str()).map(String::from))
        .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_string());
    ClientError::Server { code: tonic::Code::Unknown, kind: Some(status.as_u16().to_string()), message: detail }
}
