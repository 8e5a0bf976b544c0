//! The zero-config local server's credentials file: its address and a local admin key, for this user's SDK and CLI.
//!
//! It holds an admin key, so it is read only when it and its directory are this user's alone: both owned by the
//! current user, the file readable and writable by nobody else, the directory writable by nobody else (who could
//! otherwise swap the file for one of theirs). It is written the same way: the directory made 0700, the file 0600,
//! written aside and renamed into place. Without `HOME` (a service, a container) it lives in
//! `$XDG_RUNTIME_DIR/fal-serverless`, else `/tmp/fal-serverless-<uid>`: never a directory other users share.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

const FILE_NAME: &str = "local-server.json";

/// What the zero-config local server writes for its clients (mode 0600).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LocalServer {
    pub host: String,
    pub key_id: String,
    pub key_secret: String,
    pub pid: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("cannot use the local server's credentials at {path}: {error}")]
    Io {
        path: PathBuf,
        // Not `source`: the message carries it (the Python SDK shows messages alone), and a source would repeat it.
        error: std::io::Error,
    },
    #[error(
        "{path} belongs to uid {owner}, not to you (uid {uid}), so the local server's credentials in it cannot be \
         trusted: remove it, or set FAL_SERVERLESS_CONFIG_DIR to a directory of your own"
    )]
    NotOwned { path: PathBuf, owner: u32, uid: u32 },
    #[error(
        "{path} can be {how} by other users (mode {mode:03o}) and holds or guards the local server's admin key: run \
         `chmod {fix} {path}`"
    )]
    TooOpen { path: PathBuf, how: &'static str, mode: u32, fix: &'static str },
    #[error("{path} is not a {what}: remove it")]
    NotA { path: PathBuf, what: &'static str },
}

impl LocalServer {
    /// `$FAL_SERVERLESS_CONFIG_DIR/local-server.json`, else in `$XDG_CONFIG_HOME/fal-serverless`, else in
    /// `~/.config/fal-serverless`; without `HOME`, in `$XDG_RUNTIME_DIR/fal-serverless`, else in
    /// `/tmp/fal-serverless-<uid>`.
    pub fn credentials_path() -> PathBuf {
        credentials_path_with(|name| std::env::var_os(name), euid(), &std::env::temp_dir())
    }

    /// The local server's credentials, `None` when there are none (or an unreadable leftover); an error when the
    /// file or its directory could be someone else's.
    pub fn read() -> Result<Option<Self>, CredentialsError> {
        read_from(&Self::credentials_path())
    }

    /// Makes the credentials file's directory if it is missing (mode 0700) and checks it is the user's alone;
    /// returns the file's path. The SDK keeps the local server's lock and log there too.
    pub fn prepare_dir() -> Result<PathBuf, CredentialsError> {
        let path = Self::credentials_path();
        prepare_dir_of(&path)?;
        Ok(path)
    }

    /// Writes these credentials (mode 0600, renamed into place); returns where.
    pub fn write(&self) -> Result<PathBuf, CredentialsError> {
        let path = Self::prepare_dir()?;
        write_to(self, &path)?;
        Ok(path)
    }
}

fn credentials_path_with(var: impl Fn(&str) -> Option<OsString>, uid: u32, tmp: &Path) -> PathBuf {
    let var = |name: &str| var(name).filter(|value| !value.is_empty()).map(PathBuf::from);
    var("FAL_SERVERLESS_CONFIG_DIR")
        .or_else(|| var("XDG_CONFIG_HOME").map(|d| d.join("fal-serverless")))
        .or_else(|| var("HOME").map(|h| h.join(".config").join("fal-serverless")))
        .or_else(|| var("XDG_RUNTIME_DIR").map(|d| d.join("fal-serverless")))
        // Per user, and checked to be this user's before use: another user may have made it first.
        .unwrap_or_else(|| tmp.join(format!("fal-serverless-{uid}")))
        .join(FILE_NAME)
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> CredentialsError + '_ {
    move |error| CredentialsError::Io { path: path.to_path_buf(), error }
}

fn read_from(path: &Path) -> Result<Option<LocalServer>, CredentialsError> {
    // Not through a symbolic link: the file is only ever written in place, never linked.
    let opened = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path);
    let mut file = match opened {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(CredentialsError::NotA {
                path: path.to_path_buf(),
                what: "regular file (it is a symbolic link)",
            })
        }
        Err(e) => return Err(io_error(path)(e)),
    };
    if let Some(dir) = path.parent() {
        check_dir(dir, &std::fs::metadata(dir).map_err(io_error(dir))?)?;
    }
    // The file as opened, not the path: what is checked is what is read.
    check_file(path, &file.metadata().map_err(io_error(path))?)?;
    let mut text = Vec::new();
    file.read_to_end(&mut text).map_err(io_error(path))?;
    // Written whole and renamed into place, so anything unparsable is no server's: the next start replaces it.
    Ok(serde_json::from_slice(&text).ok())
}

fn prepare_dir_of(path: &Path) -> Result<(), CredentialsError> {
    let Some(dir) = path.parent() else { return Ok(()) };
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io_error(dir))?;
    check_dir(dir, &std::fs::metadata(dir).map_err(io_error(dir))?)
}

fn write_to(info: &LocalServer, path: &Path) -> Result<(), CredentialsError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let staging = dir.join(format!(".{FILE_NAME}.{}", std::process::id()));
    // A leftover of a crashed writer with this pid; create_new below never opens an existing file.
    let _ = std::fs::remove_file(&staging);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&staging)
        .map_err(io_error(&staging))?;
    let text = serde_json::to_vec_pretty(info).map_err(|e| io_error(&staging)(e.into()))?;
    file.write_all(&text).and_then(|()| file.sync_all()).map_err(io_error(&staging))?;
    std::fs::rename(&staging, path).map_err(io_error(path))
}

fn check_owner(path: &Path, metadata: &std::fs::Metadata) -> Result<(), CredentialsError> {
    let uid = euid();
    if metadata.uid() != uid {
        return Err(CredentialsError::NotOwned { path: path.to_path_buf(), owner: metadata.uid(), uid });
    }
    Ok(())
}

fn check_dir(path: &Path, metadata: &std::fs::Metadata) -> Result<(), CredentialsError> {
    if !metadata.is_dir() {
        return Err(CredentialsError::NotA { path: path.to_path_buf(), what: "directory" });
    }
    check_owner(path, metadata)?;
    // Reading the directory only shows the file's name; writing it would let another user replace the file.
    let mode = metadata.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(CredentialsError::TooOpen { path: path.to_path_buf(), how: "written", mode, fix: "go-w" });
    }
    Ok(())
}

fn check_file(path: &Path, metadata: &std::fs::Metadata) -> Result<(), CredentialsError> {
    if !metadata.is_file() {
        return Err(CredentialsError::NotA { path: path.to_path_buf(), what: "regular file" });
    }
    check_owner(path, metadata)?;
    let mode = metadata.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(CredentialsError::TooOpen { path: path.to_path_buf(), how: "read or written", mode, fix: "600" });
    }
    Ok(())
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn info() -> LocalServer {
        LocalServer { host: "127.0.0.1:1".into(), key_id: "id".into(), key_secret: "secret".into(), pid: 1 }
    }

    fn chmod(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn without_home_the_path_is_per_user_never_a_shared_one() {
        let tmp = Path::new("/tmp");
        let vars = |set: &'static [(&'static str, &'static str)]| {
            move |name: &str| set.iter().find(|(n, _)| *n == name).map(|(_, v)| OsString::from(v))
        };
        let path = |set| credentials_path_with(vars(set), 1234, tmp);
        assert_eq!(path(&[("HOME", "/home/a")]), Path::new("/home/a/.config/fal-serverless/local-server.json"));
        assert_eq!(
            path(&[("HOME", "/h"), ("XDG_CONFIG_HOME", "/x")]),
            Path::new("/x/fal-serverless/local-server.json")
        );
        assert_eq!(path(&[("FAL_SERVERLESS_CONFIG_DIR", "/c"), ("HOME", "/h")]), Path::new("/c/local-server.json"));
        assert_eq!(
            path(&[("XDG_RUNTIME_DIR", "/run/user/7")]),
            Path::new("/run/user/7/fal-serverless/local-server.json")
        );
        assert_eq!(path(&[("HOME", "")]), Path::new("/tmp/fal-serverless-1234/local-server.json"));
        assert_eq!(path(&[]), Path::new("/tmp/fal-serverless-1234/local-server.json"));
    }

    #[test]
    fn written_safely_and_read_back() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join("fal-serverless-1").join(FILE_NAME);
        assert_eq!(read_from(&path).unwrap(), None);
        prepare_dir_of(&path).unwrap();
        write_to(&info(), &path).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!((mode(path.parent().unwrap()), mode(&path)), (0o700, 0o600));
        assert_eq!(read_from(&path).unwrap(), Some(info()));
        // Rewriting replaces it.
        write_to(&LocalServer { pid: 2, ..info() }, &path).unwrap();
        assert_eq!(read_from(&path).unwrap().map(|i| i.pid), Some(2));
        std::fs::write(&path, "{not json").unwrap();
        assert_eq!(read_from(&path).unwrap(), None);
    }

    #[test]
    fn a_file_or_dir_others_can_reach_is_refused_with_the_fix() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join("config").join(FILE_NAME);
        prepare_dir_of(&path).unwrap();
        write_to(&info(), &path).unwrap();
        chmod(&path, 0o644);
        let error = read_from(&path).unwrap_err().to_string();
        assert!(error.contains("read or written by other users") && error.contains("chmod 600"), "{error}");
        chmod(&path, 0o600);
        chmod(path.parent().unwrap(), 0o777);
        let error = read_from(&path).unwrap_err().to_string();
        assert!(error.contains("written by other users") && error.contains("chmod go-w"), "{error}");
        assert!(matches!(prepare_dir_of(&path), Err(CredentialsError::TooOpen { .. })));
        // A directory others can only read is fine: they see the file's name, not what it holds.
        chmod(path.parent().unwrap(), 0o755);
        assert_eq!(read_from(&path).unwrap(), Some(info()));
    }

    #[test]
    fn a_symbolic_link_or_someone_elses_file_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("config");
        let path = dir.join(FILE_NAME);
        prepare_dir_of(&path).unwrap();
        let elsewhere = root.path().join("elsewhere.json");
        write_to(&info(), &elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &path).unwrap();
        assert!(matches!(read_from(&path), Err(CredentialsError::NotA { .. })));
        std::fs::remove_file(&path).unwrap();
        if euid() == 0 {
            // Another user's file (and then another user's directory), made as root can.
            write_to(&info(), &path).unwrap();
            std::os::unix::fs::chown(&path, Some(65534), None).unwrap();
            let error = read_from(&path).unwrap_err().to_string();
            assert!(error.contains("belongs to uid 65534"), "{error}");
            std::os::unix::fs::chown(&path, Some(0), None).unwrap();
            std::os::unix::fs::chown(&dir, Some(65534), None).unwrap();
            assert!(matches!(read_from(&path), Err(CredentialsError::NotOwned { owner: 65534, .. })));
            assert!(matches!(prepare_dir_of(&path), Err(CredentialsError::NotOwned { .. })));
        }
    }
}
