//! Environments: what a spec means, where its Python comes from, and how it is built.

mod builder;
mod python;
mod spec;

pub(crate) use builder::EnvBuilder;
pub(crate) use python::find_interpreter;
pub use spec::{normalize_requirements, EnvSpec, PythonVersion, Serializer, DILL_LAYER};
