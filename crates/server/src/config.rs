//! The server's configuration: command-line choices, plus an optional TOML file in the data dir.
//!
//! ```toml
//! listen = "127.0.0.1:6005"
//! idle_shutdown_seconds = 900        # stop after this long without calls or workers (default: never)
//!
//! [capacity]                         # default: this host's cores, memory and NVIDIA GPUs
//! cpus = 16
//! memory_gb = 64
//! gpus = 2
//!
//! [machine_types.XXL]                # added to (or replacing) the built-in XS, S, M, L, XL, GPU-T4, GPU
//! cpus = 16
//! memory_gb = 128
//! gpus = 0
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fal_engine::{MachineType, MachineTypes};
use serde::Deserialize;

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;
/// Where the server listens unless told otherwise: loopback only.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:6005";

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// Overrides of the host's capacity, from the config file.
    pub cpus: Option<f64>,
    pub memory_bytes: Option<u64>,
    pub gpus: Option<u32>,
    pub machine_types: MachineTypes,
    pub idle_shutdown: Option<Duration>,
    /// Zero-config mode: where to write this server's address and the local admin key (mode 0600).
    pub credentials_file: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the config file {path} is invalid: {message}")]
    Invalid { path: PathBuf, message: String },
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    idle_shutdown_seconds: Option<u64>,
    #[serde(default)]
    capacity: CapacityConfig,
    #[serde(default)]
    machine_types: BTreeMap<String, MachineTypeConfig>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CapacityConfig {
    cpus: Option<f64>,
    memory_gb: Option<f64>,
    gpus: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MachineTypeConfig {
    cpus: f64,
    memory_gb: f64,
    #[serde(default)]
    gpus: u32,
    pids: Option<u64>,
}

impl ServerConfig {
    /// Defaults, then `config_file` (or `<data_dir>/config.toml` if it exists). `listen` from the command line, if
    /// given, wins over the file.
    pub fn load(data_dir: &Path, config_file: Option<&Path>, listen: Option<SocketAddr>) -> Result<Self, ConfigError> {
        let default_file = data_dir.join("config.toml");
        let path = config_file.map(Path::to_path_buf).or_else(|| default_file.is_file().then_some(default_file));
        let file = match &path {
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.clone(), source })?;
                toml::from_str::<FileConfig>(&text)
                    .map_err(|e| ConfigError::Invalid { path: path.clone(), message: e.to_string() })?
            }
            None => FileConfig::default(),
        };
        let invalid = |message: String| ConfigError::Invalid { path: path.clone().unwrap_or_default(), message };

        let listen = match (listen, &file.listen) {
            (Some(listen), _) => listen,
            (None, Some(text)) => text.parse().map_err(|e| invalid(format!("listen = {text:?}: {e}")))?,
            (None, None) => DEFAULT_LISTEN.parse().map_err(|e| invalid(format!("{e}")))?,
        };
        let mut machine_types = MachineTypes::builtin();
        for (name, t) in file.machine_types {
            if !(t.cpus > 0.0 && t.memory_gb > 0.0) {
                return Err(invalid(format!("machine type {name}: cpus and memory_gb must be positive")));
            }
            let mut machine = MachineType::new(&name, t.cpus, (t.memory_gb * GIB) as u64, t.gpus);
            if let Some(pids) = t.pids {
                machine.pids = pids;
            }
            machine_types.insert(machine);
        }
        Ok(Self {
            listen,
            data_dir: data_dir.to_path_buf(),
            cpus: file.capacity.cpus,
            memory_bytes: file.capacity.memory_gb.map(|gb| (gb * GIB) as u64),
            gpus: file.capacity.gpus,
            machine_types,
            idle_shutdown: file.idle_shutdown_seconds.map(Duration::from_secs),
            credentials_file: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_file_adds_machine_types_and_overrides_capacity() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("config.toml"),
            "listen = \"127.0.0.1:7000\"\n[capacity]\ngpus = 2\n[machine_types.XXL]\ncpus = 16\nmemory_gb = 64\n",
        )
        .unwrap();
        let config = ServerConfig::load(dir.path(), None, None).unwrap();
        assert_eq!(config.listen.port(), 7000);
        assert_eq!(config.gpus, Some(2));
        assert_eq!(config.machine_types.get("XXL").unwrap().memory_bytes, 64 << 30);
        assert!(config.machine_types.get("XS").is_ok());
    }

    #[test]
    fn unknown_keys_are_refused_with_the_file_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.toml"), "[capacity]\ncores = 2\n").unwrap();
        let err = ServerConfig::load(dir.path(), None, None).unwrap_err().to_string();
        assert!(err.contains("config.toml") && err.contains("cores"), "{err}");
    }
}
