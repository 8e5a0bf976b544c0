//! Schedules ("crons") and their activations in SQLite (`state.sqlite3`): what survives a restart.
//!
//! A cron keeps `last_due_ms`, the latest due time it has dealt with (run, skipped, or caught up after a stop): the
//! next activation is the cron expression's first time after it, so a restarted server knows what it missed.

use std::path::Path;

use rusqlite::{params, OptionalExtension, Row};

pub type ScheduleStoreError = crate::db::DatabaseError;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS crons (
    id            TEXT PRIMARY KEY,
    user_id       TEXT NOT NULL,
    revision      TEXT NOT NULL,
    function_name TEXT NOT NULL,
    machine_type  TEXT NOT NULL,
    cron          TEXT NOT NULL,
    created_ms    INTEGER NOT NULL,
    last_due_ms   INTEGER NOT NULL,
    active        INTEGER NOT NULL DEFAULT 1,
    cancelled_ms  INTEGER
);
CREATE INDEX IF NOT EXISTS crons_by_user ON crons (user_id, created_ms);
CREATE TABLE IF NOT EXISTS cron_activations (
    id             TEXT PRIMARY KEY,
    cron_id        TEXT NOT NULL,
    due_ms         INTEGER NOT NULL,
    started_ms     INTEGER,
    finished_ms    INTEGER,
    outcome        TEXT NOT NULL,
    error_kind     TEXT NOT NULL DEFAULT '',
    error          TEXT NOT NULL DEFAULT '',
    logs           TEXT NOT NULL DEFAULT '[]',
    logs_truncated INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS cron_activations_by_cron ON cron_activations (cron_id, due_ms);
";

/// One schedule.
#[derive(Debug, Clone, PartialEq)]
pub struct CronRow {
    pub id: String,
    pub user_id: String,
    /// The app revision whose function it runs.
    pub revision: String,
    pub function_name: String,
    pub machine_type: String,
    pub cron: String,
    pub created_ms: i64,
    pub last_due_ms: i64,
    pub active: bool,
}

fn cron_row(row: &Row<'_>) -> rusqlite::Result<CronRow> {
    Ok(CronRow {
        id: row.get(0)?,
        user_id: row.get(1)?,
        revision: row.get(2)?,
        function_name: row.get(3)?,
        machine_type: row.get(4)?,
        cron: row.get(5)?,
        created_ms: row.get(6)?,
        last_due_ms: row.get(7)?,
        active: row.get(8)?,
    })
}

const CRON_COLUMNS: &str = "id, user_id, revision, function_name, machine_type, cron, created_ms, last_due_ms, active";

/// One activation: a due time of a cron, run or skipped.
#[derive(Debug, Clone, PartialEq)]
pub struct ActivationRow {
    pub id: String,
    pub cron_id: String,
    pub due_ms: i64,
    pub started_ms: Option<i64>,
    pub finished_ms: Option<i64>,
    /// "running", "success", "error", "timeout", "cancelled" or "skipped".
    pub outcome: String,
    pub error_kind: String,
    pub error: String,
}

fn activation_row(row: &Row<'_>) -> rusqlite::Result<ActivationRow> {
    Ok(ActivationRow {
        id: row.get(0)?,
        cron_id: row.get(1)?,
        due_ms: row.get(2)?,
        started_ms: row.get(3)?,
        finished_ms: row.get(4)?,
        outcome: row.get(5)?,
        error_kind: row.get(6)?,
        error: row.get(7)?,
    })
}

const ACTIVATION_COLUMNS: &str = "id, cron_id, due_ms, started_ms, finished_ms, outcome, error_kind, error";

#[derive(Debug)]
pub struct ScheduleStore(crate::db::Database);

impl ScheduleStore {
    pub fn open(path: &Path) -> Result<Self, ScheduleStoreError> {
        Ok(Self(crate::db::Database::open(path, SCHEMA)?))
    }

    /// Inserts `cron` unless its user has `max` active schedules already (`false` then): one step, so that two
    /// registrations at once cannot both pass the count.
    pub fn insert_within(&self, cron: &CronRow, max: usize) -> Result<bool, ScheduleStoreError> {
        let db = self.0.lock();
        if Self::count_in(&db, &cron.user_id)? >= max {
            return Ok(false);
        }
        Self::insert_into(&db, cron)?;
        Ok(true)
    }

    fn insert_into(db: &rusqlite::Connection, cron: &CronRow) -> Result<(), ScheduleStoreError> {
        db.execute(
            &format!("INSERT INTO crons ({CRON_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"),
            params![
                cron.id,
                cron.user_id,
                cron.revision,
                cron.function_name,
                cron.machine_type,
                cron.cron,
                cron.created_ms,
                cron.last_due_ms,
                cron.active
            ],
        )?;
        Ok(())
    }

    /// `user`'s active schedules.
    fn count_in(db: &rusqlite::Connection, user: &str) -> Result<usize, ScheduleStoreError> {
        let n: i64 =
            db.query_row("SELECT COUNT(*) FROM crons WHERE user_id = ?1 AND active = 1", params![user], |r| r.get(0))?;
        Ok(n as usize)
    }

    /// `user`'s schedules (everyone's for `None`), oldest first; cancelled ones too.
    pub fn list(&self, user: Option<&str>) -> Result<Vec<CronRow>, ScheduleStoreError> {
        let db = self.0.lock();
        let rows = match user {
            Some(user) => db
                .prepare(&format!("SELECT {CRON_COLUMNS} FROM crons WHERE user_id = ?1 ORDER BY created_ms, id"))?
                .query_map(params![user], cron_row)?
                .collect::<Result<_, _>>()?,
            None => db
                .prepare(&format!("SELECT {CRON_COLUMNS} FROM crons ORDER BY created_ms, id"))?
                .query_map([], cron_row)?
                .collect::<Result<_, _>>()?,
        };
        Ok(rows)
    }

    pub fn active(&self) -> Result<Vec<CronRow>, ScheduleStoreError> {
        let db = self.0.lock();
        let rows = db
            .prepare(&format!("SELECT {CRON_COLUMNS} FROM crons WHERE active = 1 ORDER BY created_ms, id"))?
            .query_map([], cron_row)?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    pub fn get(&self, id: &str) -> Result<Option<CronRow>, ScheduleStoreError> {
        Ok(self
            .0
            .lock()
            .query_row(&format!("SELECT {CRON_COLUMNS} FROM crons WHERE id = ?1"), params![id], cron_row)
            .optional()?)
    }

    /// Marks cron `id` cancelled; returns whether it was active.
    pub fn cancel(&self, id: &str, now_ms: i64) -> Result<bool, ScheduleStoreError> {
        Ok(self.0.lock().execute(
            "UPDATE crons SET active = 0, cancelled_ms = ?2 WHERE id = ?1 AND active = 1",
            params![id, now_ms],
        )? == 1)
    }

    /// Records that cron `id` dealt with its due time `due_ms`, with `activation` (a new one, run or skipped).
    pub fn activate(
        &self,
        id: &str,
        due_ms: i64,
        activation: &ActivationRow,
        logs: &str,
    ) -> Result<(), ScheduleStoreError> {
        let mut db = self.0.lock();
        let tx = db.transaction()?;
        tx.execute("UPDATE crons SET last_due_ms = MAX(last_due_ms, ?2) WHERE id = ?1", params![id, due_ms])?;
        tx.execute(
            &format!(
                "INSERT INTO cron_activations ({ACTIVATION_COLUMNS}, logs) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"
            ),
            params![
                activation.id,
                activation.cron_id,
                activation.due_ms,
                activation.started_ms,
                activation.finished_ms,
                activation.outcome,
                activation.error_kind,
                activation.error,
                logs
            ],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Stores how activation `id` ended, with its logs.
    pub fn finish(
        &self,
        id: &str,
        finished_ms: i64,
        outcome: (&str, &str, &str),
        logs: &str,
        logs_truncated: bool,
    ) -> Result<(), ScheduleStoreError> {
        self.0.lock().execute(
            "UPDATE cron_activations SET finished_ms = ?2, outcome = ?3, error_kind = ?4, error = ?5, logs = ?6, \
             logs_truncated = ?7 WHERE id = ?1",
            params![id, finished_ms, outcome.0, outcome.1, outcome.2, logs, logs_truncated],
        )?;
        Ok(())
    }

    /// Activations a stopped server left running: ended by that stop. Returns how many.
    pub fn end_interrupted(&self, now_ms: i64) -> Result<usize, ScheduleStoreError> {
        Ok(self.0.lock().execute(
            "UPDATE cron_activations SET outcome = 'cancelled', error_kind = 'server-stopped', \
             error = 'the server stopped while this activation ran', finished_ms = ?1 WHERE outcome = 'running'",
            params![now_ms],
        )?)
    }

    /// Cron `id`'s activations, newest first, at most `limit`.
    pub fn activations(&self, id: &str, limit: usize) -> Result<Vec<ActivationRow>, ScheduleStoreError> {
        let db = self.0.lock();
        let rows = db
            .prepare(&format!(
                "SELECT {ACTIVATION_COLUMNS} FROM cron_activations WHERE cron_id = ?1 ORDER BY due_ms DESC, id DESC \
                 LIMIT ?2"
            ))?
            .query_map(params![id, limit as i64], activation_row)?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    /// Activation `id` of cron `cron_id` with its logs.
    pub fn activation_logs(&self, cron_id: &str, id: &str) -> Result<Option<String>, ScheduleStoreError> {
        Ok(self
            .0
            .lock()
            .query_row("SELECT logs FROM cron_activations WHERE cron_id = ?1 AND id = ?2", params![cron_id, id], |r| {
                r.get(0)
            })
            .optional()?)
    }

    /// Deletes activations due before `before_ms` (the run history's retention). Returns how many.
    pub fn prune(&self, before_ms: i64) -> Result<usize, ScheduleStoreError> {
        Ok(self
            .0
            .lock()
            .execute("DELETE FROM cron_activations WHERE due_ms < ?1 AND outcome != 'running'", params![before_ms])?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, user: &str) -> CronRow {
        CronRow {
            id: id.into(),
            user_id: user.into(),
            revision: "r".into(),
            function_name: "f".into(),
            machine_type: "XS".into(),
            cron: "* * * * *".into(),
            created_ms: 0,
            last_due_ms: 0,
            active: true,
        }
    }

    #[test]
    fn a_user_at_the_limit_gets_no_more_schedules_and_others_still_do() {
        let dir = tempfile::tempdir().unwrap();
        let store = ScheduleStore::open(&dir.path().join("state.db")).unwrap();
        assert!(store.insert_within(&row("1", "alice"), 2).unwrap());
        assert!(store.insert_within(&row("2", "alice"), 2).unwrap());
        assert!(!store.insert_within(&row("3", "alice"), 2).unwrap());
        assert!(store.insert_within(&row("4", "bob"), 2).unwrap());
        assert_eq!(store.list(Some("alice")).unwrap().len(), 2);
    }
}
