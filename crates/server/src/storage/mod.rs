//! Users' persistent storage: a directory per user that their jailed workers see read-write at `/data` (calls, web
//! endpoint replicas and queue requests; never environment builds), owned by the user's uid, mode 0700, under the
//! storage root (`[storage] root`, default `<data dir>/storage`, itself root's alone). The REST routes that read and
//! write it for clients (the original's `sync_dir`, `download_file`, ours `fal-serverless files`) are `rest.rs`.
//!
//! The quota (`[storage] quota_mb`) is the kernel's, where it can be: the root is a btrfs file system and each user's
//! directory a subvolume of it with a qgroup limit, so a function's own write past it fails with `OSError: [Errno 122]
//! Disk quota exceeded`. A subvolume the function made inside its directory would get a qgroup of its own, without the
//! limit: the jail's seccomp filter refuses the ioctls that make one (`fal-sandbox`'s `seccomp.rs`). The root is on
//! btrfs already, or the server makes it so: one image file for all users (`<root>.img`, sparse, `[storage] image_gb`,
//! made with `mkfs.btrfs` on first start, grown when the setting grows, never shrunk) loop-mounted at the root while
//! the server runs and unmounted when it stops. Only where neither is possible (not root, no btrfs-progs) is it a plain
//! directory with a soft quota: uploads over it are refused, a function's own writes are not stopped (the server's log
//! says so at start).

pub mod confine;
pub mod rest;
pub mod unzip;

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

pub use confine::UserRoot;

/// statfs's magic number of btrfs.
const BTRFS_MAGIC: i64 = 0x9123_683E;
/// The smallest image mkfs.btrfs makes with its defaults.
const MIN_IMAGE_BYTES: u64 = 256 << 20;

/// `[storage]` in the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageConfig {
    /// Where users' directories live; `None`: `<data dir>/storage`.
    pub root: Option<PathBuf>,
    /// What one user may keep.
    pub quota_bytes: u64,
    /// The size of the image the server makes when the root is not on btrfs (sparse: it takes what is stored).
    pub image_bytes: u64,
}

impl Default for StorageConfig {
    /// 1 GiB per user, a 16 GiB image.
    fn default() -> Self {
        Self { root: None, quota_bytes: 1 << 30, image_bytes: 16 << 30 }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("cannot set up users' storage at {path}: {message}")]
    Setup { path: PathBuf, message: String },
    #[error("cannot make the storage of user {user:?} at {path}: {message}")]
    User { user: String, path: PathBuf, message: String },
}

/// How the quota is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enforcement {
    /// btrfs qgroups: the kernel refuses writes past it.
    Kernel,
    /// Counted by the server: uploads past it are refused, a function's writes are not.
    Soft,
}

#[derive(Debug)]
pub struct Storage {
    root: PathBuf,
    quota_bytes: u64,
    enforcement: Enforcement,
    /// The image this server mounted at `root`, to unmount when it stops.
    mounted: Mutex<Option<PathBuf>>,
    /// Users whose directory is made (and its limit set) in this run.
    ready: Mutex<HashMap<String, PathBuf>>,
}

fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let output = Command::new(program).args(args).output().map_err(|e| format!("cannot run {program}: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!("`{program} {}` failed: {}", args.join(" "), String::from_utf8_lossy(&output.stderr).trim()))
    }
}

fn statfs_type(path: &Path) -> Option<i64> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: an all-zero statfs is a valid value; statfs writes only into it.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: NUL-terminated path and a valid pointer, both outliving the call.
    (unsafe { libc::statfs(c.as_ptr(), &raw mut stat) } == 0).then_some(stat.f_type as i64)
}

/// Whether `path` is a mount point (its device differs from its parent's).
fn is_mount_point(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let (Ok(me), Some(Ok(parent))) = (path.metadata(), path.parent().map(|p| p.metadata())) else { return false };
    me.dev() != parent.dev()
}

fn has_btrfs_tools() -> bool {
    ["mkfs.btrfs", "btrfs"].iter().all(|tool| {
        std::env::var_os("PATH").is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()))
    })
}

impl Storage {
    /// Sets up the root (mounting its image if need be; see the module doc); `no_mount` says why the server must
    /// not mount one (it does not run as root, say), if it must not. Blocking.
    pub fn open(config: &StorageConfig, data_dir: &Path, no_mount: Option<&str>) -> Result<Self, StorageError> {
        let root = config.root.clone().unwrap_or_else(|| data_dir.join("storage"));
        let shown = root.clone();
        let setup = |message: String| StorageError::Setup { path: shown.clone(), message };
        // Workers see their storage at /data, over whatever is there: their environments must not be.
        let canonical = data_dir.canonicalize().unwrap_or_else(|_| data_dir.to_path_buf());
        if canonical.starts_with(confine::MOUNT) {
            return Err(setup(format!(
                "the data dir {} is below {}, where workers see their storage; give the server a data dir \
                 elsewhere (--data-dir)",
                canonical.display(),
                confine::MOUNT
            )));
        }
        std::fs::create_dir_all(&root).map_err(|e| setup(e.to_string()))?;
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700)).map_err(|e| setup(e.to_string()))?;
        let image = PathBuf::from(format!("{}.img", root.display()));
        let mut mounted = None;
        let enforcement = if let Some(reason) = no_mount {
            tracing::warn!(root = %root.display(), "users' storage quota is soft (counted on upload, not enforced on \
                a function's writes): {reason}");
            Enforcement::Soft
        } else if statfs_type(&root) == Some(BTRFS_MAGIC) {
            // Already btrfs: the admin's, or this server's image left mounted by a run that was killed.
            if is_mount_point(&root) && image.is_file() {
                mounted = Some(image.clone());
            }
            run("btrfs", &["quota", "enable", &root.display().to_string()]).map_err(setup)?;
            Enforcement::Kernel
        } else if has_btrfs_tools() {
            match Self::mount_image(&image, &root, config.image_bytes) {
                Ok(()) => {
                    mounted = Some(image.clone());
                    Enforcement::Kernel
                }
                // No loop device or no btrfs in this kernel (a container, say): the server still serves.
                Err(error) => {
                    tracing::warn!(root = %root.display(), %error, "users' storage quota is soft (counted on \
                        upload, not enforced on a function's writes): its btrfs image could not be mounted");
                    Enforcement::Soft
                }
            }
        } else {
            tracing::warn!(root = %root.display(), "users' storage quota is soft (counted on upload, not enforced on \
                a function's writes): install btrfs-progs for a kernel-enforced quota");
            Enforcement::Soft
        };
        // What the root holds besides users' directories is the server's (uploads in flight).
        let storage = Self {
            root,
            quota_bytes: config.quota_bytes,
            enforcement,
            mounted: Mutex::new(mounted),
            ready: Mutex::default(),
        };
        let uploads = storage.uploads_dir();
        // What a killed server was receiving is of no use now.
        let _ = std::fs::remove_dir_all(&uploads);
        std::fs::create_dir_all(&uploads).map_err(|e| setup(format!("{}: {e}", uploads.display())))?;
        tracing::info!(root = %storage.root.display(), quota_bytes = storage.quota_bytes,
            enforcement = ?storage.enforcement, "users' storage");
        Ok(storage)
    }

    /// Makes the image if it is missing, grows it to `bytes` if it is smaller, and mounts it at `root`.
    fn mount_image(image: &Path, root: &Path, bytes: u64) -> Result<(), String> {
        let bytes = bytes.max(MIN_IMAGE_BYTES);
        let show = |p: &Path| p.display().to_string();
        let fresh = !image.exists();
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(image)
            .map_err(|e| format!("{}: {e}", image.display()))?;
        let size = file.metadata().map_err(|e| e.to_string())?.len();
        if size < bytes {
            // Sparse: the image takes on disk what is stored in it.
            file.set_len(bytes).map_err(|e| format!("cannot size {}: {e}", image.display()))?;
        }
        drop(file);
        if fresh {
            run("mkfs.btrfs", &["-q", &show(image)])?;
        }
        // `discard`: what users delete is given back to the host's disk (the loop device punches holes).
        run("mount", &["-t", "btrfs", "-o", "loop,discard=async", &show(image), &show(root)])?;
        let root_text = show(root);
        let grown = run("btrfs", &["filesystem", "resize", "max", &root_text])
            .and_then(|()| run("btrfs", &["quota", "enable", &root_text]));
        if let Err(error) = grown {
            let _ = run("umount", &[&root_text]);
            return Err(error);
        }
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700)).map_err(|e| e.to_string())?;
        Ok(())
    }

    pub fn quota_bytes(&self) -> u64 {
        self.quota_bytes
    }

    pub fn enforcement(&self) -> Enforcement {
        self.enforcement
    }

    /// Where uploads wait to be unpacked: the server's own, beside users' directories.
    fn uploads_dir(&self) -> PathBuf {
        self.root.join(".uploads")
    }

    /// `user`'s directory, made (owned by `uid`, mode 0700, with its quota) if it is not yet. Blocking.
    pub fn user_dir(&self, user: &str, uid: u32) -> Result<PathBuf, StorageError> {
        // Held while a directory is made: two first calls of one user make it once.
        let mut ready = self.ready.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(dir) = ready.get(user) {
            return Ok(dir.clone());
        }
        let dir = self.root.join(user);
        let fail = |message: String| StorageError::User { user: user.to_string(), path: dir.clone(), message };
        // User ids are plain names (the key store's rule); checked again, as this names a path.
        if user.is_empty()
            || user.starts_with('.')
            || !user.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(fail("not a plain name".into()));
        }
        let text = dir.display().to_string();
        if !dir.exists() {
            match self.enforcement {
                Enforcement::Kernel => run("btrfs", &["subvolume", "create", &text]).map_err(fail)?,
                Enforcement::Soft => std::fs::create_dir(&dir).map_err(|e| fail(e.to_string()))?,
            }
        }
        // A server that is not root runs its workers as itself, unjailed: the directory stays its own.
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            std::os::unix::fs::chown(&dir, Some(uid), Some(uid)).map_err(|e| fail(e.to_string()))?;
        }
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).map_err(|e| fail(e.to_string()))?;
        if self.enforcement == Enforcement::Kernel {
            // Set on every start: a changed quota_mb applies to existing users too.
            run("btrfs", &["qgroup", "limit", &self.quota_bytes.to_string(), &text]).map_err(fail)?;
        }
        ready.insert(user.to_string(), dir.clone());
        Ok(dir)
    }

    /// A new file to receive an upload in (removed by the caller).
    pub fn upload_file(&self) -> std::io::Result<(PathBuf, std::fs::File)> {
        let path = self.uploads_dir().join(format!("{:016x}.zip", rand::random::<u64>()));
        let file = std::fs::OpenOptions::new().create_new(true).read(true).write(true).open(&path)?;
        Ok((path, file))
    }

    /// Unmounts the image this server mounted. Blocking.
    pub fn close(&self) {
        let Some(image) = self.mounted.lock().unwrap_or_else(|e| e.into_inner()).take() else { return };
        let root = self.root.display().to_string();
        if let Err(error) = run("umount", &[&root]) {
            tracing::warn!(%error, image = %image.display(), "could not unmount users' storage; lazily unmounting it");
            let _ = run("umount", &["-l", &root]);
        }
    }
}

impl Drop for Storage {
    /// A server that stops early (its port taken, say) leaves no mount behind.
    fn drop(&mut self) {
        self.close();
    }
}

/// `user`'s directory for an engine call ([`fal_engine::CallRequest::data_dir`]), made if need be.
pub async fn data_dir(storage: &std::sync::Arc<Storage>, user: &str, uid: u32) -> Result<PathBuf, String> {
    let (storage, user) = (storage.clone(), user.to_string());
    tokio::task::spawn_blocking(move || storage.user_dir(&user, uid).map_err(|e| e.to_string()))
        .await
        .map_err(|e| format!("the storage task failed: {e}"))?
}

/// The bytes of the regular files below `dir` (not following links): what the user keeps. Walked with
/// [`confine::walk`]: a tree of any depth the user's functions made costs the server two descriptors.
pub fn usage(root: &UserRoot, dir: &confine::RelPath) -> std::io::Result<u64> {
    struct Sum(u64);
    impl confine::Visitor for Sum {
        fn enter(
            &mut self,
            _dir: &std::os::fd::OwnedFd,
            entries: Vec<(std::ffi::OsString, confine::Entry)>,
        ) -> std::io::Result<Vec<std::ffi::OsString>> {
            let mut subdirs = Vec::new();
            for (name, entry) in entries {
                if entry.is_dir {
                    subdirs.push(name);
                } else if entry.is_file {
                    self.0 += entry.size;
                }
            }
            Ok(subdirs)
        }
    }
    let mut sum = Sum(0);
    root.walk(dir, &mut sum)?;
    Ok(sum.0)
}
