//! An environment spec and its content key.

use std::fmt;
use std::str::FromStr;

use pep508_rs::{Requirement, VerbatimUrl, VersionOrUrl};
use sha2::{Digest, Sha256};

use crate::error::EnvironmentError;

/// Bumped whenever the layout of a built environment changes, so old cache entries are never reused.
const LAYOUT_VERSION: u32 = 2;

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

/// How a worker unpickles its calls and pickles their outcomes, and so what it needs besides the requirements.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Serializer {
    /// Our SDK's calls: cloudpickle of `(function, args, kwargs)`. cloudpickle is installed into the environment,
    /// as a requirement pinned to the client's version (`cloudpickle==3.1.1`).
    Cloudpickle(String),
    /// The original fal-serverless client's calls: dill of a callable that takes no arguments. dill, and the
    /// packages that client's code expects on the remote side, come from the [dill layer](DILL_LAYER), which is
    /// built once per Python version and shared by every such environment; the environment holds only the
    /// requirements.
    Dill,
}

/// What the dill layer installs, with why: the original client (fal-serverless 0.6.41) pins `dill==0.3.7`, whose
/// pickles of functions name dill's own loaders; its `@cached` keeps its cache on the `isolate` module, which the
/// original service's workers always had (within the client's own range).
pub const DILL_LAYER: [&str; 2] = ["dill==0.3.7", "isolate>=0.12.2,<1.0"];

impl Serializer {
    /// cloudpickle at `requirement` (`cloudpickle==3.1.1`); a malformed requirement is refused.
    pub fn cloudpickle(requirement: &str) -> Result<Self, EnvironmentError> {
        Ok(Self::Cloudpickle(normalize_requirements(&[requirement.to_string()])?.remove(0)))
    }
}

impl fmt::Display for Serializer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cloudpickle(requirement) => f.write_str(requirement),
            Self::Dill => write!(f, "dill layer {}", DILL_LAYER.join(", ")),
        }
    }
}

/// What an environment contains. Two specs with the same [`EnvSpec::key`] are the same environment.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EnvSpec {
    pub python: PythonVersion,
    /// Normalized PEP 508 requirements, sorted, without duplicates.
    pub requirements: Vec<String>,
    pub serializer: Serializer,
}

impl EnvSpec {
    /// Parses and normalizes `requirements`; a malformed requirement is refused here, before anything is built.
    pub fn new(
        python: PythonVersion,
        requirements: &[String],
        serializer: Serializer,
    ) -> Result<Self, EnvironmentError> {
        Ok(Self { python, requirements: normalize_requirements(requirements)?, serializer })
    }

    /// The dill layer for `python`: an environment of its own, whose packages dill workers see after their own.
    pub fn dill_layer(python: PythonVersion) -> Self {
        let requirements = DILL_LAYER.map(String::from).to_vec();
        // The layer's requirements are constants, parsed by a test; they cannot be malformed.
        Self { python, requirements, serializer: Serializer::Dill }
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

    /// The requirements that name files of the machine that builds (`file://` URLs, local paths): the user's own
    /// files on the local host, but the server's own on a server, which refuses them.
    pub fn local_references(&self) -> Vec<&str> {
        self.requirements.iter().filter(|r| names_local_files(r)).map(String::as_str).collect()
    }

    /// The requirements that would replace what the worker's agent unpickles calls with (`dill==0.3.2` in a dill
    /// environment: it comes before the layer's dill, and the original client's pickles need 0.3.7; another
    /// cloudpickle than the client's), each with what the server needs instead. Such an environment could be built,
    /// but no call could run in it.
    pub fn protocol_conflicts(&self) -> Vec<(String, String)> {
        let needed = match &self.serializer {
            Serializer::Cloudpickle(requirement) => requirement.as_str(),
            Serializer::Dill => DILL_LAYER[0],
        };
        let Ok(Requirement { name: needed_name, version_or_url: Some(VersionOrUrl::VersionSpecifier(pin)), .. }) =
            Requirement::<VerbatimUrl>::from_str(needed)
        else {
            return Vec::new();
        };
        // The pin is `name==version`: the version it names.
        let Some(needed_version) = pin.iter().next().map(|specifier| specifier.version().clone()) else {
            return Vec::new();
        };
        self.requirements
            .iter()
            .filter_map(|requirement| {
                let parsed = Requirement::<VerbatimUrl>::from_str(requirement).ok()?;
                if parsed.name != needed_name {
                    return None;
                }
                let compatible = match &parsed.version_or_url {
                    None => true,
                    Some(VersionOrUrl::VersionSpecifier(specifiers)) => specifiers.contains(&needed_version),
                    Some(VersionOrUrl::Url(_)) => false,
                };
                (!compatible).then(|| (requirement.clone(), needed.to_string()))
            })
            .collect()
    }

    /// [`EnvSpec::protocol_conflicts`]' first, as the error a user is shown.
    pub fn check_protocol(&self) -> Result<(), EnvironmentError> {
        let Some((requirement, needed)) = self.protocol_conflicts().into_iter().next() else { return Ok(()) };
        let why = match self.serializer {
            Serializer::Dill => {
                "the original fal-serverless client pickles its calls with dill 0.3.7, and a dill the environment \
                 installs comes before the server's"
            }
            Serializer::Cloudpickle(_) => {
                "the client pickles calls with its own cloudpickle, installed at that version"
            }
        };
        Err(EnvironmentError::BreaksProtocol { requirement, needed, why })
    }

    /// Whether every requirement comes from a package index (a name and versions; no URL, VCS or path).
    pub fn from_indexes_only(&self) -> bool {
        self.install_targets().all(|r| {
            Requirement::<VerbatimUrl>::from_str(r)
                .is_ok_and(|parsed| !matches!(parsed.version_or_url, Some(VersionOrUrl::Url(_))))
        })
    }

    /// Everything `uv pip install` is asked to install (nothing, for a dill environment without requirements).
    pub fn install_targets(&self) -> impl Iterator<Item = &str> {
        let serializer = match &self.serializer {
            Serializer::Cloudpickle(requirement) => Some(requirement),
            Serializer::Dill => None,
        };
        self.requirements.iter().chain(serializer).map(String::as_str)
    }
}

fn names_local_files(requirement: &str) -> bool {
    match Requirement::<VerbatimUrl>::from_str(requirement) {
        // Normalized requirements always parse; a URL is local unless it names a remote scheme.
        Ok(parsed) => match parsed.version_or_url {
            Some(VersionOrUrl::Url(url)) => {
                let scheme = url.scheme();
                let transport = scheme.rsplit('+').next().unwrap_or(scheme);
                !matches!(transport, "http" | "https" | "ssh") || url.host_str().is_none_or(str::is_empty)
            }
            _ => false,
        },
        Err(_) => true,
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

    fn cloudpickle(version: &str) -> Serializer {
        Serializer::cloudpickle(&format!("cloudpickle=={version}")).unwrap()
    }

    #[test]
    fn a_requirement_that_replaces_the_agents_serializer_is_a_conflict() {
        let dill = |requirements: &[&str]| {
            let requirements: Vec<String> = requirements.iter().map(|r| r.to_string()).collect();
            EnvSpec::new(py311(), &requirements, Serializer::Dill).unwrap().protocol_conflicts()
        };
        assert_eq!(dill(&["dill==0.3.2", "pyjokes"]), [("dill==0.3.2".to_string(), "dill==0.3.7".to_string())]);
        assert_eq!(dill(&["dill<0.3.5"]).len(), 1);
        assert_eq!(dill(&["dill @ https://example.com/dill.tar.gz"]).len(), 1);
        assert!(dill(&["dill", "dill>=0.3", "dill==0.3.7", "pyjokes==0.3.2"]).is_empty());
        let ours = |requirement: &str| {
            EnvSpec::new(py311(), &[requirement.into()], cloudpickle("3.1.1")).unwrap().protocol_conflicts()
        };
        assert_eq!(ours("cloudpickle==2.2.1"), [("cloudpickle==2.2.1".to_string(), "cloudpickle==3.1.1".to_string())]);
        assert!(ours("cloudpickle>=3").is_empty());
        assert!(ours("dill==0.3.2").is_empty(), "our calls do not use dill");
    }

    #[test]
    fn equivalent_requirements_share_a_key() {
        let a = EnvSpec::new(py311(), &["PyJokes".into(), "numpy >= 1.0".into()], cloudpickle("3.1.1")).unwrap();
        let b = EnvSpec::new(py311(), &["numpy>=1.0".into(), "pyjokes".into(), "pyjokes".into()], cloudpickle("3.1.1"))
            .unwrap();
        assert_eq!(a.key(), b.key());
        assert_eq!(a.requirements, ["numpy>=1.0", "pyjokes"]);
    }

    #[test]
    fn python_version_and_serializer_are_part_of_the_key() {
        let base = EnvSpec::new(py311(), &[], cloudpickle("3.1.1")).unwrap();
        let other_python = EnvSpec::new("3.12".parse().unwrap(), &[], cloudpickle("3.1.1")).unwrap();
        let other_serializer = EnvSpec::new(py311(), &[], cloudpickle("3.0.0")).unwrap();
        let dill = EnvSpec::new(py311(), &[], Serializer::Dill).unwrap();
        assert_ne!(base.key(), other_python.key());
        assert_ne!(base.key(), other_serializer.key());
        assert_ne!(base.key(), dill.key());
    }

    #[test]
    fn dill_environments_install_only_their_requirements() {
        let dill = EnvSpec::new(py311(), &["pyjokes".into()], Serializer::Dill).unwrap();
        assert_eq!(dill.install_targets().collect::<Vec<_>>(), ["pyjokes"]);
        let ours = EnvSpec::new(py311(), &["pyjokes".into()], cloudpickle("3.1.1")).unwrap();
        assert_eq!(ours.install_targets().collect::<Vec<_>>(), ["pyjokes", "cloudpickle==3.1.1"]);
    }

    #[test]
    fn the_dill_layer_is_well_formed() {
        let layer = EnvSpec::dill_layer(py311());
        let normalized = normalize_requirements(&layer.requirements).unwrap();
        assert_eq!(normalized.len(), DILL_LAYER.len());
    }

    #[test]
    fn malformed_requirements_are_refused_with_the_offender_named() {
        for bad in ["pyjokes==", "", "--index-url=http://x", "py jokes"] {
            let err = normalize_requirements(&[bad.to_string()]).unwrap_err();
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn local_files_are_told_apart_from_remote_urls() {
        let spec = EnvSpec::new(
            py311(),
            &[
                "evil @ file:///some/dir".into(),
                "victim @ file:///tmp/x".into(),
                "pyjokes==0.6".into(),
                "remote @ https://example.com/remote-1.0-py3-none-any.whl".into(),
                "vcs @ git+https://example.com/vcs.git".into(),
            ],
            cloudpickle("3.1.1"),
        )
        .unwrap();
        assert_eq!(spec.local_references(), ["evil @ file:///some/dir", "victim @ file:///tmp/x"]);
        assert!(!spec.from_indexes_only());
        let plain = EnvSpec::new(py311(), &["pyjokes==0.6".into(), "numpy[extra]>=1".into()], cloudpickle("3.1.1"));
        assert!(plain.unwrap().from_indexes_only());
    }

    #[test]
    fn python_versions_parse_major_minor() {
        assert_eq!("3.11.7".parse::<PythonVersion>().unwrap().to_string(), "3.11");
        assert!("3".parse::<PythonVersion>().is_err());
        assert!("three.eleven".parse::<PythonVersion>().is_err());
    }
}
