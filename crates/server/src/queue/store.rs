//! The queue's tables, in SQLite beside the keys and apps (`state.sqlite3`, its own connection, WAL): every request
//! submitted (what to send the app, and once done what it answered), each request's webhook delivery and every
//! attempt at it. This is what a restart of the server finds again.
//!
//! Three connections write to that file (keys, apps, queue): every transaction that reads then writes begins
//! IMMEDIATE, taking the write lock first, since a deferred one that another connection wrote under cannot upgrade
//! and fails at once with "database is locked", without waiting out the busy timeout.

use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OptionalExtension, Row, TransactionBehavior};

pub type QueueStoreError = crate::db::DatabaseError;

/// Where a request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Waiting for a replica.
    Queued,
    /// Sent to a replica.
    Running,
    /// Done: answered, failed or cancelled (its outcome is stored).
    Done,
}

impl State {
    fn parse(name: &str) -> Result<Self, QueueStoreError> {
        match name {
            "queued" => Ok(Self::Queued),
            "running" => Ok(Self::Running),
            "done" => Ok(Self::Done),
            other => Err(QueueStoreError::Corrupt(format!("request state {other:?}"))),
        }
    }
}

/// A request as submitted.
#[derive(Debug, Clone, PartialEq)]
pub struct NewRequest {
    pub id: String,
    /// The app's owner and the name it was submitted under (an alias or a revision id), as in its URLs.
    pub owner: String,
    pub app: String,
    pub revision: String,
    /// The user of the key that submitted it; `None` for a public app called without a key.
    pub submitter: Option<String>,
    pub method: String,
    /// The path within the app (`/` or `/sub/path`) and the query (without `?`, empty for none).
    pub path: String,
    pub query: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub webhook: Option<String>,
    /// When it must have started, in ms since the epoch (its `X-Fal-Request-Timeout`), if it says.
    pub deadline_ms: Option<i64>,
}

/// How a request ended.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Outcome {
    /// The app's answer, when it answered (its status, content type and body).
    pub status_code: Option<u16>,
    pub content_type: Option<String>,
    pub body: Vec<u8>,
    /// Why it failed, if it did (the app answered an error, no replica, cancelled), and a short kind for clients.
    pub error: Option<String>,
    pub error_type: Option<String>,
    /// Its log lines, as JSON (an array of fal's log objects).
    pub logs: String,
}

/// A stored request.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    pub seq: i64,
    pub request: NewRequest,
    pub state: State,
    /// How many times it was sent to a replica (a restart while it ran sends it again, once).
    pub runs: u32,
    pub submitted_ms: i64,
    pub started_ms: Option<i64>,
    pub finished_ms: Option<i64>,
    pub outcome: Outcome,
}

/// A webhook still to deliver.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    pub request_id: String,
    pub url: String,
    pub payload: Vec<u8>,
    /// Attempts made so far.
    pub attempts: u32,
    /// When the next attempt is due, ms since the epoch.
    pub next_ms: i64,
}

/// One attempt at a webhook: the receiver's status code, or why there was none.
#[derive(Debug, Clone, PartialEq)]
pub struct Attempt {
    pub attempt: u32,
    pub at_ms: i64,
    pub status_code: Option<u16>,
    pub error: Option<String>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS queue_requests (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    id            TEXT NOT NULL UNIQUE,
    owner         TEXT NOT NULL,
    app           TEXT NOT NULL,
    revision      TEXT NOT NULL,
    submitter     TEXT,
    method        TEXT NOT NULL,
    path          TEXT NOT NULL,
    query         TEXT NOT NULL,
    headers       TEXT NOT NULL,
    body          BLOB NOT NULL,
    webhook       TEXT,
    deadline_ms   INTEGER,
    state         TEXT NOT NULL,
    runs          INTEGER NOT NULL DEFAULT 0,
    submitted_ms  INTEGER NOT NULL,
    started_ms    INTEGER,
    finished_ms   INTEGER,
    status_code   INTEGER,
    content_type  TEXT,
    result        BLOB,
    error         TEXT,
    error_type    TEXT,
    logs          TEXT
);
CREATE INDEX IF NOT EXISTS queue_requests_waiting ON queue_requests (revision, state, seq);
CREATE INDEX IF NOT EXISTS queue_requests_finished ON queue_requests (state, finished_ms);
CREATE TABLE IF NOT EXISTS queue_webhooks (
    request_id TEXT PRIMARY KEY,
    url        TEXT NOT NULL,
    payload    BLOB NOT NULL,
    attempts   INTEGER NOT NULL DEFAULT 0,
    next_ms    INTEGER NOT NULL,
    -- 'pending', 'delivered' or 'failed' (every attempt made).
    state      TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS queue_webhook_attempts (
    request_id  TEXT NOT NULL,
    attempt     INTEGER NOT NULL,
    at_ms       INTEGER NOT NULL,
    status_code INTEGER,
    error       TEXT,
    PRIMARY KEY (request_id, attempt)
);
";

const COLUMNS: &str = "seq, id, owner, app, revision, submitter, method, path, query, headers, body, webhook, \
                       deadline_ms, state, runs, submitted_ms, finished_ms, status_code, content_type, result, error, \
                       error_type, logs, started_ms";

pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

fn stored(row: &Row<'_>) -> rusqlite::Result<(Stored, String, String)> {
    let headers: String = row.get(9)?;
    let state: String = row.get(13)?;
    let stored = Stored {
        seq: row.get(0)?,
        request: NewRequest {
            id: row.get(1)?,
            owner: row.get(2)?,
            app: row.get(3)?,
            revision: row.get(4)?,
            submitter: row.get(5)?,
            method: row.get(6)?,
            path: row.get(7)?,
            query: row.get(8)?,
            headers: Vec::new(),
            body: row.get(10)?,
            webhook: row.get(11)?,
            deadline_ms: row.get(12)?,
        },
        state: State::Queued,
        runs: row.get(14)?,
        submitted_ms: row.get(15)?,
        started_ms: row.get(23)?,
        finished_ms: row.get(16)?,
        outcome: Outcome {
            status_code: row.get(17)?,
            content_type: row.get(18)?,
            body: row.get::<_, Option<Vec<u8>>>(19)?.unwrap_or_default(),
            error: row.get(20)?,
            error_type: row.get(21)?,
            logs: row.get::<_, Option<String>>(22)?.unwrap_or_else(|| "[]".into()),
        },
    };
    Ok((stored, headers, state))
}

fn finish_row(row: (Stored, String, String)) -> Result<Stored, QueueStoreError> {
    let (mut stored, headers, state) = row;
    stored.request.headers =
        serde_json::from_str(&headers).map_err(|e| QueueStoreError::Corrupt(format!("request headers: {e}")))?;
    stored.state = State::parse(&state)?;
    Ok(stored)
}

#[derive(Debug)]
pub struct QueueStore(crate::db::Database);

impl QueueStore {
    pub fn open(path: &Path) -> Result<Self, QueueStoreError> {
        Ok(Self(crate::db::Database::open(path, SCHEMA)?))
    }

    fn db(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.0.lock()
    }

    /// Runs `work` on a blocking thread: SQLite waits for the disk, which no async task may.
    pub async fn blocking<T: Send + 'static>(
        self: &Arc<Self>,
        work: impl FnOnce(&QueueStore) -> Result<T, QueueStoreError> + Send + 'static,
    ) -> Result<T, QueueStoreError> {
        crate::db::blocking(self, work).await
    }

    /// Stores a new request, queued; returns its place in its app's line (0: next) and its sequence number.
    pub fn insert(&self, request: &NewRequest) -> Result<(u64, i64), QueueStoreError> {
        let headers =
            serde_json::to_string(&request.headers).map_err(|e| QueueStoreError::Corrupt(format!("headers: {e}")))?;
        let mut db = self.db();
        let tx = db.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "INSERT INTO queue_requests (id, owner, app, revision, submitter, method, path, query, headers, body, \
             webhook, deadline_ms, state, submitted_ms) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, 'queued', ?13)",
            params![
                request.id,
                request.owner,
                request.app,
                request.revision,
                request.submitter,
                request.method,
                request.path,
                request.query,
                headers,
                request.body,
                request.webhook,
                request.deadline_ms,
                now_ms(),
            ],
        )?;
        let seq = tx.last_insert_rowid();
        let position = position(&tx, &request.revision, seq)?;
        tx.commit()?;
        Ok((position, seq))
    }

    pub fn get(&self, id: &str) -> Result<Option<Stored>, QueueStoreError> {
        let db = self.db();
        let row = db
            .query_row(&format!("SELECT {COLUMNS} FROM queue_requests WHERE id = ?1"), params![id], stored)
            .optional()?;
        row.map(finish_row).transpose()
    }

    /// How many requests of the same app wait before the queued request `seq`.
    pub fn position(&self, revision: &str, seq: i64) -> Result<u64, QueueStoreError> {
        position(&self.db(), revision, seq)
    }

    /// How many requests wait for a replica (queued, not yet handed to one): of app revision `revision`, or of all.
    pub fn depth(&self, revision: Option<&str>) -> Result<u64, QueueStoreError> {
        // One query per case, each served by an index (an `OR` on the revision would scan the kept results).
        let db = self.db();
        let count: i64 = match revision {
            Some(revision) => db.query_row(
                "SELECT COUNT(*) FROM queue_requests WHERE revision = ?1 AND state = 'queued'",
                [revision],
                |row| row.get(0),
            )?,
            None => db.query_row("SELECT COUNT(*) FROM queue_requests WHERE state = 'queued'", [], |row| row.get(0))?,
        };
        Ok(count.max(0) as u64)
    }

    /// Every request not done, in arrival order: what a (re)started server dispatches.
    pub fn unfinished(&self) -> Result<Vec<Stored>, QueueStoreError> {
        let db = self.db();
        let mut statement =
            db.prepare(&format!("SELECT {COLUMNS} FROM queue_requests WHERE state != 'done' ORDER BY seq"))?;
        let rows = statement.query_map([], stored)?;
        rows.map(|row| finish_row(row?)).collect()
    }

    /// Marks a queued request as sent to a replica (counting the run). False if it is no longer queued (cancelled).
    pub fn start(&self, id: &str) -> Result<bool, QueueStoreError> {
        let changed = self.db().execute(
            "UPDATE queue_requests SET state = 'running', runs = runs + 1, started_ms = ?2 \
             WHERE id = ?1 AND state = 'queued'",
            params![id, now_ms()],
        )?;
        Ok(changed == 1)
    }

    /// Puts a request that was running back in line (its place is its arrival).
    pub fn requeue(&self, id: &str) -> Result<(), QueueStoreError> {
        self.db().execute("UPDATE queue_requests SET state = 'queued' WHERE id = ?1 AND state = 'running'", [id])?;
        Ok(())
    }

    /// Stores how a request ended, unless it already had (a cancel and a reply can race: the first one stands),
    /// and its webhook, if it has one, with `payload`. Returns whether this outcome was the one stored.
    pub fn finish(&self, id: &str, outcome: &Outcome, webhook: Option<(&str, &[u8])>) -> Result<bool, QueueStoreError> {
        let mut db = self.db();
        let tx = db.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let now = now_ms();
        let changed = tx.execute(
            "UPDATE queue_requests SET state = 'done', finished_ms = ?2, status_code = ?3, content_type = ?4, \
             result = ?5, error = ?6, error_type = ?7, logs = ?8, body = x'' WHERE id = ?1 AND state != 'done'",
            params![
                id,
                now,
                outcome.status_code,
                outcome.content_type,
                outcome.body,
                outcome.error,
                outcome.error_type,
                outcome.logs
            ],
        )?;
        if changed == 1 {
            if let Some((url, payload)) = webhook {
                tx.execute(
                    "INSERT OR REPLACE INTO queue_webhooks (request_id, url, payload, attempts, next_ms, state) \
                     VALUES (?1, ?2, ?3, 0, ?4, 'pending')",
                    params![id, url, payload, now],
                )?;
            }
        }
        tx.commit()?;
        Ok(changed == 1)
    }

    /// Webhooks not yet delivered nor given up on.
    pub fn pending_deliveries(&self) -> Result<Vec<Delivery>, QueueStoreError> {
        let db = self.db();
        let mut statement = db.prepare(
            "SELECT request_id, url, payload, attempts, next_ms FROM queue_webhooks WHERE state = 'pending' \
             ORDER BY next_ms",
        )?;
        let rows = statement.query_map([], |row| {
            Ok(Delivery {
                request_id: row.get(0)?,
                url: row.get(1)?,
                payload: row.get(2)?,
                attempts: row.get(3)?,
                next_ms: row.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Records an attempt at `request_id`'s webhook and what follows: the next one at `next_ms`, or none (`None`:
    /// delivered when `delivered`, else given up).
    pub fn record_attempt(
        &self,
        request_id: &str,
        attempt: &Attempt,
        delivered: bool,
        next_ms: Option<i64>,
    ) -> Result<(), QueueStoreError> {
        let mut db = self.db();
        let tx = db.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "INSERT OR REPLACE INTO queue_webhook_attempts (request_id, attempt, at_ms, status_code, error) \
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![request_id, attempt.attempt, attempt.at_ms, attempt.status_code, attempt.error],
        )?;
        let state = match (delivered, next_ms) {
            (true, _) => "delivered",
            (false, Some(_)) => "pending",
            (false, None) => "failed",
        };
        tx.execute(
            "UPDATE queue_webhooks SET attempts = ?2, next_ms = ?3, state = ?4 WHERE request_id = ?1",
            params![request_id, attempt.attempt, next_ms.unwrap_or(attempt.at_ms), state],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// The attempts at `request_id`'s webhook, in order, and its state (`pending`, `delivered`, `failed`).
    pub fn webhook(&self, request_id: &str) -> Result<Option<(String, Vec<Attempt>)>, QueueStoreError> {
        let db = self.db();
        let state: Option<String> = db
            .query_row("SELECT state FROM queue_webhooks WHERE request_id = ?1", [request_id], |r| r.get(0))
            .optional()?;
        let Some(state) = state else { return Ok(None) };
        let mut statement = db.prepare(
            "SELECT attempt, at_ms, status_code, error FROM queue_webhook_attempts WHERE request_id = ?1 \
             ORDER BY attempt",
        )?;
        let rows = statement.query_map([request_id], |row| {
            Ok(Attempt { attempt: row.get(0)?, at_ms: row.get(1)?, status_code: row.get(2)?, error: row.get(3)? })
        })?;
        Ok(Some((state, rows.collect::<Result<_, _>>()?)))
    }

    /// Deletes the requests done before `before_ms` (results past their retention), with their webhooks once those
    /// are no longer pending. Returns how many requests it deleted.
    pub fn sweep(&self, before_ms: i64) -> Result<usize, QueueStoreError> {
        let mut db = self.db();
        let tx = db.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let expired = "SELECT id FROM queue_requests WHERE state = 'done' AND finished_ms < ?1 AND id NOT IN \
                       (SELECT request_id FROM queue_webhooks WHERE state = 'pending')";
        tx.execute(&format!("DELETE FROM queue_webhook_attempts WHERE request_id IN ({expired})"), [before_ms])?;
        tx.execute(&format!("DELETE FROM queue_webhooks WHERE request_id IN ({expired})"), [before_ms])?;
        let deleted = tx.execute(&format!("DELETE FROM queue_requests WHERE id IN ({expired})"), [before_ms])?;
        tx.commit()?;
        Ok(deleted)
    }
}

fn position(db: &Connection, revision: &str, seq: i64) -> Result<u64, QueueStoreError> {
    let ahead: i64 = db.query_row(
        "SELECT COUNT(*) FROM queue_requests WHERE revision = ?1 AND state = 'queued' AND seq < ?2",
        params![revision, seq],
        |r| r.get(0),
    )?;
    Ok(ahead.max(0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(id: &str, revision: &str) -> NewRequest {
        NewRequest {
            id: id.into(),
            owner: "alice".into(),
            app: "app".into(),
            revision: revision.into(),
            submitter: Some("alice".into()),
            method: "POST".into(),
            path: "/".into(),
            query: "x=1".into(),
            headers: vec![("content-type".into(), "application/json".into())],
            body: b"{\"x\": 1}".to_vec(),
            webhook: Some("http://127.0.0.1:9/hook".into()),
            deadline_ms: None,
        }
    }

    #[test]
    fn requests_keep_their_order_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.sqlite3");
        {
            let store = QueueStore::open(&path).unwrap();
            assert_eq!(store.insert(&request("a", "r1")).unwrap().0, 0);
            assert_eq!(store.insert(&request("b", "r1")).unwrap().0, 1);
            assert_eq!(store.insert(&request("c", "r2")).unwrap().0, 0, "another app has a line of its own");
            assert_eq!(store.insert(&request("d", "r1")).unwrap().0, 2);
            assert!(store.start("a").unwrap());
            assert!(!store.start("a").unwrap(), "a request starts once");
        }
        let store = QueueStore::open(&path).unwrap();
        let unfinished = store.unfinished().unwrap();
        let ids: Vec<_> = unfinished.iter().map(|s| s.request.id.as_str()).collect();
        assert_eq!(ids, ["a", "b", "c", "d"]);
        assert_eq!((unfinished[0].state, unfinished[0].runs), (State::Running, 1));
        assert_eq!(unfinished[1].request, request("b", "r1"), "stored as submitted");
        let d = store.get("d").unwrap().unwrap();
        assert_eq!(store.position("r1", d.seq).unwrap(), 1, "the running request is no longer in line");
        store.requeue("a").unwrap();
        assert_eq!(store.position("r1", d.seq).unwrap(), 2, "a request put back in line takes its old place");
        assert!(store.get("nope").unwrap().is_none());
    }

    #[test]
    fn the_first_outcome_stands_and_queues_its_webhook() {
        let dir = tempfile::tempdir().unwrap();
        let store = QueueStore::open(&dir.path().join("state.sqlite3")).unwrap();
        store.insert(&request("a", "r1")).unwrap();
        let outcome = Outcome {
            status_code: Some(200),
            content_type: Some("application/json".into()),
            body: b"{\"y\": 2}".to_vec(),
            logs: "[]".into(),
            ..Outcome::default()
        };
        assert!(store.finish("a", &outcome, Some(("http://h/", b"{}"))).unwrap());
        let cancelled = Outcome { error: Some("cancelled".into()), ..Outcome::default() };
        assert!(!store.finish("a", &cancelled, None).unwrap(), "a later outcome does not replace the first");
        let done = store.get("a").unwrap().unwrap();
        assert_eq!((done.state, done.outcome), (State::Done, outcome));
        assert!(done.request.body.is_empty(), "the request's body is not kept once it is done");
        assert!(store.unfinished().unwrap().is_empty());
        let pending = store.pending_deliveries().unwrap();
        assert_eq!((pending.len(), pending[0].url.as_str(), pending[0].attempts), (1, "http://h/", 0));
    }

    #[test]
    fn webhook_attempts_are_recorded_until_delivered() {
        let dir = tempfile::tempdir().unwrap();
        let store = QueueStore::open(&dir.path().join("state.sqlite3")).unwrap();
        store.insert(&request("a", "r1")).unwrap();
        store.finish("a", &Outcome::default(), Some(("http://h/", b"{}"))).unwrap();
        let failed = Attempt { attempt: 1, at_ms: 10, status_code: Some(500), error: None };
        store.record_attempt("a", &failed, false, Some(1010)).unwrap();
        assert_eq!(store.pending_deliveries().unwrap()[0].next_ms, 1010);
        let ok = Attempt { attempt: 2, at_ms: 1010, status_code: Some(204), error: None };
        store.record_attempt("a", &ok, true, None).unwrap();
        assert!(store.pending_deliveries().unwrap().is_empty());
        let (state, attempts) = store.webhook("a").unwrap().unwrap();
        assert_eq!((state.as_str(), attempts), ("delivered", vec![failed, ok]));
    }

    #[test]
    fn the_sweep_deletes_old_results_but_not_pending_webhooks_or_unfinished_requests() {
        let dir = tempfile::tempdir().unwrap();
        let store = QueueStore::open(&dir.path().join("state.sqlite3")).unwrap();
        for id in ["done", "hooked", "queued"] {
            store.insert(&request(id, "r1")).unwrap();
        }
        store.finish("done", &Outcome::default(), None).unwrap();
        store.finish("hooked", &Outcome::default(), Some(("http://h/", b"{}"))).unwrap();
        assert_eq!(store.sweep(now_ms() + 1000).unwrap(), 1);
        assert!(store.get("done").unwrap().is_none());
        assert!(store.get("hooked").unwrap().is_some(), "kept while its webhook is pending");
        assert!(store.get("queued").unwrap().is_some());
        let gave_up = Attempt { attempt: 1, at_ms: 0, status_code: None, error: Some("refused".into()) };
        store.record_attempt("hooked", &gave_up, false, None).unwrap();
        assert_eq!(store.sweep(now_ms() + 1000).unwrap(), 1);
        assert!(store.webhook("hooked").unwrap().is_none(), "its webhook's record goes with it");
        assert_eq!(store.sweep(0).unwrap(), 0);
    }
}
