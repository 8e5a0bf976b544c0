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
