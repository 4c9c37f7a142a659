//! Durable coordinator state in an embedded SQLite database (WAL, so a `kill -9` loses nothing
//! that was acknowledged). Jobs and workers are stored as JSON documents of their in-memory
//! types; attempts, events and checkpoints are rows. The in-memory state is a cache of this.
//!
//! A job's progress (step, losses) changes with every step its progress rank reports, so it
//! has a row of its own, `job_progress`, written without touching the job's document (and its
//! spec). The document stays authoritative up to its own write, which drops that row.

use crate::state::{CheckpointRecord, Job, Worker};
use gantry_core::{Attempt, JobId, WorkerId};
use rusqlite::{Connection, params};
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("corrupt record: {0}")]
    Corrupt(#[from] serde_json::Error),
}

/// One stored log or event line of a job.
#[derive(Debug, Clone, PartialEq)]
pub struct EventRow {
    pub seq: u64,
    pub job_id: JobId,
    pub at_ms: i64,
    pub attempt: Attempt,
    /// -1 for the coordinator's own lines.
    pub rank: i32,
    pub stream: String,
    pub line: String,
}

/// One attempt of a job; `outcome` is None while it is live.
#[derive(Debug, Clone, PartialEq)]
pub struct AttemptRow {
    pub attempt: Attempt,
    pub started_at_ms: i64,
    pub ended_at_ms: Option<i64>,
    pub outcome: Option<String>,
}

/// The part of a job that each reported step changes.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    pub step: u64,
    pub loss: Option<f64>,
    pub eval_loss: Option<f64>,
    pub updated_at_ms: i64,
}

impl Progress {
    pub fn of(job: &Job) -> Self {
        Self {
            step: job.step,
            loss: job.loss,
            eval_loss: job.eval_loss,
            updated_at_ms: job.updated_at_ms,
        }
    }

    pub fn apply(&self, job: &mut Job) {
        job.step = self.step;
        job.loss = self.loss;
        job.eval_loss = self.eval_loss;
        job.updated_at_ms = self.updated_at_ms;
    }
}

pub struct Store {
    conn: Connection,
}

impl Store {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path)?;
        Self::init(conn)
    }

    pub fn in_memory() -> Result<Self, StoreError> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(conn: Connection) -> Result<Self, StoreError> {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS jobs (
                 id TEXT PRIMARY KEY, created_seq INTEGER NOT NULL, doc TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS workers (id TEXT PRIMARY KEY, doc TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS attempts (
                 job_id TEXT NOT NULL, attempt INTEGER NOT NULL, started_at_ms INTEGER NOT NULL,
                 ended_at_ms INTEGER, placement TEXT NOT NULL, outcome TEXT,
                 PRIMARY KEY (job_id, attempt));
             CREATE TABLE IF NOT EXISTS events (
                 seq INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL,
                 at_ms INTEGER NOT NULL, attempt INTEGER NOT NULL, rank INTEGER NOT NULL,
                 stream TEXT NOT NULL, line TEXT NOT NULL);
             CREATE INDEX IF NOT EXISTS events_by_job ON events (job_id, seq);
             CREATE TABLE IF NOT EXISTS checkpoints (
                 job_id TEXT NOT NULL, step INTEGER NOT NULL, attempt INTEGER NOT NULL,
                 url TEXT NOT NULL, size_bytes INTEGER NOT NULL, committed_at_ms INTEGER NOT NULL,
                 PRIMARY KEY (job_id, step));
             CREATE TABLE IF NOT EXISTS keys (name TEXT PRIMARY KEY, key BLOB NOT NULL);
             CREATE TABLE IF NOT EXISTS job_progress (
                 job_id TEXT PRIMARY KEY, step INTEGER NOT NULL, loss REAL, eval_loss REAL,
                 updated_at_ms INTEGER NOT NULL);",
        )?;
        Ok(Self { conn })
    }

    /// The 256-bit key named `name`, made from the OS's generator on first use and kept.
    pub fn key(&self, name: &str) -> Result<[u8; 32], StoreError> {
        let fresh: [u8; 32] = rand::random();
        self.conn.execute(
            "INSERT OR IGNORE INTO keys (name, key) VALUES (?1, ?2)",
            params![name, fresh.as_slice()],
        )?;
        let key: Vec<u8> =
            self.conn
                .query_row("SELECT key FROM keys WHERE name = ?1", [name], |r| r.get(0))?;
        Ok(key.try_into().unwrap_or(fresh))
    }

    pub fn put_job(&self, job: &Job) -> Result<(), StoreError> {
        let doc = serde_json::to_string(job)?;
        // One transaction: the document carries the newest progress, so the progress row it
        // supersedes goes with the same commit.
        let tx = self.conn.unchecked_transaction()?;
        tx.execute(
            "INSERT INTO jobs (id, created_seq, doc)
             VALUES (?1, (SELECT COALESCE(MAX(created_seq), 0) + 1 FROM jobs), ?2)
             ON CONFLICT (id) DO UPDATE SET doc = excluded.doc",
            params![job.id.0, doc],
        )?;
        tx.execute("DELETE FROM job_progress WHERE job_id = ?1", [&job.id.0])?;
        tx.commit()?;
        Ok(())
    }

    /// Records a job's progress without rewriting its document.
    pub fn put_progress(&self, job: &JobId, p: &Progress) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT OR REPLACE INTO job_progress (job_id, step, loss, eval_loss, updated_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![job.0, p.step, p.loss, p.eval_loss, p.updated_at_ms],
        )?;
        Ok(())
    }

    /// Every job, oldest first, with its newest progress.
    pub fn jobs(&self) -> Result<Vec<Job>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT j.doc, p.step, p.loss, p.eval_loss, p.updated_at_ms
             FROM jobs j LEFT JOIN job_progress p ON p.job_id = j.id
             ORDER BY j.created_seq",
        )?;
        let rows = stmt.query_map([], |row| {
            let progress = match row.get::<_, Option<u64>>(1)? {
                Some(step) => Some(Progress {
                    step,
                    loss: row.get(2)?,
                    eval_loss: row.get(3)?,
                    updated_at_ms: row.get(4)?,
                }),
                None => None,
            };
            Ok((row.get::<_, String>(0)?, progress))
        })?;
        rows.map(|row| {
            let (doc, progress) = row?;
            let mut job: Job = serde_json::from_str(&doc)?;
            if let Some(p) = progress {
                p.apply(&mut job);
            }
            Ok(job)
        })
        .collect()
    }

    pub fn put_worker(&self, worker: &Worker) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO workers (id, doc) VALUES (?1, ?2)
             ON CONFLICT (id) DO UPDATE SET doc = excluded.doc",
            params![worker.id.0, serde_json::to_string(worker)?],
        )?;
        Ok(())
    }

    pub fn workers(&self) -> Result<Vec<Worker>, StoreError> {
        let mut stmt = self.conn.prepare("SELECT doc FROM workers ORDER BY id")?;
        let docs = stmt.query_map([], |row| row.get::<_, String>(0))?;
        docs.map(|doc| Ok(serde_json::from_str(&doc?)?)).collect()
    }

    pub fn start_attempt(
        &self,
        job: &JobId,
        attempt: Attempt,
        placement: &[WorkerId],
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT OR REPLACE INTO attempts (job_id, attempt, started_at_ms, placement)
             VALUES (?1, ?2, ?3, ?4)",
            params![
                job.0,
                attempt.get(),
                now_ms,
                serde_json::to_string(placement)?
            ],
        )?;
        Ok(())
    }

    pub fn end_attempt(
        &self,
        job: &JobId,
        attempt: Attempt,
        outcome: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.conn.execute(
            "UPDATE attempts SET ended_at_ms = ?3, outcome = ?4
             WHERE job_id = ?1 AND attempt = ?2 AND ended_at_ms IS NULL",
            params![job.0, attempt.get(), now_ms, outcome],
        )?;
        Ok(())
    }

    /// Every attempt of a job, in order.
    pub fn attempts(&self, job: &JobId) -> Result<Vec<AttemptRow>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT attempt, started_at_ms, ended_at_ms, outcome FROM attempts
             WHERE job_id = ?1 ORDER BY attempt",
        )?;
        let rows = stmt.query_map([&job.0], |row| {
            Ok(AttemptRow {
                attempt: Attempt(row.get(0)?),
                started_at_ms: row.get(1)?,
                ended_at_ms: row.get(2)?,
                outcome: row.get(3)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Appends an event line and returns its sequence number.
    pub fn append_event(
        &self,
        job: &JobId,
        at_ms: i64,
        attempt: Attempt,
        rank: i32,
        stream: &str,
        line: &str,
    ) -> Result<u64, StoreError> {
        self.conn.execute(
            "INSERT INTO events (job_id, at_ms, attempt, rank, stream, line)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![job.0, at_ms, attempt.get(), rank, stream, line],
        )?;
        Ok(self.conn.last_insert_rowid() as u64)
    }

    pub fn events_after(
        &self,
        job: &JobId,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<EventRow>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT seq, at_ms, attempt, rank, stream, line FROM events
             WHERE job_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
        )?;
        let rows = stmt.query_map(params![job.0, after_seq, limit as i64], |row| {
            Ok(EventRow {
                seq: row.get(0)?,
                job_id: job.clone(),
                at_ms: row.get(1)?,
                attempt: Attempt(row.get(2)?),
                rank: row.get(3)?,
                stream: row.get(4)?,
                line: row.get(5)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn put_checkpoint(&self, job: &JobId, c: &CheckpointRecord) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT OR REPLACE INTO checkpoints
                 (job_id, step, attempt, url, size_bytes, committed_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                job.0,
                c.step,
                c.attempt.get(),
                c.url,
                c.size_bytes,
                c.committed_at_ms
            ],
        )?;
        Ok(())
    }

    /// Forgets checkpoints that retention deleted from the object store.
    pub fn delete_checkpoints(&self, job: &JobId, steps: &[u64]) -> Result<(), StoreError> {
        for step in steps {
            self.conn.execute(
                "DELETE FROM checkpoints WHERE job_id = ?1 AND step = ?2",
                params![job.0, step],
            )?;
        }
        Ok(())
    }

    pub fn checkpoints(&self, job: &JobId) -> Result<Vec<CheckpointRecord>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT step, url, attempt, size_bytes, committed_at_ms FROM checkpoints
             WHERE job_id = ?1 ORDER BY step",
        )?;
        let rows = stmt.query_map([&job.0], |row| {
            Ok(CheckpointRecord {
                step: row.get(0)?,
                url: row.get(1)?,
                attempt: Attempt(row.get(2)?),
                size_bytes: row.get(3)?,
                committed_at_ms: row.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gantry_core::JobSpec;

    #[test]
    fn jobs_and_events_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let spec = JobSpec::from_json(
            r#"{"name":"a","model":{"kind":"mlp"},"train":{"steps":1,"global_batch":1,"lr":0.1}}"#,
        )
        .unwrap();
        {
            let store = Store::open(&path).unwrap();
            store
                .put_job(&Job::new("j1".into(), spec.clone(), 5))
                .unwrap();
            store.put_job(&Job::new("j0".into(), spec, 6)).unwrap();
            store
                .append_event(&"j1".into(), 7, Attempt(1), -1, "event", "hello")
                .unwrap();
        }
        let store = Store::open(&path).unwrap();
        let ids: Vec<String> = store.jobs().unwrap().into_iter().map(|j| j.id.0).collect();
        assert_eq!(ids, ["j1", "j0"], "creation order is kept");
        let events = store.events_after(&"j1".into(), 0, 10).unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].line, "hello");
    }

    #[test]
    fn progress_is_stored_apart_from_the_document_until_the_next_write_of_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let spec = JobSpec::from_json(
            r#"{"name":"a","model":{"kind":"mlp"},"train":{"steps":9,"global_batch":1,"lr":0.1}}"#,
        )
        .unwrap();
        let mut job = Job::new("j".into(), spec, 5);
        let progress = Progress {
            step: 7,
            loss: Some(0.5),
            eval_loss: Some(0.25),
            updated_at_ms: 70,
        };
        {
            let store = Store::open(&path).unwrap();
            store.put_job(&job).unwrap();
            store.put_progress(&job.id, &progress).unwrap();
            let doc: String = store
                .conn
                .query_row("SELECT doc FROM jobs WHERE id = 'j'", [], |r| r.get(0))
                .unwrap();
            assert!(
                doc.contains(r#""step":0"#),
                "the document is untouched: {doc}"
            );
        }
        let store = Store::open(&path).unwrap();
        let loaded = store.jobs().unwrap().remove(0);
        assert_eq!(Progress::of(&loaded), progress);
        assert_eq!(loaded.spec, job.spec);
        // A write of the whole job supersedes the progress row.
        job.step = 8;
        job.loss = None;
        job.eval_loss = None;
        store.put_job(&job).unwrap();
        let loaded = store.jobs().unwrap().remove(0);
        assert_eq!((loaded.step, loaded.loss), (8, None));
    }
}
