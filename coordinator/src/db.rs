//! The embedded database (SQLite): jobs, workers and per-iteration history, so the job record
//! and `GetJobStatus` survive a coordinator restart.

use std::path::Path;

use dancegrpo_proto::{JobConfig, JobId, JobState, WorkerId, WorkerInfo, WorkerState};
use rusqlite::{Connection, OptionalExtension, params};

use crate::error::{Error, Result};

/// A job as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct JobRecord {
    /// Id.
    pub id: JobId,
    /// The config's `job_name`.
    pub name: String,
    /// Lifecycle state.
    pub state: JobState,
    /// Completed iterations.
    pub step: u64,
    /// Expected workers.
    pub world_size: u32,
    /// Group generation (bumped on every re-formed world).
    pub generation: u64,
    /// Newest step rank 0 has written a checkpoint of (0 = none): where a re-formed world
    /// restarts from.
    pub checkpoint_step: u64,
    /// The job config.
    pub config: JobConfig,
    /// Last notable event, for humans.
    pub message: String,
    /// Unix ms.
    pub created_ms: i64,
    /// Unix ms.
    pub updated_ms: i64,
}

/// A worker registration as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkerRecord {
    /// Id of this registration.
    pub id: WorkerId,
    /// What the worker said about itself.
    pub info: WorkerInfo,
    /// Global rank, once the world is formed.
    pub rank: Option<u32>,
    /// Lifecycle state.
    pub state: WorkerState,
    /// Unix ms.
    pub last_heartbeat_ms: i64,
    /// Unix ms.
    pub registered_ms: i64,
}

/// One finished iteration.
#[derive(Clone, Debug, PartialEq)]
pub struct IterationRecord {
    /// Iteration number (1-based).
    pub iteration: u64,
    /// Mean reward per configured reward.
    pub mean_rewards: Vec<f64>,
    /// Worker-reported metrics as JSON (loss, grad norm, ratios, timings).
    pub metrics_json: String,
    /// The prompt sampler's position after this iteration, as JSON.
    pub cursor_json: String,
}

/// Handle to the database file.
#[derive(Debug)]
pub struct Db {
    conn: Connection,
}

const SCHEMA_VERSION: i64 = 2;

impl Db {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| Error::Io {
                context: format!("cannot create {}", dir.display()),
                source,
            })?;
        }
        let conn = Connection::open(path)?;
        // WAL keeps readers (status queries) off the writer's back; NORMAL is durable enough
        // for a record that is rewritten on every state change.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version > SCHEMA_VERSION {
            return Err(Error::InvalidRequest(format!(
                "database {} has schema v{version}, newer than this coordinator's v{SCHEMA_VERSION}",
                path.display()
            )));
        }
        if version != 0 && version < SCHEMA_VERSION {
            // Pre-release schema (no training state): there is nothing in it worth migrating.
            return Err(Error::InvalidRequest(format!(
                "database {} has the pre-release schema v{version}; start with a new --db",
                path.display()
            )));
        }
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS jobs (
                id TEXT PRIMARY KEY, name TEXT NOT NULL, state TEXT NOT NULL,
                step INTEGER NOT NULL, world_size INTEGER NOT NULL, generation INTEGER NOT NULL,
                config_json TEXT NOT NULL, message TEXT NOT NULL,
                created_ms INTEGER NOT NULL, updated_ms INTEGER NOT NULL,
                checkpoint_step INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS workers (
                id TEXT PRIMARY KEY, job_id TEXT NOT NULL REFERENCES jobs(id),
                rank INTEGER, node_rank INTEGER NOT NULL, local_rank INTEGER NOT NULL,
                host TEXT NOT NULL, device TEXT NOT NULL, device_description TEXT NOT NULL,
                pid INTEGER NOT NULL, state TEXT NOT NULL,
                last_heartbeat_ms INTEGER NOT NULL, registered_ms INTEGER NOT NULL);
             CREATE INDEX IF NOT EXISTS workers_by_job ON workers(job_id);
             CREATE TABLE IF NOT EXISTS iterations (
                job_id TEXT NOT NULL REFERENCES jobs(id), iteration INTEGER NOT NULL,
                mean_rewards_json TEXT NOT NULL, metrics_json TEXT NOT NULL,
                cursor_json TEXT NOT NULL,
                PRIMARY KEY (job_id, iteration));
             CREATE TABLE IF NOT EXISTS stops (
                job_id TEXT PRIMARY KEY REFERENCES jobs(id), at INTEGER NOT NULL,
                reason TEXT NOT NULL);",
        )?;
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        Ok(Self { conn })
    }

    /// The newest job with this name that has not ended.
    pub fn find_active_job(&self, name: &str) -> Result<Option<JobRecord>> {
        let mut stmt = self.conn.prepare(
            "SELECT * FROM jobs WHERE name = ?1 AND state NOT IN ('completed','failed','stopped','cancelled')
             ORDER BY created_ms DESC LIMIT 1",
        )?;
        Ok(stmt.query_row([name], job_from_row).optional()?)
    }

    /// A job by id.
    pub fn job(&self, id: &str) -> Result<Option<JobRecord>> {
        let mut stmt = self.conn.prepare("SELECT * FROM jobs WHERE id = ?1")?;
        Ok(stmt.query_row([id], job_from_row).optional()?)
    }

    /// All jobs, newest first.
    pub fn jobs(&self) -> Result<Vec<JobRecord>> {
        let mut stmt = self.conn.prepare("SELECT * FROM jobs ORDER BY created_ms DESC")?;
        let rows = stmt.query_map([], job_from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Inserts or replaces a job.
    pub fn put_job(&self, j: &JobRecord) -> Result<()> {
        let config = serde_json::to_string(&j.config).expect("JobConfig serializes");
        self.conn.execute(
            "INSERT OR REPLACE INTO jobs VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11)",
            params![
                j.id.as_str(),
                j.name,
                j.state.as_str(),
                j.step as i64,
                j.world_size,
                j.generation as i64,
                config,
                j.message,
                j.created_ms,
                j.updated_ms,
                j.checkpoint_step as i64
            ],
        )?;
        Ok(())
    }

    /// Records an operator's pending stop of `job`: at step `at`, and why. Kept so that a
    /// restarted coordinator still stops there.
    pub fn put_stop(&self, job: &JobId, at: u64, reason: &str) -> Result<()> {
        self.conn.execute(
            "INSERT OR REPLACE INTO stops VALUES (?1,?2,?3)",
            params![job.as_str(), at as i64, reason],
        )?;
        Ok(())
    }

    /// The pending stop of `job`, if an operator asked for one.
    pub fn stop(&self, job: &str) -> Result<Option<(u64, String)>> {
        let mut stmt = self.conn.prepare("SELECT at, reason FROM stops WHERE job_id = ?1")?;
        let row = stmt.query_row([job], |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)));
        Ok(row.optional()?)
    }

    /// Inserts or replaces a worker of `job`.
    pub fn put_worker(&self, job: &JobId, w: &WorkerRecord) -> Result<()> {
        self.conn.execute(
            "INSERT OR REPLACE INTO workers VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12)",
            params![
                w.id.as_str(),
                job.as_str(),
                w.rank,
                w.info.node_rank,
                w.info.local_rank,
                w.info.host,
                w.info.device,
                w.info.device_description,
                w.info.pid,
                w.state.as_str(),
                w.last_heartbeat_ms,
                w.registered_ms
            ],
        )?;
        Ok(())
    }

    /// Workers of a job, by (node rank, local rank, registration time).
    pub fn workers(&self, job: &str) -> Result<Vec<WorkerRecord>> {
        let mut stmt = self.conn.prepare(
            "SELECT id, rank, node_rank, local_rank, host, device, device_description, pid, state,
                    last_heartbeat_ms, registered_ms
             FROM workers WHERE job_id = ?1 ORDER BY node_rank, local_rank, registered_ms",
        )?;
        let rows = stmt.query_map([job], |r| {
            let state: String = r.get(8)?;
            Ok(WorkerRecord {
                id: WorkerId::from(r.get::<_, String>(0)?),
                rank: r.get(1)?,
                info: WorkerInfo {
                    node_rank: r.get(2)?,
                    local_rank: r.get(3)?,
                    host: r.get(4)?,
                    device: r.get(5)?,
                    device_description: r.get(6)?,
                    pid: r.get(7)?,
                },
                state: WorkerState::parse(&state).ok_or_else(|| bad_enum(8, &state))?,
                last_heartbeat_ms: r.get(9)?,
                registered_ms: r.get(10)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Records a finished iteration (replacing a previous record of the same iteration, which
    /// only happens when an iteration is redone after a resume).
    pub fn put_iteration(&self, job: &JobId, it: &IterationRecord) -> Result<()> {
        self.conn.execute(
            "INSERT OR REPLACE INTO iterations VALUES (?1,?2,?3,?4,?5)",
            params![
                job.as_str(),
                it.iteration as i64,
                floats_to_json(&it.mean_rewards),
                it.metrics_json,
                it.cursor_json
            ],
        )?;
        Ok(())
    }

    /// Forgets the iterations after `step` (a job rolled back to the checkpoint of `step`).
    pub fn truncate_iterations(&self, job: &JobId, step: u64) -> Result<()> {
        self.conn.execute(
            "DELETE FROM iterations WHERE job_id = ?1 AND iteration > ?2",
            params![job.as_str(), step as i64],
        )?;
        Ok(())
    }

    /// The iteration history of a job, oldest first.
    pub fn iterations(&self, job: &str) -> Result<Vec<IterationRecord>> {
        self.latest_iterations(job, None)
    }

    /// The latest `limit` completed iterations of `job` (all with `None`), in order; read
    /// backwards through the primary key, so a short status of a long job stays cheap.
    pub fn latest_iterations(&self, job: &str, limit: Option<u32>) -> Result<Vec<IterationRecord>> {
        let mut stmt = self.conn.prepare(
            "SELECT iteration, mean_rewards_json, metrics_json, cursor_json FROM iterations
             WHERE job_id = ?1 ORDER BY iteration DESC LIMIT ?2",
        )?;
        // SQLite reads a negative LIMIT as none.
        let limit = limit.map_or(-1, i64::from);
        let rows = stmt.query_map(rusqlite::params![job, limit], |r| {
            let rewards: String = r.get(1)?;
            Ok(IterationRecord {
                iteration: r.get::<_, i64>(0)? as u64,
                mean_rewards: floats_from_json(&rewards).map_err(|e| {
                    rusqlite::Error::FromSqlConversionFailure(
                        1,
                        rusqlite::types::Type::Text,
                        e.into(),
                    )
                })?,
                metrics_json: r.get(2)?,
                cursor_json: r.get(3)?,
            })
        })?;
        let mut out = rows.collect::<rusqlite::Result<Vec<_>>>()?;
        out.reverse();
        Ok(out)
    }
}

/// Floats as JSON that reads back as written. JSON has no NaN or Inf (serde_json writes them as
/// `null`, which no f64 reads), so those are written as the strings `"NaN"`, `"inf"`, `"-inf"`.
fn floats_to_json(v: &[f64]) -> String {
    serde_json::Value::Array(v.iter().copied().map(float_to_json).collect()).to_string()
}

/// A float as JSON that reads back: a number, or for NaN and ±Inf (which JSON has no number
/// for, and serde_json would write as `null`) the string Rust prints, `"NaN"`, `"inf"`.
pub fn float_to_json(x: f64) -> serde_json::Value {
    if x.is_finite() { x.into() } else { x.to_string().into() }
}

/// The inverse of [`float_to_json`]; a `null` (what earlier releases wrote for a NaN) reads as
/// NaN.
pub fn float_from_json(v: &serde_json::Value) -> Option<f64> {
    use serde_json::Value;
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.parse().ok().filter(|x: &f64| !x.is_finite()),
        Value::Null => Some(f64::NAN),
        _ => None,
    }
}

/// The inverse of [`floats_to_json`]; a `null` (what earlier releases wrote for a NaN) reads as
/// NaN, so such a database still opens.
fn floats_from_json(text: &str) -> std::result::Result<Vec<f64>, String> {
    use serde_json::Value;
    let items: Vec<Value> = serde_json::from_str(text).map_err(|e| e.to_string())?;
    items
        .iter()
        .map(|v| float_from_json(v).ok_or_else(|| format!("not a float list: {text}")))
        .collect()
}

fn bad_enum(col: usize, v: &str) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        col,
        rusqlite::types::Type::Text,
        format!("unknown state {v:?}").into(),
    )
}

fn job_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<JobRecord> {
    let state: String = r.get(2)?;
    let config: String = r.get(6)?;
    Ok(JobRecord {
        id: JobId::from(r.get::<_, String>(0)?),
        name: r.get(1)?,
        state: JobState::parse(&state).ok_or_else(|| bad_enum(2, &state))?,
        step: r.get::<_, i64>(3)? as u64,
        world_size: r.get(4)?,
        generation: r.get::<_, i64>(5)? as u64,
        config: serde_json::from_str(&config).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(6, rusqlite::types::Type::Text, e.into())
        })?,
        message: r.get(7)?,
        created_ms: r.get(8)?,
        updated_ms: r.get(9)?,
        checkpoint_step: r.get::<_, i64>(10)? as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/db.sqlite");
        let job = JobRecord {
            id: JobId::new(),
            name: "j".into(),
            state: JobState::Running,
            step: 3,
            world_size: 2,
            generation: 1,
            checkpoint_step: 0,
            config: JobConfig::default(),
            message: String::new(),
            created_ms: 1,
            updated_ms: 2,
        };
        let w = WorkerRecord {
            id: WorkerId::new(),
            info: WorkerInfo {
                host: "h".into(),
                node_rank: 0,
                local_rank: 1,
                device: "cpu".into(),
                device_description: "cpu".into(),
                pid: 7,
            },
            rank: Some(1),
            state: WorkerState::Running,
            last_heartbeat_ms: 5,
            registered_ms: 4,
        };
        {
            let db = Db::open(&path).unwrap();
            db.put_job(&job).unwrap();
            db.put_worker(&job.id, &w).unwrap();
            let it = IterationRecord {
                iteration: 1,
                mean_rewards: vec![0.5],
                metrics_json: "{}".into(),
                cursor_json: "{}".into(),
            };
            db.put_iteration(&job.id, &it).unwrap();
            for i in [3, 2] {
                db.put_iteration(&job.id, &IterationRecord { iteration: i, ..it.clone() }).unwrap();
            }
        }
        let db = Db::open(&path).unwrap();
        let its = |limit| -> Vec<u64> {
            let all = db.latest_iterations(job.id.as_str(), limit).unwrap();
            all.iter().map(|r| r.iteration).collect()
        };
        assert_eq!(its(None), [1, 2, 3]);
        assert_eq!(its(Some(2)), [2, 3], "the latest two, in order");
        assert_eq!(its(Some(10)), [1, 2, 3]);
        assert_eq!(db.find_active_job("j").unwrap(), Some(job.clone()));
        assert_eq!(db.workers(job.id.as_str()).unwrap(), vec![w]);
        assert_eq!(db.iterations(job.id.as_str()).unwrap()[0].mean_rewards, vec![0.5]);
        assert!(db.find_active_job("other").unwrap().is_none());
    }

    #[test]
    fn every_float_reads_back_as_written() {
        let v = [0.5, -0.0, f64::INFINITY, f64::NEG_INFINITY, 1e-300];
        let back = floats_from_json(&floats_to_json(&v)).unwrap();
        assert_eq!(format!("{back:?}"), format!("{v:?}"));
        assert!(floats_from_json(&floats_to_json(&[f64::NAN])).unwrap()[0].is_nan());
        // What earlier releases wrote for a NaN.
        assert!(floats_from_json("[0.5,null]").unwrap()[1].is_nan());
        assert!(floats_from_json("[\"0.5\"]").is_err(), "a finite float is a number");
        assert!(floats_from_json("[{}]").is_err());
    }
}
