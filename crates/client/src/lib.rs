//! A client of the fal-serverless server, for the CLI and the Python SDK's `cloud` host.
//!
//! Owns: finding the server and the key ([`Target`]: `FAL_HOST`, `FAL_KEY_ID` / `FAL_KEY_SECRET`, explicit
//! credentials, or the zero-config local server's credentials file), the connection, and the RPCs with their errors.
//! Channels are plaintext; they are only used where that is safe or asked for: a loopback host, an `http://` host,
//! or `ISOLATE_TEST_MODE=1` (as the original client).

use std::path::PathBuf;

use fal_proto::controller::isolate_controller_client::IsolateControllerClient;
use fal_proto::controller::{
    hosted_run_status, CreateUserKeyRequest, HostedRun, ListUserKeysRequest, RevokeUserKeyRequest, UserKeyInfo,
    WorkerStatus, WorkerStatusListRequest,
};
use fal_proto::{Log, SerializedObject, AUTH_KEY_ID, AUTH_KEY_SECRET, CONNECTION_WINDOW, MAX_MESSAGE, STREAM_WINDOW};
use serde::{Deserialize, Serialize};
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::{Channel, Endpoint};
use tonic::Request;

/// What the zero-config local server writes for its clients (mode 0600).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LocalServer {
    pub host: String,
    pub key_id: String,
    pub key_secret: String,
    pub pid: u32,
}

impl LocalServer {
    /// `$XDG_CONFIG_HOME/fal-serverless/local-server.json`, else `~/.config/fal-serverless/local-server.json`.
    pub fn credentials_path() -> PathBuf {
        std::env::var_os("FAL_SERVERLESS_CONFIG_DIR")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("XDG_CONFIG_HOME").map(|d| PathBuf::from(d).join("fal-serverless")))
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config").join("fal-serverless")))
            .unwrap_or_else(|| std::env::temp_dir().join("fal-serverless"))
            .join("local-server.json")
    }

    pub fn read() -> Option<Self> {
        serde_json::from_slice(&std::fs::read(Self::credentials_path()).ok()?).ok()
    }
}

/// Where to call and with which key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub uri: String,
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
    #[error(
        "FAL_HOST={host:?} is not a loopback address and this client only speaks plaintext gRPC: write it as \
         http://{host} if the network to it is trusted, or set ISOLATE_TEST_MODE=1"
    )]
    Insecure { host: String },
    #[error("cannot reach the fal-serverless server at {uri}: {message}; is it running? (`fal-serverless server`)")]
    Connect { uri: String, message: String },
    #[error("{message}")]
    Server { code: tonic::Code, kind: Option<String>, message: String },
    #[error("the server ended the run without a result")]
    NoResult,
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
                Ok(Self { uri: plaintext_uri(&host)?, key_id, key_secret })
            }
            None => {
                let local = LocalServer::read().ok_or(ClientError::NoServer)?;
                let (key_id, key_secret) = credentials.unwrap_or((local.key_id, local.key_secret));
                Ok(Self { uri: plaintext_uri(&local.host)?, key_id, key_secret })
            }
        }
    }
}

fn plaintext_uri(host: &str) -> Result<String, ClientError> {
    let host = host.trim();
    if let Some(rest) = host.strip_prefix("http://") {
        return Ok(format!("http://{rest}"));
    }
    let bare = host.strip_prefix("grpc://").unwrap_or(host);
    let name = bare.rsplit_once(':').map(|(h, _)| h).unwrap_or(bare).trim_start_matches('[').trim_end_matches(']');
    let loopback = name == "localhost" || name.parse::<std::net::IpAddr>().map(|ip| ip.is_loopback()).unwrap_or(false);
    if loopback || std::env::var("ISOLATE_TEST_MODE").is_ok_and(|v| !v.is_empty() && v != "0") {
        Ok(format!("http://{bare}"))
    } else {
        Err(ClientError::Insecure { host: host.to_string() })
    }
}

/// A connection to the server, with the key every request carries.
#[derive(Debug, Clone)]
pub struct Client {
    grpc: IsolateControllerClient<Channel>,
    key_id: AsciiMetadataValue,
    key_secret: AsciiMetadataValue,
}

impl Client {
    pub async fn connect(target: &Target) -> Result<Self, ClientError> {
        let connect_error = |message: String| ClientError::Connect { uri: target.uri.clone(), message };
        let endpoint = Endpoint::from_shared(target.uri.clone()).map_err(|e| connect_error(e.to_string()))?;
        let channel = endpoint
            .tcp_nodelay(true)
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .connect()
            .await
            .map_err(|e| connect_error(source_chain(&e)))?;
        let key = |value: &str, what: &str| {
            value.parse::<AsciiMetadataValue>().map_err(|_| ClientError::Server {
                code: tonic::Code::Unauthenticated,
                kind: None,
                message: format!("the {what} holds characters a key never has; check it"),
            })
        };
        Ok(Self {
            grpc: IsolateControllerClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
            key_id: key(&target.key_id, "key id")?,
            key_secret: key(&target.key_secret, "key secret")?,
        })
    }

    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        request.metadata_mut().insert(AUTH_KEY_ID, self.key_id.clone());
        request.metadata_mut().insert(AUTH_KEY_SECRET, self.key_secret.clone());
        request
    }

    /// Runs a call, handing each log to `on_log` as it arrives; returns the function's serialized outcome.
    pub async fn run(&self, run: HostedRun, mut on_log: impl FnMut(Log)) -> Result<SerializedObject, ClientError> {
        let mut stream = self.grpc.clone().run(self.request(run)).await?.into_inner();
        while let Some(message) = stream.message().await? {
            message.logs.into_iter().for_each(&mut on_log);
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

    pub async fn workers(&self) -> Result<Vec<WorkerStatus>, ClientError> {
        let request = WorkerStatusListRequest::default();
        Ok(self.grpc.clone().worker_status_list(self.request(request)).await?.into_inner().worker_status)
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
    fn plaintext_only_where_safe_or_asked_for() {
        assert_eq!(plaintext_uri("127.0.0.1:6005").unwrap(), "http://127.0.0.1:6005");
        assert_eq!(plaintext_uri("localhost:1").unwrap(), "http://localhost:1");
        assert_eq!(plaintext_uri("[::1]:7").unwrap(), "http://[::1]:7");
        assert_eq!(plaintext_uri("http://10.0.0.5:6005").unwrap(), "http://10.0.0.5:6005");
        if std::env::var_os("ISOLATE_TEST_MODE").is_none() {
            assert!(matches!(plaintext_uri("api.example.com:443"), Err(ClientError::Insecure { .. })));
        }
    }
}
