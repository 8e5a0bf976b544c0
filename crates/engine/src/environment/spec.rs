//! An environment spec and its content key.

use std::fmt;
use std::str::FromStr;

use pep508_rs::{Requirement, VerbatimUrl};
use sha2::{Digest, Sha256};

use crate::error::EnvironmentError;

/// Bumped whenever the layout of a built environment changes, so old cache entries are never reused.
const LAYOUT_VERSION: u32 = 1;

/// A Python `major.minor`: pickled code only loads under the minor version that made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PythonVersion {
    pub major: u8,
    pub minor: u8,
}

impl FromStr for PythonVersion {
    type Err = EnvironmentError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || EnvironmentError::InvalidPythonVersion(s.to_string());
        let mut parts = s.trim().split('.');
        let major = parts.next().and_then(|p| p.parse().ok()).ok_or_else(invalid)?;
        let minor = parts.next().and_then(|p| p.parse().ok()).ok_or_else(invalid)?;
        // A patch level is accepted and ignored: 3.11.7 and 3.11.2 load each other's pickles.
        if parts.nth(1).is_some() {
            return Err(invalid());
        }
        Ok(Self { major, minor })
    }
}

impl fmt::Display for PythonVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// What an environment contains. Two specs with the same [`EnvSpec::key`] are the same environment.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EnvSpec {
    pub python: PythonVersion,
    /// Normalized PEP 508 requirements, sorted, without duplicates.
    pub requirements: Vec<String>,
    /// The serializer the worker needs, as a requirement pinned to the client's version (`cloudpickle==3.1.1`).
    pub serializer: String,
}

impl EnvSpec {
    /// Parses and normalizes `requirements` and `serializer`; a malformed requirement is refused here, before
    /// anything is built.
    pub fn new(python: PythonVersion, requirements: &[String], serializer: &str) -> Result<Self, EnvironmentError> {
        let requirements = normalize_requirements(requirements)?;
        let serializer = normalize_requirements(&[serializer.to_string()])?.remove(0);
        Ok(Self { python, requirements, serializer })
    }

    /// The content key: a hash of everything that makes the environment what it is.
    pub fn key(&self) -> String {
        let mut hasher = Sha256::new();
        hasher.update(format!("fal-env/{LAYOUT_VERSION}\npython {}\nserializer {}\n", self.python, self.serializer));
        for requirement in &self.requirements {
            hasher.update(format!("requirement {requirement}\n"));
        }
        hex::encode(&hasher.finalize()[..12])
    }

    /// Everything `uv pip install` is asked to install.
    pub fn install_targets(&self) -> impl Iterator<Item = &str> {
        self.requirements.iter().chain(std::iter::once(&self.serializer)).map(String::as_str)
    }
}

/// Parses each requirement as PEP 508 and returns their normalized forms, sorted and deduplicated, so that
/// `["PyJokes"]` and `["pyjokes "]` name the same environment.
pub fn normalize_requirements(requirements: &[String]) -> Result<Vec<String>, EnvironmentError> {
    let mut normalized = requirements
        .iter()
        .map(|raw| {
            let trimmed = raw.trim();
            if trimmed.is_empty() || trimmed.starts_with('-') {
                return Err(EnvironmentError::InvalidRequirement {
                    requirement: raw.clone(),
                    reason: "expected a package name with an optional version, like \"pyjokes\" or \"numpy>=1.26\""
                        .to_string(),
                });
            }
            Requirement::<VerbatimUrl>::from_str(trimmed)
                .map(|r| r.to_string())
                .map_err(|e| EnvironmentError::InvalidRequirement { requirement: raw.clone(), reason: e.to_string() })
        })
        .collect::<Result<Vec<_>, _>>()?;
    normalized.sort();
    normalized.dedup();
    Ok(normalized)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn py311() -> PythonVersion {
        "3.11".parse().unwrap()
    }

    #[test]
    fn equivalent_requirements_share_a_key() {
        let a = EnvSpec::new(py311(), &["PyJokes".into(), "numpy >= 1.0".into()], "cloudpickle==3.1.1").unwrap();
        let b = EnvSpec::new(py311(), &["numpy>=1.0".into(), "pyjokes".into(), "pyjokes".into()], "cloudpickle==3.1.1")
            .unwrap();
        assert_eq!(a.key(), b.key());
        assert_eq!(a.requirements, ["numpy>=1.0", "pyjokes"]);
    }

    #[test]
    fn python_version_and_serializer_are_part_of_the_key() {
        let base = EnvSpec::new(py311(), &[], "cloudpickle==3.1.1").unwrap();
        let other_python = EnvSpec::new("3.12".parse().unwrap(), &[], "cloudpickle==3.1.1").unwrap();
        let other_serializer = EnvSpec::new(py311(), &[], "cloudpickle==3.0.0").unwrap();
        assert_ne!(base.key(), other_python.key());
        assert_ne!(base.key(), other_serializer.key());
    }

    #[test]
    fn malformed_requirements_are_refused_with_the_offender_named() {
        for bad in ["pyjokes==", "", "--index-url=http://x", "py jokes"] {
            let err = normalize_requirements(&[bad.to_string()]).unwrap_err();
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn python_versions_parse_major_minor() {
        assert_eq!("3.11.7".parse::<PythonVersion>().unwrap().to_string(), "3.11");
        assert!("3".parse::<PythonVersion>().is_err());
        assert!("three.eleven".parse::<PythonVersion>().is_err());
    }
}
