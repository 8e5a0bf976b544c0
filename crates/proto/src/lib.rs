//! The gRPC contract between clients and the server: `IsolateController` of PyPI's isolate-proto 0.0.37, with the
//! same package, service, message names and field numbers, extended only with new fields (numbered from 100).
//!
//! `common.proto` and `server.proto` have no package, as in isolate: their types (`SerializedObject`, `Log`,
//! `EnvironmentDefinition`, ...) live at this crate's root. The service and its messages are in [`controller`].

tonic::include_proto!("_");

/// The `controller` package: the `IsolateController` service and its messages.
pub mod controller {
    tonic::include_proto!("controller");

    impl std::fmt::Debug for SetSecretRequest {
        /// The value as `***` (or absent, for a delete): never printed.
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("SetSecretRequest")
                .field("name", &self.name)
                .field("value", &self.value.as_ref().map(|_| "***"))
                .field("user_id", &self.user_id)
                .finish()
        }
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn a_set_secret_request_prints_no_value() {
            let request =
                super::SetSecretRequest { name: "TOKEN".into(), value: Some("hunter2".into()), user_id: None };
            let shown = format!("{request:?}");
            assert!(shown.contains("TOKEN") && shown.contains("***") && !shown.contains("hunter2"), "{shown}");
        }
    }
}

/// Metadata key carrying a key's id on every call.
pub const AUTH_KEY_ID: &str = "auth-key-id";
/// Metadata key carrying a key's secret on every call.
pub const AUTH_KEY_SECRET: &str = "auth-key";

/// Largest message either side accepts: a payload up to the server's 1 GiB limit, and the message around it.
pub const MAX_MESSAGE: usize = (1 << 30) + (1 << 20);

/// HTTP/2 flow-control windows both sides advertise. With the protocol's default of 64 KiB, a 100 MB payload waits
/// for about 1,600 window updates; these let a large payload flow while the peer reads it.
pub const STREAM_WINDOW: u32 = 16 << 20;
pub const CONNECTION_WINDOW: u32 = 32 << 20;

/// HTTP/2 keepalive, both sides: a PING after this long without a frame from the peer...
pub const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);
/// ...and the connection closed when its answer takes longer than this. A client that vanished without closing (its
/// host gone, its process stopped) so loses its call, and the call's worker and capacity, within 30 s; a live one
/// answers at once, and 20 s leaves room for a host loaded enough to delay it. Servers pinging clients this often is
/// allowed by gRPC's keepalive policy (the policy limits clients' pings); our client pings only while a call is open.
pub const KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);
/// The `fal-error-kind` of the answer a plaintext client gets from a TLS port.
pub const TLS_REQUIRED_KIND: &str = "tls-required";
/// A method no server has: what our client calls in plaintext to learn whether a server speaks only TLS.
pub const TLS_PROBE_PATH: &str = "/fal_serverless.Probe/Tls";
