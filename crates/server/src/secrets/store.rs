//! Secrets at rest: a table of the shared SQLite file, each value encrypted with XChaCha20-Poly1305 under a key kept
//! in a file of its own (`secrets.key`, mode 0600), so that the database alone (a copy, a backup) reveals no value.
//!
//! Each value has a random 192-bit nonce (random nonces of that size never repeat in practice) and is bound to its
//! user and name as associated data: a ciphertext moved to another row (another user's, another name) fails to
//! decrypt instead of handing its value to someone else. The key's fingerprint (a hash of it) is kept in the
//! database, so that a server started with another key file, or without the one its secrets were stored with, stops
//! with a clear error instead of failing every call (or silently dropping the secrets).

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::RngCore;
use rusqlite::{params, OptionalExtension, TransactionBehavior};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::{SecretValue, SecretsError};

const SCHEMA: &str = "
-- Users' secrets: each value encrypted (XChaCha20-Poly1305) with the key file's key, its user and name bound as
-- associated data.
CREATE TABLE IF NOT EXISTS secrets (
    user_id    TEXT NOT NULL,
    name       TEXT NOT NULL,
    nonce      BLOB NOT NULL,
    ciphertext BLOB NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (user_id, name)
);
-- The fingerprint of the key the secrets are encrypted with (one row).
CREATE TABLE IF NOT EXISTS secrets_key (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    fingerprint BLOB NOT NULL
);
";

/// What the associated data of every value starts with: a format version, so another format never decrypts as this.
const AD_PREFIX: &[u8] = b"fal-serverless secret v1\0";
const KEY_BYTES: usize = 32;
const NONCE_BYTES: usize = 24;

/// A secret's record, without its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretInfo {
    pub user_id: String,
    pub name: String,
    /// When its current value was set (seconds since the epoch).
    pub created_at: i64,
}

/// The key of the secrets, from its file. Printed as `***`.
struct SecretKey(Zeroizing<[u8; KEY_BYTES]>);

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(***)")
    }
}

impl SecretKey {
    fn fingerprint(&self) -> Vec<u8> {
        let mut hash = Sha256::new();
        hash.update(b"fal-serverless secrets key fingerprint v1\0");
        hash.update(self.0.as_slice());
        hash.finalize().to_vec()
    }

    /// Reads the key file: 64 hex digits (and a newline), readable by its owner alone.
    fn read(path: &Path) -> Result<Self, SecretsError> {
        let unreadable = |reason: String| SecretsError::KeyFile { path: path.to_path_buf(), reason };
        let metadata = std::fs::metadata(path).map_err(|e| unreadable(e.to_string()))?;
        let mode = metadata.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(unreadable(format!(
                "it is readable by others (mode {mode:04o}); make it the server's alone: chmod 600 {}",
                path.display()
            )));
        }
        let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| unreadable(e.to_string()))?);
        let mut key = Zeroizing::new([0u8; KEY_BYTES]);
        hex::decode_to_slice(text.trim(), key.as_mut_slice()).map_err(|_| {
            unreadable(format!("it does not hold a key ({} hex digits, as the server writes it)", KEY_BYTES * 2))
        })?;
        Ok(Self(key))
    }

    /// Makes a new key and writes it to `path` (which must not exist), mode 0600.
    fn create(path: &Path) -> Result<Self, SecretsError> {
        let failed = |e: std::io::Error| SecretsError::KeyFile { path: path.to_path_buf(), reason: e.to_string() };
        let mut key = Zeroizing::new([0u8; KEY_BYTES]);
        rand::rng().fill_bytes(key.as_mut_slice());
        let mut file =
            std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(failed)?;
        let text = Zeroizing::new(format!("{}\n", hex::encode(key.as_slice())));
        file.write_all(text.as_bytes()).and_then(|()| file.sync_all()).map_err(failed)?;
        Ok(Self(key))
    }
}

pub struct SecretStore {
    db: crate::db::Database,
    cipher: XChaCha20Poly1305,
    key_file: PathBuf,
}

impl std::fmt::Debug for SecretStore {
    /// The key file's path, never the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretStore").field("key_file", &self.key_file).finish_non_exhaustive()
    }
}

impl SecretStore {
    /// Opens the secrets of the database at `path` with the key in `key_file`, which is created (mode 0600) when it
    /// is missing and no secret needs it. Fails, saying what to do, when the key file is unreadable, is not the one
    /// the stored secrets were encrypted with, or is missing while secrets need it.
    pub fn open(path: &Path, key_file: &Path) -> Result<Self, SecretsError> {
        let db = crate::db::Database::open(path, SCHEMA)?;
        let (stored, count) = {
            let connection = db.lock();
            let stored: Option<Vec<u8>> = connection
                .query_row("SELECT fingerprint FROM secrets_key WHERE id = 1", [], |row| row.get(0))
                .optional()?;
            let count: i64 = connection.query_row("SELECT COUNT(*) FROM secrets", [], |row| row.get(0))?;
            (stored, count)
        };
        let key = match std::fs::symlink_metadata(key_file) {
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                if count > 0 {
                    return Err(SecretsError::KeyMissing { path: key_file.to_path_buf(), count });
                }
                SecretKey::create(key_file)?
            }
            _ => SecretKey::read(key_file)?,
        };
        let fingerprint = key.fingerprint();
        if stored.as_ref().is_some_and(|stored| *stored != fingerprint) && count > 0 {
            return Err(SecretsError::WrongKey { path: key_file.to_path_buf(), count });
        }
        if stored.as_ref() != Some(&fingerprint) {
            db.lock().execute(
                "INSERT INTO secrets_key (id, fingerprint) VALUES (1, ?1)
                 ON CONFLICT (id) DO UPDATE SET fingerprint = excluded.fingerprint",
                [&fingerprint],
            )?;
        }
        let cipher = XChaCha20Poly1305::new(key.0.as_slice().into());
        Ok(Self { db, cipher, key_file: key_file.to_path_buf() })
    }

    /// Runs `work` on the store on a blocking thread (see [`crate::db::blocking`]).
    pub async fn blocking<T: Send + 'static>(
        self: &Arc<Self>,
        work: impl FnOnce(&SecretStore) -> Result<T, SecretsError> + Send + 'static,
    ) -> Result<T, SecretsError> {
        crate::db::blocking(self, work).await
    }

    pub fn key_file(&self) -> &Path {
        &self.key_file
    }

    /// Sets `user`'s secret `name` (a new one, or a new value), unless that would take `user` past `max_per_user`.
    pub fn set(&self, user: &str, name: &str, value: &SecretValue, max_per_user: u32) -> Result<(), SecretsError> {
        let mut nonce = [0u8; NONCE_BYTES];
        rand::rng().fill_bytes(&mut nonce);
        let ad = associated_data(user, name);
        let ciphertext = self
            .cipher
            .encrypt(XNonce::from_slice(&nonce), Payload { msg: value.expose().as_bytes(), aad: &ad })
            .map_err(|_| SecretsError::Encrypt)?;
        let mut db = self.db.lock();
        // Counted and written in one transaction: secrets set at once cannot pass the cap together.
        let tx = db.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let exists: bool = tx
            .query_row("SELECT 1 FROM secrets WHERE user_id = ?1 AND name = ?2", params![user, name], |_| Ok(()))
            .optional()?
            .is_some();
        if !exists {
            let held: i64 =
                tx.query_row("SELECT COUNT(*) FROM secrets WHERE user_id = ?1", [user], |row| row.get(0))?;
            if held >= i64::from(max_per_user) {
                return Err(SecretsError::TooMany { user: user.to_string(), cap: max_per_user });
            }
        }
        tx.execute(
            "INSERT INTO secrets (user_id, name, nonce, ciphertext, created_at) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (user_id, name) DO UPDATE SET nonce = excluded.nonce, ciphertext = excluded.ciphertext,
                                                       created_at = excluded.created_at",
            params![user, name, nonce.to_vec(), ciphertext, now()],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Deletes `user`'s secret `name`; an error if there is none.
    pub fn delete(&self, user: &str, name: &str) -> Result<(), SecretsError> {
        let deleted =
            self.db.lock().execute("DELETE FROM secrets WHERE user_id = ?1 AND name = ?2", params![user, name])?;
        if deleted == 0 {
            return Err(SecretsError::NotFound { user: user.to_string(), name: name.to_string() });
        }
        Ok(())
    }

    /// Secrets (names and times, no values) of `user`, or of every user; by user, then name.
    pub fn list(&self, user: Option<&str>) -> Result<Vec<SecretInfo>, SecretsError> {
        let db = self.db.lock();
        let mut statement = db.prepare(
            "SELECT user_id, name, created_at FROM secrets WHERE (?1 IS NULL OR user_id = ?1) ORDER BY user_id, name",
        )?;
        let rows = statement.query_map(params![user], |row| {
            Ok(SecretInfo { user_id: row.get(0)?, name: row.get(1)?, created_at: row.get(2)? })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// `user`'s secrets with their values, decrypted, by name.
    pub fn values(&self, user: &str) -> Result<Vec<(String, SecretValue)>, SecretsError> {
        let rows: Vec<(String, Vec<u8>, Vec<u8>)> = {
            let db = self.db.lock();
            let mut statement =
                db.prepare_cached("SELECT name, nonce, ciphertext FROM secrets WHERE user_id = ?1 ORDER BY name")?;
            let rows = statement.query_map([user], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?;
            rows.collect::<Result<_, _>>()?
        };
        rows.into_iter()
            .map(|(name, nonce, ciphertext)| {
                let value = self.decrypt(user, &name, &nonce, &ciphertext)?;
                Ok((name, value))
            })
            .collect()
    }

    fn decrypt(&self, user: &str, name: &str, nonce: &[u8], ciphertext: &[u8]) -> Result<SecretValue, SecretsError> {
        let undecryptable = || SecretsError::Undecryptable { user: user.to_string(), name: name.to_string() };
        if nonce.len() != NONCE_BYTES {
            return Err(undecryptable());
        }
        let ad = associated_data(user, name);
        let plain = Zeroizing::new(
            self.cipher
                .decrypt(XNonce::from_slice(nonce), Payload { msg: ciphertext, aad: &ad })
                .map_err(|_| undecryptable())?,
        );
        let text = std::str::from_utf8(&plain).map_err(|_| undecryptable())?;
        Ok(SecretValue::new(text.to_string()))
    }
}

/// What binds a value to its row: the format, its user and its name (neither holds a NUL: both are validated).
fn associated_data(user: &str, name: &str) -> Vec<u8> {
    [AD_PREFIX, user.as_bytes(), b"\0", name.as_bytes()].concat()
}

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path) -> SecretStore {
        SecretStore::open(&dir.join("state.sqlite3"), &dir.join("secrets.key")).unwrap()
    }

    fn value(text: &str) -> SecretValue {
        SecretValue::new(text.to_string())
    }

    fn values(store: &SecretStore, user: &str) -> Vec<(String, String)> {
        store.values(user).unwrap().into_iter().map(|(n, v)| (n, v.expose().to_string())).collect()
    }

    #[test]
    fn values_round_trip_per_user_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let key_mode = std::fs::metadata(dir.path().join("secrets.key")).unwrap().permissions().mode() & 0o777;
        assert_eq!(key_mode, 0o600);
        store.set("alice", "TOKEN", &value("a-1"), 10).unwrap();
        store.set("alice", "EMPTY", &value(""), 10).unwrap();
        store.set("bob", "TOKEN", &value("b-1"), 10).unwrap();
        store.set("alice", "TOKEN", &value("a-2 with\nnewline"), 10).unwrap();
        assert_eq!(
            values(&store, "alice"),
            [("EMPTY".to_string(), String::new()), ("TOKEN".to_string(), "a-2 with\nnewline".to_string())]
        );
        assert_eq!(values(&store, "bob"), [("TOKEN".to_string(), "b-1".to_string())]);
        assert!(values(&store, "carol").is_empty());
        let names: Vec<_> = store.list(None).unwrap().into_iter().map(|s| (s.user_id, s.name)).collect();
        assert_eq!(names.len(), 3);
        assert_eq!(store.list(Some("bob")).unwrap()[0].name, "TOKEN");
        drop(store);
        assert_eq!(values(&open(dir.path()), "bob"), [("TOKEN".to_string(), "b-1".to_string())]);
    }

    #[test]
    fn the_database_alone_holds_no_value() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let secret = "plain-text-that-must-not-be-on-disk";
        store.set("alice", "TOKEN", &value(secret), 10).unwrap();
        drop(store);
        for file in ["state.sqlite3", "state.sqlite3-wal"] {
            let bytes = std::fs::read(dir.path().join(file)).unwrap_or_default();
            assert!(!bytes.windows(secret.len()).any(|w| w == secret.as_bytes()), "{file} holds the value");
        }
    }

    #[test]
    fn a_tampered_value_fails_to_decrypt_naming_the_secret_not_its_value() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        store.set("alice", "TOKEN", &value("v"), 10).unwrap();
        store.db.lock().execute("UPDATE secrets SET ciphertext = CAST(X'00112233445566778899' AS BLOB)", []).unwrap();
        let error = store.values("alice").unwrap_err();
        assert!(matches!(error, SecretsError::Undecryptable { .. }), "{error}");
        assert!(error.to_string().contains("TOKEN"), "{error}");
        // A flipped bit of a real ciphertext, too.
        store.set("bob", "TOKEN", &value("w"), 10).unwrap();
        store.db.lock().execute("UPDATE secrets SET nonce = zeroblob(24) WHERE user_id = 'bob'", []).unwrap();
        assert!(matches!(store.values("bob"), Err(SecretsError::Undecryptable { .. })));
    }

    #[test]
    fn a_value_moved_to_another_user_or_name_does_not_decrypt() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        store.set("alice", "TOKEN", &value("alice's"), 10).unwrap();
        store.set("bob", "TOKEN", &value("bob's"), 10).unwrap();
        store.set("bob", "OTHER", &value("bob's other"), 10).unwrap();
        // Bob's rows given Alice's ciphertext (a database edit by someone without the key).
        store
            .db
            .lock()
            .execute(
                "UPDATE secrets SET (nonce, ciphertext) = (SELECT nonce, ciphertext FROM secrets WHERE user_id = \
                 'alice') WHERE user_id = 'bob'",
                [],
            )
            .unwrap();
        let error = store.values("bob").unwrap_err();
        assert!(matches!(error, SecretsError::Undecryptable { .. }), "{error}");
        assert_eq!(values(&store, "alice"), [("TOKEN".to_string(), "alice's".to_string())]);
        // The same ciphertext under another name of its own user fails too.
        store.db.lock().execute("UPDATE secrets SET name = 'RENAMED' WHERE user_id = 'alice'", []).unwrap();
        assert!(matches!(store.values("alice"), Err(SecretsError::Undecryptable { .. })));
    }

    #[test]
    fn another_or_missing_key_file_is_refused_at_open_while_secrets_need_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        store.set("alice", "TOKEN", &value("v"), 10).unwrap();
        drop(store);
        let key_file = dir.path().join("secrets.key");
        let original = std::fs::read(&key_file).unwrap();
        // Another key.
        std::fs::remove_file(&key_file).unwrap();
        SecretKey::create(&key_file).unwrap();
        let error = SecretStore::open(&dir.path().join("state.sqlite3"), &key_file).unwrap_err();
        assert!(matches!(error, SecretsError::WrongKey { count: 1, .. }), "{error}");
        assert!(error.to_string().contains("secrets.key"), "{error}");
        // None at all: not made anew over secrets that need the old one.
        std::fs::remove_file(&key_file).unwrap();
        let error = SecretStore::open(&dir.path().join("state.sqlite3"), &key_file).unwrap_err();
        assert!(matches!(error, SecretsError::KeyMissing { count: 1, .. }), "{error}");
        assert!(!key_file.exists());
        // Readable by others, or not a key.
        std::fs::write(&key_file, &original).unwrap();
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let error = SecretStore::open(&dir.path().join("state.sqlite3"), &key_file).unwrap_err();
        assert!(error.to_string().contains("chmod 600"), "{error}");
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(values(&open(dir.path()), "alice"), [("TOKEN".to_string(), "v".to_string())]);
        std::fs::write(&key_file, "not hex\n").unwrap();
        let error = SecretStore::open(&dir.path().join("state.sqlite3"), &key_file).unwrap_err();
        assert!(error.to_string().contains("hex digits"), "{error}");
        // With no secret left, another key is taken (nothing can be lost).
        std::fs::write(&key_file, &original).unwrap();
        open(dir.path()).delete("alice", "TOKEN").unwrap();
        std::fs::remove_file(&key_file).unwrap();
        open(dir.path()).set("alice", "NEW", &value("n"), 10).unwrap();
        assert_ne!(std::fs::read(&key_file).unwrap(), original);
    }

    #[test]
    fn caps_and_deletes() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        store.set("alice", "A", &value("1"), 2).unwrap();
        store.set("alice", "B", &value("2"), 2).unwrap();
        // A new value of one held is not a new secret.
        store.set("alice", "B", &value("3"), 2).unwrap();
        let error = store.set("alice", "C", &value("4"), 2).unwrap_err();
        assert!(matches!(error, SecretsError::TooMany { cap: 2, .. }), "{error}");
        store.set("bob", "C", &value("4"), 2).unwrap();
        store.delete("alice", "A").unwrap();
        store.set("alice", "C", &value("4"), 2).unwrap();
        let error = store.delete("alice", "A").unwrap_err();
        assert!(matches!(error, SecretsError::NotFound { .. }), "{error}");
        assert!(store.delete("bob", "B").is_err());
    }
}
