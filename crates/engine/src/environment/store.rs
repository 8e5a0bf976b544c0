//! Environments on disk: which there are, how much disk each takes, when each was last used and whether it is in
//! use; removing them; and the eviction policy that picks which to remove.
//!
//! Whoever touches an environment (the server, the local host's engine in a user's process, `fal-serverless envs`)
//! agrees with the others through `flock` on one file per environment, `<tenant>/.locks/<key>.use`:
//! * whoever uses an environment holds it shared: a live worker for its whole life; a call from before it looks for
//!   its environment until its worker has started, the build included; a user's build while it links the
//!   environment users share;
//! * whoever removes one takes it exclusively without waiting, and leaves the environment alone when it cannot: an
//!   environment in use is never removed.
//!
//! The lock file's mtime is when the environment was last used: it is set when a worker starts in it and when one
//! ends (never on warm calls). Environments built before these files existed fall back to their record's mtime.
//!
//! Removing: under the exclusive lock the environment is renamed into `<tenant>/.trash/` (gone for everyone at once:
//! the next call builds it anew), its record and lock files are deleted, the lock is released, and only then is the
//! renamed tree deleted, holding a lock on its directory that tells a later sweep it is being deleted. A sweep
//! deletes trees an interrupted removal left there, and staging dirs of interrupted builds.
//!
//! Sizes: a user's environment built from wheels alone is a hard-linked copy of the environment users share of the
//! same key (`.shared/<key>`), so they take that disk once. An environment's size is its own blocks (files of one
//! link, directories, symbolic links) plus an even share of the blocks it links with the others of its key; the
//! sizes add up to what the environments take. Those linked blocks are freed only when every environment of the key
//! is removed, and a shared environment no user's environment links any more is removed too.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use crate::error::EnvironmentError;

/// The tenant directory of environments built by the shared uid, of which users' environments are linked copies. Not
/// a valid tenant name, so no user's environments can be there.
pub(crate) const SHARED_TENANT: &str = ".shared";
const LOCKS: &str = ".locks";
const RECORDS: &str = ".records";
const TRASH: &str = ".trash";
const GIB: u64 = 1 << 30;

/// When environments are removed (`[environments]` in the server's config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EnvironmentPolicy {
    /// An environment no worker used for this long is removed.
    pub max_unused: Duration,
    /// All environments together; past it, the least recently used are removed. `None`: half the file system the
    /// environments are on.
    pub disk_budget_bytes: Option<u64>,
    /// Environments one user may have; a build past it removes the user's own least recently used first.
    pub max_per_user: usize,
    /// The disk one user's environments may take. `None`: a quarter of the budget.
    pub disk_per_user_bytes: Option<u64>,
}

impl Default for EnvironmentPolicy {
    /// 30 days unused; half the file system for all, a quarter of that per user; 50 environments per user.
    fn default() -> Self {
        Self {
            max_unused: Duration::from_secs(30 * 24 * 3600),
            disk_budget_bytes: None,
            max_per_user: 50,
            disk_per_user_bytes: None,
        }
    }
}

/// A policy with its defaults worked out for one directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    pub max_unused: Duration,
    pub budget: u64,
    pub max_per_user: usize,
    pub per_user: u64,
}

impl EnvironmentPolicy {
    /// The limits for environments in `dir`: the budget's default is half the file system `dir` is on.
    pub(crate) fn limits(&self, dir: &Path) -> Limits {
        let budget = self.disk_budget_bytes.unwrap_or_else(|| file_system_size(dir).map_or(u64::MAX, |size| size / 2));
        Limits {
            max_unused: self.max_unused,
            budget,
            max_per_user: self.max_per_user,
            per_user: self.disk_per_user_bytes.unwrap_or(budget / 4),
        }
    }

    /// The disk budget for environments in `dir`, its default worked out.
    pub fn disk_budget(&self, dir: &Path) -> u64 {
        self.limits(dir).budget
    }
}

/// The size of the file system `path` (or its nearest existing parent) is on.
fn file_system_size(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let existing = path.ancestors().find(|p| p.exists())?;
    let c_path = std::ffi::CString::new(existing.as_os_str().as_bytes()).ok()?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c_path` is a valid C string, and `stat` is written by statvfs before it is read (only on success).
    let stat = unsafe {
        if libc::statvfs(c_path.as_ptr(), stat.as_mut_ptr()) != 0 {
            return None;
        }
        stat.assume_init()
    };
    Some((stat.f_blocks as u64).saturating_mul(stat.f_frsize as u64))
}

/// One environment, as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvironmentInfo {
    /// Its user (the tenant's directory name), or `.shared` for an environment users share.
    pub tenant: String,
    pub key: String,
    /// The disk it takes: its own blocks plus its share of those it links with the others of its key.
    pub bytes: u64,
    /// When a worker last started or ended in it.
    pub last_used: SystemTime,
    /// A live worker uses it, or a build or call is starting on it.
    pub in_use: bool,
}

impl EnvironmentInfo {
    /// Whether it is an environment users share (of which their environments are linked copies).
    pub fn is_shared(&self) -> bool {
        self.tenant == SHARED_TENANT
    }
}

/// Why an environment is removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvictionReason {
    /// Unused for longer than the policy's `max_unused`.
    Unused,
    /// The environments together were over the disk budget; this was the least recently used.
    OverBudget,
    /// Its user had more environments than `max_per_user`.
    UserCount,
    /// Its user's environments took more disk than `disk_per_user`.
    UserDisk,
    /// A shared environment whose last user's environment was removed.
    NoLongerShared,
}

impl std::fmt::Display for EvictionReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Unused => "unused for longer than the policy keeps environments",
            Self::OverBudget => "least recently used while the environments were over their disk budget",
            Self::UserCount => "least recently used of a user over the per-user count",
            Self::UserDisk => "least recently used of a user over the per-user disk",
            Self::NoLongerShared => "shared, and no user's environment links it any more",
        })
    }
}

/// An environment chosen for removal, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Eviction {
    pub environment: EnvironmentInfo,
    pub reason: EvictionReason,
}

/// What a prune did.
#[derive(Debug, Default)]
pub struct PruneReport {
    /// Removed (or, for a dry run, chosen).
    pub evicted: Vec<Eviction>,
    /// Chosen, but not removed: in use by the time of removal, or it could not be deleted (with why).
    pub failed: Vec<(Eviction, String)>,
    /// Trees of interrupted removals and builds deleted.
    pub swept: usize,
}

impl PruneReport {
    /// The sizes of what it removed, as listed (a linked environment frees less while others link the same files).
    pub fn removed_bytes(&self) -> u64 {
        self.evicted.iter().map(|e| e.environment.bytes).sum()
    }
}

/// What a removal removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removal {
    pub environment: EnvironmentInfo,
    /// The shared environment of the same key, removed with it since no user's environment links it any more.
    pub shared_too: Option<EnvironmentInfo>,
}

#[derive(Debug, thiserror::Error)]
pub enum RemoveError {
    #[error(
        "environment {tenant}/{key} is in use: a live worker runs in it, or a build or a call is starting on it; it \
         can be removed once its workers have stopped (warm workers stop when their keep_alive ends; \
         `fal-serverless workers` lists them)"
    )]
    InUse { tenant: String, key: String },
    #[error("there is no environment {tenant}/{key} (`fal-serverless envs list` shows those there are)")]
    NotFound { tenant: String, key: String },
    #[error("cannot remove the environment at {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A user over a per-user cap whose environments are all in use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CapReached {
    Count { count: usize, limit: usize },
    Disk { bytes: u64, limit: u64 },
}

impl CapReached {
    pub fn into_error(self) -> EnvironmentError {
        match self {
            Self::Count { count, limit } => EnvironmentError::UserEnvironments { count, limit },
            Self::Disk { bytes, limit } => EnvironmentError::UserDisk {
                gigabytes: bytes as f64 / GIB as f64,
                limit_gigabytes: limit as f64 / GIB as f64,
            },
        }
    }
}

/// The environments of one directory (`<dir>/<tenant>/<key>`).
#[derive(Debug)]
pub struct EnvironmentStore {
    envs: PathBuf,
    /// Sizes measured, by root, with the root's identity (inode and mtime): an environment does not change once
    /// built (workers of a server only read it), so each is measured once; a rebuilt one is another directory.
    sizes: Mutex<HashMap<PathBuf, (Identity, Usage)>>,
}

/// The environment's share of the disk, in blocks' bytes: `own`, which removing it frees, and `linked`: files it
/// shares with other environments (hard links), freed only with the last of them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Usage {
    pub own: u64,
    pub linked: u64,
}

/// What tells one directory at a path from another made there later: its inode and its mtime (inodes are reused).
type Identity = (u64, i64, i64);

/// An environment as the policy sees it.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub tenant: String,
    pub key: String,
    pub usage: Usage,
    pub last_used: SystemTime,
    pub in_use: bool,
}

impl Entry {
    fn is_shared(&self) -> bool {
        self.tenant == SHARED_TENANT
    }
}

/// A lock on an environment's use (see the module's doc), held as long as this lives; dropped, it records the time
/// as the environment's last use.
#[derive(Debug)]
pub(crate) struct EnvUse {
    file: File,
    _counted: Counted,
}

impl Drop for EnvUse {
    fn drop(&mut self) {
        // Setting a time on an open file: a system call that does not wait on anything.
        let _ = self.file.set_modified(SystemTime::now());
    }
}

/// The use locks this process holds, by lock file, counted. `flock` keeps a process's own locks apart too, except
/// where a file system emulates it with POSIX locks (NFS), under which a process's locks never conflict with each
/// other: removals in this process look here as well, holding this while they check, lock and rename.
static HELD: Mutex<BTreeMap<PathBuf, usize>> = Mutex::new(BTreeMap::new());

type Held = std::sync::MutexGuard<'static, BTreeMap<PathBuf, usize>>;

fn held() -> Held {
    HELD.lock().unwrap_or_else(|e| e.into_inner())
}

/// The use lock at `path`, exclusively, for a removal: `None` when this process or another uses the environment.
/// The returned guard keeps this process's users out until the removal has renamed the environment away.
fn take_for_removal(path: &Path) -> io::Result<Option<(File, Held)>> {
    let held = held();
    if held.contains_key(path) {
        return Ok(None);
    }
    Ok(lock_file(path, Mode::Exclusive, false)?.map(|file| (file, held)))
}

#[derive(Debug, Clone, Copy)]
enum Mode {
    Shared,
    Exclusive,
}

/// Opens (creating it) the lock file at `path` and locks it; `None` when `wait` is false and another holds it in a
/// conflicting mode. A remover deletes the file after it took it: a lock on a file no longer at `path` locks nothing,
/// so then it is opened and locked again.
fn lock_file(path: &Path, mode: Mode, wait: bool) -> io::Result<Option<File>> {
    loop {
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
        let attempt = match (mode, wait) {
            (Mode::Shared, true) => file.lock_shared().map_err(TryLockError::Error),
            (Mode::Exclusive, true) => file.lock().map_err(TryLockError::Error),
            (Mode::Shared, false) => file.try_lock_shared(),
            (Mode::Exclusive, false) => file.try_lock(),
        };
        match attempt {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => return Ok(None),
            Err(TryLockError::Error(error)) => return Err(error),
        }
        let ours = file.metadata()?;
        match fs::metadata(path) {
            Ok(now) if now.ino() == ours.ino() && now.dev() == ours.dev() => return Ok(Some(file)),
            Ok(_) => continue,
            Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
            Err(error) => return Err(error),
        }
    }
}

fn use_lock_path(envs: &Path, tenant: &str, key: &str) -> PathBuf {
    envs.join(tenant).join(LOCKS).join(format!("{key}.use"))
}

/// Takes `tenant`'s environment `key` in `envs` as in use (shared), marking it used now; waits (on a blocking thread)
/// only while a removal holds it, which is brief.
pub(crate) async fn use_environment(envs: &Path, tenant: &str, key: &str) -> Result<EnvUse, EnvironmentError> {
    let path = use_lock_path(envs, tenant, key);
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| EnvironmentError::Io { path, source }
    };
    if let Some(locks) = path.parent() {
        fs::create_dir_all(locks).map_err(io(locks))?;
    }
    // Counted before it is locked: a removal in this process that has not looked yet sees it; one that has, has
    // renamed the environment away by the time this gets the lock.
    *held().entry(path.clone()).or_default() += 1;
    let counted = Counted(path.clone());
    let file = match lock_file(&path, Mode::Shared, false).map_err(io(&path))? {
        Some(file) => file,
        None => {
            let waited = path.clone();
            tokio::task::spawn_blocking(move || lock_file(&waited, Mode::Shared, true))
                .await
                .map_err(|e| EnvironmentError::Io { path: path.clone(), source: io::Error::other(e) })?
                .map_err(io(&path))?
                .ok_or_else(|| EnvironmentError::Io { path: path.clone(), source: io::Error::other("not locked") })?
        }
    };
    let _ = file.set_modified(SystemTime::now());
    Ok(EnvUse { file, _counted: counted })
}

/// One use counted in [`HELD`], taken back when dropped.
#[derive(Debug)]
struct Counted(PathBuf);

impl Drop for Counted {
    fn drop(&mut self) {
        let mut held = held();
        if let Some(count) = held.get_mut(&self.0) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.0);
            }
        }
    }
}

impl EnvironmentStore {
    /// The environments of `envs` (`<envs>/<tenant>/<key>`): a server's `<data-dir>/envs`, the local host's
    /// `<cache-dir>/envs`.
    pub fn new(envs: PathBuf) -> Self {
        Self { envs, sizes: Mutex::default() }
    }

    pub fn dir(&self) -> &Path {
        &self.envs
    }

    /// Every environment (users' and shared), by tenant and key.
    pub fn list(&self) -> io::Result<Vec<EnvironmentInfo>> {
        let entries = self.scan()?;
        let sizes = shares(&entries);
        Ok(entries.into_iter().zip(sizes).map(|(entry, bytes)| info(entry, bytes)).collect())
    }

    /// Removes `tenant`'s environment `key`, refusing one in use; the shared environment of its key too when no
    /// user's environment links it any more.
    pub fn remove(&self, tenant: &str, key: &str) -> Result<Removal, RemoveError> {
        let not_found = || RemoveError::NotFound { tenant: tenant.to_string(), key: key.to_string() };
        if !(plain_name(tenant) || tenant == SHARED_TENANT) || !plain_name(key) {
            return Err(not_found());
        }
        let listed = self.list().map_err(|source| RemoveError::Io { path: self.envs.clone(), source })?;
        let environment = listed.iter().find(|e| e.tenant == tenant && e.key == key).cloned().ok_or_else(not_found)?;
        self.remove_one(tenant, key)?;
        let mut shared_too = None;
        let linked_elsewhere = listed.iter().any(|e| !e.is_shared() && e.key == key && e.tenant != tenant);
        if tenant != SHARED_TENANT && !linked_elsewhere {
            if let Some(shared) = listed.iter().find(|e| e.is_shared() && e.key == key) {
                // Best effort: one in use (a build linking it right now) stays for the next prune.
                if self.remove_one(SHARED_TENANT, key).is_ok() {
                    shared_too = Some(shared.clone());
                }
            }
        }
        Ok(Removal { environment, shared_too })
    }

    /// Applies `policy` now: chooses what to remove (of `only`'s environments, if given) and, unless `dry_run`,
    /// removes it, after sweeping what interrupted removals and builds left.
    pub fn prune(
        &self,
        policy: &EnvironmentPolicy,
        now: SystemTime,
        only: Option<&str>,
        dry_run: bool,
    ) -> io::Result<PruneReport> {
        let swept = if dry_run { 0 } else { self.sweep() };
        let entries = self.scan()?;
        let limits = policy.limits(&self.envs);
        let removable = |entry: &Entry| only.is_none_or(|tenant| entry.tenant == tenant || entry.is_shared());
        let chosen = select(&entries, &limits, now, removable);
        let mut report = self.evict(&entries, chosen, dry_run);
        report.swept = swept;
        Ok(report)
    }

    /// Before a build of a new environment for `tenant`: removes the tenant's own least recently used environments
    /// not in use while it is at (or over) a per-user cap. Fails when it stays there, every one being in use.
    pub(crate) fn make_room(
        &self,
        policy: &EnvironmentPolicy,
        tenant: &str,
    ) -> io::Result<Result<Vec<Eviction>, CapReached>> {
        let entries = self.scan()?;
        let limits = policy.limits(&self.envs);
        Ok(match select_room(&entries, &limits, tenant) {
            Ok(chosen) => {
                let report = self.evict(&entries, chosen, false);
                Ok(report.evicted)
            }
            Err(cap) => Err(cap),
        })
    }

    fn evict(&self, entries: &[Entry], chosen: Vec<(usize, EvictionReason)>, dry_run: bool) -> PruneReport {
        let sizes = shares(entries);
        let mut report = PruneReport::default();
        for (index, reason) in chosen {
            let entry = &entries[index];
            let eviction = Eviction { environment: info(entry.clone(), sizes[index]), reason };
            if dry_run {
                report.evicted.push(eviction);
                continue;
            }
            match self.remove_one(&entry.tenant, &entry.key) {
                Ok(()) => report.evicted.push(eviction),
                // Removed meanwhile by another: what was wanted.
                Err(RemoveError::NotFound { .. }) => {}
                Err(error) => report.failed.push((eviction, error.to_string())),
            }
        }
        report
    }

    /// Removes one environment (see the module's doc for the steps and why in that order).
    fn remove_one(&self, tenant: &str, key: &str) -> Result<(), RemoveError> {
        let dir = self.envs.join(tenant);
        let root = dir.join(key);
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| RemoveError::Io { path, source }
        };
        let not_found = || RemoveError::NotFound { tenant: tenant.to_string(), key: key.to_string() };
        if !root.is_dir() {
            return Err(not_found());
        }
        let locks = dir.join(LOCKS);
        fs::create_dir_all(&locks).map_err(io(&locks))?;
        let use_path = locks.join(format!("{key}.use"));
        let Some((lock, users_here)) = take_for_removal(&use_path).map_err(io(&use_path))? else {
            return Err(RemoveError::InUse { tenant: tenant.to_string(), key: key.to_string() });
        };
        if !root.is_dir() {
            return Err(not_found());
        }
        let trash = dir.join(TRASH);
        fs::create_dir_all(&trash).map_err(io(&trash))?;
        let doomed = trash.join(format!("{key}.{}.{}", std::process::id(), unique()));
        // Locked before the rename, so no sweep ever finds it unlocked in the trash while this deletes it.
        let tree = File::open(&root).map_err(io(&root))?;
        tree.lock().map_err(io(&root))?;
        fs::rename(&root, &doomed).map_err(io(&root))?;
        // The build lock goes before the use lock: a build only starts under a use lock of its own, so nobody holds
        // it now; once the use lock's file is gone, one may.
        for path in [dir.join(RECORDS).join(key), locks.join(format!("{key}.lock")), use_path] {
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                Err(error) => return Err(RemoveError::Io { path, source: error }),
            }
        }
        drop((lock, users_here));
        self.sizes.lock().unwrap_or_else(|e| e.into_inner()).remove(&root);
        let deleted = fs::remove_dir_all(&doomed).map_err(io(&doomed));
        drop(tree);
        deleted
    }

    /// Deletes what interrupted removals left in `.trash/` and the staging dirs (`.tmp-<key>-<pid>`) of interrupted
    /// builds, none of which is ever used again. Returns how many it deleted.
    pub fn sweep(&self) -> usize {
        let mut swept = 0;
        for (_, dir) in self.tenant_dirs() {
            if let Ok(trash) = fs::read_dir(dir.join(TRASH)) {
                for entry in trash.flatten() {
                    let path = entry.path();
                    // Locked: a removal is deleting it right now.
                    let Ok(tree) = File::open(&path) else { continue };
                    if tree.try_lock().is_ok() && fs::remove_dir_all(&path).is_ok() {
                        swept += 1;
                    }
                }
            }
            let Ok(entries) = fs::read_dir(&dir) else { continue };
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let Some(key) = name.strip_prefix(".tmp-").and_then(|rest| rest.rsplit_once('-')).map(|(k, _)| k)
                else {
                    continue;
                };
                // A build of the key holds its use lock (shared) from before its staging dir exists until after
                // it is renamed into place: taken exclusively, no build of the key runs.
                let use_path = dir.join(LOCKS).join(format!("{key}.use"));
                if !plain_name(key) || fs::create_dir_all(dir.join(LOCKS)).is_err() {
                    continue;
                }
                let Ok(Some((lock, users_here))) = take_for_removal(&use_path) else { continue };
                // Into the trash (locked, as a removal's), so that a build of the key may start at once.
                let doomed = dir.join(TRASH).join(format!("{name}.{}", unique()));
                let Ok(tree) = File::open(entry.path()) else { continue };
                let moved = tree
                    .lock()
                    .and_then(|()| fs::create_dir_all(dir.join(TRASH)))
                    .and_then(|()| fs::rename(entry.path(), &doomed));
                drop((lock, users_here));
                if moved.is_ok() && fs::remove_dir_all(&doomed).is_ok() {
                    swept += 1;
                }
                drop(tree);
            }
        }
        swept
    }

    /// Tenant directories: users' (plain names) and the shared one.
    fn tenant_dirs(&self) -> Vec<(String, PathBuf)> {
        let Ok(entries) = fs::read_dir(&self.envs) else { return Vec::new() };
        let mut dirs: Vec<(String, PathBuf)> = entries
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| e.file_name().into_string().ok().map(|name| (name, e.path())))
            .filter(|(name, _)| name == SHARED_TENANT || plain_name(name))
            .collect();
        dirs.sort();
        dirs
    }

    /// Every environment with what the policy needs to know of it. A missing directory has none.
    fn scan(&self) -> io::Result<Vec<Entry>> {
        match fs::metadata(&self.envs) {
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(error) => return Err(error),
            Ok(_) => {}
        }
        // Unreadable is an error the caller reports (a data dir of another user), not an empty list.
        fs::read_dir(&self.envs)?;
        let mut found = Vec::new();
        for (tenant, dir) in self.tenant_dirs() {
            let mut keys: Vec<(String, PathBuf, Identity)> = fs::read_dir(&dir)?
                .flatten()
                .filter_map(|e| {
                    let name = e.file_name().into_string().ok().filter(|n| plain_name(n))?;
                    let metadata = fs::symlink_metadata(e.path()).ok().filter(fs::Metadata::is_dir)?;
                    Some((name, e.path(), (metadata.ino(), metadata.mtime(), metadata.mtime_nsec())))
                })
                .collect();
            keys.sort();
            for (key, root, identity) in keys {
                let usage = self.usage(&root, identity);
                let mtime = |path: PathBuf| fs::metadata(path).and_then(|m| m.modified()).ok();
                let last_used = [
                    mtime(dir.join(LOCKS).join(format!("{key}.use"))),
                    mtime(dir.join(RECORDS).join(&key)),
                    mtime(root.clone()),
                ]
                .into_iter()
                .flatten()
                .max()
                .unwrap_or(SystemTime::UNIX_EPOCH);
                let in_use = in_use(&dir.join(LOCKS).join(format!("{key}.use")));
                found.push(Entry { tenant: tenant.clone(), key, usage, last_used, in_use });
            }
        }
        Ok(found)
    }

    fn usage(&self, root: &Path, identity: Identity) -> Usage {
        let known = self.sizes.lock().unwrap_or_else(|e| e.into_inner()).get(root).copied();
        match known {
            Some((measured, usage)) if measured == identity => usage,
            _ => {
                let usage = tree_usage(root);
                self.sizes.lock().unwrap_or_else(|e| e.into_inner()).insert(root.to_path_buf(), (identity, usage));
                usage
            }
        }
    }
}

/// Whether someone holds the use lock at `path` (without creating it: none there, nobody holds it).
fn in_use(path: &Path) -> bool {
    if held().contains_key(path) {
        return true;
    }
    match OpenOptions::new().read(true).open(path) {
        Ok(file) => matches!(file.try_lock(), Err(TryLockError::WouldBlock)),
        Err(_) => false,
    }
}

/// A letters, digits, `-`, `_` name: a tenant's or a key's (never `.`, `..` or a path).
fn plain_name(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// A number no other removal of this process uses.
fn unique() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    nanos.wrapping_add(NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
}

/// The blocks the tree at `root` takes, not following symbolic links: files with more than one link count as
/// `linked`, the rest as `own`. What cannot be read counts nothing.
pub(crate) fn tree_usage(root: &Path) -> Usage {
    let mut usage = Usage::default();
    let mut pending = vec![root.to_path_buf()];
    while let Some(path) = pending.pop() {
        let Ok(metadata) = fs::symlink_metadata(&path) else { continue };
        let bytes = metadata.blocks() * 512;
        if metadata.is_file() && metadata.nlink() > 1 {
            usage.linked += bytes;
        } else {
            usage.own += bytes;
        }
        if metadata.is_dir() {
            if let Ok(entries) = fs::read_dir(&path) {
                pending.extend(entries.flatten().map(|e| e.path()));
            }
        }
    }
    usage
}

fn info(entry: Entry, bytes: u64) -> EnvironmentInfo {
    EnvironmentInfo { tenant: entry.tenant, key: entry.key, bytes, last_used: entry.last_used, in_use: entry.in_use }
}

/// Each entry's size: its own blocks plus an even share of its key's linked blocks among the entries of the key that
/// link them.
fn shares(entries: &[Entry]) -> Vec<u64> {
    let mut linking: HashMap<&str, u64> = HashMap::new();
    for entry in entries.iter().filter(|e| e.usage.linked > 0) {
        *linking.entry(entry.key.as_str()).or_default() += 1;
    }
    entries.iter().map(|e| e.usage.own + linking.get(e.key.as_str()).map_or(0, |&n| e.usage.linked / n)).collect()
}

/// The environments chosen so far, and what the rest take.
struct Selection<'a> {
    entries: &'a [Entry],
    sizes: Vec<u64>,
    chosen: Vec<(usize, EvictionReason)>,
    is_chosen: Vec<bool>,
    removable: Vec<bool>,
    /// What the environments not chosen take: their own blocks, and the linked blocks of each key while one of its
    /// linking environments is not chosen.
    total: u64,
    /// Per key that links: its linked blocks (the most any of its environments links) and how many of its linking
    /// environments are not chosen.
    groups: HashMap<&'a str, (u64, usize)>,
}

impl<'a> Selection<'a> {
    fn new(entries: &'a [Entry], removable: impl Fn(&Entry) -> bool) -> Self {
        let mut groups: HashMap<&str, (u64, usize)> = HashMap::new();
        for entry in entries.iter().filter(|e| e.usage.linked > 0) {
            let group = groups.entry(entry.key.as_str()).or_default();
            group.0 = group.0.max(entry.usage.linked);
            group.1 += 1;
        }
        let total = entries.iter().map(|e| e.usage.own).sum::<u64>() + groups.values().map(|g| g.0).sum::<u64>();
        Self {
            entries,
            sizes: shares(entries),
            chosen: Vec::new(),
            is_chosen: vec![false; entries.len()],
            removable: entries.iter().map(|e| removable(e) && !e.in_use).collect(),
            total,
            groups,
        }
    }

    fn choose(&mut self, index: usize, reason: EvictionReason) {
        if self.is_chosen[index] || !self.removable[index] {
            return;
        }
        self.is_chosen[index] = true;
        self.chosen.push((index, reason));
        let entry = &self.entries[index];
        self.total = self.total.saturating_sub(entry.usage.own);
        if entry.usage.linked > 0 {
            if let Some(group) = self.groups.get_mut(entry.key.as_str()) {
                group.1 = group.1.saturating_sub(1);
                if group.1 == 0 {
                    self.total = self.total.saturating_sub(group.0);
                }
            }
        }
        if !entry.is_shared() {
            self.choose_orphans(&entry.key);
        }
    }

    /// The shared environment of `key`, once no user's environment of the key is left.
    fn choose_orphans(&mut self, key: &str) {
        let left = (0..self.entries.len())
            .any(|i| !self.is_chosen[i] && !self.entries[i].is_shared() && self.entries[i].key == key);
        if !left {
            let shared: Vec<usize> = (0..self.entries.len())
                .filter(|&i| self.entries[i].is_shared() && self.entries[i].key == key)
                .collect();
            for index in shared {
                self.choose(index, EvictionReason::NoLongerShared);
            }
        }
    }

    /// Users' environments that may still be chosen, least recently used first.
    fn candidates(&self, tenant: Option<&str>) -> Vec<usize> {
        let mut found: Vec<usize> = (0..self.entries.len())
            .filter(|&i| self.removable[i] && !self.is_chosen[i] && !self.entries[i].is_shared())
            .filter(|&i| tenant.is_none_or(|t| self.entries[i].tenant == t))
            .collect();
        found.sort_by(|&a, &b| {
            let (a, b) = (&self.entries[a], &self.entries[b]);
            (a.last_used, &a.tenant, &a.key).cmp(&(b.last_used, &b.tenant, &b.key))
        });
        found
    }

    /// `tenant`'s environments not chosen, and their sizes together.
    fn held_by(&self, tenant: &str) -> (usize, u64) {
        (0..self.entries.len())
            .filter(|&i| !self.is_chosen[i] && !self.entries[i].is_shared() && self.entries[i].tenant == tenant)
            .fold((0, 0), |(count, bytes), i| (count + 1, bytes + self.sizes[i]))
    }
}

/// What `limits` removes of `entries` at `now`, in order, with why: shared environments no user's links; those unused
/// longer than `max_unused`; each user's least recently used while the user is over a per-user cap; then the least
/// recently used of all while they are over the budget. Never one in use, nor one `removable` refuses.
pub(crate) fn select(
    entries: &[Entry],
    limits: &Limits,
    now: SystemTime,
    removable: impl Fn(&Entry) -> bool,
) -> Vec<(usize, EvictionReason)> {
    let mut selection = Selection::new(entries, removable);
    let keys: Vec<&str> = entries.iter().filter(|e| e.is_shared()).map(|e| e.key.as_str()).collect();
    for key in keys {
        selection.choose_orphans(key);
    }
    for index in selection.candidates(None) {
        if now.duration_since(entries[index].last_used).unwrap_or_default() > limits.max_unused {
            selection.choose(index, EvictionReason::Unused);
        }
    }
    let tenants: BTreeMap<&str, ()> =
        entries.iter().filter(|e| !e.is_shared()).map(|e| (e.tenant.as_str(), ())).collect();
    for tenant in tenants.keys() {
        for index in selection.candidates(Some(tenant)) {
            let (count, bytes) = selection.held_by(tenant);
            let reason = if count > limits.max_per_user {
                EvictionReason::UserCount
            } else if bytes > limits.per_user {
                EvictionReason::UserDisk
            } else {
                break;
            };
            selection.choose(index, reason);
        }
    }
    for index in selection.candidates(None) {
        if selection.total <= limits.budget {
            break;
        }
        selection.choose(index, EvictionReason::OverBudget);
    }
    selection.chosen
}

/// What to remove of `tenant`'s environments for it to build one more within its caps: its least recently used not
/// in use while it has `max_per_user` or more, or takes `per_user` or more. `Err` when all in use and still there.
pub(crate) fn select_room(
    entries: &[Entry],
    limits: &Limits,
    tenant: &str,
) -> Result<Vec<(usize, EvictionReason)>, CapReached> {
    let mut selection = Selection::new(entries, |e| e.tenant == tenant || e.is_shared());
    let mut candidates = selection.candidates(Some(tenant)).into_iter();
    loop {
        let (count, bytes) = selection.held_by(tenant);
        let reason = if count >= limits.max_per_user {
            EvictionReason::UserCount
        } else if bytes >= limits.per_user {
            EvictionReason::UserDisk
        } else {
            return Ok(selection.chosen);
        };
        match candidates.next() {
            Some(index) => selection.choose(index, reason),
            None if reason == EvictionReason::UserCount => {
                return Err(CapReached::Count { count, limit: limits.max_per_user })
            }
            None => return Err(CapReached::Disk { bytes, limit: limits.per_user }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1 << 20;
    const DAY: Duration = Duration::from_secs(24 * 3600);

    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + DAY * 1000
    }

    /// An environment of `tenant` last used `days_ago`, taking `own` MB of its own and linking `linked` MB.
    fn entry(tenant: &str, key: &str, own: u64, linked: u64, days_ago: u64) -> Entry {
        Entry {
            tenant: tenant.into(),
            key: key.into(),
            usage: Usage { own: own * MB, linked: linked * MB },
            last_used: now() - DAY * days_ago as u32,
            in_use: false,
        }
    }

    fn limits() -> Limits {
        Limits { max_unused: DAY * 30, budget: u64::MAX, max_per_user: 100, per_user: u64::MAX }
    }

    fn names(entries: &[Entry], chosen: &[(usize, EvictionReason)]) -> Vec<String> {
        chosen.iter().map(|&(i, _)| format!("{}/{}", entries[i].tenant, entries[i].key)).collect()
    }

    #[test]
    fn environments_unused_past_the_limit_go_and_those_in_use_never_do() {
        let mut entries =
            vec![entry("alice", "a", 10, 0, 40), entry("alice", "b", 10, 0, 5), entry("bob", "c", 10, 0, 31)];
        entries.push(Entry { in_use: true, ..entry("bob", "d", 10, 0, 400) });
        let chosen = select(&entries, &limits(), now(), |_| true);
        assert_eq!(names(&entries, &chosen), ["alice/a", "bob/c"]);
        assert!(chosen.iter().all(|&(_, reason)| reason == EvictionReason::Unused));
    }

    #[test]
    fn over_the_budget_the_least_recently_used_go_first_until_it_fits() {
        let entries = vec![
            entry("alice", "a", 100, 0, 3),
            entry("bob", "b", 100, 0, 9),
            Entry { in_use: true, ..entry("carol", "c", 100, 0, 20) },
            entry("alice", "d", 100, 0, 1),
        ];
        let budget = Limits { budget: 250 * MB, ..limits() };
        let chosen = select(&entries, &budget, now(), |_| true);
        // 400 MB: bob's (9 days) and alice's a (3 days) go; carol's, older but in use, stays.
        assert_eq!(names(&entries, &chosen), ["bob/b", "alice/a"]);
        assert!(chosen.iter().all(|&(_, reason)| reason == EvictionReason::OverBudget));
        assert!(select(&entries, &Limits { budget: 400 * MB, ..limits() }, now(), |_| true).is_empty());
    }

    #[test]
    fn linked_blocks_are_freed_with_the_last_environment_of_their_key_and_the_shared_one_with_it() {
        // alice and bob link 300 MB from the shared environment of key k; carol's j is 100 MB of her own.
        let entries = vec![
            entry(SHARED_TENANT, "k", 1, 300, 10),
            entry("alice", "k", 1, 300, 8),
            entry("bob", "k", 1, 300, 2),
            entry("carol", "j", 100, 0, 5),
        ];
        assert_eq!(shares(&entries), [101 * MB, 101 * MB, 101 * MB, 100 * MB]);
        // 403 MB in all. Removing alice's frees 1 MB; carol's next frees 100: under 310 MB.
        let chosen = select(&entries, &Limits { budget: 310 * MB, ..limits() }, now(), |_| true);
        assert_eq!(names(&entries, &chosen), ["alice/k", "carol/j"]);
        // Under 100 MB bob's must go too, and with it the shared environment no user's links any more.
        let chosen = select(&entries, &Limits { budget: 100 * MB, ..limits() }, now(), |_| true);
        assert_eq!(names(&entries, &chosen), ["alice/k", "carol/j", "bob/k", ".shared/k"]);
        assert_eq!(chosen[3].1, EvictionReason::NoLongerShared);
    }

    #[test]
    fn a_shared_environment_no_user_links_goes_unless_a_build_is_linking_it() {
        let entries = vec![entry(SHARED_TENANT, "k", 1, 0, 0), entry("alice", "j", 1, 0, 0)];
        let chosen = select(&entries, &limits(), now(), |_| true);
        assert_eq!(names(&entries, &chosen), [".shared/k"]);
        let linking = [Entry { in_use: true, ..entries[0].clone() }, entries[1].clone()];
        assert!(select(&linking, &limits(), now(), |_| true).is_empty());
    }

    #[test]
    fn a_user_over_a_per_user_cap_loses_their_own_least_recently_used() {
        let entries = vec![
            entry("alice", "a", 10, 0, 3),
            entry("alice", "b", 10, 0, 2),
            entry("alice", "c", 10, 0, 1),
            entry("bob", "d", 10, 0, 9),
        ];
        let chosen = select(&entries, &Limits { max_per_user: 2, ..limits() }, now(), |_| true);
        assert_eq!(names(&entries, &chosen), ["alice/a"]);
        assert_eq!(chosen[0].1, EvictionReason::UserCount);
        let chosen = select(&entries, &Limits { per_user: 15 * MB, ..limits() }, now(), |_| true);
        assert_eq!(names(&entries, &chosen), ["alice/a", "alice/b"]);
        assert_eq!(chosen[0].1, EvictionReason::UserDisk);
        // Limited to bob's (`prune --user bob`): alice's stay whatever they take.
        let only_bob = select(&entries, &Limits { per_user: 5 * MB, ..limits() }, now(), |e| e.tenant == "bob");
        assert_eq!(names(&entries, &only_bob), ["bob/d"]);
    }

    #[test]
    fn room_for_a_build_comes_from_the_users_own_environments_or_the_cap_is_reported() {
        let entries = vec![
            entry("alice", "a", 10, 0, 3),
            Entry { in_use: true, ..entry("alice", "b", 10, 0, 9) },
            entry("bob", "c", 10, 0, 30),
        ];
        let two = Limits { max_per_user: 2, ..limits() };
        let chosen = select_room(&entries, &two, "alice").expect("room");
        assert_eq!(names(&entries, &chosen), ["alice/a"]);
        assert!(select_room(&entries, &two, "bob").expect("room").is_empty());
        let one = Limits { max_per_user: 1, ..limits() };
        assert_eq!(select_room(&entries, &one, "alice"), Err(CapReached::Count { count: 1, limit: 1 }));
        let disk = Limits { per_user: 5 * MB, ..limits() };
        assert_eq!(select_room(&entries, &disk, "alice"), Err(CapReached::Disk { bytes: 10 * MB, limit: 5 * MB }));
    }

    /// A store in a temp dir with `tenant/key` environments of one 8 KiB file each (linked from `.shared` when
    /// `linked`), and their records.
    fn store_with(envs: &[(&str, &str)], linked: bool) -> (tempfile::TempDir, EnvironmentStore) {
        let dir = tempfile::tempdir().expect("temp dir");
        for &(tenant, key) in envs {
            let root = dir.path().join(tenant).join(key);
            fs::create_dir_all(root.join("lib")).expect("mkdir");
            let shared = dir.path().join(SHARED_TENANT).join(key);
            if linked {
                fs::create_dir_all(shared.join("lib")).expect("mkdir");
                if !shared.join("lib/file").exists() {
                    fs::write(shared.join("lib/file"), vec![7u8; 8192]).expect("write");
                }
                fs::hard_link(shared.join("lib/file"), root.join("lib/file")).expect("link");
            } else {
                fs::write(root.join("lib/file"), vec![7u8; 8192]).expect("write");
            }
            fs::create_dir_all(dir.path().join(tenant).join(RECORDS)).expect("mkdir");
            fs::write(dir.path().join(tenant).join(RECORDS).join(key), "/usr").expect("write");
        }
        let store = EnvironmentStore::new(dir.path().to_path_buf());
        (dir, store)
    }

    fn block_on<T>(future: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime").block_on(future)
    }

    #[test]
    fn an_environment_in_use_is_refused_and_removed_once_released() {
        let (dir, store) = store_with(&[("alice", "k1")], false);
        let held = block_on(use_environment(dir.path(), "alice", "k1")).expect("use");
        assert!(store.list().expect("list")[0].in_use);
        assert!(matches!(store.remove("alice", "k1"), Err(RemoveError::InUse { .. })));
        let report = store
            .prune(
                &EnvironmentPolicy { max_unused: Duration::ZERO, ..Default::default() },
                SystemTime::now() + DAY,
                None,
                false,
            )
            .expect("prune");
        assert!(report.evicted.is_empty());
        drop(held);
        // Held by another process (a flock alone, as the server's and the CLI's are to each other).
        let other = lock_file(&use_lock_path(dir.path(), "alice", "k1"), Mode::Shared, false).expect("lock");
        assert!(store.list().expect("list")[0].in_use);
        assert!(matches!(store.remove("alice", "k1"), Err(RemoveError::InUse { .. })));
        drop(other);
        let removal = store.remove("alice", "k1").expect("removed");
        assert_eq!((removal.environment.key.as_str(), removal.shared_too), ("k1", None));
        assert!(!dir.path().join("alice/k1").exists() && !dir.path().join("alice/.records/k1").exists());
        assert!(fs::read_dir(dir.path().join("alice/.trash")).expect("trash").next().is_none());
        assert!(matches!(store.remove("alice", "k1"), Err(RemoveError::NotFound { .. })));
        // A use after the removal gets a lock of its own (a new file), not the one the removal deleted.
        let again = block_on(use_environment(dir.path(), "alice", "k1")).expect("use");
        assert!(dir.path().join("alice/.locks/k1.use").exists());
        drop(again);
    }

    #[test]
    fn the_shared_environment_goes_with_the_last_user_environment_that_links_it() {
        let (dir, store) = store_with(&[("alice", "k"), ("bob", "k")], true);
        let listed = store.list().expect("list");
        assert_eq!(listed.len(), 3);
        // One 8 KiB file, shared three ways (rounded down; the directories are each their own).
        let linked: u64 = listed.iter().map(|e| e.bytes).sum::<u64>()
            - listed.iter().map(|e| tree_usage(&dir.path().join(&e.tenant).join(&e.key)).own).sum::<u64>();
        assert!((8192 - 2..=8192).contains(&linked), "{linked}");
        assert_eq!(store.remove("alice", "k").expect("removed").shared_too, None);
        let removal = store.remove("bob", "k").expect("removed");
        assert_eq!(removal.shared_too.map(|s| s.tenant), Some(SHARED_TENANT.to_string()));
        assert!(store.list().expect("list").is_empty());
    }

    #[test]
    fn a_sweep_deletes_leftovers_of_interrupted_removals_and_builds_but_not_a_running_build() {
        let (dir, store) = store_with(&[("alice", "k1")], false);
        fs::create_dir_all(dir.path().join("alice/.trash/k0.1.2/lib")).expect("mkdir");
        fs::create_dir_all(dir.path().join("alice/.tmp-k2-99")).expect("mkdir");
        fs::create_dir_all(dir.path().join("alice/.tmp-k3-99")).expect("mkdir");
        let building = block_on(use_environment(dir.path(), "alice", "k3")).expect("use");
        assert_eq!(store.sweep(), 2);
        assert!(!dir.path().join("alice/.tmp-k2-99").exists() && dir.path().join("alice/.tmp-k3-99").exists());
        assert!(dir.path().join("alice/k1").exists());
        drop(building);
    }

    #[test]
    fn the_default_budget_is_half_the_file_system() {
        let dir = tempfile::tempdir().expect("temp dir");
        let size = file_system_size(dir.path()).expect("statvfs");
        let limits = EnvironmentPolicy::default().limits(&dir.path().join("not/yet"));
        assert_eq!((limits.budget, limits.per_user), (size / 2, size / 8));
    }
}
