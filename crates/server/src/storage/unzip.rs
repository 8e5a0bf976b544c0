//! Unpacking an uploaded zip (what `sync_dir` sends) into a user's storage, safely.
//!
//! Every entry's name is checked as a request's path is (`confine.rs`: relative, no `..`, no absolute name, no name
//! over 255 bytes), symbolic-link entries are refused, and what is written goes through the user's root descriptor
//! (no link the user's functions left is followed). The bytes written are counted as they are inflated, not as the
//! archive declares them: past `max_bytes` (what the user's quota has left) the upload stops, so a zip bomb costs at
//! most that. Entries are written in the archive's order (so the stored directory lists in the order the client
//! walked it: `check_hash` relies on it).

use std::io::{Read, Write};

use super::confine::{RelPath, UserRoot};

/// The most entries one archive may hold.
pub const MAX_ENTRIES: usize = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum UnzipError {
    #[error("the upload is not a zip archive: {0}")]
    NotZip(String),
    #[error("the archive's entry {name:?} is refused: {why}")]
    BadEntry { name: String, why: String },
    #[error("the archive holds more than {MAX_ENTRIES} entries")]
    TooManyEntries,
    #[error("the archive unpacks to more than the {limit} bytes your storage quota has left")]
    OverQuota { limit: u64 },
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Unpacks `archive` into `into` (a directory below `root`, made if missing). Returns the bytes written.
pub fn unzip<R: Read + std::io::Seek>(
    archive: R,
    root: &UserRoot,
    into: &RelPath,
    max_bytes: u64,
) -> Result<u64, UnzipError> {
    let mut zip = zip::ZipArchive::new(archive).map_err(|e| UnzipError::NotZip(e.to_string()))?;
    if zip.len() > MAX_ENTRIES {
        return Err(UnzipError::TooManyEntries);
    }
    let write_error = |path: &RelPath| {
        let path = path.display();
        move |source: std::io::Error| {
            if source.raw_os_error() == Some(libc::EDQUOT) || source.raw_os_error() == Some(libc::ENOSPC) {
                return UnzipError::OverQuota { limit: max_bytes };
            }
            UnzipError::Write { path: path.clone(), source }
        }
    };
    root.make_dirs(into).map_err(write_error(into))?;
    let mut written: u64 = 0;
    let mut buffer = vec![0u8; 64 << 10];
    for index in 0..zip.len() {
        let mut entry = zip.by_index(index).map_err(|e| UnzipError::NotZip(e.to_string()))?;
        let name = entry.name().map_err(|e| UnzipError::NotZip(e.to_string()))?.to_string();
        let bad = |why: &str| UnzipError::BadEntry { name: name.clone(), why: why.to_string() };
        if name.starts_with('/') || name.starts_with('\\') || name.contains('\\') {
            return Err(bad("its name is absolute or has a backslash; names are relative, with `/`"));
        }
        if entry.is_symlink() {
            return Err(bad("it is a symbolic link; archives of regular files and directories only"));
        }
        let relative = RelPath::parse(&name).map_err(|e| bad(&e.to_string()))?;
        if relative.is_root() {
            continue;
        }
        let mut path = into.clone();
        for part in relative.components() {
            path = path.join(part);
        }
        if entry.is_dir() {
            root.make_dirs(&path).map_err(write_error(&path))?;
            continue;
        }
        let Some((parent, file_name)) = path.split_last() else { continue };
        let dir = root.make_dirs(&parent).map_err(write_error(&path))?;
        let mut file = root.create_in(&dir, file_name).map_err(write_error(&path))?;
        loop {
            let read = entry.read(&mut buffer).map_err(|e| bad(&format!("it cannot be inflated: {e}")))?;
            if read == 0 {
                break;
            }
            written += read as u64;
            if written > max_bytes {
                return Err(UnzipError::OverQuota { limit: max_bytes });
            }
            file.write_all(&buffer[..read]).map_err(write_error(&path))?;
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;
    use zip::write::SimpleFileOptions;

    fn archive(entries: &[(&str, &[u8])]) -> Cursor<Vec<u8>> {
        let mut writer = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let options = SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
        for (name, data) in entries {
            writer.start_file(*name, options).unwrap();
            writer.write_all(data).unwrap();
        }
        let mut cursor = writer.finish().unwrap();
        cursor.set_position(0);
        cursor
    }

    fn root() -> (tempfile::TempDir, UserRoot) {
        let dir = tempfile::tempdir().unwrap();
        let root = UserRoot::open(dir.path(), unsafe { libc::geteuid() }).unwrap();
        (dir, root)
    }

    #[test]
    fn unpacks_files_and_directories_in_order() {
        let (dir, root) = root();
        let into = RelPath::parse("sync/x").unwrap();
        let written =
            unzip(archive(&[("b.txt", b"bee"), ("sub/a.txt", b"a"), (".fal_hash", b"h")]), &root, &into, 100).unwrap();
        assert_eq!(written, 5);
        assert_eq!(std::fs::read(dir.path().join("sync/x/sub/a.txt")).unwrap(), b"a");
        assert_eq!(std::fs::read(dir.path().join("sync/x/b.txt")).unwrap(), b"bee");
    }

    #[test]
    fn hostile_entries_are_refused_and_write_nothing_outside() {
        let (dir, root) = root();
        let into = RelPath::parse("in").unwrap();
        for name in ["../escape", "a/../../escape", "/etc/escape", "..\\escape"] {
            let error = unzip(archive(&[(name, b"x")]), &root, &into, 100).unwrap_err();
            assert!(matches!(error, UnzipError::BadEntry { .. }), "{name}: {error}");
        }
        assert!(!dir.path().join("escape").exists() && !dir.path().parent().unwrap().join("escape").exists());
        // A symbolic-link entry.
        let mut writer = zip::ZipWriter::new(Cursor::new(Vec::new()));
        writer.add_symlink("link", "/etc/passwd", SimpleFileOptions::default()).unwrap();
        let mut cursor = writer.finish().unwrap();
        cursor.set_position(0);
        assert!(matches!(unzip(cursor, &root, &into, 100), Err(UnzipError::BadEntry { .. })));
        // A link the user left in their storage is not followed by an entry below it.
        std::os::unix::fs::symlink(dir.path().parent().unwrap(), dir.path().join("in/out")).unwrap();
        assert!(unzip(archive(&[("out/escape2", b"x")]), &root, &into, 100).is_err());
        assert!(!dir.path().parent().unwrap().join("escape2").exists());
        assert!(matches!(unzip(Cursor::new(b"not a zip".to_vec()), &root, &into, 100), Err(UnzipError::NotZip(_))));
    }

    #[test]
    fn a_zip_bomb_stops_at_the_quota() {
        let (dir, root) = root();
        let zeros = vec![0u8; 10 << 20];
        let bomb = archive(&[("zeros", &zeros)]);
        assert!(bomb.get_ref().len() < 100 << 10, "deflated to {} bytes", bomb.get_ref().len());
        let error = unzip(bomb, &root, &RelPath::parse("b").unwrap(), 1 << 20).unwrap_err();
        assert!(matches!(error, UnzipError::OverQuota { limit } if limit == 1 << 20), "{error}");
        let size = std::fs::metadata(dir.path().join("b/zeros")).map(|m| m.len()).unwrap_or(0);
        assert!(size <= 1 << 20, "{size}");
    }
}
