//! The gRPC contract between clients and the server: `IsolateController` of PyPI's isolate-proto 0.0.37, with the
//! same package, service, message names and field numbers, extended only with new fields (numbered from 100).
//!
//! `common.proto` and `server.proto` have no package, as in isolate: their types (`SerializedObject`, `Log`,
//! `EnvironmentDefinition`, ...) live at this crate's root. The service and its messages are in [`controller`].

tonic::include_proto!("_");

/// The `controller` package: the `IsolateController` service and its messages.
pub mod controller {
    tonic::include_proto!("controller");
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
