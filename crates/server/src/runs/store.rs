//! Runs in SQLite (`state.sqlite3`): one row per run, written by the history's writer in batches, listed newest
//! first a page at a time by keyset (`(queued_ms, id)` below the previous page's last), per user or for everyone,
//! each order served by an index (and a user's runs of one outcome by one of their own, for the dashboard's filter:
//! a rare outcome would otherwise scan all of a user's runs).

use std::path::Path;

use rusqlite::{params, params_from_iter, OptionalExtension, Row};

use super::{Ended, NewRun};

pub type RunStoreError = crate::db::DatabaseError;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS runs (
    id             TEXT PRIMARY KEY,
    user_id        TEXT NOT NULL,
    kind           TEXT NOT NULL,
    function       TEXT NOT NULL DEFAULT '',
    app            TEXT NOT NULL DEFAULT '',
    revision       TEXT NOT NULL DEFAULT '',
    cron_id        TEXT NOT NULL DEFAULT '',
    machine_type   TEXT NOT NULL DEFAULT '',
    worker         TEXT NOT NULL DEFAULT '',
    queued_ms      INTEGER NOT NULL,
    started_ms     INTEGER,
    finished_ms    INTEGER,
    outcome        TEXT NOT NULL,
    error_kind     TEXT NOT NULL DEFAULT '',
    error          TEXT NOT NULL DEFAULT '',
    logs           TEXT NOT NULL DEFAULT '[]',
    logs_truncated INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS runs_by_user ON runs (user_id, queued_ms, id);
CREATE INDEX IF NOT EXISTS runs_by_time ON runs (queued_ms, id);
CREATE INDEX IF NOT EXISTS runs_by_user_outcome ON runs (user_id, outcome, queued_ms, id);
";

const COLUMNS: &str = "id, user_id, kind, function, app, revision, cron_id, machine_type, worker, queued_ms, \
                       started_ms, finished_ms, outcome, error_kind, error, logs_truncated";

/// One stored run (its logs apart: [`RunStore::logs`]).
#[derive(Debug, Clone, PartialEq)]
pub struct RunRow {
    pub id: String,
    pub user_id: String,
    pub kind: String,
    pub function: String,
    pub app: String,
    pub revision: String,
    pub cron_id: String,
    pub machine_type: String,
    pub worker: String,
    pub queued_ms: i64,
    pub started_ms: Option<i64>,
    pub finished_ms: Option<i64>,
    pub outcome: String,
    pub error_kind: String,
    pub error: String,
    pub logs_truncated: bool,
}

impl RunRow {
    /// Where the next page starts (`before` of the next query).
    pub fn cursor(&self) -> String {
        format!("{}:{}", self.queued_ms, self.id)
    }
}

fn row(row: &Row<'_>) -> rusqlite::Result<RunRow> {
    Ok(RunRow {
        id: row.get(0)?,
        user_id: row.get(1)?,
        kind: row.get(2)?,
        function: row.get(3)?,
        app: row.get(4)?,
        revision: row.get(5)?,
        cron_id: row.get(6)?,
        machine_type: row.get(7)?,
        worker: row.get(8)?,
        queued_ms: row.get(9)?,
        started_ms: row.get(10)?,
        finished_ms: row.get(11)?,
        outcome: row.get(12)?,
        error_kind: row.get(13)?,
        error: row.get(14)?,
        logs_truncated: row.get(15)?,
    })
}

/// Which runs to list.
#[derive(Debug, Clone, Default)]
pub struct RunQuery {
    /// Only this user's (`None`: everyone's, for an admin).
    pub user: Option<String>,
    /// Only those of this app (alias or revision id) or function name.
    pub app: Option<String>,
    pub failed_only: bool,
    /// Only those of this outcome (`success`, `error`, `timeout`, `cancelled`, `running`).
    pub outcome: Option<String>,
    /// Only those of this kind (`call`, `web`, `queue`, `activation`).
    pub kind: Option<&'static str>,
    /// Only those that arrived at or after this time (ms since the epoch).
    pub since_ms: Option<i64>,
    /// Only those before this cursor ([`RunRow::cursor`]).
    pub before: Option<(i64, String)>,
    pub limit: usize,
}

/// A cursor as [`RunRow::cursor`] made it, or `None` if it is not one.
pub fn parse_cursor(cursor: &str) -> Option<(i64, String)> {
    let (ms, id) = cursor.split_once(':')?;
    Some((ms.parse().ok()?, id.to_string()))
}

#[derive(Debug)]
pub struct RunStore(crate::db::Database);

impl RunStore {
    pub fn open(path: &Path) -> Result<Self, RunStoreError> {
        Ok(Self(crate::db::Database::open(path, SCHEMA)?))
    }

    /// Writes a batch: runs that started (listed as running, unless already there) and runs that ended (stored whole,
    /// over their start if it was written).
    pub fn write(&self, started: &[NewRun], ended: &[Ended]) -> Result<(), RunStoreError> {
        let mut db = self.0.lock();
        let tx = db.transaction()?;
        {
            let mut insert = tx.prepare_cached(
                "INSERT OR IGNORE INTO runs (id, user_id, kind, function, app, revision, cron_id, machine_type, \
                 queued_ms, outcome) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, 'running')",
            )?;
            for run in started {
                insert.execute(params![
                    run.id,
                    run.user_id,
                    run.kind,
                    run.function,
                    run.app,
                    run.revision,
                    run.cron_id,
                    run.machine_type,
                    run.queued_ms
                ])?;
            }
            let mut upsert = tx.prepare_cached(
                "INSERT INTO runs (id, user_id, kind, function, app, revision, cron_id, machine_type, queued_ms, \
                 worker, started_ms, finished_ms, outcome, error_kind, error, logs, logs_truncated) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17) \
                 ON CONFLICT (id) DO UPDATE SET worker = excluded.worker, started_ms = excluded.started_ms, \
                 finished_ms = excluded.finished_ms, outcome = excluded.outcome, error_kind = excluded.error_kind, \
                 error = excluded.error, logs = excluded.logs, logs_truncated = excluded.logs_truncated",
            )?;
            for ended in ended {
                let (run, (outcome, kind, message)) = (&ended.run, ended.outcome.parts());
                upsert.execute(params![
                    run.id,
                    run.user_id,
                    run.kind,
                    run.function,
                    run.app,
                    run.revision,
                    run.cron_id,
                    run.machine_type,
                    run.queued_ms,
                    ended.worker,
                    ended.started_ms,
                    ended.finished_ms,
                    outcome,
                    kind,
                    message,
                    ended.logs,
                    ended.logs_truncated
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Runs a stopped server left running: ended by that stop. Returns how many.
    pub fn end_interrupted(&self, now_ms: i64) -> Result<usize, RunStoreError> {
        Ok(self.0.lock().execute(
            "UPDATE runs SET outcome = 'cancelled', error_kind = 'server-stopped', \
             error = 'the server stopped while this ran', finished_ms = COALESCE(finished_ms, ?1) \
             WHERE outcome = 'running'",
            params![now_ms],
        )?)
    }

    /// Deletes the runs that arrived before `before_ms`. Returns how many.
    pub fn prune(&self, before_ms: i64) -> Result<usize, RunStoreError> {
        Ok(self.0.lock().execute("DELETE FROM runs WHERE queued_ms < ?1", params![before_ms])?)
    }

    /// One page of runs, newest first.
    pub fn list(&self, query: &RunQuery) -> Result<Vec<RunRow>, RunStoreError> {
        let mut conditions = Vec::new();
        let mut values: Vec<rusqlite::types::Value> = Vec::new();
        if let Some(user) = &query.user {
            values.push(user.clone().into());
            conditions.push(format!("user_id = ?{}", values.len()));
        }
        if let Some(app) = &query.app {
            values.push(app.clone().into());
            let n = values.len();
            conditions.push(format!("(app = ?{n} OR revision = ?{n} OR function = ?{n})"));
        }
        if query.failed_only {
            conditions.push("outcome NOT IN ('success', 'running')".into());
        }
        if let Some(outcome) = &query.outcome {
            values.push(outcome.clone().into());
            conditions.push(format!("outcome = ?{}", values.len()));
        }
        if let Some(kind) = query.kind {
            values.push(kind.to_string().into());
            conditions.push(format!("kind = ?{}", values.len()));
        }
        if let Some(since) = query.since_ms {
            values.push(since.into());
            conditions.push(format!("queued_ms >= ?{}", values.len()));
        }
        if let Some((ms, id)) = &query.before {
            values.push((*ms).into());
            values.push(id.clone().into());
            let n = values.len();
            conditions.push(format!("(queued_ms, id) < (?{}, ?{n})", n - 1));
        }
        let filter = if conditions.is_empty() { String::new() } else { format!("WHERE {}", conditions.join(" AND ")) };
        values.push((query.limit as i64).into());
        let sql =
            format!("SELECT {COLUMNS} FROM runs {filter} ORDER BY queued_ms DESC, id DESC LIMIT ?{}", values.len());
        let db = self.0.lock();
        let mut statement = db.prepare(&sql)?;
        let rows = statement.query_map(params_from_iter(values), row)?.collect::<Result<_, _>>()?;
        Ok(rows)
    }

    /// `user`'s runs of `app` (web and queued requests) since `since_ms`: how many, and their mean duration in ms.
    pub fn app_traffic(&self, user: &str, app: &str, since_ms: i64) -> Result<(u64, Option<f64>), RunStoreError> {
        let db = self.0.lock();
        Ok(db.query_row(
            "SELECT COUNT(*), AVG(finished_ms - queued_ms) FROM runs WHERE user_id = ?1 AND queued_ms >= ?2 \
             AND (app = ?3 OR revision = ?3) AND kind IN ('web', 'queue')",
            params![user, since_ms, app],
            |r| Ok((r.get::<_, i64>(0)?.max(0) as u64, r.get(1)?)),
        )?)
    }

    /// Run `id` with its logs (JSON), if it exists.
    pub fn logs(&self, id: &str) -> Result<Option<(RunRow, String)>, RunStoreError> {
        let db = self.0.lock();
        Ok(db
            .query_row(&format!("SELECT {COLUMNS}, logs FROM runs WHERE id = ?1"), params![id], |r| {
                Ok((row(r)?, r.get(16)?))
            })
            .optional()?)
    }
}

#[cfg(test)]
mod tests {
    use super::super::Outcome;
    use super::*;

    fn run(id: &str, user: &str, queued_ms: i64) -> NewRun {
        NewRun {
            id: id.into(),
            user_id: user.into(),
            kind: "call",
            function: "f".into(),
            queued_ms,
            ..Default::default()
        }
    }

    fn ended(run: NewRun, outcome: Outcome) -> Ended {
        Ended {
            started_ms: Some(run.queued_ms + 1),
            finished_ms: run.queued_ms + 2,
            run,
            worker: "42".into(),
            outcome,
            logs: "[]".into(),
            logs_truncated: false,
        }
    }

    fn store() -> (tempfile::TempDir, RunStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = RunStore::open(&dir.path().join("state.sqlite3")).unwrap();
        (dir, store)
    }

    #[test]
    fn runs_page_newest_first_per_user_and_an_end_replaces_the_start() {
        let (_dir, store) = store();
        let started: Vec<_> = (0..5).map(|i| run(&format!("a{i}"), "alice", 1000 + i)).collect();
        store.write(&started, &[]).unwrap();
        store
            .write(&[run("b0", "bob", 1002)], &[ended(run("a3", "alice", 1003), Outcome::error("raised", "x"))])
            .unwrap();
        let page = |user: Option<&str>, before, failed_only| {
            let query = RunQuery { user: user.map(Into::into), before, failed_only, limit: 2, ..Default::default() };
            store.list(&query).unwrap()
        };
        let first = page(Some("alice"), None, false);
        assert_eq!(first.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["a4", "a3"]);
        assert_eq!(
            (first[1].outcome.as_str(), first[1].error_kind.as_str(), first[1].worker.as_str()),
            ("error", "raised", "42")
        );
        let second = page(Some("alice"), parse_cursor(&first[1].cursor()), false);
        assert_eq!(second.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["a2", "a1"]);
        assert_eq!(page(None, None, false).iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["a4", "a3"]);
        let all = RunQuery { limit: 10, ..Default::default() };
        assert_eq!(store.list(&all).unwrap().len(), 6);
        assert_eq!(page(Some("alice"), None, true).iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["a3"]);
        assert!(page(Some("carol"), None, false).is_empty());
    }

    #[test]
    fn pruning_deletes_what_arrived_before_the_retention_and_a_restart_ends_running_runs() {
        let (_dir, store) = store();
        store.write(&[run("old", "u", 10), run("new", "u", 1000)], &[]).unwrap();
        assert_eq!(store.prune(500).unwrap(), 1);
        assert!(store.logs("old").unwrap().is_none());
        assert_eq!(store.end_interrupted(2000).unwrap(), 1);
        let (row, logs) = store.logs("new").unwrap().unwrap();
        assert_eq!(
            (row.outcome.as_str(), row.error_kind.as_str(), row.finished_ms),
            ("cancelled", "server-stopped", Some(2000))
        );
        assert_eq!(logs, "[]");
    }

    #[test]
    fn cursors_round_trip_and_garbage_is_none() {
        assert_eq!(parse_cursor("12:ab:c"), Some((12, "ab:c".to_string())));
        assert_eq!(parse_cursor("x:y"), None);
        assert_eq!(parse_cursor("nothing"), None);
    }
}
