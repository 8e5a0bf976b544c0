//! Building environments: once per key, atomically, with progress streamed to whoever waits.
//!
//! Each tenant has environments of its own (`envs/<tenant>/`): one tenant's environment is never used for another's
//! calls. A build happens in `envs/<tenant>/.tmp-<key>-<pid>` and is renamed to `envs/<tenant>/<key>` only when
//! complete, so a half-built environment is never used: whatever is at `<key>` is whole. Builders of the same
//! environment in this process wait on one in-process lock; builders in other processes on a file lock
//! (`envs/<tenant>/.locks/<key>.lock`). A build runs only under its environment's use lock (`store.rs`), so no
//! eviction removes what it builds or links.
//!
//! On the server ([`BuildSandbox`]) every step of a build (`uv venv`, `uv pip install`, the bytecode compilation
//! that runs the new environment's Python, any `setup.py` a requirement brings) runs jailed as the tenant's own uid,
//! in a network namespace under the server's egress policy, in a cgroup with the build limits, within the build
//! timeout. The jail grants write access to the staging dir and to the tenant's own uv cache
//! (`build-cache/<uid>`) only, so no build can change another tenant's environments or what their builds read. What
//! a worker's jail mounts comes from the server's record of the build (`envs/<tenant>/.records/<key>`: the
//! interpreter the server chose), written outside the staging dir after the build; never from files in the
//! environment, which are the tenant's to overwrite (`pyvenv.cfg` included).

use std::collections::HashMap;
use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fal_sandbox::{
    CgroupManager, Grants, Jail, JailNetwork, Limits, Namespace, NetworkManager, ProcessSetup, WorkerCgroup,
};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use super::store::{use_environment, SHARED_TENANT};
use super::EnvSpec;
use crate::error::EnvironmentError;
use crate::logs::{LogSink, LogSource};

/// A built environment.
#[derive(Debug, Clone)]
pub(crate) struct Environment {
    pub key: String,
    pub root: PathBuf,
    /// The installation of the interpreter the environment was built with, as the builder recorded it.
    pub base_prefix: PathBuf,
}

/// How the server jails environment builds.
#[derive(Debug, Clone)]
pub struct BuildSandbox {
    pub jail: Jail,
    /// Network namespaces under the server's egress policy; `None`: loopback only.
    pub network: Option<Arc<NetworkManager>>,
    pub limits: Limits,
    pub timeout: Duration,
    /// The most a build may write: its staging dir, plus what it adds to the uv caches.
    pub disk_bytes: u64,
    /// uv caches, one per uid: `<caches>/<uid>`, written only by that uid's builds; `<caches>/shared`, written only
    /// by `shared_uid`'s wheel-only steps.
    pub caches: PathBuf,
    /// The uid of build steps whose result any user may get: wheel-only installs, layers of constant requirements.
    pub shared_uid: u32,
}

/// What one jailed build runs in: its jail's grants, its cgroup, its network namespace.
struct BuildJail<'a> {
    sandbox: &'a BuildSandbox,
    uid: u32,
    read_only: Vec<PathBuf>,
    writable: Vec<PathBuf>,
    cgroup: Option<WorkerCgroup>,
    namespace: Namespace,
    netns: Option<File>,
}

impl Environment {
    pub fn python(&self) -> PathBuf {
        self.root.join("bin").join("python")
    }

    /// Where its packages are, for a worker of another environment to add to its path.
    pub fn site_packages(&self, python: super::PythonVersion) -> PathBuf {
        self.root.join("lib").join(format!("python{python}")).join("site-packages")
    }
}

/// Who builds: the tenant's directory name and, on the server, the uid its builds run as.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Builder<'a> {
    pub tenant: &'a str,
    pub uid: u32,
}

#[derive(Debug)]
pub(crate) struct EnvBuilder {
    envs: PathBuf,
    uv: PathBuf,
    /// Jailed builds (the server's); `None` builds as the calling user (the local host).
    sandbox: Option<BuildSandbox>,
    cgroups: Arc<Result<CgroupManager, String>>,
    building: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl EnvBuilder {
    /// A builder of environments under `envs` (`envs/<tenant>/<key>`). Jailed environments have their bytecode
    /// compiled at build time: their workers only read them, so Python cannot cache it there.
    pub fn new(
        envs: PathBuf,
        uv: PathBuf,
        sandbox: Option<BuildSandbox>,
        cgroups: Arc<Result<CgroupManager, String>>,
    ) -> Self {
        // A jail binds the binary at its real path: a bare name is found on PATH now.
        let uv = match (uv.components().count(), std::env::var_os("PATH")) {
            (1, Some(path)) => {
                std::env::split_paths(&path).map(|dir| dir.join(&uv)).find(|p| p.is_file()).unwrap_or(uv)
            }
            _ => uv,
        };
        Self { envs, uv, sandbox, cgroups, building: Mutex::default() }
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
        let base_prefix = PathBuf::from(fs::read_to_string(record_path(envs, key)).ok()?.trim_end());
        root.is_dir().then(|| Environment { key: key.to_string(), root, base_prefix })
    }

    /// Returns the environment of `spec`, building it with `interpreter` first if no process has yet.
    /// `tenant` must be a plain name (letters, digits, `-`, `_`): it is a directory name.
    pub async fn ensure(
        &self,
        spec: &EnvSpec,
        builder: Builder<'_>,
        interpreter: &Interpreter,
        logs: &LogSink,
    ) -> Result<Environment, EnvironmentError> {
        let tenant = builder.tenant;
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
            None => self.build(spec, &envs, &key, builder.uid, interpreter, logs).await,
        };
        drop(lock);
        result
    }

    async fn build(
        &self,
        spec: &EnvSpec,
        envs: &Path,
        key: &str,
        uid: u32,
        interpreter: &Interpreter,
        logs: &LogSink,
    ) -> Result<Environment, EnvironmentError> {
        let started = Instant::now();
        let shown =
            if spec.requirements.is_empty() { "no requirements".to_string() } else { spec.requirements.join(", ") };
        // The shared step of a user's build says which it is: its lines come between the user's build's own.
        let what = if envs.file_name().is_some_and(|n| n == SHARED_TENANT) {
            "the environment users share (from wheels alone)"
        } else {
            "environment"
        };
        logs.send(LogSource::Build, format!("building {what} {key} (Python {}, {shown})", spec.python));

        // We hold the key's lock: any temp dir of this key is a leftover of an interrupted build.
        remove_leftovers(envs, key);
        let staging = envs.join(format!(".tmp-{key}-{}", std::process::id()));
        let result = match &self.sandbox {
            None => self.build_into(spec, &staging, interpreter, None, InstallMode::USER, logs).await,
            Some(sandbox) => {
                // What the build writes: its staging dir, and what the caches it fills grow by.
                let caches = [uid.to_string(), "shared".to_string()].map(|c| sandbox.caches.join(c)).to_vec();
                let watched = async {
                    tokio::select! {
                        built = self.jailed_build(sandbox, spec, &staging, uid, interpreter, logs) => built,
                        () = disk_watch(staging.clone(), caches, sandbox.disk_bytes) => {
                            Err(EnvironmentError::BuildDiskExceeded { gigabytes: sandbox.disk_bytes as f64 / GIB })
                        }
                    }
                };
                match tokio::time::timeout(sandbox.timeout, watched).await {
                    Ok(result) => result,
                    Err(_) => Err(EnvironmentError::BuildTimeout { seconds: sandbox.timeout.as_secs() }),
                }
            }
        };
        let finish = result.and_then(|()| {
            let root = envs.join(key);
            // The record is the server's, written outside the staging dir the build could write.
            let records = envs.join(".records");
            fs::create_dir_all(&records).map_err(|source| EnvironmentError::Io { path: records.clone(), source })?;
            let record = record_path(envs, key);
            fs::write(&record, interpreter.base_prefix.as_os_str().as_encoded_bytes())
                .map_err(|source| EnvironmentError::Io { path: record.clone(), source })?;
            fs::rename(&staging, &root).map_err(|source| EnvironmentError::Io { path: root.clone(), source })?;
            Ok(Environment { key: key.to_string(), root, base_prefix: interpreter.base_prefix.clone() })
        });
        if finish.is_err() {
            // A failed build may leave a large tree (half of torch): removed on a blocking thread.
            let _ = tokio::task::spawn_blocking(move || fs::remove_dir_all(staging)).await;
        } else {
            logs.send(LogSource::Build, format!("{what} {key} ready in {:.1}s", started.elapsed().as_secs_f64()));
        }
        finish
    }

    /// A build on the server.
    ///
    /// Requirements all from package indexes are first installed from wheels alone (`--only-binary :all:`) by the
    /// shared uid, into a uv cache only that uid writes, and compiled with `python -I -S` (no `site`, so no `.pth` and
    /// nothing of the packages runs; the compiler only reads them): no code a user chose runs in that step, so what
    /// it makes is what the indexes served, whoever asked first. It is kept, owned by root, as the shared
    /// environment of its key (`envs/.shared/<key>`), and every user's environment of that key is a hard-linked
    /// copy of it: a second user's build of the same requirements is a copy of links. Nobody writes those files: a
    /// worker's jail mounts its environment read-only, and builds never mount finished environments.
    ///
    /// Anything else (an sdist to build, a URL, a VCS requirement) is built wholly in the user's own jail, as the
    /// user, with the user's own uv cache, compiled there by uv (where a package's `.pth` may run: as the user, in the
    /// jail).
    async fn jailed_build(
        &self,
        sandbox: &BuildSandbox,
        spec: &EnvSpec,
        staging: &Path,
        uid: u32,
        interpreter: &Interpreter,
        logs: &LogSink,
    ) -> Result<(), EnvironmentError> {
        let shared_step = spec.from_indexes_only();
        if uid == sandbox.shared_uid && shared_step {
            let mut jail = self.build_jail(sandbox, uid, staging, interpreter, "shared").await?;
            let mut built =
                self.build_into(spec, staging, interpreter, Some(&mut jail), InstallMode::SHARED, logs).await;
            if built.is_ok() {
                built = self.compile(staging, spec, &mut jail, logs).await;
            }
            jail.release().await;
            built?;
            // From now on nobody but root may change it.
            return chown_tree(staging, 0);
        }
        if shared_step {
            let shared = Builder { tenant: SHARED_TENANT, uid: sandbox.shared_uid };
            // In use until linked: no eviction removes it under this build.
            let _linking = use_environment(&self.envs, SHARED_TENANT, &spec.key()).await?;
            match Box::pin(self.ensure(spec, shared, interpreter, logs)).await {
                Ok(environment) => return link_tree(&environment.root, staging),
                Err(error) => logs.send(
                    LogSource::Build,
                    format!(
                        "could not install from wheels alone ({}); building in your own sandbox instead",
                        error.to_string().lines().last().unwrap_or_default().trim()
                    ),
                ),
            }
        }
        let mut own = self.build_jail(sandbox, uid, staging, interpreter, &uid.to_string()).await?;
        let built = self.build_into(spec, staging, interpreter, Some(&mut own), InstallMode::USER, logs).await;
        own.release().await;
        built
    }

    /// Compiles the environment's bytecode in `jail` with its interpreter in isolated mode without `site` (`-I -S`):
    /// no `.pth`, `sitecustomize` or package module runs; the compiler only reads the sources.
    async fn compile(
        &self,
        staging: &Path,
        spec: &EnvSpec,
        jail: &mut BuildJail<'_>,
        logs: &LogSink,
    ) -> Result<(), EnvironmentError> {
        let python = staging.join("bin").join("python");
        let site_packages = staging.join("lib").join(format!("python{}", spec.python)).join("site-packages");
        let args = ["-I", "-S", "-m", "compileall", "-q", "-j", "0"].map(std::ffi::OsStr::new);
        let mut args = args.to_vec();
        args.push(site_packages.as_os_str());
        let (ok, output) = self.run_jailed(&python, &args, Some(jail), logs).await?;
        if !ok {
            return Err(EnvironmentError::InstallFailed {
                requirements: spec.requirements.join(", "),
                python: spec.python.to_string(),
                output: format!("compiling the environment's bytecode failed:\n{output}"),
            });
        }
        Ok(())
    }

    async fn build_into(
        &self,
        spec: &EnvSpec,
        staging: &Path,
        interpreter: &Interpreter,
        mut jail: Option<&mut BuildJail<'_>>,
        mode: InstallMode,
        logs: &LogSink,
    ) -> Result<(), EnvironmentError> {
        let mut venv: Vec<&std::ffi::OsStr> = Vec::new();
        // Relocatable: the environment is built in a temp dir and renamed; its scripts must not name the temp path.
        venv.extend(["venv", "--quiet", "--relocatable", "--no-project", "--python"].map(std::ffi::OsStr::new));
        venv.extend([interpreter.path.as_os_str(), staging.as_os_str()]);
        let (ok, output) = self.run_uv(&venv, jail.as_deref_mut(), logs).await?;
        if !ok {
            return Err(EnvironmentError::VenvFailed { python: spec.python.to_string(), output });
        }
        if spec.install_targets().next().is_none() {
            return Ok(());
        }
        let python = staging.join("bin").join("python");
        let mut install: Vec<&std::ffi::OsStr> = ["pip", "install", "--python"].map(std::ffi::OsStr::new).to_vec();
        install.push(python.as_os_str());
        install.extend(spec.install_targets().map(std::ffi::OsStr::new));
        if mode.wheels_only {
            install.extend(["--only-binary", ":all:"].map(std::ffi::OsStr::new));
        }
        // Jailed workers only read their environment, so Python cannot cache bytecode there: compile it now.
        if mode.compile && jail.is_some() {
            install.push(std::ffi::OsStr::new("--compile-bytecode"));
        }
        let (ok, output) = self.run_uv(&install, jail.as_deref_mut(), logs).await?;
        if !ok {
            let oom = jail.as_ref().and_then(|j| j.cgroup.as_ref()).is_some_and(WorkerCgroup::oom_killed);
            if let (true, Some(jail)) = (oom, jail) {
                return Err(EnvironmentError::BuildOutOfMemory { memory_mb: jail.sandbox.limits.memory_bytes >> 20 });
            }
            return Err(EnvironmentError::InstallFailed {
                requirements: spec.requirements.join(", "),
                python: spec.python.to_string(),
                output,
            });
        }
        Ok(())
    }

    /// The jail of one build step by `uid`: its staging dir (created, owned by `uid`) and the uv cache `cache`
    /// writable.
    async fn build_jail<'a>(
        &self,
        sandbox: &'a BuildSandbox,
        uid: u32,
        staging: &Path,
        interpreter: &Interpreter,
        cache: &str,
    ) -> Result<BuildJail<'a>, EnvironmentError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| EnvironmentError::Io { path, source }
        };
        let cache = sandbox.caches.join(cache);
        for dir in [staging, cache.as_path()] {
            fs::create_dir_all(dir).map_err(io(dir))?;
            std::os::unix::fs::chown(dir, Some(uid), Some(uid)).map_err(io(dir))?;
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io(dir))?;
        }
        let limits = sandbox.limits;
        let cgroup = match self.cgroups.as_ref() {
            Ok(manager) => Some(manager.create(&limits).map_err(|e| EnvironmentError::Sandbox(e.to_string()))?),
            Err(_) => None,
        };
        let namespace = match &sandbox.network {
            Some(network) => {
                let network = network.clone();
                let egress = network.policy().build_egress;
                tokio::task::spawn_blocking(move || network.take(egress))
                    .await
                    .map_err(|e| EnvironmentError::Sandbox(e.to_string()))?
                    .map_err(|e| EnvironmentError::Sandbox(e.to_string()))?
            }
            None => Namespace::loopback_only(),
        };
        let netns = match namespace.path() {
            Some(path) => Some(File::open(path).map_err(io(path))?),
            None => None,
        };
        Ok(BuildJail {
            sandbox,
            uid,
            read_only: vec![interpreter.base_prefix.clone(), self.uv.clone()],
            writable: vec![staging.to_path_buf(), cache],
            cgroup,
            namespace,
            netns,
        })
    }

    /// Runs uv with `args`, jailed when `jail` is given, streaming its output to `logs`.
    async fn run_uv(
        &self,
        args: &[&std::ffi::OsStr],
        jail: Option<&mut BuildJail<'_>>,
        logs: &LogSink,
    ) -> Result<(bool, String), EnvironmentError> {
        self.run_jailed(&self.uv, args, jail, logs).await
    }

    /// Runs `program` with `args`, jailed when `jail` is given, streaming its output to `logs`.
    async fn run_jailed(
        &self,
        program: &Path,
        args: &[&std::ffi::OsStr],
        jail: Option<&mut BuildJail<'_>>,
        logs: &LogSink,
    ) -> Result<(bool, String), EnvironmentError> {
        // The jail's filter descriptor: open until the step has been spawned, in `run_streaming`.
        let mut seccomp = None;
        let mut command = match jail {
            None => {
                let mut command = Command::new(program);
                command.args(args).env_remove("VIRTUAL_ENV").env_remove("CONDA_PREFIX");
                command
            }
            Some(jail) => {
                let read_only: Vec<&Path> = jail.read_only.iter().map(PathBuf::as_path).collect();
                let writable: Vec<&Path> = jail.writable.iter().map(PathBuf::as_path).collect();
                let hostname = format!("build-{:08x}", rand::random::<u32>());
                let joined = jail.namespace.path().is_some();
                // The same system call filter as a worker's; a build has no /data, but a staging dir on btrfs would
                // take subvolumes too. One descriptor per step: bubblewrap reads it to its end.
                let filter = fal_sandbox::seccomp_filter_fd().map_err(|e| EnvironmentError::Sandbox(e.to_string()))?;
                let filter_fd = filter.as_raw_fd();
                seccomp = Some(filter);
                let grants = Grants {
                    read_only: &read_only,
                    writable: &writable,
                    // A build never sees any user's persistent storage.
                    binds: &[],
                    uid: jail.uid,
                    gid: jail.uid,
                    hostname: &hostname,
                    network: if joined { JailNetwork::Joined } else { JailNetwork::Loopback },
                    resolv_conf: jail.sandbox.network.as_ref().filter(|_| joined).map(|n| n.resolv_conf()),
                    hosts: None,
                    gpus: None,
                    seccomp: Some(filter_fd),
                };
                let args: Vec<String> = args.iter().map(|a| a.to_string_lossy().into_owned()).collect();
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                let (bwrap, argv) = jail.sandbox.jail.wrap(&grants, program, &args);
                let mut command = Command::new(bwrap);
                // A build inherits nothing of the server's environment; its cache is its uid's own.
                command
                    .args(argv)
                    .env_clear()
                    .env("PATH", "/usr/local/bin:/usr/bin:/bin")
                    .env("LANG", "C.UTF-8")
                    .env("HOME", "/tmp")
                    .env("UV_CACHE_DIR", &jail.writable[1])
                    // The cache and the staging dir are separate mounts: hardlinks between them cannot work.
                    .env("UV_LINK_MODE", "copy");
                for (name, value) in std::env::vars_os() {
                    // The admin's uv settings (its index, TLS roots, proxy) apply to builds too; where uv caches and
                    // which Python it may use are the jail's.
                    if name.to_str().is_some_and(passes_into_builds) {
                        command.env(name, value);
                    }
                }
                let setup = ProcessSetup::new(None, jail.cgroup.as_ref())
                    .in_network(jail.netns.as_ref().map(|f| f.as_raw_fd()))
                    .inheriting(Some(filter_fd));
                // SAFETY: `apply` only makes async-signal-safe system calls on descriptors that outlive the spawn.
                unsafe {
                    command.pre_exec(move || setup.apply());
                }
                command
            }
        };
        command
            .env("UV_PYTHON_DOWNLOADS", "never")
            .env("UV_NO_PROGRESS", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let ran = run_streaming(command, program, logs).await;
        drop(seccomp);
        ran
    }
}

const GIB: f64 = (1u64 << 30) as f64;
/// How often a build's disk use is measured.
const DISK_POLL: Duration = Duration::from_millis(500);

/// Resolves once the build's disk use passes `limit` bytes: what `staging` holds plus what `caches` grew by since
/// the build began. Measured every [`DISK_POLL`] (a build writing fast may pass the limit by what it writes in that
/// time before it is stopped).
async fn disk_watch(staging: PathBuf, caches: Vec<PathBuf>, limit: u64) {
    let measure = |paths: Vec<PathBuf>| async move {
        tokio::task::spawn_blocking(move || paths.iter().map(|p| disk_usage(p)).collect::<Vec<u64>>())
            .await
            .unwrap_or_default()
    };
    let before = measure(caches.clone()).await;
    loop {
        tokio::time::sleep(DISK_POLL).await;
        let now = measure([staging.clone()].into_iter().chain(caches.iter().cloned()).collect()).await;
        let grown: u64 = now.iter().skip(1).zip(&before).map(|(now, before)| now.saturating_sub(*before)).sum();
        if now.first().copied().unwrap_or(0) + grown > limit {
            return;
        }
    }
}

/// The disk space the tree at `root` takes (its blocks), not following symbolic links; what cannot be read counts
/// nothing.
fn disk_usage(root: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut pending = vec![root.to_path_buf()];
    while let Some(path) = pending.pop() {
        let Ok(metadata) = fs::symlink_metadata(&path) else { continue };
        total += metadata.blocks() * 512;
        if metadata.is_dir() {
            if let Ok(entries) = fs::read_dir(&path) {
                pending.extend(entries.flatten().map(|e| e.path()));
            }
        }
    }
    total
}

/// What a build step asks of `uv pip install`.
#[derive(Debug, Clone, Copy)]
struct InstallMode {
    /// `--only-binary :all:`: no build backend runs.
    wheels_only: bool,
    /// `--compile-bytecode` (jailed builds only), which starts the new environment's Python.
    compile: bool,
}

impl InstallMode {
    /// A user's own build: whatever its requirements need.
    const USER: Self = Self { wheels_only: false, compile: true };
    /// The shared uid's step: nothing of the packages runs (it compiles apart, without `site`).
    const SHARED: Self = Self { wheels_only: true, compile: false };
}

impl BuildJail<'_> {
    /// Removes its cgroup (killing what is left in it) and its network namespace.
    async fn release(self) {
        let BuildJail { cgroup, namespace, .. } = self;
        let _ = tokio::task::spawn_blocking(move || drop((cgroup, namespace))).await;
    }
}

/// Makes `to` a copy of the tree at `from` whose files are hard links to `from`'s (directories and symbolic links are
/// made anew, with the same modes and targets).
fn link_tree(from: &Path, to: &Path) -> Result<(), EnvironmentError> {
    let io = |path: &Path, source| EnvironmentError::Io { path: path.to_path_buf(), source };
    if to.exists() {
        fs::remove_dir_all(to).map_err(|e| io(to, e))?;
    }
    let mut pending = vec![(from.to_path_buf(), to.to_path_buf())];
    while let Some((source, target)) = pending.pop() {
        let mode = fs::symlink_metadata(&source).map_err(|e| io(&source, e))?.permissions();
        fs::create_dir(&target).map_err(|e| io(&target, e))?;
        fs::set_permissions(&target, mode).map_err(|e| io(&target, e))?;
        for entry in fs::read_dir(&source).map_err(|e| io(&source, e))? {
            let entry = entry.map_err(|e| io(&source, e))?;
            let (path, linked) = (entry.path(), target.join(entry.file_name()));
            let kind = entry.file_type().map_err(|e| io(&path, e))?;
            if kind.is_dir() {
                pending.push((path, linked));
            } else if kind.is_symlink() {
                let points_at = fs::read_link(&path).map_err(|e| io(&path, e))?;
                std::os::unix::fs::symlink(points_at, &linked).map_err(|e| io(&linked, e))?;
            } else {
                fs::hard_link(&path, &linked).map_err(|e| io(&linked, e))?;
            }
        }
    }
    // The environment's root is walkable by its workers (of any uid).
    fs::set_permissions(to, fs::Permissions::from_mode(0o755)).map_err(|e| io(to, e))
}

/// Gives `root` and everything below it to `uid` (symbolic links themselves, never what they point at).
fn chown_tree(root: &Path, uid: u32) -> Result<(), EnvironmentError> {
    let io = |path: &Path, source| EnvironmentError::Io { path: path.to_path_buf(), source };
    std::os::unix::fs::lchown(root, Some(uid), Some(uid)).map_err(|e| io(root, e))?;
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).map_err(|e| io(&dir, e))? {
            let entry = entry.map_err(|e| io(&dir, e))?;
            let path = entry.path();
            std::os::unix::fs::lchown(&path, Some(uid), Some(uid)).map_err(|e| io(&path, e))?;
            if entry.file_type().map_err(|e| io(&path, e))?.is_dir() {
                pending.push(path);
            }
        }
    }
    Ok(())
}

/// The interpreter a build uses, and its installation (what a worker's jail mounts).
#[derive(Debug, Clone)]
pub(crate) struct Interpreter {
    pub path: PathBuf,
    pub base_prefix: PathBuf,
}

/// Whether the server's variable `name` reaches its jailed builds.
fn passes_into_builds(name: &str) -> bool {
    let proxy = ["http_proxy", "https_proxy", "all_proxy", "no_proxy"].iter().any(|p| name.eq_ignore_ascii_case(p));
    let uv = name.starts_with("UV_")
        && !matches!(name, "UV_CACHE_DIR" | "UV_LINK_MODE" | "UV_PYTHON_DOWNLOADS")
        && !name.starts_with("UV_PYTHON_INSTALL");
    proxy || uv || matches!(name, "SSL_CERT_FILE" | "SSL_CERT_DIR")
}

fn record_path(envs: &Path, key: &str) -> PathBuf {
    envs.join(".records").join(key)
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
