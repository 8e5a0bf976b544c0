//! Paths inside one user's storage, and the file operations on them, confined to it.
//!
//! A path from a request is checked by its text first ([`RelPath::parse`]: no `..`, no NUL, no name over 255 bytes,
//! an absolute path only under `/data`), so that hostile input gets a clear 400. Then every operation resolves it
//! with `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)` from a descriptor of the user's directory: the user's own
//! functions write that directory, and a symbolic link they left there (to `/etc`, to another user's storage) or a
//! directory swapped for one while the server works is refused by the kernel, not followed. The server runs as
//! root, so nothing short of that would do.

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The longest path a request may name, in bytes.
pub const MAX_PATH: usize = 4096;
/// The longest name of one component (the kernel's own limit).
pub const MAX_NAME: usize = 255;
/// Where workers see the storage: an absolute path must start here.
pub const MOUNT: &str = "/data";

/// Why a path from a request is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PathError {
    #[error("the path {0:?} has a `..` component: paths stay inside your /data")]
    DotDot(String),
    #[error("the path {0:?} is absolute outside /data: name it relative to /data, or as /data/...")]
    Outside(String),
    #[error("the path has a NUL byte")]
    Nul,
    #[error("the path is {0} bytes long; the most is {MAX_PATH}")]
    TooLong(usize),
    #[error("a name in the path is {0} bytes long; the most is {MAX_NAME}")]
    NameTooLong(usize),
}

/// A path relative to a user's storage root, checked by its text: plain names only. Empty: the root itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelPath(Vec<String>);

impl RelPath {
    /// `raw` as a request names it: relative to `/data` (`models/x`), or absolute under it (`/data/models/x`, as the
    /// original client's `file_exists` sends it). Empty and `.` components are dropped.
    pub fn parse(raw: &str) -> Result<Self, PathError> {
        if raw.len() > MAX_PATH {
            return Err(PathError::TooLong(raw.len()));
        }
        if raw.contains('\0') {
            return Err(PathError::Nul);
        }
        let rest = if raw.starts_with('/') {
            let trimmed = raw.trim_start_matches('/');
            match trimmed.strip_prefix(&MOUNT[1..]) {
                Some("") => "",
                Some(rest) if rest.starts_with('/') => rest,
                _ => return Err(PathError::Outside(raw.to_string())),
            }
        } else {
            raw
        };
        let mut parts = Vec::new();
        for part in rest.split('/') {
            match part {
                "" | "." => {}
                ".." => return Err(PathError::DotDot(raw.to_string())),
                name if name.len() > MAX_NAME => return Err(PathError::NameTooLong(name.len())),
                name => parts.push(name.to_string()),
            }
        }
        Ok(Self(parts))
    }

    /// The storage root itself.
    pub fn root() -> Self {
        Self(Vec::new())
    }

    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    pub fn components(&self) -> &[String] {
        &self.0
    }

    /// The path relative to the root (`.` for the root itself).
    pub fn as_path(&self) -> PathBuf {
        if self.0.is_empty() {
            PathBuf::from(".")
        } else {
            self.0.iter().collect()
        }
    }

    /// As a worker sees it: `/data/...`.
    pub fn display(&self) -> String {
        std::iter::once(MOUNT.to_string()).chain(self.0.iter().cloned()).collect::<Vec<_>>().join("/")
    }

    /// Its parent and last name; `None` for the root.
    pub fn split_last(&self) -> Option<(RelPath, &str)> {
        let (last, parent) = self.0.split_last()?;
        Some((RelPath(parent.to_vec()), last))
    }

    pub fn join(&self, name: &str) -> RelPath {
        let mut parts = self.0.clone();
        parts.push(name.to_string());
        RelPath(parts)
    }
}

/// One user's storage directory, held open: every operation starts from its descriptor.
#[derive(Debug)]
pub struct UserRoot {
    fd: OwnedFd,
    /// Who owns what is made through it: the user's uid, on a server that runs as root (one that does not runs its
    /// workers as itself, and keeps what it makes its own).
    owner: Option<u32>,
}

fn cstring(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))
}

/// `openat2` below `dir`: never outside it, through `..` or a symbolic link, nor through `/proc` magic links.
fn open_beneath(dir: &OwnedFd, path: &Path, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    let path = cstring(path)?;
    // SAFETY: an all-zero open_how is valid (no flags, no mode, no resolve restriction), then filled in.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.mode = if flags & libc::O_CREAT != 0 { mode as u64 } else { 0 };
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: `path` is NUL-terminated and `how` a valid open_how of the size passed; both outlive the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            path.as_ptr(),
            &raw const how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: openat2 returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn check(result: libc::c_int) -> io::Result<()> {
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The path that reads an open directory's entries (the descriptor pins the directory itself).
fn fd_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// What [`UserRoot::stat`] tells of an entry (not following a final symbolic link).
#[derive(Debug, Clone)]
pub struct Entry {
    pub is_file: bool,
    pub is_dir: bool,
    pub size: u64,
    pub modified: i64,
    pub changed: i64,
}

fn entry_of(stat: &libc::stat) -> Entry {
    let kind = stat.st_mode & libc::S_IFMT;
    Entry {
        is_file: kind == libc::S_IFREG,
        is_dir: kind == libc::S_IFDIR,
        size: stat.st_size as u64,
        modified: stat.st_mtime,
        changed: stat.st_ctime,
    }
}

impl UserRoot {
    /// Opens `dir` (created by the server, owned by `uid`); files and directories made through it are `uid`'s.
    pub fn open(dir: &Path, uid: u32) -> io::Result<Self> {
        let fd = File::open(dir)?.into();
        // SAFETY: geteuid has no preconditions and cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        Ok(Self { fd, owner: root.then_some(uid) })
    }

    /// Opens a directory below the root (the root itself for an empty path).
    pub fn open_dir(&self, path: &RelPath) -> io::Result<OwnedFd> {
        open_beneath(&self.fd, &path.as_path(), libc::O_RDONLY | libc::O_DIRECTORY, 0)
    }

    /// Opens a regular file below the root for reading.
    pub fn open_file(&self, path: &RelPath) -> io::Result<File> {
        let fd = open_beneath(&self.fd, &path.as_path(), libc::O_RDONLY | libc::O_NOFOLLOW, 0)?;
        let file = File::from(fd);
        if !file.metadata()?.is_file() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"));
        }
        Ok(file)
    }

    /// What `path` is (a symbolic link followed where it stays below the root; one leading out is an error,
    /// EXDEV); `Ok(None)` if nothing is there.
    pub fn stat(&self, path: &RelPath) -> io::Result<Option<Entry>> {
        match open_beneath(&self.fd, &path.as_path(), libc::O_PATH, 0) {
            Ok(fd) => Ok(Some(fstat(&fd)?)),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENOTDIR)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The entries of a directory: name and what each is.
    pub fn list(&self, path: &RelPath) -> io::Result<Vec<(String, Entry)>> {
        let dir = self.open_dir(path)?;
        let mut entries = Vec::new();
        for item in std::fs::read_dir(fd_path(&dir))? {
            let name = item?.file_name();
            let Some(text) = name.to_str() else { continue };
            if let Ok(entry) = fstatat(&dir, text) {
                entries.push((text.to_string(), entry));
            }
        }
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(entries)
    }

    /// The names of a directory's entries in the order the file system lists them (`os.walk`'s order), each with
    /// whether it is a directory (not following symbolic links).
    pub fn read_dir_unsorted(&self, dir: &OwnedFd) -> io::Result<Vec<(String, Entry)>> {
        let mut entries = Vec::new();
        for item in std::fs::read_dir(fd_path(dir))? {
            let name = item?.file_name();
            let Some(text) = name.to_str() else { continue };
            if let Ok(entry) = fstatat(dir, text) {
                entries.push((text.to_string(), entry));
            }
        }
        Ok(entries)
    }

    /// Opens `name` in the open directory `dir` (a regular file, for reading; no symbolic link followed).
    pub fn open_in(&self, dir: &OwnedFd, name: &str, directory: bool) -> io::Result<OwnedFd> {
        let flags = if directory { libc::O_RDONLY | libc::O_DIRECTORY } else { libc::O_RDONLY };
        open_beneath(dir, Path::new(name), flags | libc::O_NOFOLLOW, 0)
    }

    /// Makes the directories of `path` that are missing (owned by the user, mode 0755) and opens the last.
    pub fn make_dirs(&self, path: &RelPath) -> io::Result<OwnedFd> {
        let mut dir = open_beneath(&self.fd, Path::new("."), libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
        for name in path.components() {
            let c = cstring(Path::new(name))?;
            // SAFETY: `c` is NUL-terminated and outlives the call; the descriptor is open.
            let made = unsafe { libc::mkdirat(dir.as_raw_fd(), c.as_ptr(), 0o755) };
            if made == 0 {
                if let Some(owner) = self.owner {
                    // SAFETY: as above; AT_SYMLINK_NOFOLLOW: the entry just made, never a link's target.
                    check(unsafe {
                        libc::fchownat(dir.as_raw_fd(), c.as_ptr(), owner, owner, libc::AT_SYMLINK_NOFOLLOW)
                    })?;
                }
            } else {
                let error = io::Error::last_os_error();
                if error.raw_os_error() != Some(libc::EEXIST) {
                    return Err(error);
                }
            }
            dir = open_beneath(&dir, Path::new(name), libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW, 0)?;
        }
        Ok(dir)
    }

    /// Creates (or truncates) a regular file in the open directory `dir`, owned by the user, mode 0644.
    pub fn create_in(&self, dir: &OwnedFd, name: &str) -> io::Result<File> {
        let fd = open_beneath(
            dir,
            Path::new(name),
            libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_NOFOLLOW,
            0o644,
        )?;
        if let Some(owner) = self.owner {
            // SAFETY: fchown on a descriptor we own.
            check(unsafe { libc::fchown(fd.as_raw_fd(), owner, owner) })?;
        }
        Ok(File::from(fd))
    }

    /// Removes `path` (a file, or a directory with everything in it). Symbolic links are removed, not followed.
    pub fn remove(&self, path: &RelPath) -> io::Result<()> {
        let (parent, name) =
            path.split_last().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the root itself"))?;
        let parent = self.open_dir(&parent)?;
        remove_in(&parent, name)
    }

    /// Renames `from` to `to` (both below the root), replacing what `to` was (a directory too: it is removed
    /// after the rename, so `to` is never missing).
    pub fn replace(&self, from: &RelPath, to: &RelPath) -> io::Result<()> {
        let bad = || io::Error::new(io::ErrorKind::InvalidInput, "the root itself");
        let (from_parent, from_name) = from.split_last().ok_or_else(bad)?;
        let (to_parent, to_name) = to.split_last().ok_or_else(bad)?;
        let from_dir = self.open_dir(&from_parent)?;
        let to_dir = self.make_dirs(&to_parent)?;
        let (a, b) = (cstring(Path::new(from_name))?, cstring(Path::new(to_name))?);
        // SAFETY: NUL-terminated names relative to open descriptors; RENAME_EXCHANGE swaps two entries atomically.
        let swapped = unsafe {
            libc::renameat2(from_dir.as_raw_fd(), a.as_ptr(), to_dir.as_raw_fd(), b.as_ptr(), libc::RENAME_EXCHANGE)
        };
        if swapped == 0 {
            // `from` now names what `to` was.
            return remove_in(&from_dir, from_name);
        }
        // SAFETY: as above; `to` did not exist (or is not exchangeable): a plain rename.
        check(unsafe { libc::renameat(from_dir.as_raw_fd(), a.as_ptr(), to_dir.as_raw_fd(), b.as_ptr()) })
    }
}

fn fstat(fd: &OwnedFd) -> io::Result<Entry> {
    // SAFETY: an all-zero stat is a valid value; fstat writes only into it.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: the descriptor is open and `stat` outlives the call.
    check(unsafe { libc::fstat(fd.as_raw_fd(), &raw mut stat) })?;
    Ok(entry_of(&stat))
}

fn fstatat(dir: &OwnedFd, name: &str) -> io::Result<Entry> {
    let c = cstring(Path::new(name))?;
    // SAFETY: an all-zero stat is a valid value; fstatat writes only into it.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: NUL-terminated name relative to an open descriptor; not following a link.
    check(unsafe { libc::fstatat(dir.as_raw_fd(), c.as_ptr(), &raw mut stat, libc::AT_SYMLINK_NOFOLLOW) })?;
    Ok(entry_of(&stat))
}

/// Removes `name` of the open directory `dir`, recursively, never leaving `dir`'s tree.
fn remove_in(dir: &OwnedFd, name: &str) -> io::Result<()> {
    let c = cstring(Path::new(name))?;
    let entry = fstatat(dir, name)?;
    if entry.is_dir {
        let child = open_beneath(dir, Path::new(name), libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW, 0)?;
        let names: Vec<_> =
            std::fs::read_dir(fd_path(&child))?.filter_map(|e| e.ok().map(|e| e.file_name())).collect::<Vec<_>>();
        for child_name in names {
            let text = OsStr::new(&child_name);
            remove_in(&child, &text.to_string_lossy())?;
        }
        // SAFETY: NUL-terminated name relative to an open descriptor.
        check(unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), libc::AT_REMOVEDIR) })
    } else {
        // SAFETY: as above.
        check(unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), 0) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_stay_inside_the_users_storage() {
        let ok = |raw: &str| RelPath::parse(raw).unwrap().components().join("/");
        assert_eq!(ok("models/a.bin"), "models/a.bin");
        assert_eq!(ok("/data/models/a.bin"), "models/a.bin");
        assert_eq!(ok("//data/x"), "x");
        assert_eq!(ok("./a//b/"), "a/b");
        assert!(RelPath::parse("/data").unwrap().is_root());
        assert!(RelPath::parse("").unwrap().is_root());
        assert_eq!(RelPath::parse("/data/x").unwrap().display(), "/data/x");
        for hostile in ["../x", "a/../../b", "/data/../etc", "a/.."] {
            assert!(matches!(RelPath::parse(hostile), Err(PathError::DotDot(_))), "{hostile}");
        }
        for outside in ["/etc/passwd", "/database", "/datax/y", "/"] {
            assert!(matches!(RelPath::parse(outside), Err(PathError::Outside(_))), "{outside}");
        }
        assert_eq!(RelPath::parse("a\0b"), Err(PathError::Nul));
        assert!(matches!(RelPath::parse(&"n".repeat(256)), Err(PathError::NameTooLong(256))));
        assert!(matches!(RelPath::parse(&"a/".repeat(3000)), Err(PathError::TooLong(_))));
    }

    #[test]
    fn a_symbolic_link_out_of_the_storage_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let root_dir = dir.path().join("user");
        std::fs::create_dir(&root_dir).unwrap();
        std::fs::write(dir.path().join("secret"), "other user's").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret"), root_dir.join("link")).unwrap();
        std::os::unix::fs::symlink("..", root_dir.join("up")).unwrap();
        std::fs::create_dir(root_dir.join("sub")).unwrap();
        std::fs::write(root_dir.join("sub/f"), "mine").unwrap();
        let uid = unsafe { libc::geteuid() };
        let root = UserRoot::open(&root_dir, uid).unwrap();
        let parse = |p: &str| RelPath::parse(p).unwrap();
        assert!(root.open_file(&parse("link")).is_err());
        assert_eq!(root.stat(&parse("link")).unwrap_err().raw_os_error(), Some(libc::EXDEV));
        assert!(root.stat(&parse("up/secret")).is_err());
        assert!(root.stat(&parse("sub/f")).unwrap().is_some_and(|e| e.is_file && e.size == 4));
        assert!(root.stat(&parse("sub/none")).unwrap().is_none());
        assert!(root.open_file(&parse("up/secret")).is_err());
        assert!(root.open_dir(&parse("up")).is_err());
        assert!(root.make_dirs(&parse("up/x")).is_err());
        assert!(!dir.path().join("x").exists());
        assert_eq!(std::io::read_to_string(root.open_file(&parse("sub/f")).unwrap()).unwrap(), "mine");
        let names: Vec<_> = root.list(&RelPath::parse("").unwrap()).unwrap().into_iter().map(|e| e.0).collect();
        assert_eq!(names, ["link", "sub", "up"]);
        // Removing a link removes the link, not what it points at.
        root.remove(&parse("link")).unwrap();
        assert!(dir.path().join("secret").exists());
        // Replacing a directory swaps it in whole.
        let new = root.make_dirs(&parse("new/deep")).unwrap();
        root.create_in(&new, "g").unwrap();
        root.replace(&parse("new"), &parse("sub")).unwrap();
        assert!(
            root_dir.join("sub/deep/g").exists() && !root_dir.join("sub/f").exists() && !root_dir.join("new").exists()
        );
    }
}
