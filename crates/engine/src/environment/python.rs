//! Finding an interpreter of a given major.minor on this machine.

use std::path::{Path, PathBuf};

use tokio::process::Command;

use super::builder::Interpreter;
use super::PythonVersion;
use crate::error::EnvironmentError;

/// `interpreter`'s real executable (a shim, pyenv's say, only points at it) and the installation it belongs to
/// (`sys.base_prefix`), asked of the interpreter itself: one of this machine's, never an environment's. `-I -S`:
/// nothing but the interpreter's own startup runs.
pub(crate) async fn installation_of(interpreter: &Path) -> Result<Interpreter, EnvironmentError> {
    let output = Command::new(interpreter)
        .args(["-I", "-S", "-c", "import sys; sys.stdout.write(sys.executable + '\\n' + sys.base_prefix)"])
        .output()
        .await
        .map_err(|source| EnvironmentError::Io { path: interpreter.to_path_buf(), source })?;
    let said = String::from_utf8_lossy(&output.stdout).into_owned();
    let (executable, prefix) = said.split_once('\n').unwrap_or(("", ""));
    if !output.status.success() || executable.is_empty() || prefix.is_empty() {
        return Err(EnvironmentError::Io {
            path: interpreter.to_path_buf(),
            source: std::io::Error::other(format!(
                "the interpreter did not say where it is installed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            )),
        });
    }
    Ok(Interpreter { path: PathBuf::from(executable), base_prefix: PathBuf::from(prefix) })
}

/// Returns the first interpreter of `version` that `uv python list` finds on this machine. Never downloads one.
pub(crate) async fn find_interpreter(uv: &Path, version: PythonVersion) -> Result<PathBuf, EnvironmentError> {
    let installations = list_installations(uv).await?;
    installations.iter().find(|(v, _)| *v == version).map(|(_, path)| path.clone()).ok_or_else(|| {
        let mut available: Vec<String> = installations.iter().map(|(v, _)| v.to_string()).collect();
        available.dedup();
        EnvironmentError::PythonNotFound { requested: version.to_string(), available }
    })
}

async fn list_installations(uv: &Path) -> Result<Vec<(PythonVersion, PathBuf)>, EnvironmentError> {
    let output = Command::new(uv)
        .args(["python", "list", "--only-installed", "--output-format", "json"])
        .env("UV_PYTHON_DOWNLOADS", "never")
        .output()
        .await
        .map_err(|source| EnvironmentError::UvMissing { uv: uv.to_path_buf(), source })?;
    let listed: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or(serde_json::Value::Null);
    let mut installations: Vec<(PythonVersion, PathBuf)> = listed
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|entry| {
            let version = entry.get("version")?.as_str()?.parse().ok()?;
            let path = PathBuf::from(entry.get("path")?.as_str()?);
            Some((version, path))
        })
        .collect();
    installations.sort_by_key(|(v, _)| *v);
    Ok(installations)
}
