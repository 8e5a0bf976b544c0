//! Environments: what a spec means, where its Python comes from, how it is built, and when it is removed.

mod builder;
mod python;
mod spec;
mod store;

pub use builder::BuildSandbox;
pub(crate) use builder::{Builder, EnvBuilder, Interpreter};
pub(crate) use python::{find_interpreter, installation_of};
pub use spec::{normalize_requirements, EnvSpec, PythonVersion, Serializer, DILL_LAYER};
pub(crate) use store::{use_environment, EnvUse};
pub use store::{
    EnvironmentInfo, EnvironmentPolicy, EnvironmentStore, Eviction, EvictionReason, PruneReport, Removal, RemoveError,
};
