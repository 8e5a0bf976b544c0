//! Paths inside one user's storage, and the file operations on them, confined to it.
//!
//! A path from a request is checked by its text first ([`RelPath::parse`]: no `..`, no NUL, no name over 255 bytes,
//! an absolute path only under `/data`), so that hostile input gets a clear 400. Then every operation resolves it
//! with `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)` from a descriptor of the user's directory: the user's own
//! functions write that directory, and a symbolic link they left there (to `/etc`, to another user's storage) or a
//! directory swapped for one while the server works is refused by the kernel, not followed. The server runs as
//! root, so nothing short of that would do.
//!
//! What is there is the user's too: a FIFO, a socket, a tree thousands of directories deep. A file is opened first
//! as `O_PATH` (which neither waits for a FIFO's writer nor acts on a device) and re-opened for reading only once
//! `fstat` says it is a regular file ([`NotRegular`] otherwise); a file is written under a temporary name and
//! renamed over its target once whole ([`PendingFile`]), so a FIFO there is replaced, never opened. Trees are walked
//! ([`UserRoot::walk`]) without recursion and with two descriptors whatever their depth: the walk goes back up
//! through `..`, checked to be the directory it came down from.

use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
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

/// What a file operation found where a regular file must be (in an `io::Error` of kind `InvalidInput`).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{what}, not a regular file")]
pub struct NotRegular {
    /// What it is: `a FIFO (named pipe)`, `a directory`, ...
    pub what: &'static str,
}

impl NotRegular {
    fn of(mode: libc::mode_t) -> io::Error {
        let what = match mode & libc::S_IFMT {
            libc::S_IFDIR => "a directory",
            libc::S_IFIFO => "a FIFO (named pipe)",
            libc::S_IFSOCK => "a socket",
            libc::S_IFCHR => "a character device",
            libc::S_IFBLK => "a block device",
            libc::S_IFLNK => "a symbolic link",
            _ => "not a plain file",
        };
        io::Error::new(io::ErrorKind::InvalidInput, NotRegular { what })
    }

    /// The `NotRegular` an `io::Error` carries, if it does.
    pub fn of_error(error: &io::Error) -> Option<&NotRegular> {
        error.get_ref().and_then(|inner| inner.downcast_ref::<NotRegular>())
    }
}

/// A walk went up through `..` and did not find the directory it came down from: the user's functions moved a
/// directory meanwhile (in an `io::Error` of kind `Other`).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("a directory was moved while the server walked the tree; try again")]
pub struct TreeChanged;

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
    /// Its permission bits (`0o644`, say).
    pub permissions: u32,
    pub size: u64,
    pub modified: i64,
    pub changed: i64,
}

fn entry_of(stat: &libc::stat) -> Entry {
    let kind = stat.st_mode & libc::S_IFMT;
    Entry {
        is_file: kind == libc::S_IFREG,
        is_dir: kind == libc::S_IFDIR,
        permissions: stat.st_mode & 0o777,
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
        // O_DIRECTORY is checked before anything is opened: a FIFO there is ENOTDIR, not a wait.
        open_beneath(&self.fd, &path.as_path(), libc::O_RDONLY | libc::O_DIRECTORY, 0)
    }

    /// Opens a regular file below the root for reading; anything else there is a [`NotRegular`] error.
    pub fn open_file(&self, path: &RelPath) -> io::Result<File> {
        open_regular(&self.fd, &path.as_path())
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
    /// Commits the file system's transaction (`syncfs`). On btrfs a qgroup counts space freed (files a function
    /// removed) only once that commits, so a write refused with EDQUOT just after may fit once this is done.
    pub fn commit_file_system(&self) -> io::Result<()> {
        commit_file_system_of(&self.fd)
    }

    /// Uploads still being received ([`PendingFile`]) are left out.
    pub fn list(&self, path: &RelPath) -> io::Result<Vec<(String, Entry)>> {
        let dir = self.open_dir(path)?;
        let mut entries: Vec<_> = read_dir(&dir)?
            .into_iter()
            .filter(|(name, _)| !is_pending_name(name))
            .filter_map(|(name, entry)| Some((name.into_string().ok()?, entry)))
            .collect();
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(entries)
    }

    /// Walks the directory `path` and everything below it (see [`walk`]).
    pub fn walk(&self, path: &RelPath, visitor: &mut impl Visitor) -> io::Result<()> {
        walk(self.open_dir(path)?, visitor)
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

    /// Creates (or truncates) a regular file in the open directory `dir`, owned by the user, mode 0644. Something
    /// other than a regular file there is a [`NotRegular`] error (`O_NONBLOCK`: a FIFO's open does not wait).
    pub fn create_in(&self, dir: &OwnedFd, name: &str) -> io::Result<File> {
        // Looked at first: opened for writing, a FIFO without a reader is ENXIO, which says nothing useful.
        match open_beneath(dir, Path::new(name), libc::O_PATH | libc::O_NOFOLLOW, 0) {
            Ok(there) => {
                let stat = fstat_raw(&there)?;
                if stat.st_mode & libc::S_IFMT != libc::S_IFREG {
                    return Err(NotRegular::of(stat.st_mode));
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
        let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_NOFOLLOW | libc::O_NONBLOCK;
        let fd = open_beneath(dir, Path::new(name), flags, 0o644)?;
        self.made_file(fd)
    }

    /// Checks that `fd` (opened `O_NONBLOCK` for writing) is a regular file, gives it to the user, and clears
    /// `O_NONBLOCK`.
    fn made_file(&self, fd: OwnedFd) -> io::Result<File> {
        let stat = fstat_raw(&fd)?;
        if stat.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(NotRegular::of(stat.st_mode));
        }
        if let Some(owner) = self.owner {
            // SAFETY: fchown on a descriptor we own.
            check(unsafe { libc::fchown(fd.as_raw_fd(), owner, owner) })?;
        }
        // SAFETY: fcntl on a descriptor we own.
        let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
        check(flags)?;
        // SAFETY: as above.
        check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) })?;
        Ok(File::from(fd))
    }

    /// A new file that becomes `path` once it is whole ([`PendingFile::commit`]): written under a temporary name in
    /// `path`'s directory (made if missing), removed if it is dropped uncommitted. Until then `path` is what it was.
    pub fn create_pending(&self, path: &RelPath) -> io::Result<(PendingFile, File)> {
        let (parent, name) =
            path.split_last().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the root itself"))?;
        let dir = self.make_dirs(&parent)?;
        // A directory there would refuse the rename only once the whole upload is in. A file there keeps its
        // permissions in its replacement (an executable stays one, a private file private).
        let (permissions, replaces) = match fstatat(&dir, OsStr::new(name)) {
            Ok(entry) if entry.is_dir => return Err(io::Error::from_raw_os_error(libc::EISDIR)),
            Ok(entry) if entry.is_file => (entry.permissions, Some(entry.size)),
            Ok(_) => (0o644, None),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => (0o644, None),
            Err(e) => return Err(e),
        };
        remove_stale_pending(&dir);
        loop {
            let temp = format!("{PENDING_PREFIX}{:016x}", rand::random::<u64>());
            let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_NONBLOCK;
            let temp_c = cstring(Path::new(&temp))?;
            match open_beneath(&dir, Path::new(&temp), flags, 0o644) {
                Ok(fd) => {
                    // Owned by the guard from here: whatever fails next removes the temporary file.
                    let pending = PendingFile { dir, temp: temp_c, name: name.to_string(), replaces, committed: false };
                    let file = self.made_file(fd)?;
                    file.set_permissions(std::fs::Permissions::from_mode(permissions))?;
                    return Ok((pending, file));
                }
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Removes `path` (a file, or a directory with everything in it). Symbolic links are removed, not followed.
    pub fn remove(&self, path: &RelPath) -> io::Result<()> {
        let (parent, name) =
            path.split_last().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the root itself"))?;
        let parent = self.open_dir(&parent)?;
        remove_in(&parent, OsStr::new(name))
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
            return remove_in(&from_dir, OsStr::new(from_name));
        }
        // SAFETY: as above; `to` did not exist (or is not exchangeable): a plain rename.
        check(unsafe { libc::renameat(from_dir.as_raw_fd(), a.as_ptr(), to_dir.as_raw_fd(), b.as_ptr()) })
    }
}

/// A file being written under a temporary name beside its target ([`UserRoot::create_pending`]): renamed over the
/// target by [`PendingFile::commit`], removed when dropped uncommitted (an upload refused, or its request dropped
/// with the client gone), so a refused upload leaves the target as it was.
#[derive(Debug)]
pub struct PendingFile {
    dir: OwnedFd,
    temp: CString,
    name: String,
    /// The size of the file it replaces, if one is there: it counts against the quota until the commit.
    pub replaces: Option<u64>,
    committed: bool,
}

/// What a [`PendingFile`]'s temporary name starts with (then 16 hex digits).
const PENDING_PREFIX: &str = ".fal-part-";
/// A temporary file not written to for this long is one a stopped server left (an upload being received writes
/// to it all along): the next upload into its directory removes it.
const STALE_PENDING: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

fn is_pending_name(name: &OsStr) -> bool {
    name.to_str()
        .and_then(|n| n.strip_prefix(PENDING_PREFIX))
        .is_some_and(|hex| hex.len() == 16 && hex.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()))
}

/// Removes the temporary files of uploads a stopped server left in `dir` (see [`STALE_PENDING`]).
fn remove_stale_pending(dir: &OwnedFd) {
    let Ok(entries) = read_dir(dir) else { return };
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    for (name, entry) in entries {
        if entry.is_file && is_pending_name(&name) && now - entry.modified > STALE_PENDING.as_secs() as i64 {
            if let Ok(c) = cstring(Path::new(&name)) {
                // SAFETY: a NUL-terminated name relative to an open descriptor.
                unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), 0) };
            }
        }
    }
}

impl PendingFile {
    /// Renames the file over its target, atomically.
    pub fn commit(&mut self) -> io::Result<()> {
        let name = cstring(Path::new(&self.name))?;
        // SAFETY: NUL-terminated names relative to an open descriptor.
        check(unsafe {
            libc::renameat(self.dir.as_raw_fd(), self.temp.as_ptr(), self.dir.as_raw_fd(), name.as_ptr())
        })?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for PendingFile {
    fn drop(&mut self) {
        if !self.committed {
            // SAFETY: a NUL-terminated name relative to an open descriptor.
            unsafe { libc::unlinkat(self.dir.as_raw_fd(), self.temp.as_ptr(), 0) };
        }
    }
}

/// Commits the transaction of the file system `fd` is on (see [`UserRoot::commit_file_system`]).
pub fn commit_file_system_of(fd: &impl AsRawFd) -> io::Result<()> {
    // SAFETY: syncfs on an open descriptor; it only writes out its file system.
    check(unsafe { libc::syncfs(fd.as_raw_fd()) })
}

/// Opens the regular file `name` of the open directory `dir` (one a walk is in) for reading: no symbolic link
/// followed, anything else there a [`NotRegular`] error.
pub fn open_file_in(dir: &OwnedFd, name: &OsStr) -> io::Result<File> {
    open_regular(dir, Path::new(name))
}

/// Opens the regular file `path` below `dir` for reading. First as `O_PATH` (opening a FIFO for reading waits for a
/// writer; opening a device acts on it): only once `fstat` says it is a regular file is the inode that descriptor
/// pins (not the name again, which the user's functions may have swapped meanwhile) opened for reading.
fn open_regular(dir: &OwnedFd, path: &Path) -> io::Result<File> {
    let pinned = open_beneath(dir, path, libc::O_PATH | libc::O_NOFOLLOW, 0)?;
    let stat = fstat_raw(&pinned)?;
    if stat.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(NotRegular::of(stat.st_mode));
    }
    File::open(fd_path(&pinned))
}

/// What a [`walk`] does in each directory.
pub trait Visitor {
    /// The walk is in `dir`, whose entries are `entries` (in the order the file system lists them): returns the
    /// names of the subdirectories to walk, in the order to walk them.
    fn enter(&mut self, dir: &OwnedFd, entries: Vec<(OsString, Entry)>) -> io::Result<Vec<OsString>>;

    /// The walk of `name`, a subdirectory of `parent`, is done.
    fn leave(&mut self, _parent: &OwnedFd, _name: &OsStr) -> io::Result<()> {
        Ok(())
    }
}

/// A directory's identity: what `..` must lead back to.
type Identity = (u64, u64);

fn identity(fd: &OwnedFd) -> io::Result<Identity> {
    let stat = fstat_raw(fd)?;
    Ok((stat.st_dev, stat.st_ino))
}

/// Walks `top` and the directories below it, depth first (a directory is entered before those below it, which are
/// walked in the order `enter` gives them). The user's functions make these trees, as deep as they like: so no
/// recursion, and no descriptor held per level (a few thousand levels would use up the server's descriptors). The
/// walk holds the directory it is in; it goes down by name (`openat2` below it, no link followed) and back up
/// through `..`, which must be the very directory it came down from (device and inode), or the walk stops with
/// [`TreeChanged`]: a directory moved meanwhile. What it keeps per level is a name and what is left to walk there.
pub fn walk(top: OwnedFd, visitor: &mut impl Visitor) -> io::Result<()> {
    struct Level {
        identity: Identity,
        name: OsString,
        pending: std::vec::IntoIter<OsString>,
    }
    let mut current = top;
    let pending = visitor.enter(&current, read_dir(&current)?)?.into_iter();
    let mut levels = vec![Level { identity: identity(&current)?, name: OsString::new(), pending }];
    while let Some(level) = levels.last_mut() {
        if let Some(name) = level.pending.next() {
            let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW;
            let child = match open_beneath(&current, Path::new(&name), flags, 0) {
                Ok(child) => child,
                // Removed meanwhile: nothing to walk.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
                Err(e) => return Err(e),
            };
            current = child;
            let pending = visitor.enter(&current, read_dir(&current)?)?.into_iter();
            levels.push(Level { identity: identity(&current)?, name, pending });
            continue;
        }
        let Some(done) = levels.pop() else { break };
        let Some(parent) = levels.last() else { break };
        // SAFETY: a NUL-terminated literal relative to an open descriptor.
        let up = unsafe {
            libc::openat(
                current.as_raw_fd(),
                c"..".as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        };
        if up < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: openat returned a new descriptor that nothing else owns.
        current = unsafe { OwnedFd::from_raw_fd(up) };
        if identity(&current)? != parent.identity {
            return Err(io::Error::other(TreeChanged));
        }
        visitor.leave(&current, &done.name)?;
    }
    Ok(())
}

fn fstat_raw(fd: &OwnedFd) -> io::Result<libc::stat> {
    // SAFETY: an all-zero stat is a valid value; fstat writes only into it.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: the descriptor is open and `stat` outlives the call.
    check(unsafe { libc::fstat(fd.as_raw_fd(), &raw mut stat) })?;
    Ok(stat)
}

fn fstat(fd: &OwnedFd) -> io::Result<Entry> {
    Ok(entry_of(&fstat_raw(fd)?))
}

fn fstatat(dir: &OwnedFd, name: &OsStr) -> io::Result<Entry> {
    let c = cstring(Path::new(name))?;
    // SAFETY: an all-zero stat is a valid value; fstatat writes only into it.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: NUL-terminated name relative to an open descriptor; not following a link.
    check(unsafe { libc::fstatat(dir.as_raw_fd(), c.as_ptr(), &raw mut stat, libc::AT_SYMLINK_NOFOLLOW) })?;
    Ok(entry_of(&stat))
}

/// The entries of the open directory `dir` in the order the file system lists them (`os.walk`'s order), each with
/// what it is (not following symbolic links); one removed while it is listed is left out.
pub fn read_dir(dir: &OwnedFd) -> io::Result<Vec<(OsString, Entry)>> {
    let mut entries = Vec::new();
    for item in std::fs::read_dir(fd_path(dir))? {
        let name = item?.file_name();
        if let Ok(entry) = fstatat(dir, &name) {
            entries.push((name, entry));
        }
    }
    Ok(entries)
}

fn unlink(dir: &OwnedFd, name: &OsStr, flags: libc::c_int) -> io::Result<()> {
    let c = cstring(Path::new(name))?;
    // SAFETY: NUL-terminated name relative to an open descriptor.
    match check(unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), flags) }) {
        // Removed meanwhile: as good.
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

/// Removes what a walk goes through: a directory's other entries when it is entered, the directory once left.
struct Remover;

impl Visitor for Remover {
    fn enter(&mut self, dir: &OwnedFd, entries: Vec<(OsString, Entry)>) -> io::Result<Vec<OsString>> {
        let mut subdirs = Vec::new();
        for (name, entry) in entries {
            if entry.is_dir {
                subdirs.push(name);
            } else {
                unlink(dir, &name, 0)?;
            }
        }
        Ok(subdirs)
    }

    fn leave(&mut self, parent: &OwnedFd, name: &OsStr) -> io::Result<()> {
        unlink(parent, name, libc::AT_REMOVEDIR)
    }
}

/// Removes `name` of the open directory `dir` with everything below it, never leaving `dir`'s tree.
fn remove_in(dir: &OwnedFd, name: &OsStr) -> io::Result<()> {
    if !fstatat(dir, name)?.is_dir {
        let c = cstring(Path::new(name))?;
        // SAFETY: NUL-terminated name relative to an open descriptor.
        return check(unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), 0) });
    }
    let top = open_beneath(dir, Path::new(name), libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW, 0)?;
    walk(top, &mut Remover)?;
    let c = cstring(Path::new(name))?;
    // SAFETY: as above.
    check(unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), libc::AT_REMOVEDIR) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStringExt;

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

    fn user_root() -> (tempfile::TempDir, UserRoot) {
        let dir = tempfile::tempdir().unwrap();
        let root = UserRoot::open(dir.path(), unsafe { libc::geteuid() }).unwrap();
        (dir, root)
    }

    /// Runs `work` on another thread, failing if it takes over 10 s (it waits on a FIFO, say).
    fn within_seconds<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
        let (send, receive) = std::sync::mpsc::channel();
        std::thread::spawn(move || send.send(work()));
        receive.recv_timeout(std::time::Duration::from_secs(10)).expect("it did not finish within 10 s")
    }

    #[test]
    fn a_fifo_or_socket_is_refused_not_opened() {
        let (dir, root) = user_root();
        let fifo = CString::new(dir.path().join("p").into_os_string().into_vec()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        let _socket = std::os::unix::net::UnixListener::bind(dir.path().join("s")).unwrap();
        std::fs::create_dir(dir.path().join("d")).unwrap();
        std::fs::write(dir.path().join("f"), "old").unwrap();
        let (dir, root) = within_seconds(move || {
            let parse = |p: &str| RelPath::parse(p).unwrap();
            for (name, what) in [("p", "a FIFO (named pipe)"), ("s", "a socket"), ("d", "a directory")] {
                let error = root.open_file(&parse(name)).unwrap_err();
                assert_eq!(NotRegular::of_error(&error), Some(&NotRegular { what }), "{name}: {error}");
            }
            let top = root.open_dir(&RelPath::root()).unwrap();
            let error = root.create_in(&top, "p").unwrap_err();
            assert!(NotRegular::of_error(&error).is_some(), "{error}");
            assert!(NotRegular::of_error(&open_file_in(&top, OsStr::new("p")).unwrap_err()).is_some());
            // A file put there replaces the FIFO.
            let (pending, mut file) = root.create_pending(&parse("p")).unwrap();
            std::io::Write::write_all(&mut file, b"new").unwrap();
            let mut pending = pending;
            pending.commit().unwrap();
            assert_eq!(std::io::read_to_string(root.open_file(&parse("p")).unwrap()).unwrap(), "new");
            (dir, root)
        });
        assert_eq!(std::fs::read(dir.path().join("p")).unwrap(), b"new");
        drop(root);
    }

    #[test]
    fn a_pending_file_replaces_its_target_only_once_committed() {
        let (dir, root) = user_root();
        let parse = |p: &str| RelPath::parse(p).unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/f"), "old").unwrap();
        std::fs::set_permissions(dir.path().join("sub/f"), std::fs::Permissions::from_mode(0o750)).unwrap();
        let (pending, mut file) = root.create_pending(&parse("sub/f")).unwrap();
        std::io::Write::write_all(&mut file, b"partial").unwrap();
        drop(pending);
        assert_eq!(std::fs::read(dir.path().join("sub/f")).unwrap(), b"old");
        let names: Vec<_> = root.list(&parse("sub")).unwrap().into_iter().map(|e| e.0).collect();
        assert_eq!(names, ["f"]);
        // One a stopped server left a day ago goes with the next upload there; one being received is not listed.
        let stale = dir.path().join("sub/.fal-part-00000000000000aa");
        std::fs::write(&stale, "left").unwrap();
        let old = std::time::SystemTime::now() - STALE_PENDING - std::time::Duration::from_secs(60);
        std::fs::File::options().write(true).open(&stale).unwrap().set_modified(old).unwrap();
        let (mut pending, mut file) = root.create_pending(&parse("sub/f")).unwrap();
        assert!(!stale.exists(), "a stale temporary file is removed");
        assert_eq!(pending.replaces, Some(3));
        let names: Vec<_> = root.list(&parse("sub")).unwrap().into_iter().map(|e| e.0).collect();
        assert_eq!(names, ["f"], "an upload being received is not listed");
        std::io::Write::write_all(&mut file, b"new").unwrap();
        pending.commit().unwrap();
        assert_eq!(std::fs::read(dir.path().join("sub/f")).unwrap(), b"new");
        let mode = std::fs::metadata(dir.path().join("sub/f")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o750, "the replacement keeps the replaced file's permissions");
        let names: Vec<_> = root.list(&parse("sub")).unwrap().into_iter().map(|e| e.0).collect();
        assert_eq!(names, ["f"]);
        // Over a directory: refused before anything is received.
        assert_eq!(root.create_pending(&parse("sub")).unwrap_err().raw_os_error(), Some(libc::EISDIR));
    }

    /// Counts the directories entered, and the most descriptors the process had open meanwhile.
    struct Count {
        dirs: usize,
        most_fds: usize,
    }

    impl Visitor for Count {
        fn enter(&mut self, _dir: &OwnedFd, entries: Vec<(OsString, Entry)>) -> io::Result<Vec<OsString>> {
            self.dirs += 1;
            self.most_fds = self.most_fds.max(std::fs::read_dir("/proc/self/fd")?.count());
            Ok(entries.into_iter().filter(|(_, e)| e.is_dir).map(|(name, _)| name).collect())
        }
    }

    #[test]
    fn a_deep_tree_is_walked_and_removed_with_a_few_descriptors() {
        const DEPTH: usize = 5_000;
        let (dir, root) = user_root();
        // What a user's function can make: `os.mkdir("d"); os.chdir("d")`, over and over.
        let mut at = root.open_dir(&RelPath::root()).unwrap();
        for _ in 0..DEPTH {
            assert_eq!(unsafe { libc::mkdirat(at.as_raw_fd(), c"d".as_ptr(), 0o755) }, 0);
            at = open_beneath(&at, Path::new("d"), libc::O_RDONLY | libc::O_DIRECTORY, 0).unwrap();
        }
        let bottom = root.create_in(&at, "f").unwrap();
        std::io::Write::write_all(&mut &bottom, b"bottom").unwrap();
        drop((at, bottom));
        // On a small stack: a walk that recursed per level would overflow it.
        let walker = std::thread::Builder::new().stack_size(256 << 10);
        let dir = walker
            .spawn(move || {
                let before = std::fs::read_dir("/proc/self/fd").unwrap().count();
                let mut count = Count { dirs: 0, most_fds: 0 };
                root.walk(&RelPath::root(), &mut count).unwrap();
                assert_eq!(count.dirs, DEPTH + 1);
                // Other tests run meanwhile in this process: a margin, far below one per level.
                assert!(count.most_fds < before + 50, "{} descriptors open, {before} before", count.most_fds);
                assert_eq!(crate::storage::usage(&root, &RelPath::root()).unwrap(), 6);
                root.remove(&RelPath::parse("d").unwrap()).unwrap();
                dir
            })
            .unwrap()
            .join()
            .unwrap();
        assert!(!dir.path().join("d").exists());
    }

    #[test]
    fn a_walk_stops_where_a_directory_was_moved_under_it() {
        let (dir, root) = user_root();
        std::fs::create_dir_all(dir.path().join("top/a/b")).unwrap();
        std::fs::create_dir(dir.path().join("x")).unwrap();
        struct Mover(PathBuf);
        impl Visitor for Mover {
            fn enter(&mut self, _dir: &OwnedFd, entries: Vec<(OsString, Entry)>) -> io::Result<Vec<OsString>> {
                if entries.is_empty() {
                    // In `b`: `a` moves elsewhere, so `..` of `a` is no longer `top`.
                    std::fs::rename(self.0.join("top/a"), self.0.join("x/a"))?;
                }
                Ok(entries.into_iter().filter(|(_, e)| e.is_dir).map(|(name, _)| name).collect())
            }
        }
        let error = root.walk(&RelPath::parse("top").unwrap(), &mut Mover(dir.path().to_path_buf())).unwrap_err();
        assert!(error.get_ref().is_some_and(|e| e.is::<TreeChanged>()), "{error}");
    }
}
