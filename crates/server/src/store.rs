//! Keys and users' uids, in SQLite in the server's data dir (and workers' keys, in memory: `nested/keys.rs`). Secrets are stored only as SHA-256 hashes (they are 256 random bits,
//! so a fast hash is enough) and compared in constant time.

use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use rand::RngCore;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::nested::keys::{Refused, WorkerKeys, WORKER_KEY_PREFIX};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Admin,
    Api,
}

impl Scope {
    fn to_db(self) -> i64 {
        match self {
            Scope::Admin => 0,
            Scope::Api => 1,
        }
    }

    fn from_db(value: i64) -> Self {
        if value == 0 {
            Scope::Admin
        } else {
            Scope::Api
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    pub key_id: String,
    pub user_id: String,
    pub scope: Scope,
    pub alias: String,
    pub created_at: i64,
}

/// Who is calling: established from a valid key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub user_id: String,
    pub key_id: String,
    pub scope: Scope,
    /// How many nested calls deep what this caller calls is: 0 for a key of the store; for a worker's key (a
    /// function calling other functions), one more than the call its worker runs.
    pub depth: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("key id {0:?} is not known to this server; create a key with `fal-serverless keys create`")]
    UnknownKey(String),
    #[error("the secret given for key {0:?} is wrong; check FAL_KEY_SECRET or the key_secret of your credentials")]
    WrongSecret(String),
    #[error(
        "key {0:?} was a worker's, valid only while that worker lived, and the worker has ended; calls from inside a \
         function use the key its worker is given (FAL_KEY_ID and FAL_KEY_SECRET), which the server makes for each \
         worker"
    )]
    WorkerKeyEnded(String),
    #[error("key {0:?} has been revoked; create a new key with `fal-serverless keys create`")]
    Revoked(String),
    #[error("key {0:?} is not yours to revoke")]
    NotYours(String),
    #[error("invalid user name {0:?}: use letters, digits, '-' and '_' (at most 64)")]
    InvalidUser(String),
    #[error(
        "no uid is left for user {user:?}: all {count} uids from {first} are assigned; give [jail] uid_count a \
         larger value in the server's config.toml"
    )]
    NoUidLeft { user: String, first: u32, count: u32 },
    #[error(
        "user {user:?} already has {cap} keys, the most this server allows per user; revoke one no longer used \
         (`fal-serverless keys list`, then `fal-serverless keys revoke KEY_ID`), or ask the server's admin to raise \
         [limits] max_keys_per_user"
    )]
    TooManyKeys { user: String, cap: u32 },
    #[error("the key store failed: {0}")]
    Database(#[from] rusqlite::Error),
    #[error(transparent)]
    Task(#[from] crate::db::TaskFailed),
}

#[derive(Debug)]
pub struct Store {
    db: crate::db::Database,
    /// Keys of live workers (`nested/`): in memory only.
    worker_keys: Arc<WorkerKeys>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS keys (
    key_id        TEXT PRIMARY KEY,
    user_id       TEXT NOT NULL,
    secret_sha256 BLOB NOT NULL,
    scope         INTEGER NOT NULL,
    alias         TEXT NOT NULL DEFAULT '',
    created_at    INTEGER NOT NULL,
    revoked_at    INTEGER
);
-- The uid (and gid) each user's jailed workers and builds run as; assigned on first use, never reused.
CREATE TABLE IF NOT EXISTS uids (
    user_id TEXT PRIMARY KEY,
    uid     INTEGER NOT NULL UNIQUE
);
";

impl Store {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Ok(Self { db: crate::db::Database::open(path, SCHEMA)?, worker_keys: Arc::default() })
    }

    fn db(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.db.lock()
    }

    /// Runs `work` on the store on a blocking thread, for async callers: SQLite waits for the disk, and for the
    /// store's lock while another request holds it, and neither may hold up an async runtime's threads.
    pub async fn blocking<T: Send + 'static>(
        self: &Arc<Self>,
        work: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        crate::db::blocking(self, work).await
    }

    /// The uid of `user_id`'s jailed processes: the one assigned before, else the next free one of the `count`
    /// uids from `first`.
    pub fn uid(&self, user_id: &str, first: u32, count: u32) -> Result<u32, StoreError> {
        let mut db = self.db();
        // Asked on every call: a cached statement.
        let known = |db: &Connection| {
            db.prepare_cached("SELECT uid FROM uids WHERE user_id = ?1")?
                .query_row([user_id], |row| row.get::<_, u32>(0))
                .optional()
        };
        if let Some(uid) = known(&db)? {
            return Ok(uid);
        }
        let tx = db.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let last = first as i64 + count as i64 - 1;
        let next: i64 = tx.query_row(
            "SELECT COALESCE(MAX(uid) + 1, ?1) FROM uids WHERE uid BETWEEN ?1 AND ?2",
            params![first, last],
            |row| row.get(0),
        )?;
        if next > last {
            return Err(StoreError::NoUidLeft { user: user_id.to_string(), first, count });
        }
        tx.execute("INSERT INTO uids (user_id, uid) VALUES (?1, ?2)", params![user_id, next])?;
        tx.commit()?;
        Ok(next as u32)
    }

    /// Writes one row (a probe's own table): whether SQLite takes writes now (`/readyz`).
    pub fn check_writable(&self) -> Result<(), StoreError> {
        let db = self.db();
        db.execute_batch("CREATE TABLE IF NOT EXISTS readiness (id INTEGER PRIMARY KEY, at_ms INTEGER NOT NULL)")?;
        db.execute("REPLACE INTO readiness (id, at_ms) VALUES (1, ?1)", [crate::runs::now_ms()])?;
        Ok(())
    }

    pub fn is_empty(&self) -> Result<bool, StoreError> {
        Ok(self.db().query_row("SELECT COUNT(*) FROM keys", [], |row| row.get::<_, i64>(0))? == 0)
    }

    /// Creates a key for `user_id` and returns it with its secret, which is never stored and never shown again.
    pub fn create_key(&self, user_id: &str, scope: Scope, alias: &str) -> Result<(KeyInfo, String), StoreError> {
        self.insert_key(user_id, scope, alias, None)
    }

    /// [`Store::create_key`], refused when `user_id` already has `max_keys` keys that are not revoked.
    pub fn create_key_within(
        &self,
        user_id: &str,
        scope: Scope,
        alias: &str,
        max_keys: u32,
    ) -> Result<(KeyInfo, String), StoreError> {
        self.insert_key(user_id, scope, alias, Some(max_keys))
    }

    fn insert_key(
        &self,
        user_id: &str,
        scope: Scope,
        alias: &str,
        max_keys: Option<u32>,
    ) -> Result<(KeyInfo, String), StoreError> {
        if user_id.is_empty()
            || user_id.len() > 64
            || !user_id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(StoreError::InvalidUser(user_id.to_string()));
        }
        let key_id = random_hex(8);
        let secret = random_hex(32);
        let created_at = now();
        let mut db = self.db();
        // Counted and inserted in one transaction, so that keys made at once cannot pass the cap together.
        let tx = db.transaction_with_behavior(TransactionBehavior::Immediate)?;
        if let Some(cap) = max_keys {
            let held: i64 = tx.query_row(
                "SELECT COUNT(*) FROM keys WHERE user_id = ?1 AND revoked_at IS NULL",
                [user_id],
                |row| row.get(0),
            )?;
            if held >= i64::from(cap) {
                return Err(StoreError::TooManyKeys { user: user_id.to_string(), cap });
            }
        }
        tx.execute(
            "INSERT INTO keys (key_id, user_id, secret_sha256, scope, alias, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![key_id, user_id, hash(&secret).to_vec(), scope.to_db(), alias, created_at],
        )?;
        tx.commit()?;
        Ok((KeyInfo { key_id, user_id: user_id.to_string(), scope, alias: alias.to_string(), created_at }, secret))
    }

    /// Keys that are not revoked: of `user_id`, or all of them.
    pub fn list_keys(&self, user_id: Option<&str>) -> Result<Vec<KeyInfo>, StoreError> {
        let db = self.db();
        let mut statement = db.prepare(
            "SELECT key_id, user_id, scope, alias, created_at FROM keys
             WHERE revoked_at IS NULL AND (?1 IS NULL OR user_id = ?1) ORDER BY created_at, key_id",
        )?;
        let rows = statement.query_map(params![user_id], |row| {
            Ok(KeyInfo {
                key_id: row.get(0)?,
                user_id: row.get(1)?,
                scope: Scope::from_db(row.get(2)?),
                alias: row.get(3)?,
                created_at: row.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Revokes `key_id`, if `caller` may: its own user's keys, or any key for an admin.
    pub fn revoke(&self, caller: &Caller, key_id: &str) -> Result<(), StoreError> {
        let db = self.db();
        let owner: Option<String> = db
            .query_row("SELECT user_id FROM keys WHERE key_id = ?1 AND revoked_at IS NULL", [key_id], |row| row.get(0))
            .optional()?;
        match owner {
            None => Err(StoreError::UnknownKey(key_id.to_string())),
            Some(owner) if owner != caller.user_id && caller.scope != Scope::Admin => {
                Err(StoreError::NotYours(key_id.to_string()))
            }
            Some(_) => {
                db.execute("UPDATE keys SET revoked_at = ?1 WHERE key_id = ?2", params![now(), key_id])?;
                Ok(())
            }
        }
    }

    /// Where workers' keys are made and checked.
    pub(crate) fn worker_keys(&self) -> &Arc<WorkerKeys> {
        &self.worker_keys
    }

    /// The caller a key id and secret stand for, or why they stand for no one.
    pub fn verify(&self, key_id: &str, secret: &str) -> Result<Caller, StoreError> {
        if key_id.starts_with(WORKER_KEY_PREFIX) {
            return self.worker_keys.verify(key_id, secret).map_err(|refused| match refused {
                Refused::Ended => StoreError::WorkerKeyEnded(key_id.to_string()),
                Refused::WrongSecret => StoreError::WrongSecret(key_id.to_string()),
            });
        }
        let row: Option<(String, Vec<u8>, i64, Option<i64>)> = self
            .db()
            // Every call verifies its key: the statement is prepared once per connection.
            .prepare_cached("SELECT user_id, secret_sha256, scope, revoked_at FROM keys WHERE key_id = ?1")?
            .query_row([key_id], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?)))
            .optional()?;
        let Some((user_id, stored, scope, revoked_at)) = row else {
            return Err(StoreError::UnknownKey(key_id.to_string()));
        };
        if !bool::from(hash(secret).as_slice().ct_eq(&stored)) {
            return Err(StoreError::WrongSecret(key_id.to_string()));
        }
        if revoked_at.is_some() {
            return Err(StoreError::Revoked(key_id.to_string()));
        }
        Ok(Caller { user_id, key_id: key_id.to_string(), scope: Scope::from_db(scope), depth: 0 })
    }
}

fn hash(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// `bytes` random bytes, in hex: key ids and secrets.
pub(crate) fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buf);
    hex::encode(buf)
}

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn each_user_gets_a_uid_of_their_own_that_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.sqlite3");
        let store = super::Store::open(&path).unwrap();
        let alice = store.uid("alice", 200_000, 2).unwrap();
        let bob = store.uid("bob", 200_000, 2).unwrap();
        assert_eq!((alice, bob), (200_000, 200_001));
        assert_eq!(store.uid("alice", 200_000, 2).unwrap(), alice);
        let full = store.uid("carol", 200_000, 2).unwrap_err().to_string();
        assert!(full.contains("uid_count"), "{full}");
        drop(store);
        assert_eq!(super::Store::open(&path).unwrap().uid("bob", 200_000, 2).unwrap(), bob);
    }

    use super::*;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state.sqlite3")).unwrap();
        (dir, store)
    }

    #[test]
    fn keys_verify_and_fail_for_the_right_reasons() {
        let (_dir, store) = store();
        assert!(store.is_empty().unwrap());
        let (key, secret) = store.create_key("alice", Scope::Api, "laptop").unwrap();
        let caller = store.verify(&key.key_id, &secret).unwrap();
        assert_eq!((caller.user_id.as_str(), caller.scope), ("alice", Scope::Api));
        assert!(matches!(store.verify(&key.key_id, "nope"), Err(StoreError::WrongSecret(_))));
        assert!(matches!(store.verify("missing", &secret), Err(StoreError::UnknownKey(_))));
        store.revoke(&caller, &key.key_id).unwrap();
        assert!(matches!(store.verify(&key.key_id, &secret), Err(StoreError::Revoked(_))));
        assert!(store.list_keys(Some("alice")).unwrap().is_empty());
    }

    #[test]
    fn secrets_are_stored_only_hashed() {
        let (dir, store) = store();
        let (_, secret) = store.create_key("bob", Scope::Admin, "").unwrap();
        drop(store);
        let raw = std::fs::read(dir.path().join("state.sqlite3")).unwrap();
        let wal = std::fs::read(dir.path().join("state.sqlite3-wal")).unwrap_or_default();
        for bytes in [raw, wal] {
            assert!(!bytes.windows(secret.len()).any(|w| w == secret.as_bytes()));
        }
    }

    #[test]
    fn only_owners_and_admins_revoke() {
        let (_dir, store) = store();
        let (alice_key, alice_secret) = store.create_key("alice", Scope::Api, "").unwrap();
        let (bob_key, bob_secret) = store.create_key("bob", Scope::Api, "").unwrap();
        let bob = store.verify(&bob_key.key_id, &bob_secret).unwrap();
        assert!(matches!(store.revoke(&bob, &alice_key.key_id), Err(StoreError::NotYours(_))));
        let (admin_key, admin_secret) = store.create_key("admin", Scope::Admin, "").unwrap();
        let admin = store.verify(&admin_key.key_id, &admin_secret).unwrap();
        store.revoke(&admin, &alice_key.key_id).unwrap();
        assert!(store.verify(&alice_key.key_id, &alice_secret).is_err());
        assert!(matches!(store.create_key("no/slash", Scope::Api, ""), Err(StoreError::InvalidUser(_))));
    }

    #[test]
    fn a_user_has_at_most_the_cap_of_keys_and_revoking_one_makes_room() {
        let (_dir, store) = store();
        let keys: Vec<KeyInfo> =
            (0..3).map(|_| store.create_key_within("carol", Scope::Api, "", 3).unwrap().0).collect();
        let refused = store.create_key_within("carol", Scope::Api, "", 3).unwrap_err();
        assert!(matches!(refused, StoreError::TooManyKeys { cap: 3, .. }), "{refused}");
        assert!(refused.to_string().contains("fal-serverless keys revoke"), "{refused}");
        // Another user's keys are their own; the uncapped form (the server's own first keys) is not counted against.
        store.create_key_within("dave", Scope::Api, "", 3).unwrap();
        let (admin, secret) = store.create_key("admin", Scope::Admin, "").unwrap();
        let admin = store.verify(&admin.key_id, &secret).unwrap();
        store.revoke(&admin, &keys[0].key_id).unwrap();
        store.create_key_within("carol", Scope::Api, "", 3).unwrap();
    }
}
