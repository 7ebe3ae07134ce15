//! The audit log: every login, fetch, renew, revocation and admin call, in
//! the shared database, hash-chained so that an altered or removed record is
//! detected by [`Audit::verify`].
//!
//! Records never hold a secret value or a token (a token appears only as its
//! fingerprint). Calls hand records to [`Auditor::record`], which queues them;
//! one writer task per replica ([`super::writer`]) appends them in batches.
//! On PostgreSQL each batch is a transaction that extends the chain under a
//! lock (`pg_advisory_xact_lock`), so replicas share one chain; on SQLite (one
//! replica) the writer remembers the chain's end and each batch is one
//! statement.

use std::time::Duration;

use aws_lc_rs::digest::{SHA256, digest};
use serde::{Deserialize, Serialize};
use sqlx::Row;
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

use crate::db::{Db, on_db};

/// Hash that starts the chain.
const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// Advisory lock key that serialises chain appends across replicas.
const CHAIN_LOCK: i64 = 0x5365_6372_6574_4175;

/// One audit record.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Record {
    pub seq: i64,
    /// Unix time in milliseconds.
    pub at_ms: i64,
    /// Who acted: a workload identity (`ns/sa`) or an admin client's name.
    pub actor: String,
    /// `login`, `fetch`, `renew`, `watch`, `revoke`, `admin.<call>`.
    pub action: String,
    /// `ok` or the refusal reason class.
    pub result: String,
    /// Details as JSON text: pod UID, secrets and versions, lease IDs, reason.
    pub detail: String,
    pub prev_hash: String,
    pub hash: String,
}

/// A record before it is chained.
#[derive(Debug, Clone)]
pub struct Entry {
    pub at_ms: i64,
    pub actor: String,
    pub action: String,
    pub result: String,
    /// Details as JSON text, as they are stored and hashed.
    pub detail: String,
}

impl Entry {
    /// A record made now; `detail` is serialised at once (a `json!` value,
    /// or a struct of borrowed fields on the hot path).
    pub fn new(
        actor: impl Into<String>,
        action: &str,
        result: impl Into<String>,
        detail: impl Serialize,
    ) -> Entry {
        Entry {
            at_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis() as i64,
            actor: actor.into(),
            action: action.to_owned(),
            result: result.into(),
            // Only a map with non-string keys fails to serialise; no detail has one.
            detail: serde_json::to_string(&detail).unwrap_or_else(|_| "{}".to_owned()),
        }
    }
}

fn chain_hash(
    prev: &str,
    seq: i64,
    at_ms: i64,
    actor: &str,
    action: &str,
    result: &str,
    detail: &str,
) -> String {
    // Length-prefixed fields: no two different records hash the same input.
    let mut input = Vec::with_capacity(256);
    for field in [
        prev,
        &seq.to_string(),
        &at_ms.to_string(),
        actor,
        action,
        result,
        detail,
    ] {
        input.extend_from_slice(&(field.len() as u64).to_be_bytes());
        input.extend_from_slice(field.as_bytes());
    }
    hex::encode(digest(&SHA256, &input))
}

/// The result of checking the chain.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VerifyReport {
    pub ok: bool,
    pub records: i64,
    pub last_seq: i64,
    /// The first problem found, naming the record.
    pub problem: Option<String>,
}

/// The audit log in the shared database.
#[derive(Clone, Debug)]
pub struct Audit {
    db: Db,
}

const COLUMNS: &str = "seq, at_ms, actor, action, result, detail, prev_hash, hash";

/// A chained record as written: one element of a batch's JSON array.
#[derive(Serialize)]
struct Chained<'a> {
    seq: i64,
    at_ms: i64,
    actor: &'a str,
    action: &'a str,
    result: &'a str,
    detail: &'a str,
    prev_hash: String,
    hash: String,
}

const INSERT_SQLITE: &str =
    "INSERT INTO audit (seq, at_ms, actor, action, result, detail, prev_hash, hash)
     SELECT value->>'seq', value->>'at_ms', value->>'actor', value->>'action', value->>'result',
            value->>'detail', value->>'prev_hash', value->>'hash'
     FROM jsonb_each($1)";
const INSERT_PG: &str = "INSERT INTO audit (seq, at_ms, actor, action, result, detail, prev_hash, hash)
     SELECT seq, at_ms, actor, action, result, detail, prev_hash, hash
     FROM jsonb_to_recordset($1::jsonb) AS r(seq BIGINT, at_ms BIGINT, actor TEXT, action TEXT, result TEXT,
          detail TEXT, prev_hash TEXT, hash TEXT)";

const LAST: &str = "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1";

/// The chain's last record: its sequence number and hash.
pub type ChainEnd = (i64, String);

/// Chains `entries` after `end` (`None`: an empty log). Returns the batch
/// as one JSON array (the insert statement's one parameter: the same
/// prepared statement for any batch size) and the new end.
fn chain(end: Option<ChainEnd>, entries: &[Entry]) -> Result<(String, ChainEnd), sqlx::Error> {
    let (mut seq, mut prev) = end.unwrap_or_else(|| (0, GENESIS.to_owned()));
    let mut rows = Vec::with_capacity(entries.len());
    for e in entries {
        seq += 1;
        let hash = chain_hash(
            &prev, seq, e.at_ms, &e.actor, &e.action, &e.result, &e.detail,
        );
        let prev_hash = std::mem::replace(&mut prev, hash.clone());
        rows.push(Chained {
            seq,
            at_ms: e.at_ms,
            actor: &e.actor,
            action: &e.action,
            result: &e.result,
            detail: &e.detail,
            prev_hash,
            hash,
        });
    }
    let batch = serde_json::to_string(&rows).map_err(|e| sqlx::Error::Encode(e.into()))?;
    Ok((batch, (seq, prev)))
}

impl Audit {
    pub fn new(db: Db) -> Audit {
        Audit { db }
    }

    /// Appends entries to the chain in one transaction, reading the chain's
    /// end inside it (under the chain lock on PostgreSQL, where replicas
    /// share the chain).
    pub async fn append(&self, entries: &[Entry]) -> Result<(), sqlx::Error> {
        if entries.is_empty() {
            return Ok(());
        }
        let _turn = self.db.write_turn().await;
        on_db!(&self.db, pool => {
            // SQLite: take the write lock up front. A deferred transaction
            // reads the chain's end, then fails to upgrade to a write
            // (SQLITE_BUSY_SNAPSHOT, no busy wait) whenever a lease was
            // written in between: under load, most batches.
            let mut tx = if self.db.is_postgres() {
                pool.begin().await?
            } else {
                pool.begin_with("BEGIN IMMEDIATE").await?
            };
            if self.db.is_postgres() {
                sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(CHAIN_LOCK).execute(&mut *tx).await?;
            }
            let end: Option<ChainEnd> = sqlx::query_as(LAST).fetch_optional(&mut *tx).await?;
            let (batch, _) = chain(end, entries)?;
            let insert = if self.db.is_postgres() { INSERT_PG } else { INSERT_SQLITE };
            sqlx::query(insert).bind(&batch).execute(&mut *tx).await?;
            tx.commit().await
        })
    }

    /// SQLite, on a connection the caller holds: appends entries with one
    /// statement (atomic on its own, so no transaction around it), chained
    /// from `end`, the chain's last record as this writer last wrote it;
    /// `None` reads it first. On success `end` is the new last record; on
    /// failure it is `None`, so the next call reads it again. A stale `end`
    /// (another process appended) cannot fork the chain: its sequence
    /// numbers are taken, and the insert fails on the primary key.
    pub async fn append_sqlite(
        conn: &mut sqlx::SqliteConnection,
        end: &mut Option<ChainEnd>,
        entries: &[Entry],
    ) -> Result<(), sqlx::Error> {
        if entries.is_empty() {
            return Ok(());
        }
        let from = match end.take() {
            Some(e) => Some(e),
            None => sqlx::query_as(LAST).fetch_optional(&mut *conn).await?,
        };
        let (batch, last) = chain(from, entries)?;
        sqlx::query(INSERT_SQLITE)
            .bind(&batch)
            .execute(&mut *conn)
            .await?;
        *end = Some(last);
        Ok(())
    }

    /// Records after `after_seq`, oldest first, at most `limit`.
    pub async fn after(&self, after_seq: i64, limit: i64) -> Result<Vec<Record>, sqlx::Error> {
        let sql = format!("SELECT {COLUMNS} FROM audit WHERE seq > $1 ORDER BY seq LIMIT $2");
        on_db!(&self.db, pool => sqlx::query(sqlx::AssertSqlSafe(sql.as_str())).bind(after_seq).bind(limit).fetch_all(pool).await.map(|rows| {
            rows.iter()
                .map(|r| Record {
                    seq: r.get(0),
                    at_ms: r.get(1),
                    actor: r.get(2),
                    action: r.get(3),
                    result: r.get(4),
                    detail: r.get(5),
                    prev_hash: r.get(6),
                    hash: r.get(7),
                })
                .collect()
        }))
    }

    /// The last `n` records, oldest first.
    pub async fn tail(&self, n: i64) -> Result<Vec<Record>, sqlx::Error> {
        let last: Option<i64> = on_db!(&self.db, pool => sqlx::query_scalar("SELECT MAX(seq) FROM audit").fetch_one(pool).await)?;
        self.after(last.unwrap_or(0).saturating_sub(n), n).await
    }

    /// Walks the whole chain: every record's hash must recompute, link to its
    /// predecessor, and sequence numbers must have no gap.
    pub async fn verify(&self) -> Result<VerifyReport, sqlx::Error> {
        let mut prev = GENESIS.to_owned();
        let mut expected_seq = 1;
        let mut count = 0;
        loop {
            let batch = self.after(expected_seq - 1, 1000).await?;
            if batch.is_empty() {
                break;
            }
            for r in batch {
                let problem = if r.seq != expected_seq {
                    Some(format!(
                        "record {expected_seq} is missing (next is {})",
                        r.seq
                    ))
                } else if r.prev_hash != prev {
                    Some(format!(
                        "record {} does not link to record {}",
                        r.seq,
                        r.seq - 1
                    ))
                } else if chain_hash(
                    &r.prev_hash,
                    r.seq,
                    r.at_ms,
                    &r.actor,
                    &r.action,
                    &r.result,
                    &r.detail,
                ) != r.hash
                {
                    Some(format!(
                        "record {} was altered (its hash does not match its content)",
                        r.seq
                    ))
                } else {
                    None
                };
                if problem.is_some() {
                    return Ok(VerifyReport {
                        ok: false,
                        records: count,
                        last_seq: expected_seq - 1,
                        problem,
                    });
                }
                prev = r.hash;
                expected_seq += 1;
                count += 1;
            }
        }
        Ok(VerifyReport {
            ok: true,
            records: count,
            last_seq: expected_seq - 1,
            problem: None,
        })
    }
}

/// What calls queue for the writer task: records, and a reader's request
/// to be told once the records queued before it are written.
#[derive(Debug)]
pub(super) enum Queued {
    Record(Entry),
    Flush(oneshot::Sender<()>),
}

/// The handle calls use: queues records for the writer task.
#[derive(Clone, Debug)]
pub struct Auditor {
    tx: mpsc::Sender<Queued>,
}

/// Longest [`Auditor::flush`] waits (the database may be down).
const FLUSH_WAIT: Duration = Duration::from_secs(2);

impl Auditor {
    /// A handle on the queue that [`super::writer`] drains.
    pub(super) fn new(tx: mpsc::Sender<Queued>) -> Auditor {
        Auditor { tx }
    }

    /// Queues a record; never blocks a call. A full queue drops the record with a warning.
    pub fn record(&self, entry: Entry) {
        if let Err(e) = self.tx.try_send(Queued::Record(entry)) {
            warn!(error = %e, "audit queue full; record dropped");
        }
    }

    /// Waits until the records queued before this call are written (the
    /// writer holds records back to write many at once), for readers of the
    /// log: an operator's `audit tail` shows the call made a moment ago.
    /// Gives up after [`FLUSH_WAIT`], so that a reader still gets what the
    /// log holds while the database refuses writes.
    pub async fn flush(&self) {
        let (done, written) = oneshot::channel();
        let _ = tokio::time::timeout(FLUSH_WAIT, async {
            if self.tx.send(Queued::Flush(done)).await.is_ok() {
                let _ = written.await;
            }
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[tokio::test]
    async fn chain_detects_alteration_and_removal() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::sqlite_in(dir.path()).await;
        let audit = Audit::new(db.clone());
        let entries: Vec<Entry> = (0..5)
            .map(|i| Entry::new("payments/api", "fetch", "ok", json!({"n": i})))
            .collect();
        audit.append(&entries[..2]).await.unwrap();
        audit.append(&entries[2..]).await.unwrap();
        let report = audit.verify().await.unwrap();
        assert!(report.ok && report.records == 5, "{report:?}");
        assert_eq!(
            audit
                .tail(2)
                .await
                .unwrap()
                .iter()
                .map(|r| r.seq)
                .collect::<Vec<_>>(),
            vec![4, 5]
        );

        let pool = match &db {
            Db::Sqlite(p) => p,
            Db::Postgres(_) => unreachable!(),
        };
        sqlx::query("UPDATE audit SET result = 'refused' WHERE seq = 3")
            .execute(pool)
            .await
            .unwrap();
        let report = audit.verify().await.unwrap();
        assert_eq!(
            report.problem.as_deref(),
            Some("record 3 was altered (its hash does not match its content)")
        );
        sqlx::query("UPDATE audit SET result = 'ok' WHERE seq = 3")
            .execute(pool)
            .await
            .unwrap();
        assert!(audit.verify().await.unwrap().ok);
        sqlx::query("DELETE FROM audit WHERE seq = 2")
            .execute(pool)
            .await
            .unwrap();
        let report = audit.verify().await.unwrap();
        assert_eq!(
            report.problem.as_deref(),
            Some("record 2 is missing (next is 3)")
        );
    }
}
