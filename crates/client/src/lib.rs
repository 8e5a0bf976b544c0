//! A client of the fal-serverless server, for the CLI and the Python SDK's `cloud` host.
//!
//! Owns: finding the server and the key ([`Target`]: `FAL_HOST`, `FAL_KEY_ID` / `FAL_KEY_SECRET`, explicit
//! credentials, or the zero-config local server's credentials file, see [`LocalServer`]), the connection, and the
//! RPCs with their errors: calls, keys, secrets, workers, and web endpoints (`apps.rs`: register, list, delete, logs, and an
//! app's URL).
//!
//! How a host is reached:
//! - `https://host:port`: TLS, trusting the system's roots plus the CA file `FAL_SERVERLESS_CA_FILE` names.
//! - `http://host:port`: plaintext, as asked.
//! - a bare `host:port`: TLS, unless the host is loopback or `ISOLATE_TEST_MODE=1` is set (as the original client
//!   does): those start plaintext and switch to TLS when the server answers that it speaks only TLS (one probe call
//!   on connecting). Plaintext is so only ever used to loopback, `http://` or under `ISOLATE_TEST_MODE`.
//!
//! A TLS client at a plaintext server, or the reverse, a certificate the client does not trust or one for another
//! name: each is a [`ClientError`] saying what to change.

mod apps;
mod credentials;
pub mod rest;
mod schedules;

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use fal_proto::controller::isolate_controller_client::IsolateControllerClient;
use fal_proto::controller::{
    hosted_run_status, AliasInfo, CreateUserKeyRequest, DeleteAliasRequest, GetLogsRequest, GetLogsResult, HostedMap,
    HostedRun, HostedRunResult, ListAliasesRequest, ListSecretsRequest, ListUserKeysRequest, LogsFilter, MapRequest,
    RegisterApplicationRequest, RevokeUserKeyRequest, Secret, SetSecretRequest, UserKeyInfo, WorkerStatus,
    WorkerStatusListRequest,
};
use fal_proto::{
    Log, SerializedObject, AUTH_KEY_ID, AUTH_KEY_SECRET, CONNECTION_WINDOW, KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT,
    MAX_MESSAGE, STREAM_WINDOW, TLS_PROBE_PATH, TLS_REQUIRED_KIND,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::Request;

pub use crate::apps::{app_url, auth_mode_name, parse_auth_mode, LogsQuery, Registered, AUTH_MODES};
pub use crate::credentials::{CredentialsError, LocalServer};

/// The variable naming a CA file (PEM) to trust besides the system's roots.
pub const CA_FILE_VARIABLE: &str = "FAL_SERVERLESS_CA_FILE";
/// How long the probes that tell plaintext from TLS wait for an answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Where to call and with which key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `https://host:port` (TLS) or `http://host:port` (plaintext).
    pub uri: String,
    /// A plaintext `uri` that switches to TLS when the server answers that it speaks only TLS.
    pub tls_if_offered: bool,
    pub key_id: String,
    pub key_secret: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "no fal-serverless server is configured: FAL_HOST is unset and no local server is running (start one with \
         `fal-serverless server`, or set FAL_HOST)"
    )]
    NoServer,
    #[error("no key for {host}: set FAL_KEY_ID and FAL_KEY_SECRET, or pass credentials=CloudKeyCredentials(...)")]
    NoKey { host: String },
    #[error(transparent)]
    Credentials(#[from] CredentialsError),
    #[error("cannot reach the fal-serverless server at {uri}: {message}; is it running? (`fal-serverless server`)")]
    Connect { uri: String, message: String },
    #[error("cannot use {CA_FILE_VARIABLE}={path}: {message}")]
    CaFile { path: PathBuf, message: String },
    #[error(
        "the server at {uri} presented a certificate this client does not trust ({detail}): set \
         {CA_FILE_VARIABLE} to the CA file that signed it (for a server set up with `fal-serverless server init \
         --tls-self-signed`, a copy of its <data-dir>/tls/ca.pem)"
    )]
    UntrustedCertificate { uri: String, detail: String },
    #[error(
        "the server at {uri} presented a certificate for other names ({detail}): connect with a name the \
         certificate holds, or give the server a certificate for this one (`fal-serverless server init \
         --tls-self-signed NAME...`)"
    )]
    WrongName { uri: String, detail: String },
    #[error(
        "the server at {uri} speaks plaintext gRPC, not TLS: write FAL_HOST as http://{host} if the network to it \
         is trusted, or give the server a certificate (`fal-serverless server --tls-cert FILE --tls-key FILE`, or \
         `fal-serverless server init --tls-self-signed NAME...`)"
    )]
    NotTls { uri: String, host: String },
    #[error("{message}")]
    Server { code: tonic::Code, kind: Option<String>, message: String },
    #[error("the server ended the run without a result")]
    NoResult,
    #[error("the server ended the registration without a revision id; its logs above may say why")]
    NoRevision,
    #[error("unknown auth mode {given:?}: use private, public or shared")]
    UnknownAuthMode { given: String },
    #[error(
        "the connection to the server was lost during the call ({detail}): the server stopped, restarted or crashed. \
         The call may or may not have run; call it again once the server is back"
    )]
    ConnectionLost { detail: String },
}

impl From<tonic::Status> for ClientError {
    fn from(status: tonic::Status) -> Self {
        // A status the server sent carries its headers or trailers; one made here, from a broken connection,
        // carries none.
        let local = status.metadata().is_empty();
        if local && matches!(status.code(), tonic::Code::Unknown | tonic::Code::Unavailable | tonic::Code::Internal) {
            return ClientError::ConnectionLost { detail: status.message().to_string() };
        }
        let kind = status.metadata().get("fal-error-kind").and_then(|v| v.to_str().ok()).map(String::from);
        let message = match status.code() {
            // A TLS port's answer to a plaintext client says itself what to do.
            _ if kind.as_deref() == Some(TLS_REQUIRED_KIND) => status.message().to_string(),
            tonic::Code::Unavailable => format!("the server is unavailable: {}", status.message()),
            _ => status.message().to_string(),
        };
        ClientError::Server { code: status.code(), kind, message }
    }
}

impl Target {
    /// `FAL_HOST` with `credentials` (else `FAL_KEY_ID` / `FAL_KEY_SECRET`); without `FAL_HOST`, the local
    /// server's credentials file (whose key is used unless `credentials` are given).
    pub fn resolve(credentials: Option<(String, String)>) -> Result<Self, ClientError> {
        let from_env = || Some((std::env::var("FAL_KEY_ID").ok()?, std::env::var("FAL_KEY_SECRET").ok()?));
        let host = std::env::var("FAL_HOST").ok().filter(|h| !h.trim().is_empty());
        match host {
            Some(host) => {
                let (key_id, key_secret) =
                    credentials.or_else(from_env).ok_or_else(|| ClientError::NoKey { host: host.clone() })?;
                let (uri, tls_if_offered) = connection_uri(&host, test_mode());
                Ok(Self { uri, tls_if_offered, key_id, key_secret })
            }
            None => {
                // The zero-config server listens on loopback, in plaintext, for this user alone.
                let local = LocalServer::read()?.ok_or(ClientError::NoServer)?;
                let (key_id, key_secret) = credentials.unwrap_or((local.key_id, local.key_secret));
                Ok(Self { uri: format!("http://{}", local.host), tls_if_offered: false, key_id, key_secret })
            }
        }
    }
}

/// `ISOLATE_TEST_MODE=1`: plaintext to any host, as the original client.
fn test_mode() -> bool {
    std::env::var("ISOLATE_TEST_MODE").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// The URI to connect to for `host` as the user wrote it, and whether it is plaintext that switches to TLS when
/// the server offers only that (see the crate's doc).
fn connection_uri(host: &str, test_mode: bool) -> (String, bool) {
    let host = host.trim();
    if let Some(rest) = host.strip_prefix("https://") {
        return (format!("https://{rest}"), false);
    }
    if let Some(rest) = host.strip_prefix("http://") {
        return (format!("http://{rest}"), false);
    }
    let bare = host.strip_prefix("grpc://").unwrap_or(host);
    if is_loopback(bare) || test_mode {
        (format!("http://{bare}"), true)
    } else {
        (format!("https://{bare}"), false)
    }
}

fn is_loopback(host_port: &str) -> bool {
    let name = host_port.rsplit_once(':').map(|(h, _)| h).unwrap_or(host_port);
    let name = name.trim_start_matches('[').trim_end_matches(']');
    name == "localhost" || name.parse::<std::net::IpAddr>().map(|ip| ip.is_loopback()).unwrap_or(false)
}

/// `scheme://host:port/...` -> `host:port`.
fn authority(uri: &str) -> &str {
    let rest = uri.split_once("://").map(|(_, rest)| rest).unwrap_or(uri);
    rest.split('/').next().unwrap_or(rest)
}

/// A connection to the server, with the key every request carries.
#[derive(Debug, Clone)]
pub struct Client {
    grpc: IsolateControllerClient<Channel>,
    /// What the connection speaks to: `https://host:port` once a plaintext target switched to TLS.
    uri: String,
    key_id: AsciiMetadataValue,
    key_secret: AsciiMetadataValue,
}

impl Client {
    pub async fn connect(target: &Target) -> Result<Self, ClientError> {
        let key = |value: &str, what: &str| {
            value.parse::<AsciiMetadataValue>().map_err(|_| ClientError::Server {
                code: tonic::Code::Unauthenticated,
                kind: None,
                message: format!("the {what} holds characters a key never has; check it"),
            })
        };
        let (key_id, key_secret) = (key(&target.key_id, "key id")?, key(&target.key_secret, "key secret")?);
        let mut uri = target.uri.clone();
        let mut grpc = channel(&uri).await?;
        if target.tls_if_offered {
            let probe = with_key(Request::new(()), &key_id, &key_secret);
            if speaks_tls_only(grpc.clone(), probe, &target.uri).await? {
                uri = format!("https://{}", authority(&target.uri));
                grpc = channel(&uri).await?;
            }
        }
        Ok(Self {
            uri,
            grpc: IsolateControllerClient::new(grpc)
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
            key_id,
            key_secret,
        })
    }

    /// `http://host:port` or `https://host:port`: the server as this connection reaches it (an app's URL starts
    /// with it).
    pub fn uri(&self) -> &str {
        &self.uri
    }

    fn request<T>(&self, message: T) -> Request<T> {
        with_key(Request::new(message), &self.key_id, &self.key_secret)
    }

    /// Runs a call, handing each log to `on_log` and each item a generator function yields to `on_item` as they
    /// arrive; returns its outcome.
    pub async fn run(
        &self,
        run: HostedRun,
        mut on_log: impl FnMut(Log),
        mut on_item: impl FnMut(SerializedObject),
    ) -> Result<SerializedObject, ClientError> {
        let mut stream = self.grpc.clone().run(self.request(run)).await?.into_inner();
        while let Some(message) = stream.message().await? {
            message.logs.into_iter().for_each(&mut on_log);
            if let Some(item) = message.item {
                on_item(item);
            }
            if let Some(value) = message.return_value {
                return Ok(value);
            }
            if message.status.is_some_and(|s| s.state == hosted_run_status::State::InternalFailure as i32) {
                return Err(ClientError::Server {
                    code: tonic::Code::Internal,
                    kind: Some("internal".into()),
                    message: "the server reported an internal failure of the run".into(),
                });
            }
        }
        Err(ClientError::NoResult)
    }

    /// Starts a map: `map` with its first inputs, then each batch `more` gives, sent as the server reads them.
    /// Returns its messages (logs, results and errors, each naming its input), as they come.
    pub async fn map(
        &self,
        map: HostedMap,
        more: impl tokio_stream::Stream<Item = Vec<SerializedObject>> + Send + 'static,
    ) -> Result<tonic::Streaming<HostedRunResult>, ClientError> {
        use tokio_stream::StreamExt as _;
        let first = MapRequest { map: Some(map), inputs: Vec::new() };
        let requests = tokio_stream::once(first).chain(more.map(|inputs| MapRequest { map: None, inputs }));
        Ok(self.grpc.clone().map_stream(self.request(requests)).await?.into_inner())
    }

    pub async fn create_key(&self, request: CreateUserKeyRequest) -> Result<(String, String), ClientError> {
        let response = self.grpc.clone().create_user_key(self.request(request)).await?.into_inner();
        Ok((response.key_id, response.key_secret))
    }

    pub async fn list_keys(&self) -> Result<Vec<UserKeyInfo>, ClientError> {
        Ok(self.grpc.clone().list_user_keys(self.request(ListUserKeysRequest {})).await?.into_inner().user_keys)
    }

    pub async fn revoke_key(&self, key_id: &str) -> Result<(), ClientError> {
        let request = RevokeUserKeyRequest { key_id: key_id.to_string() };
        self.grpc.clone().revoke_user_key(self.request(request)).await?;
        Ok(())
    }

    /// Sets secret `name` of the caller (or, with an admin key, of `user`) to `value`; `None` deletes it.
    pub async fn set_secret(&self, name: &str, value: Option<String>, user: Option<String>) -> Result<(), ClientError> {
        let request = SetSecretRequest { name: name.to_string(), value, user_id: user };
        self.grpc.clone().set_secret(self.request(request)).await?;
        Ok(())
    }

    /// The caller's secrets (every user's for an admin key, or `user`'s), by name, without values.
    pub async fn list_secrets(&self, user: Option<String>) -> Result<Vec<Secret>, ClientError> {
        let request = ListSecretsRequest { user_id: user };
        Ok(self.grpc.clone().list_secrets(self.request(request)).await?.into_inner().secrets)
    }

    pub async fn workers(&self) -> Result<Vec<WorkerStatus>, ClientError> {
        let request = WorkerStatusListRequest::default();
        Ok(self.grpc.clone().worker_status_list(self.request(request)).await?.into_inner().worker_status)
    }

    /// Deploys a web endpoint: a new revision (under `request.application_name` when given, which then points to
    /// it), handing each log (its environment's build) to `on_log` as it arrives.
    pub async fn register_application(
        &self,
        request: RegisterApplicationRequest,
        mut on_log: impl FnMut(Log),
    ) -> Result<Registered, ClientError> {
        let mut stream = self.grpc.clone().register_application(self.request(request)).await?.into_inner();
        while let Some(message) = stream.message().await? {
            message.logs.into_iter().for_each(&mut on_log);
            if let Some(result) = message.result.filter(|r| !r.application_id.is_empty()) {
                return Ok(Registered { revision: result.application_id, user_id: result.user_id });
            }
        }
        Err(ClientError::NoRevision)
    }

    /// The caller's aliases (every user's, for an admin), with the revision each points to.
    pub async fn list_aliases(&self) -> Result<Vec<AliasInfo>, ClientError> {
        Ok(self.grpc.clone().list_aliases(self.request(ListAliasesRequest {})).await?.into_inner().aliases)
    }

    /// Removes an alias of the caller's; returns the revision it pointed to.
    pub async fn delete_alias(&self, alias: &str) -> Result<String, ClientError> {
        let request = DeleteAliasRequest { alias: alias.to_string() };
        Ok(self.grpc.clone().delete_alias(self.request(request)).await?.into_inner().revision)
    }

    /// Reads apps' logs, handing each line to `on_line`; with `query.follow`, until the server ends the stream or
    /// the future is dropped.
    pub async fn get_logs(&self, query: LogsQuery, mut on_line: impl FnMut(GetLogsResult)) -> Result<(), ClientError> {
        let request = GetLogsRequest {
            follow: Some(query.follow),
            filter: Some(LogsFilter { lines: query.lines, alias: query.app, ..Default::default() }),
        };
        let mut stream = self.grpc.clone().get_logs(self.request(request)).await?.into_inner();
        while let Some(line) = stream.message().await? {
            on_line(line);
        }
        Ok(())
    }
}

fn with_key<T>(mut request: Request<T>, key_id: &AsciiMetadataValue, key_secret: &AsciiMetadataValue) -> Request<T> {
    request.metadata_mut().insert(AUTH_KEY_ID, key_id.clone());
    request.metadata_mut().insert(AUTH_KEY_SECRET, key_secret.clone());
    request
}

/// A connected channel to `uri`: TLS for `https://`, with HTTP/2 keepalive while calls are open.
async fn channel(uri: &str) -> Result<Channel, ClientError> {
    let connect_error = |message: String| ClientError::Connect { uri: uri.to_string(), message };
    let mut endpoint = Endpoint::from_shared(uri.to_string())
        .map_err(|e| connect_error(e.to_string()))?
        .tcp_nodelay(true)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        // Finds a server that vanished mid-call (its host gone) in seconds rather than at the call's timeout.
        // Only while a call is open: an idle connection's pings would count against strict servers' ping policy.
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(false);
    let tls = uri.starts_with("https://");
    if tls {
        endpoint = endpoint.tls_config(tls_config()?).map_err(|e| connect_error(source_chain(&e)))?;
    }
    match endpoint.connect().await {
        Ok(channel) => Ok(channel),
        Err(error) if tls => Err(tls_connect_error(uri, &error).await),
        Err(error) => Err(connect_error(source_chain(&error))),
    }
}

/// The system's roots (where there are any) plus `FAL_SERVERLESS_CA_FILE`.
fn tls_config() -> Result<ClientTlsConfig, ClientError> {
    // tonic refuses to build a config with native roots where the system has none (a slim container, say), even
    // with a CA file given; so they are asked for only where they exist. Looked up once per process.
    static SYSTEM_ROOTS: OnceLock<bool> = OnceLock::new();
    let system_roots = *SYSTEM_ROOTS.get_or_init(|| !rustls_native_certs::load_native_certs().certs.is_empty());
    let mut config = ClientTlsConfig::new();
    if system_roots {
        config = config.with_native_roots();
    }
    if let Some(path) = std::env::var_os(CA_FILE_VARIABLE).filter(|p| !p.is_empty()).map(PathBuf::from) {
        let ca_error = |message: String| ClientError::CaFile { path: path.clone(), message };
        let pem = std::fs::read(&path).map_err(|e| ca_error(e.to_string()))?;
        if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
            return Err(ca_error("it holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into()));
        }
        config = config.ca_certificate(Certificate::from_pem(pem));
    }
    Ok(config)
}

/// What a failed TLS connection means for the user: a certificate not trusted or for another name, a server that
/// speaks plaintext (checked by asking it in plaintext), or the connection's own trouble.
async fn tls_connect_error(uri: &str, error: &tonic::transport::Error) -> ClientError {
    use tokio_rustls::rustls::{CertificateError, Error as TlsError};
    let chain = source_chain(error);
    let mut found = None;
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(cause) = source {
        // An io::Error's source() skips the error it wraps, so that one is looked into by hand.
        let wrapped = cause
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref().map(|inner| inner as &(dyn std::error::Error + 'static)));
        if let Some(tls) = cause.downcast_ref::<TlsError>().or_else(|| wrapped.and_then(|w| w.downcast_ref())) {
            found = Some(tls.clone());
            break;
        }
        source = cause.source();
    }
    let uri_owned = uri.to_string();
    match &found {
        Some(TlsError::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        )) => return ClientError::WrongName { uri: uri_owned, detail: chain_tail(&chain) },
        Some(TlsError::InvalidCertificate(_)) => {
            return ClientError::UntrustedCertificate { uri: uri_owned, detail: chain_tail(&chain) }
        }
        _ => {}
    }
    // A plaintext server closes (or resets) a TLS client's connection, or answers bytes that are no TLS record:
    // asking it in plaintext tells that apart from a server that is down or a network that is broken.
    let host = authority(uri).to_string();
    if speaks_plaintext_h2(&host).await {
        return ClientError::NotTls { uri: uri_owned, host };
    }
    ClientError::Connect { uri: uri_owned, message: chain }
}

/// The last, most specific part of an error chain.
fn chain_tail(chain: &str) -> String {
    chain.rsplit(": ").next().unwrap_or(chain).to_string()
}

/// Whether `host` answers an HTTP/2 client preface in plaintext (with its SETTINGS frame).
async fn speaks_plaintext_h2(host: &str) -> bool {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
    let ask = async {
        let mut stream = tokio::net::TcpStream::connect(host).await?;
        stream.write_all(PREFACE).await?;
        let mut frame = [0u8; 9];
        stream.read_exact(&mut frame).await?;
        // A frame header: 3 bytes of length, then the type; SETTINGS is 4.
        Ok::<bool, std::io::Error>(frame[3] == 0x04)
    };
    matches!(tokio::time::timeout(PROBE_TIMEOUT, ask).await, Ok(Ok(true)))
}

/// Asks a server reached in plaintext whether it speaks only TLS: a method no server has is called; a plaintext
/// server refuses it (UNIMPLEMENTED, or the key): a TLS port answers every plaintext call with `fal-error-kind:
/// tls-required`.
async fn speaks_tls_only(channel: Channel, probe: Request<()>, uri: &str) -> Result<bool, ClientError> {
    let mut grpc = tonic::client::Grpc::new(channel);
    let call = async {
        grpc.ready().await.map_err(|e| tonic::Status::unavailable(source_chain(&e)))?;
        let path = tonic::codegen::http::uri::PathAndQuery::from_static(TLS_PROBE_PATH);
        grpc.unary(probe, path, tonic_prost::ProstCodec::<(), ()>::default()).await
    };
    let status = match tokio::time::timeout(PROBE_TIMEOUT, call).await {
        Ok(Ok(_)) => return Ok(false),
        Ok(Err(status)) => status,
        // A TLS port's responder answers at once; a server this slow is a busy plaintext one.
        Err(_) => return Ok(false),
    };
    let kind = status.metadata().get("fal-error-kind").and_then(|v| v.to_str().ok());
    if kind == Some(TLS_REQUIRED_KIND) {
        return Ok(true);
    }
    match ClientError::from(status) {
        ClientError::ConnectionLost { detail } => Err(ClientError::Connect { uri: uri.to_string(), message: detail }),
        _ => Ok(false),
    }
}

fn source_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plaintext_only_where_safe_or_asked_for_and_tls_elsewhere() {
        let plain = |uri: &str| (uri.to_string(), false);
        let upgradable = |uri: &str| (uri.to_string(), true);
        assert_eq!(connection_uri("127.0.0.1:6005", false), upgradable("http://127.0.0.1:6005"));
        assert_eq!(connection_uri("localhost:1", false), upgradable("http://localhost:1"));
        assert_eq!(connection_uri("[::1]:7", false), upgradable("http://[::1]:7"));
        assert_eq!(connection_uri("http://10.0.0.5:6005", false), plain("http://10.0.0.5:6005"));
        assert_eq!(connection_uri("https://127.0.0.1:1", false), plain("https://127.0.0.1:1"));
        assert_eq!(connection_uri("api.example.com:443", false), plain("https://api.example.com:443"));
        assert_eq!(connection_uri("grpc://10.0.0.5:6005", false), plain("https://10.0.0.5:6005"));
        assert_eq!(connection_uri("api.example.com:443", true), upgradable("http://api.example.com:443"));
        assert_eq!(authority("https://a.b:5/x"), "a.b:5");
    }
}
