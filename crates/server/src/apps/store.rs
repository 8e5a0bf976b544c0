//! Revisions and aliases, in SQLite beside the keys (`state.sqlite3`): what survives a restart of the server.
//!
//! A revision is one registration: the function that serves the app (the `RegisterApplicationRequest` as it came,
//! encoded), how it scales and who may call it. An alias is a user's name for one of their revisions; registering
//! under an alias again makes a new revision and moves the alias to it, and the old revision stays reachable by its
//! id. Deleting an alias deletes the revisions registered under its name.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OptionalExtension, Row, TransactionBehavior};

/// Who may call an app (isolate-proto's `ApplicationAuthMode`, same numbers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    /// The owner's keys (and admins').
    Private = 0,
    /// Anyone, with no key.
    Public = 1,
    /// Any valid key of this server.
    Shared = 2,
}

impl AuthMode {
    pub fn from_wire(value: i32) -> Option<Self> {
        match value {
            0 => Some(Self::Private),
            1 => Some(Self::Public),
            2 => Some(Self::Shared),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Private => "private",
            Self::Public => "public",
            Self::Shared => "shared",
        }
    }
}

/// One registered revision of an app.
#[derive(Debug, Clone)]
pub struct Revision {
    /// A UUID: the app's address when it has no alias, and the old revision's after a new one takes the alias.
    pub id: String,
    pub user_id: String,
    /// The alias it was registered under, if any (it may have moved on since).
    pub alias: Option<String>,
    pub auth: AuthMode,
    pub min_concurrency: u32,
    pub max_concurrency: u32,
    pub max_multiplexing: u32,
    pub machine_type: String,
    /// How long an idle replica stays up.
    pub keep_alive: Duration,
    pub function_name: String,
    /// The `RegisterApplicationRequest` it was made from, protobuf-encoded: what a replica runs (shared: a revision
    /// is cloned per request).
    pub definition: Arc<[u8]>,
    /// Seconds since the epoch.
    pub created_at: i64,
    /// Whether it is a web endpoint (its function serves on the app port); else a plain function, registered
    /// anonymously to be run by a schedule (the 0.6.41 client's `function schedule`).
    pub serves: bool,
}

impl Revision {
    /// The name the app goes by in paths and logs: its alias, else its id.
    pub fn name(&self) -> &str {
        self.alias.as_deref().unwrap_or(&self.id)
    }
}

pub type AppStoreError = crate::db::DatabaseError;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS app_revisions (
    id               TEXT PRIMARY KEY,
    user_id          TEXT NOT NULL,
    alias            TEXT,
    auth_mode        INTEGER NOT NULL,
    min_concurrency  INTEGER NOT NULL,
    max_concurrency  INTEGER NOT NULL,
    max_multiplexing INTEGER NOT NULL,
    machine_type     TEXT NOT NULL,
    keep_alive_ms    INTEGER NOT NULL,
    function_name    TEXT NOT NULL,
    definition       BLOB NOT NULL,
    created_at       INTEGER NOT NULL,
    serves           INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX IF NOT EXISTS app_revisions_by_user_alias ON app_revisions (user_id, alias);
CREATE TABLE IF NOT EXISTS app_aliases (
    user_id    TEXT NOT NULL,
    alias      TEXT NOT NULL,
    revision   TEXT NOT NULL REFERENCES app_revisions (id),
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (user_id, alias)
);
";

const REVISION_COLUMNS: &str = "r.id, r.user_id, r.alias, r.auth_mode, r.min_concurrency, r.max_concurrency, \
                                r.max_multiplexing, r.machine_type, r.keep_alive_ms, r.function_name, r.definition, \
                                r.created_at, r.serves";

#[derive(Debug)]
pub struct AppStore(crate::db::Database);

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

fn revision(row: &Row<'_>) -> rusqlite::Result<Revision> {
    Ok(Revision {
        id: row.get(0)?,
        user_id: row.get(1)?,
        alias: row.get(2)?,
        auth: AuthMode::from_wire(row.get(3)?).unwrap_or(AuthMode::Private),
        min_concurrency: row.get(4)?,
        max_concurrency: row.get(5)?,
        max_multiplexing: row.get(6)?,
        machine_type: row.get(7)?,
        keep_alive: Duration::from_millis(row.get::<_, i64>(8)?.max(0) as u64),
        function_name: row.get(9)?,
        definition: Arc::from(row.get::<_, Vec<u8>>(10)?),
        created_at: row.get(11)?,
        serves: row.get(12)?,
    })
}

impl AppStore {
    pub fn open(path: &Path) -> Result<Self, AppStoreError> {
        let database = crate::db::Database::open(path, SCHEMA)?;
        {
            // A data dir from before plain-function revisions: all its revisions serve.
            let db = database.lock();
            let has_serves =
                db.prepare("SELECT 1 FROM pragma_table_info('app_revisions') WHERE name = 'serves'")?.exists([])?;
            if !has_serves {
                db.execute_batch("ALTER TABLE app_revisions ADD COLUMN serves INTEGER NOT NULL DEFAULT 1")?;
            }
        }
        Ok(Self(database))
    }

    fn db(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.0.lock()
    }

    /// Runs `work` on a blocking thread: SQLite waits for the disk, which no async task may.
    pub async fn blocking<T: Send + 'static>(
        self: &Arc<Self>,
        work: impl FnOnce(&AppStore) -> Result<T, AppStoreError> + Send + 'static,
    ) -> Result<T, AppStoreError> {
        crate::db::blocking(self, work).await
    }

    /// Stores `revision` (its `created_at` set now) and, if it has an alias, points the alias at it.
    pub fn insert(&self, revision: &mut Revision) -> Result<(), AppStoreError> {
        revision.created_at = now();
        let mut db = self.db();
        let tx = db.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "INSERT INTO app_revisions (id, user_id, alias, auth_mode, min_concurrency, max_concurrency, \
             max_multiplexing, machine_type, keep_alive_ms, function_name, definition, created_at, serves) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
            params![
                revision.id,
                revision.user_id,
                revision.alias,
                revision.auth as i32,
                revision.min_concurrency,
                revision.max_concurrency,
                revision.max_multiplexing,
                revision.machine_type,
                revision.keep_alive.as_millis() as i64,
                revision.function_name,
                revision.definition.as_ref(),
                revision.created_at,
                revision.serves,
            ],
        )?;
        if let Some(alias) = &revision.alias {
            tx.execute(
                "INSERT INTO app_aliases (user_id, alias, revision, updated_at) VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT (user_id, alias) DO UPDATE SET revision = excluded.revision, \
                 updated_at = excluded.updated_at",
                params![revision.user_id, alias, revision.id, revision.created_at],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// The revision `user`'s `name` stands for: an alias of theirs, else one of their revision ids.
    pub fn resolve(&self, user: &str, name: &str) -> Result<Option<Revision>, AppStoreError> {
        let db = self.db();
        let by_alias = db
            .query_row(
                &format!(
                    "SELECT {REVISION_COLUMNS} FROM app_aliases a JOIN app_revisions r ON r.id = a.revision \
                     WHERE a.user_id = ?1 AND a.alias = ?2"
                ),
                params![user, name],
                revision,
            )
            .optional()?;
        if by_alias.is_some() {
            return Ok(by_alias);
        }
        Ok(db
            .query_row(
                &format!("SELECT {REVISION_COLUMNS} FROM app_revisions r WHERE r.user_id = ?1 AND r.id = ?2"),
                params![user, name],
                revision,
            )
            .optional()?)
    }

    /// `user`'s aliases (every user's with `None`), each with the revision it points to, by alias.
    pub fn aliases(&self, user: Option<&str>) -> Result<Vec<Revision>, AppStoreError> {
        let db = self.db();
        let sql = format!(
            "SELECT {REVISION_COLUMNS}, a.alias FROM app_aliases a JOIN app_revisions r ON r.id = a.revision \
             WHERE ?1 IS NULL OR a.user_id = ?1 ORDER BY a.user_id, a.alias"
        );
        let mut statement = db.prepare(&sql)?;
        let rows = statement.query_map(params![user], |row| {
            let mut found = revision(row)?;
            // The alias's own name (a revision made under another alias name cannot be pointed to, but be exact).
            found.alias = Some(row.get(13)?);
            Ok(found)
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Deletes `user`'s `alias` and the revisions registered under that name; returns the revision it pointed to
    /// and the ids of every revision deleted, or `None` if there is no such alias.
    pub fn delete_alias(&self, user: &str, alias: &str) -> Result<Option<(String, Vec<String>)>, AppStoreError> {
        let mut db = self.db();
        let tx = db.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let current: Option<String> = tx
            .query_row(
                "SELECT revision FROM app_aliases WHERE user_id = ?1 AND alias = ?2",
                params![user, alias],
                |r| r.get(0),
            )
            .optional()?;
        let Some(current) = current else { return Ok(None) };
        let mut ids: Vec<String> = {
            let mut statement = tx.prepare("SELECT id FROM app_revisions WHERE user_id = ?1 AND alias = ?2")?;
            let rows = statement.query_map(params![user, alias], |r| r.get(0))?;
            rows.collect::<Result<_, _>>()?
        };
        if !ids.contains(&current) {
            ids.push(current.clone());
        }
        tx.execute("DELETE FROM app_aliases WHERE user_id = ?1 AND alias = ?2", params![user, alias])?;
        for id in &ids {
            tx.execute("DELETE FROM app_revisions WHERE id = ?1", params![id])?;
        }
        tx.commit()?;
        Ok(Some((current, ids)))
    }

    /// Every revision an alias points to whose app keeps replicas up when idle: started again after a restart.
    pub fn kept_warm(&self) -> Result<Vec<Revision>, AppStoreError> {
        let db = self.db();
        let sql = format!(
            "SELECT {REVISION_COLUMNS} FROM app_aliases a JOIN app_revisions r ON r.id = a.revision \
             WHERE r.min_concurrency > 0"
        );
        let mut statement = db.prepare(&sql)?;
        let rows = statement.query_map([], revision)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn revision(id: &str, alias: Option<&str>) -> Revision {
        Revision {
            id: id.into(),
            user_id: "alice".into(),
            alias: alias.map(str::to_string),
            auth: AuthMode::Shared,
            min_concurrency: 0,
            max_concurrency: 2,
            max_multiplexing: 1,
            machine_type: "XS".into(),
            keep_alive: Duration::from_secs(10),
            function_name: "f".into(),
            definition: Arc::from(vec![1, 2, 3]),
            created_at: 0,
            serves: true,
        }
    }

    #[test]
    fn an_alias_moves_to_the_new_revision_and_the_old_one_stays_reachable() {
        let dir = tempfile::tempdir().unwrap();
        let store = AppStore::open(&dir.path().join("state.sqlite3")).unwrap();
        store.insert(&mut revision("r1", Some("app"))).unwrap();
        store.insert(&mut revision("r2", Some("app"))).unwrap();
        assert_eq!(store.resolve("alice", "app").unwrap().unwrap().id, "r2");
        assert_eq!(store.resolve("alice", "r1").unwrap().unwrap().id, "r1");
        assert!(store.resolve("bob", "app").unwrap().is_none(), "another user's alias is not found");
        assert!(store.resolve("bob", "r1").unwrap().is_none(), "nor another user's revision");
        let aliases = store.aliases(Some("alice")).unwrap();
        assert_eq!(aliases.len(), 1);
        assert_eq!((aliases[0].alias.as_deref(), aliases[0].id.as_str()), (Some("app"), "r2"));
        assert_eq!(aliases[0].auth, AuthMode::Shared);
    }

    #[test]
    fn deleting_an_alias_deletes_its_revisions_and_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.sqlite3");
        {
            let store = AppStore::open(&path).unwrap();
            store.insert(&mut revision("r1", Some("app"))).unwrap();
            store.insert(&mut revision("r2", Some("app"))).unwrap();
            store.insert(&mut revision("r3", None)).unwrap();
        }
        let store = AppStore::open(&path).unwrap();
        assert_eq!(store.resolve("alice", "r3").unwrap().unwrap().alias, None);
        let (current, mut deleted) = store.delete_alias("alice", "app").unwrap().unwrap();
        deleted.sort();
        assert_eq!((current.as_str(), deleted), ("r2", vec!["r1".to_string(), "r2".to_string()]));
        assert!(store.resolve("alice", "app").unwrap().is_none());
        assert!(store.resolve("alice", "r1").unwrap().is_none());
        assert!(store.resolve("alice", "r3").unwrap().is_some(), "an anonymous revision is not the alias's");
        assert!(store.delete_alias("alice", "app").unwrap().is_none());
    }
}
