//! Building environments: once per key, atomically, with progress streamed to whoever waits.
//!
//! Each tenant has environments of its own (`envs/<tenant>/`): one tenant's environment is never used for another's
//! calls. A build happens in `envs/<tenant>/.tmp-<key>-<pid>` and is renamed to `envs/<tenant>/<key>` only when
//! complete, so a half-built environment is never used: whatever is at `<key>` is whole. Builders of the same
//! environment in this process wait on one in-process lock; builders in other processes on a file lock
//! (`envs/<tenant>/.locks/<key>.lock`).

use std::collections::HashMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use super::EnvSpec;
use crate::error::EnvironmentError;
use crate::logs::{LogSink, LogSource};

/// A built environment.
#[derive(Debug, Clone)]
pub(crate) struct Environment {
    pub key: String,
    pub root: PathBuf,
}

impl Environment {
    pub fn python(&self) -> PathBuf {
        self.root.join("bin").join("python")
    }

    /// Where its packages are, for a worker of another environment to add to its path.
    pub fn site_packages(&self, python: super::PythonVersion) -> PathBuf {
        self.root.join("lib").join(format!("python{python}")).join("site-packages")
    }

    /// The installation of the interpreter the environment was made from (`home` in `pyvenv.cfg` is its `bin`).
    pub fn base_prefix(&self) -> Option<PathBuf> {
        let cfg = fs::read_to_string(self.root.join("pyvenv.cfg")).ok()?;
        let home =
            cfg.lines().find_map(|l| l.split_once('=').filter(|(k, _)| k.trim() == "home").map(|(_, v)| v.trim()))?;
        Path::new(home).parent().map(Path::to_path_buf)
    }
}

#[derive(Debug)]
pub(crate) struct EnvBuilder {
    envs: PathBuf,
    uv: PathBuf,
    /// Compile bytecode at build time: for environments workers only read (jailed), where Python cannot cache it.
    compile_bytecode: bool,
    building: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl EnvBuilder {
    /// A builder of environments under `envs` (`envs/<tenant>/<key>`).
    pub fn new(envs: PathBuf, uv: PathBuf, compile_bytecode: bool) -> Self {
        Self { envs, uv, compile_bytecode, building: Mutex::default() }
    }

    pub fn uv(&self) -> &Path {
        &self.uv
    }

    /// The environment of `spec` for `tenant`, if it is built.
    pub fn built(&self, spec: &EnvSpec, tenant: &str) -> Option<Environment> {
        Self::ready(&self.envs.join(tenant), &spec.key())
    }

    fn ready(envs: &Path, key: &str) -> Option<Environment> {
        let root = envs.join(key);
        root.join("pyvenv.cfg").is_file().then(|| Environment { key: key.to_string(), root })
    }

    /// Returns the environment of `spec`, building it with `interpreter` first if no process has yet.
    /// `tenant` must be a plain name (letters, digits, `-`, `_`): it is a directory name.
    pub async fn ensure(
        &self,
        spec: &EnvSpec,
        tenant: &str,
        interpreter: &Path,
        logs: &LogSink,
    ) -> Result<Environment, EnvironmentError> {
        let envs = self.envs.join(tenant);
        let key = spec.key();
        if let Some(env) = Self::ready(&envs, &key) {
            return Ok(env);
        }
        let in_process = {
            let mut building = self.building.lock().unwrap_or_else(|e| e.into_inner());
            building.entry(format!("{tenant}/{key}")).or_default().clone()
        };
        let _in_process = in_process.lock().await;
        if let Some(env) = Self::ready(&envs, &key) {
            return Ok(env);
        }

        let locks = envs.join(".locks");
        fs::create_dir_all(&locks).map_err(|source| EnvironmentError::Io { path: locks.clone(), source })?;
        let lock_path = locks.join(format!("{key}.lock"));
        let lock =
            File::create(&lock_path).map_err(|source| EnvironmentError::Io { path: lock_path.clone(), source })?;
        let lock = match lock.try_lock() {
            Ok(()) => lock,
            Err(_) => {
                logs.send(
                    LogSource::Build,
                    format!("waiting for another process to finish building environment {key}"),
                );
                tokio::task::spawn_blocking(move || lock.lock().map(|()| lock))
                    .await
                    .map_err(|e| EnvironmentError::Io { path: lock_path.clone(), source: std::io::Error::other(e) })?
                    .map_err(|source| EnvironmentError::Io { path: lock_path.clone(), source })?
            }
        };
        let result = match Self::ready(&envs, &key) {
            Some(env) => Ok(env),
            None => self.build(spec, &envs, &key, interpreter, logs).await,
        };
        drop(lock);
        result
    }

    async fn build(
        &self,
        spec: &EnvSpec,
        envs: &Path,
        key: &str,
        interpreter: &Path,
        logs: &LogSink,
    ) -> Result<Environment, EnvironmentError> {
        let started = Instant::now();
        let shown =
            if spec.requirements.is_empty() { "no requirements".to_string() } else { spec.requirements.join(", ") };
        logs.send(LogSource::Build, format!("building environment {key} (Python {}, {shown})", spec.python));

        // We hold the key's lock: any temp dir of this key is a leftover of an interrupted build.
        remove_leftovers(envs, key);
        let staging = envs.join(format!(".tmp-{key}-{}", std::process::id()));
        let result = self.build_into(spec, &staging, interpreter, logs).await;
        let finish = result.and_then(|()| {
            let root = envs.join(key);
            fs::rename(&staging, &root).map_err(|source| EnvironmentError::Io { path: root.clone(), source })?;
            Ok(Environment { key: key.to_string(), root })
        });
        if finish.is_err() {
            let _ = fs::remove_dir_all(&staging);
        } else {
            logs.send(LogSource::Build, format!("environment {key} ready in {:.1}s", started.elapsed().as_secs_f64()));
        }
        finish
    }

    async fn build_into(
        &self,
        spec: &EnvSpec,
        staging: &Path,
        interpreter: &Path,
        logs: &LogSink,
    ) -> Result<(), EnvironmentError> {
        let mut venv = self.uv_command();
        // Relocatable: the environment is built in a temp dir and renamed; its scripts must not name the temp path.
        venv.args(["venv", "--quiet", "--relocatable", "--no-project", "--python"]).arg(interpreter).arg(staging);
        let (ok, output) = run_streaming(venv, &self.uv, logs).await?;
        if !ok {
            return Err(EnvironmentError::VenvFailed { python: spec.python.to_string(), output });
        }
        if spec.install_targets().next().is_none() {
            return Ok(());
        }
        let mut install = self.uv_command();
        install
            .args(["pip", "install", "--python"])
            .arg(staging.join("bin").join("python"))
            .args(spec.install_targets());
        if self.compile_bytecode {
            install.arg("--compile-bytecode");
        }
        let (ok, output) = run_streaming(install, &self.uv, logs).await?;
        if !ok {
            return Err(EnvironmentError::InstallFailed {
                requirements: spec.requirements.join(", "),
                python: spec.python.to_string(),
                output,
            });
        }
        Ok(())
    }

    fn uv_command(&self) -> Command {
        let mut command = Command::new(&self.uv);
        command
            .env("UV_PYTHON_DOWNLOADS", "never")
            .env("UV_NO_PROGRESS", "1")
            .env_remove("VIRTUAL_ENV")
            .env_remove("CONDA_PREFIX")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        command
    }
}

fn remove_leftovers(envs: &Path, key: &str) {
    let prefix = format!(".tmp-{key}-");
    let Ok(entries) = fs::read_dir(envs) else { return };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// Runs `command`, streaming each line of its output to `logs`; returns success and the output, for errors.
async fn run_streaming(mut command: Command, uv: &Path, logs: &LogSink) -> Result<(bool, String), EnvironmentError> {
    let mut child = command.spawn().map_err(|source| EnvironmentError::UvMissing { uv: uv.to_path_buf(), source })?;
    let stdout = child.stdout.take().map(|s| BufReader::new(s).lines());
    let stderr = child.stderr.take().map(|s| BufReader::new(s).lines());
    let mut collected = String::new();
    if let (Some(mut stdout), Some(mut stderr)) = (stdout, stderr) {
        let (mut out_open, mut err_open) = (true, true);
        while out_open || err_open {
            let line = tokio::select! {
                line = stdout.next_line(), if out_open => line.unwrap_or(None).or_else(|| { out_open = false; None }),
                line = stderr.next_line(), if err_open => line.unwrap_or(None).or_else(|| { err_open = false; None }),
            };
            if let Some(line) = line {
                logs.send(LogSource::Build, line.clone());
                // The staging path uv names is ours, not the user's business.
                if !line.starts_with("Using Python") {
                    collected.push_str(&line);
                    collected.push('\n');
                }
            }
        }
    }
    let status = child.wait().await.map_err(|source| EnvironmentError::UvMissing { uv: uv.to_path_buf(), source })?;
    Ok((status.success(), collected.trim_end().to_string()))
}
