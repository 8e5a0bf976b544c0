//! Environments: what a spec means, where its Python comes from, and how it is built.

mod builder;
mod python;
mod spec;

pub use builder::BuildSandbox;
pub(crate) use builder::{Builder, EnvBuilder, Interpreter};
pub(crate) use python::{find_interpreter, installation_of};
pub use spec::{normalize_requirements, EnvSpec, PythonVersion, Serializer, DILL_LAYER};
