//! The server's SQLite file (`<data-dir>/state.sqlite3`), shared by its stores (keys and uids, apps, the queue):
//! each opens a connection of its own, in WAL mode so that one reads while another writes, waiting up to
//! [`BUSY_TIMEOUT`] for another's write instead of failing at once.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::Connection;

/// How long a statement waits for another connection's write.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// One store's connection.
#[derive(Debug)]
pub struct Database(Mutex<Connection>);

impl Database {
    /// Opens `path` and creates `schema`'s tables if they are missing.
    pub fn open(path: &Path, schema: &str) -> rusqlite::Result<Self> {
        let connection = Connection::open(path)?;
        connection.pragma_update(None, "journal_mode", "WAL")?;
        connection.busy_timeout(BUSY_TIMEOUT)?;
        connection.execute_batch(schema)?;
        Ok(Self(Mutex::new(connection)))
    }

    /// The connection, for one store's statements at a time.
    pub fn lock(&self) -> MutexGuard<'_, Connection> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What fails in a store that is SQLite and nothing more (the apps', the queue's, the run history's, the
/// schedules'): each module names it after itself (`RunStoreError`, ...), one type.
#[derive(Debug, thiserror::Error)]
pub enum DatabaseError {
    #[error("the server's database failed: {0}")]
    Database(#[from] rusqlite::Error),
    #[error("the server's database holds a value that cannot be read ({0})")]
    Corrupt(String),
    #[error(transparent)]
    Task(#[from] TaskFailed),
}

/// A store's work on a blocking thread, failed as a task (it panicked).
#[derive(Debug, thiserror::Error)]
#[error("the store's task failed: {0}")]
pub struct TaskFailed(String);

/// Runs `work` on `store` on a blocking thread, for async callers: SQLite waits for the disk, and for the store's
/// lock while another request holds it, and neither may hold up an async runtime's threads.
pub async fn blocking<S, T, E>(store: &Arc<S>, work: impl FnOnce(&S) -> Result<T, E> + Send + 'static) -> Result<T, E>
where
    S: Send + Sync + 'static,
    T: Send + 'static,
    E: From<TaskFailed> + Send + 'static,
{
    let store = store.clone();
    tokio::task::spawn_blocking(move || work(&store)).await.map_err(|e| E::from(TaskFailed(e.to_string())))?
}
