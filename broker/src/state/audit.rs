//! The audit log: every login, fetch, renew, revocation and admin call, in
//! the shared database, chained so that an altered or removed record is
//! detected by [`Audit::verify`].
//!
//! Each record's hash covers its predecessor's hash and its own fields. With
//! an audit key ([`super::audit_key`], a file outside the database) the hash
//! is an HMAC-SHA256 under that key, and the record names the key
//! (`key_id`): someone who can write the database but lacks the key cannot
//! alter, remove or add a record and chain the rest again. Without a key,
//! and for records written before there was one (`key_id` NULL), it is a
//! plain SHA-256, which anyone can recompute; once a keyed record appears in
//! the chain, an unkeyed one after it is refused as a rewrite. Removing
//! records from the end is caught by the signed checkpoints exported outside
//! the database ([`super::checkpoint`]), which [`Audit::verify_with`]
//! compares; a retention prune leaves a signed anchor (the first kept
//! record's sequence number and the hash it links to) where the chain then
//! starts.
//!
//! Records never hold a secret value or a token (a token appears only as its
//! fingerprint). Calls hand records to [`Auditor::record`], which queues them;
//! one writer task per replica ([`super::writer`]) appends them in batches.
//! A full queue drops a record, counts it ([`AuditStatus`]: a metric, and
//! `/readyz`), and the writer audits how many once it has room again.
//! On PostgreSQL each batch is a transaction that extends the chain under a
//! lock (`pg_advisory_xact_lock`), so replicas share one chain; on SQLite (one
//! replica) the writer remembers the chain's end and each batch is one
//! statement.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_lc_rs::digest::{SHA256, digest};
use prometheus_client::metrics::counter::Counter;
use serde::{Deserialize, Serialize};
use sqlx::Row;
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

use super::audit_key::{Anchor, AuditKeys, Checkpoint, encode};
use crate::db::{Db, on_db};

/// Hash that starts the chain.
const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// Advisory lock key that serialises chain appends (and prunes) across replicas.
const CHAIN_LOCK: i64 = 0x5365_6372_6574_4175;
/// Most records one prune deletes (the rest go at the next one), so that
/// it holds the write lock briefly.
const PRUNE_BATCH: i64 = 50_000;

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
    /// The audit key whose HMAC chains this record; `None`: plain SHA-256
    /// (no key configured, or written before there was one).
    #[serde(default)]
    pub key_id: Option<String>,
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

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as i64
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
            at_ms: now_ms(),
            actor: actor.into(),
            action: action.to_owned(),
            result: result.into(),
            // Only a map with non-string keys fails to serialise; no detail has one.
            detail: serde_json::to_string(&detail).unwrap_or_else(|_| "{}".to_owned()),
        }
    }
}

/// The unkeyed chain's hash (SHA-256 over the length-prefixed fields), as
/// records without a `key_id` carry it. Public because it is no secret:
/// anyone can compute it, which is why the keyed chain exists (the tests
/// play that attacker with it).
pub fn sha256_chain_hash(
    prev: &str,
    seq: i64,
    at_ms: i64,
    actor: &str,
    action: &str,
    result: &str,
    detail: &str,
) -> String {
    let (seq, at_ms) = (seq.to_string(), at_ms.to_string());
    let input = encode(&[
        prev.as_bytes(),
        seq.as_bytes(),
        at_ms.as_bytes(),
        actor.as_bytes(),
        action.as_bytes(),
        result.as_bytes(),
        detail.as_bytes(),
    ]);
    hex::encode(digest(&SHA256, &input))
}

/// A record's hash as chained with `key_id` (`None`: the unkeyed SHA-256).
/// `None` when the key is not among `keys`.
#[allow(clippy::too_many_arguments)]
fn record_hash(
    keys: Option<&AuditKeys>,
    key_id: Option<&str>,
    prev: &str,
    seq: i64,
    at_ms: i64,
    actor: &str,
    action: &str,
    result: &str,
    detail: &str,
) -> Option<String> {
    let Some(id) = key_id else {
        return Some(sha256_chain_hash(
            prev, seq, at_ms, actor, action, result, detail,
        ));
    };
    let (seq, at_ms) = (seq.to_string(), at_ms.to_string());
    // The key ID is hashed too: a record cannot be passed off under another key.
    let input = encode(&[
        prev.as_bytes(),
        seq.as_bytes(),
        at_ms.as_bytes(),
        actor.as_bytes(),
        action.as_bytes(),
        result.as_bytes(),
        detail.as_bytes(),
        id.as_bytes(),
    ]);
    keys?.chain_mac(id, &input)
}

fn same(a: &str, b: &str) -> bool {
    aws_lc_rs::constant_time::verify_slices_are_equal(a.as_bytes(), b.as_bytes()).is_ok()
}

/// The result of checking the chain.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VerifyReport {
    pub ok: bool,
    pub records: i64,
    pub last_seq: i64,
    /// The first problem found, naming the record.
    pub problem: Option<String>,
    /// The sequence number the problem is at.
    #[serde(default)]
    pub problem_seq: Option<i64>,
    /// Where the chain starts: 1, or the anchor a retention prune left.
    #[serde(default)]
    pub first_seq: i64,
    /// Records chained with plain SHA-256 (before the audit key, or with
    /// none): not tamper-evident against a database writer.
    #[serde(default)]
    pub legacy_records: i64,
    /// Whether this broker has an audit key (so keyed records were checked).
    #[serde(default)]
    pub keyed: bool,
    /// Exported checkpoints the log was compared with, and the newest one's seq.
    #[serde(default)]
    pub checkpoints_checked: usize,
    #[serde(default)]
    pub checkpoint_seq: Option<i64>,
    /// What was not checked, and why (a checkpoint older than the kept log).
    #[serde(default)]
    pub notes: Vec<String>,
}

/// A problem in the chain, at a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Problem {
    pub seq: i64,
    pub message: String,
}

fn problem(seq: i64, message: String) -> Problem {
    Problem { seq, message }
}

/// Where a walk along the chain is.
#[derive(Debug, Clone)]
struct Cursor {
    /// The next record expected, and the hash it must link to.
    next_seq: i64,
    prev: String,
    /// A keyed record was seen: no unkeyed one may follow.
    keyed: bool,
    count: i64,
    legacy: i64,
}

impl Cursor {
    fn at(next_seq: i64, prev: String, keyed: bool) -> Cursor {
        Cursor {
            next_seq,
            prev,
            keyed,
            count: 0,
            legacy: 0,
        }
    }
}

/// The chain's head as verified: its last record and the records kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Head {
    pub seq: i64,
    pub hash: String,
    pub count: i64,
}

/// What this replica's audit machinery has to report: records dropped
/// (a metric and `/readyz`), checkpoints written or not, and the last
/// checkpoint it exported (for `audit verify`).
#[derive(Debug, Default)]
pub struct AuditStatus {
    /// Records dropped since start: the queue was full, or the database
    /// refused them until shutdown.
    pub dropped: Counter,
    /// Drops not yet written to the log as an `audit.dropped` record.
    unreported: AtomicU64,
    last_drop_ms: AtomicI64,
    /// Checkpoints written to the sink, and failures (a write, or a log
    /// that no longer matches the last checkpoint).
    pub checkpoints_written: Counter,
    pub checkpoint_failures: Counter,
    checkpoint_problem: Mutex<Option<String>>,
    last_checkpoint: Mutex<Option<Checkpoint>>,
}

/// How long after a dropped record `/readyz` answers 503.
pub const DROP_NOT_READY: Duration = Duration::from_secs(60);

impl AuditStatus {
    /// Counts one dropped record; true when none was dropped in the second
    /// before (so that a flood of drops logs a few warnings, not one each).
    pub(super) fn note_drops(&self, n: u64) -> bool {
        self.dropped.inc_by(n);
        self.unreported.fetch_add(n, Ordering::Relaxed);
        let now = now_ms();
        now - self.last_drop_ms.swap(now, Ordering::Relaxed) > 1000
    }

    /// Drops not yet audited, now to be (the count goes back to zero).
    pub(super) fn take_unreported(&self) -> u64 {
        self.unreported.swap(0, Ordering::Relaxed)
    }

    pub(super) fn count_dropped_at_shutdown(&self, n: u64) {
        self.dropped.inc_by(n);
    }

    pub(crate) fn set_checkpoint_problem(&self, p: Option<String>) {
        *self
            .checkpoint_problem
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = p;
    }

    pub(crate) fn checkpoint_problem(&self) -> Option<String> {
        self.checkpoint_problem
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn set_last_checkpoint(&self, cp: Checkpoint) {
        *self
            .last_checkpoint
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(cp);
    }

    /// The last checkpoint this replica exported (or found in its sink at start).
    pub fn last_checkpoint(&self) -> Option<Checkpoint> {
        self.last_checkpoint
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// For `/readyz`: lines that make the replica not ready (records
    /// dropped within [`DROP_NOT_READY`]: it cannot keep up auditing, let
    /// the others take its calls), and lines that only degrade it (drops
    /// longer ago, checkpoints failing).
    pub fn readiness(&self) -> (Vec<String>, Vec<String>) {
        let (mut failing, mut degraded) = (Vec::new(), Vec::new());
        let dropped = self.dropped.get();
        if dropped > 0 {
            let ago = (now_ms() - self.last_drop_ms.load(Ordering::Relaxed)).max(0);
            let line = format!(
                "audit: {dropped} records dropped since start (audit queue full), the last {}s ago",
                ago / 1000
            );
            if ago < DROP_NOT_READY.as_millis() as i64 {
                failing.push(line);
            } else {
                degraded.push(line);
            }
        }
        if let Some(p) = self.checkpoint_problem() {
            degraded.push(format!("audit: {p}"));
        }
        (failing, degraded)
    }
}

/// Why a prune did not happen.
#[derive(Debug, thiserror::Error)]
pub enum PruneError {
    /// The database failed.
    #[error("audit database: {0}")]
    Database(#[from] sqlx::Error),
    /// The records to prune do not verify: they are kept as evidence.
    #[error("not pruning the audit log: {0}")]
    Chain(String),
    /// Pruning needs the audit key (the anchor it leaves is signed).
    #[error("not pruning the audit log: it needs audit.key_file")]
    NoKey,
}

/// What a prune removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pruned {
    pub records: u64,
    /// The last record removed; the chain now starts after it.
    pub up_to: i64,
}

/// The audit log in the shared database.
#[derive(Clone, Debug)]
pub struct Audit {
    db: Db,
    keys: Option<Arc<AuditKeys>>,
    status: Arc<AuditStatus>,
}

const COLUMNS: &str = "seq, at_ms, actor, action, result, detail, prev_hash, hash, key_id";

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
    key_id: Option<&'a str>,
}

const INSERT_SQLITE: &str =
    "INSERT INTO audit (seq, at_ms, actor, action, result, detail, prev_hash, hash, key_id)
     SELECT value->>'seq', value->>'at_ms', value->>'actor', value->>'action', value->>'result',
            value->>'detail', value->>'prev_hash', value->>'hash', value->>'key_id'
     FROM jsonb_each($1)";
const INSERT_PG: &str = "INSERT INTO audit (seq, at_ms, actor, action, result, detail, prev_hash, hash, key_id)
     SELECT seq, at_ms, actor, action, result, detail, prev_hash, hash, key_id
     FROM jsonb_to_recordset($1::jsonb) AS r(seq BIGINT, at_ms BIGINT, actor TEXT, action TEXT, result TEXT,
          detail TEXT, prev_hash TEXT, hash TEXT, key_id TEXT)";

const LAST: &str = "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1";
const ANCHOR: &str =
    "SELECT seq, prev_hash, at_ms, key_id, sig FROM audit_anchor ORDER BY seq DESC LIMIT 1";

/// The chain's last record: its sequence number and hash.
pub type ChainEnd = (i64, String);

/// Chains `entries` after `end` (`None`: an empty log), with the current
/// audit key when there is one. Returns the batch as one JSON array (the
/// insert statement's one parameter: the same prepared statement for any
/// batch size) and the new end.
fn chain(
    end: Option<ChainEnd>,
    entries: &[Entry],
    keys: Option<&AuditKeys>,
) -> Result<(String, ChainEnd), sqlx::Error> {
    let (mut seq, mut prev) = end.unwrap_or_else(|| (0, GENESIS.to_owned()));
    let key_id = keys.map(AuditKeys::current_id);
    let mut rows = Vec::with_capacity(entries.len());
    for e in entries {
        seq += 1;
        let hash = record_hash(
            keys, key_id, &prev, seq, e.at_ms, &e.actor, &e.action, &e.result, &e.detail,
        )
        .ok_or_else(|| sqlx::Error::Protocol("the audit key vanished".into()))?;
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
            key_id,
        });
    }
    let batch = serde_json::to_string(&rows).map_err(|e| sqlx::Error::Encode(e.into()))?;
    Ok((batch, (seq, prev)))
}

impl Audit {
    /// The log without an audit key: the plain SHA-256 chain.
    pub fn new(db: Db) -> Audit {
        Audit::keyed(db, None, Arc::default())
    }

    /// The log chained with `keys` when given; `status` is where drops and
    /// checkpoints are reported (the metrics own it).
    pub fn keyed(db: Db, keys: Option<Arc<AuditKeys>>, status: Arc<AuditStatus>) -> Audit {
        Audit { db, keys, status }
    }

    pub fn keys(&self) -> Option<&Arc<AuditKeys>> {
        self.keys.as_ref()
    }

    pub fn status(&self) -> &Arc<AuditStatus> {
        &self.status
    }

    pub(crate) fn db(&self) -> &Db {
        &self.db
    }

    /// Appends entries to the chain in one transaction, reading the chain's
    /// end inside it (under the chain lock on PostgreSQL, where replicas
    /// share the chain).
    pub async fn append(&self, entries: &[Entry]) -> Result<(), sqlx::Error> {
        if entries.is_empty() {
            return Ok(());
        }
        let _turn = self.db.write_turn().await;
        let keys = self.keys.as_deref();
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
            let (batch, _) = chain(end, entries, keys)?;
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
        &self,
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
        let (batch, last) = chain(from, entries, self.keys.as_deref())?;
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
                    key_id: r.get(8),
                })
                .collect()
        }))
    }

    /// The last `n` records, oldest first.
    pub async fn tail(&self, n: i64) -> Result<Vec<Record>, sqlx::Error> {
        let last: Option<i64> = on_db!(&self.db, pool => sqlx::query_scalar("SELECT MAX(seq) FROM audit").fetch_one(pool).await)?;
        self.after(last.unwrap_or(0).saturating_sub(n), n).await
    }

    /// The anchor the last retention prune left, if any.
    pub async fn anchor(&self) -> Result<Option<Anchor>, sqlx::Error> {
        on_db!(&self.db, pool => sqlx::query(ANCHOR).fetch_optional(pool).await.map(|r| r.map(|r| Anchor {
            seq: r.get(0),
            prev_hash: r.get(1),
            at_ms: r.get(2),
            key_id: r.get(3),
            sig: r.get(4),
        })))
    }

    /// Where the chain starts: after a checked anchor, or at the genesis.
    async fn start(&self) -> Result<Result<Cursor, Problem>, sqlx::Error> {
        let Some(a) = self.anchor().await? else {
            return Ok(Ok(Cursor::at(1, GENESIS.to_owned(), false)));
        };
        let checked = match &self.keys {
            None => Err(format!(
                "signed with audit key {:?}, and this broker has no audit.key_file to check it",
                a.key_id
            )),
            Some(k) => k.verify_anchor(&a),
        };
        Ok(match checked {
            Ok(()) => Ok(Cursor::at(a.seq, a.prev_hash, false)),
            Err(e) => Err(problem(
                a.seq,
                format!(
                    "the chain's start (the anchor at record {} left by a retention prune) is not valid: {e}",
                    a.seq
                ),
            )),
        })
    }

    /// What is wrong with `r` as the record after `cur`, if anything.
    fn check(&self, cur: &Cursor, r: &Record) -> Option<Problem> {
        if r.seq != cur.next_seq {
            return Some(problem(
                cur.next_seq,
                format!("record {} is missing (next is {})", cur.next_seq, r.seq),
            ));
        }
        if r.prev_hash != cur.prev {
            return Some(problem(
                r.seq,
                format!("record {} does not link to record {}", r.seq, r.seq - 1),
            ));
        }
        let keys = self.keys.as_deref();
        match r.key_id.as_deref() {
            None if cur.keyed => {
                return Some(problem(
                    r.seq,
                    format!(
                        "record {} is chained without the audit key after keyed records: it was rewritten by someone without the key",
                        r.seq
                    ),
                ));
            }
            Some(id) if keys.is_none() => {
                return Some(problem(
                    r.seq,
                    format!(
                        "record {} is chained with audit key {id:?}, and this broker has no audit.key_file to check it",
                        r.seq
                    ),
                ));
            }
            _ => {}
        }
        match record_hash(
            keys,
            r.key_id.as_deref(),
            &r.prev_hash,
            r.seq,
            r.at_ms,
            &r.actor,
            &r.action,
            &r.result,
            &r.detail,
        ) {
            None => Some(problem(
                r.seq,
                format!(
                    "record {} is chained with audit key {:?}, which is not in audit.key_file",
                    r.seq,
                    r.key_id.as_deref().unwrap_or_default()
                ),
            )),
            Some(h) if !same(&h, &r.hash) => Some(problem(
                r.seq,
                format!(
                    "record {} was altered (its hash does not match its content)",
                    r.seq
                ),
            )),
            Some(_) => None,
        }
    }

    /// Walks the chain from `cur` to `until` (included; `None`: its end),
    /// checking each record, and the hash of each record `marks` names
    /// (seq → the hash it must have, and what says so).
    async fn walk(
        &self,
        cur: &mut Cursor,
        until: Option<i64>,
        marks: &BTreeMap<i64, (String, String)>,
    ) -> Result<Option<Problem>, sqlx::Error> {
        loop {
            let left = until.map_or(1000, |u| (u - cur.next_seq + 1).clamp(0, 1000));
            if left == 0 {
                return Ok(None);
            }
            let batch = self.after(cur.next_seq - 1, left).await?;
            if batch.is_empty() {
                return Ok(None);
            }
            for r in batch {
                if until.is_some_and(|u| r.seq > u) {
                    return Ok(None);
                }
                if let Some(p) = self.check(cur, &r) {
                    return Ok(Some(p));
                }
                if let Some((head, what)) = marks.get(&r.seq)
                    && !same(head, &r.hash)
                {
                    return Ok(Some(problem(
                        r.seq,
                        format!(
                            "record {} does not match {what}: the log was rewritten",
                            r.seq
                        ),
                    )));
                }
                cur.keyed |= r.key_id.is_some();
                if r.key_id.is_none() {
                    cur.legacy += 1;
                }
                cur.prev = r.hash;
                cur.next_seq += 1;
                cur.count += 1;
            }
        }
    }

    /// Walks the whole chain: every record's hash must recompute, link to its
    /// predecessor, and sequence numbers must have no gap.
    pub async fn verify(&self) -> Result<VerifyReport, sqlx::Error> {
        self.verify_with(&[]).await
    }

    /// [`Audit::verify`], and the log must agree with each exported
    /// checkpoint: each must be signed by the audit key, its record must
    /// exist with the checkpoint's head hash, and the log may not start
    /// before the first record it counted. So a rewrite, and the removal of
    /// records up to the newest checkpoint, are detected.
    pub async fn verify_with(
        &self,
        checkpoints: &[Checkpoint],
    ) -> Result<VerifyReport, sqlx::Error> {
        Ok(self.examine(checkpoints).await?.0)
    }

    /// The report, and the head as walked.
    pub(crate) async fn examine(
        &self,
        checkpoints: &[Checkpoint],
    ) -> Result<(VerifyReport, Head), sqlx::Error> {
        let mut report = VerifyReport {
            ok: true,
            records: 0,
            last_seq: 0,
            problem: None,
            problem_seq: None,
            first_seq: 1,
            legacy_records: 0,
            keyed: self.keys.is_some(),
            checkpoints_checked: 0,
            checkpoint_seq: None,
            notes: Vec::new(),
        };
        let fail = |mut report: VerifyReport, cur: &Cursor, p: Problem| -> (VerifyReport, Head) {
            report.ok = false;
            report.records = cur.count;
            report.legacy_records = cur.legacy;
            report.last_seq = cur.next_seq - 1;
            report.problem = Some(p.message);
            report.problem_seq = Some(p.seq);
            let head = Head {
                seq: cur.next_seq - 1,
                hash: cur.prev.clone(),
                count: cur.count,
            };
            (report, head)
        };
        let mut cur = match self.start().await? {
            Ok(c) => c,
            Err(p) => {
                let c = Cursor::at(p.seq, GENESIS.to_owned(), false);
                return Ok(fail(report, &c, p));
            }
        };
        report.first_seq = cur.next_seq;
        let mut marks = BTreeMap::new();
        for cp in checkpoints {
            let what = format!(
                "the exported checkpoint of record {} (made at {})",
                cp.seq,
                rfc3339(cp.at_ms)
            );
            let signed = match &self.keys {
                None => Err("this broker has no audit.key_file to check it".to_owned()),
                Some(k) => k.verify_checkpoint(cp),
            };
            if let Err(e) = signed {
                return Ok(fail(
                    report,
                    &cur,
                    problem(cp.seq, format!("{what} is not valid: {e}")),
                ));
            }
            let counted_from = cp.seq - cp.count + 1;
            if cur.next_seq < counted_from {
                return Ok(fail(
                    report,
                    &cur,
                    problem(
                        cur.next_seq,
                        format!(
                            "the log starts at record {}, but {what} counted records from {counted_from}: records were added before them",
                            cur.next_seq
                        ),
                    ),
                ));
            }
            if cp.seq < cur.next_seq - 1 {
                report.notes.push(format!(
                    "{what} is older than the kept log (it starts at record {}): not compared",
                    cur.next_seq
                ));
                continue;
            }
            if cp.seq == cur.next_seq - 1 {
                // The anchor links to it.
                if !same(&cp.head, &cur.prev) {
                    return Ok(fail(
                        report,
                        &cur,
                        problem(
                            cp.seq,
                            format!(
                                "record {} (the chain's anchor) does not match {what}: the log was rewritten",
                                cp.seq
                            ),
                        ),
                    ));
                }
            } else {
                marks.insert(cp.seq, (cp.head.clone(), what));
            }
            report.checkpoints_checked += 1;
            report.checkpoint_seq = report.checkpoint_seq.max(Some(cp.seq));
        }
        if let Some(p) = self.walk(&mut cur, None, &marks).await? {
            return Ok(fail(report, &cur, p));
        }
        let last = cur.next_seq - 1;
        if let Some((seq, (_, what))) = marks.range(cur.next_seq..).next_back() {
            let removed = if last + 1 == *seq {
                format!("record {seq} was removed")
            } else {
                format!("records {} to {seq} were removed", last + 1)
            };
            let p = problem(
                last + 1,
                format!("the log ends at record {last}, but {what} covers record {seq}: {removed}"),
            );
            return Ok(fail(report, &cur, p));
        }
        report.records = cur.count;
        report.legacy_records = cur.legacy;
        report.last_seq = last;
        let head = Head {
            seq: last,
            hash: cur.prev,
            count: cur.count,
        };
        Ok((report, head))
    }

    /// Checks the whole chain; returns its head, or the first problem.
    pub(crate) async fn check_all(&self) -> Result<Result<Head, Problem>, sqlx::Error> {
        let (report, head) = self.examine(&[]).await?;
        Ok(if report.ok {
            Ok(head)
        } else {
            Err(problem(
                report.problem_seq.unwrap_or(report.last_seq + 1),
                report.problem.unwrap_or_default(),
            ))
        })
    }

    /// Checks the chain from record `seq`, which must still have the hash
    /// `head` (the last checkpoint exported), to its end; returns the new
    /// head. Only what was added since is walked.
    pub(crate) async fn extend_from(
        &self,
        seq: i64,
        head: &str,
    ) -> Result<Result<Head, Problem>, sqlx::Error> {
        let anchor = self.anchor().await?;
        let first = anchor.as_ref().map_or(1, |a| a.seq);
        let at: Option<(String, Option<String>)> = on_db!(&self.db, pool => sqlx::query_as("SELECT hash, key_id FROM audit WHERE seq = $1")
            .bind(seq)
            .fetch_optional(pool)
            .await)?;
        let (hash, keyed) = match (at, anchor) {
            (Some((h, k)), _) => (h, k.is_some()),
            // Pruned just now: the anchor links to it.
            (None, Some(a)) if a.seq == seq + 1 => (a.prev_hash, false),
            // Pruned past it (by another replica, whose checkpoint was
            // newer): the whole kept chain is checked from its anchor.
            (None, Some(a)) if a.seq > seq + 1 => return self.check_all().await,
            (None, _) => {
                return Ok(Err(problem(
                    seq,
                    format!(
                        "record {seq}, the head of the last exported checkpoint, is gone: the log was truncated"
                    ),
                )));
            }
        };
        if !same(&hash, head) {
            return Ok(Err(problem(
                seq,
                format!(
                    "record {seq} no longer matches the last exported checkpoint: the log was rewritten"
                ),
            )));
        }
        let mut cur = Cursor::at(seq + 1, hash, keyed);
        if let Some(p) = self.walk(&mut cur, None, &BTreeMap::new()).await? {
            return Ok(Err(p));
        }
        let last = cur.next_seq - 1;
        Ok(Ok(Head {
            seq: last,
            hash: cur.prev,
            count: last - first + 1,
        }))
    }

    /// Deletes the records made before `before_ms`, up to record `up_to`
    /// at most (the newest exported checkpoint: what is removed was
    /// attested outside the database first), never the last record, and at
    /// most [`PRUNE_BATCH`] at a time. The records removed must verify
    /// first; the chain then starts at a signed anchor. Under the chain lock
    /// on PostgreSQL, so one replica prunes at a time.
    pub async fn prune(&self, before_ms: i64, up_to: i64) -> Result<Option<Pruned>, PruneError> {
        let keys = self.keys.as_deref().ok_or(PruneError::NoKey)?;
        let mut cur = match self.start().await? {
            Ok(c) => c,
            Err(p) => return Err(PruneError::Chain(p.message)),
        };
        let first = cur.next_seq;
        let last: Option<i64> = on_db!(&self.db, pool => sqlx::query_scalar("SELECT MAX(seq) FROM audit").fetch_one(pool).await)?;
        let Some(last) = last else { return Ok(None) };
        let bound = up_to.min(last - 1).min(first + PRUNE_BATCH - 1);
        const CUT: &str = "SELECT MAX(seq) FROM audit WHERE seq >= $1 AND seq <= $2 AND at_ms < $3";
        let cut: Option<i64> = on_db!(&self.db, pool => sqlx::query_scalar(CUT).bind(first).bind(bound).bind(before_ms).fetch_one(pool).await)?;
        let Some(cut) = cut else { return Ok(None) };
        if let Some(p) = self.walk(&mut cur, Some(cut), &BTreeMap::new()).await? {
            return Err(PruneError::Chain(p.message));
        }
        if cur.next_seq != cut + 1 {
            return Err(PruneError::Chain(format!(
                "record {} is missing",
                cur.next_seq
            )));
        }
        let anchor = keys.anchor(cut + 1, cur.prev.clone(), now_ms());
        let _turn = self.db.write_turn().await;
        let removed = on_db!(&self.db, pool => {
            let mut tx = if self.db.is_postgres() {
                pool.begin().await?
            } else {
                pool.begin_with("BEGIN IMMEDIATE").await?
            };
            if self.db.is_postgres() {
                sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(CHAIN_LOCK).execute(&mut *tx).await?;
            }
            let now: Option<String> = sqlx::query_scalar("SELECT hash FROM audit WHERE seq = $1").bind(cut).fetch_optional(&mut *tx).await?;
            match now {
                // Another replica pruned it meanwhile.
                None => return Ok(None),
                Some(h) if h != anchor.prev_hash => {
                    return Err(PruneError::Chain(format!("record {cut} changed while it was checked")));
                }
                Some(_) => {}
            }
            let removed = sqlx::query("DELETE FROM audit WHERE seq <= $1").bind(cut).execute(&mut *tx).await?.rows_affected();
            sqlx::query("INSERT INTO audit_anchor (seq, prev_hash, at_ms, key_id, sig) VALUES ($1, $2, $3, $4, $5)")
                .bind(anchor.seq)
                .bind(&anchor.prev_hash)
                .bind(anchor.at_ms)
                .bind(&anchor.key_id)
                .bind(&anchor.sig)
                .execute(&mut *tx)
                .await?;
            sqlx::query("DELETE FROM audit_anchor WHERE seq < $1").bind(anchor.seq).execute(&mut *tx).await?;
            tx.commit().await?;
            removed
        });
        Ok(Some(Pruned {
            records: removed,
            up_to: cut,
        }))
    }
}

/// Unix milliseconds as RFC 3339, for messages.
pub(crate) fn rfc3339(at_ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(at_ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| at_ms.to_string())
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
    status: Arc<AuditStatus>,
}

/// Longest [`Auditor::flush`] waits (the database may be down).
const FLUSH_WAIT: Duration = Duration::from_secs(2);

impl Auditor {
    /// A handle on the queue that [`super::writer`] drains.
    pub(super) fn new(tx: mpsc::Sender<Queued>, status: Arc<AuditStatus>) -> Auditor {
        Auditor { tx, status }
    }

    /// Queues a record; never blocks a call. A full queue drops the record:
    /// it is counted (a metric, `/readyz`), a warning is logged (at most
    /// about one a second), and the writer audits the count once it has
    /// room again.
    pub fn record(&self, entry: Entry) {
        if let Err(e) = self.tx.try_send(Queued::Record(entry))
            && self.status.note_drops(1)
        {
            warn!(error = %e, dropped_since_start = self.status.dropped.get(), "audit queue full; record dropped");
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
    use crate::state::audit_key::tests::keys_in;
    use crate::state::audit_key::{CHECKPOINT_KIND, generate_key_file};
    use serde_json::json;

    fn pool(db: &Db) -> &sqlx::SqlitePool {
        match db {
            Db::Sqlite(p) => p,
            Db::Postgres(_) => unreachable!(),
        }
    }

    fn entries(n: usize) -> Vec<Entry> {
        (0..n)
            .map(|i| Entry::new("payments/api", "fetch", "ok", json!({ "n": i })))
            .collect()
    }

    /// An audit log on a fresh SQLite database, chained with key `a1`.
    async fn keyed(dir: &std::path::Path) -> (Db, Audit) {
        let db = Db::sqlite_in(dir).await;
        let keys = Arc::new(keys_in(dir, "a1"));
        let audit = Audit::keyed(db.clone(), Some(keys), Arc::default());
        (db, audit)
    }

    /// What a script with write access to the database and without the
    /// key does: delete record `seq`, renumber the ones after it, and
    /// chain every record from there again with SHA-256. With `unkeyed`,
    /// it also marks the rewritten records as written without a key.
    async fn delete_and_rechain(db: &Db, seq: i64, unkeyed: bool) {
        let p = pool(db);
        sqlx::query("DELETE FROM audit WHERE seq = $1")
            .bind(seq)
            .execute(p)
            .await
            .unwrap();
        sqlx::query("UPDATE audit SET seq = seq - 1 WHERE seq > $1")
            .bind(seq)
            .execute(p)
            .await
            .unwrap();
        if unkeyed {
            sqlx::query("UPDATE audit SET key_id = NULL WHERE seq >= $1")
                .bind(seq)
                .execute(p)
                .await
                .unwrap();
        }
        rechain_sha256(db, seq).await;
    }

    /// Chains records from `from` on again with SHA-256, as the attacker can.
    async fn rechain_sha256(db: &Db, from: i64) {
        let p = pool(db);
        let rows: Vec<(i64, i64, String, String, String, String, String)> = sqlx::query_as(
            "SELECT seq, at_ms, actor, action, result, detail, prev_hash FROM audit WHERE seq >= $1 ORDER BY seq",
        )
        .bind(from)
        .fetch_all(p)
        .await
        .unwrap();
        let mut prev: Option<String> = sqlx::query_scalar("SELECT hash FROM audit WHERE seq = $1")
            .bind(from - 1)
            .fetch_optional(p)
            .await
            .unwrap();
        for (seq, at_ms, actor, action, result, detail, old_prev) in rows {
            let prev_hash = prev.take().unwrap_or(old_prev);
            let hash = sha256_chain_hash(&prev_hash, seq, at_ms, &actor, &action, &result, &detail);
            sqlx::query("UPDATE audit SET prev_hash = $1, hash = $2 WHERE seq = $3")
                .bind(&prev_hash)
                .bind(&hash)
                .bind(seq)
                .execute(p)
                .await
                .unwrap();
            prev = Some(hash);
        }
    }

    /// A checkpoint of the log as it is now, signed with the log's key.
    async fn checkpoint_now(audit: &Audit) -> Checkpoint {
        let (report, head) = audit.examine(&[]).await.unwrap();
        assert!(report.ok, "{report:?}");
        let mut cp = Checkpoint {
            kind: CHECKPOINT_KIND.into(),
            seq: head.seq,
            count: head.count,
            head: head.hash,
            at_ms: now_ms(),
            key_id: String::new(),
            run: "test".into(),
            sig: String::new(),
        };
        audit.keys().unwrap().sign_checkpoint(&mut cp);
        cp
    }

    #[tokio::test]
    async fn chain_detects_alteration_and_removal() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::sqlite_in(dir.path()).await;
        let audit = Audit::new(db.clone());
        let entries = entries(5);
        audit.append(&entries[..2]).await.unwrap();
        audit.append(&entries[2..]).await.unwrap();
        let report = audit.verify().await.unwrap();
        assert!(report.ok && report.records == 5, "{report:?}");
        assert_eq!(report.legacy_records, 5);
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

        let pool = pool(&db);
        sqlx::query("UPDATE audit SET result = 'refused' WHERE seq = 3")
            .execute(pool)
            .await
            .unwrap();
        let report = audit.verify().await.unwrap();
        assert_eq!(
            report.problem.as_deref(),
            Some("record 3 was altered (its hash does not match its content)")
        );
        assert_eq!(report.problem_seq, Some(3));
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

    /// The script: without the key, a SHA-256 chain recomputed over
    /// a deleted or rewritten record passed `audit verify`. With the key it
    /// cannot.
    #[tokio::test]
    async fn the_keyed_chain_detects_a_rewrite_by_a_database_writer_without_the_key() {
        for unkeyed in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let (db, audit) = keyed(dir.path()).await;
            audit.append(&entries(3)).await.unwrap();
            audit.append(&entries(3)).await.unwrap();
            let report = audit.verify().await.unwrap();
            assert!(report.ok && report.records == 6, "{report:?}");
            assert_eq!((report.legacy_records, report.keyed), (0, true));
            let tail = audit.tail(6).await.unwrap();
            assert!(tail.iter().all(|r| r.key_id.as_deref() == Some("a1")));
            // The stored hash is not the SHA-256 anyone could compute.
            let r = &tail[0];
            assert_ne!(
                r.hash,
                sha256_chain_hash(
                    &r.prev_hash,
                    r.seq,
                    r.at_ms,
                    &r.actor,
                    &r.action,
                    &r.result,
                    &r.detail
                )
            );

            delete_and_rechain(&db, 3, unkeyed).await;
            let report = audit.verify().await.unwrap();
            assert!(!report.ok);
            assert_eq!(report.problem_seq, Some(3), "{report:?}");
            let want = if unkeyed {
                "record 3 is chained without the audit key after keyed records"
            } else {
                "record 3 was altered"
            };
            assert!(
                report.problem.as_deref().unwrap().starts_with(want),
                "{report:?}"
            );
        }

        // Rewriting one record's content and re-chaining the rest.
        let dir = tempfile::tempdir().unwrap();
        let (db, audit) = keyed(dir.path()).await;
        audit.append(&entries(4)).await.unwrap();
        sqlx::query("UPDATE audit SET result = 'refused' WHERE seq = 2")
            .execute(pool(&db))
            .await
            .unwrap();
        rechain_sha256(&db, 2).await;
        let report = audit.verify().await.unwrap();
        assert_eq!(report.problem_seq, Some(2), "{report:?}");
    }

    /// A writer who rewrites every record as an unkeyed one leaves a chain
    /// that verifies on its own (reported as not tamper-evident), but not
    /// against a checkpoint; removing the tail is caught by one too.
    #[tokio::test]
    async fn checkpoints_catch_a_whole_rewrite_and_a_removed_tail() {
        let dir = tempfile::tempdir().unwrap();
        let (db, audit) = keyed(dir.path()).await;
        audit.append(&entries(5)).await.unwrap();
        let cp = checkpoint_now(&audit).await;
        assert_eq!((cp.seq, cp.count), (5, 5));
        let report = audit.verify_with(std::slice::from_ref(&cp)).await.unwrap();
        assert!(report.ok, "{report:?}");
        assert_eq!(
            (report.checkpoints_checked, report.checkpoint_seq),
            (1, Some(5))
        );

        // The tail removed.
        sqlx::query("DELETE FROM audit WHERE seq >= 4")
            .execute(pool(&db))
            .await
            .unwrap();
        assert!(
            audit.verify().await.unwrap().ok,
            "the chain alone cannot tell"
        );
        let report = audit.verify_with(std::slice::from_ref(&cp)).await.unwrap();
        assert!(!report.ok);
        assert_eq!(report.problem_seq, Some(4));
        let p = report.problem.unwrap();
        assert!(
            p.starts_with("the log ends at record 3, but the exported checkpoint of record 5")
                && p.ends_with("records 4 to 5 were removed"),
            "{p}"
        );
        // New records appended after the cut: record 5 differs.
        audit.append(&entries(3)).await.unwrap();
        let report = audit.verify_with(std::slice::from_ref(&cp)).await.unwrap();
        assert_eq!(report.problem_seq, Some(5), "{report:?}");
        assert!(
            report
                .problem
                .unwrap()
                .contains("does not match the exported checkpoint")
        );

        // Everything rewritten as unkeyed records.
        let dir = tempfile::tempdir().unwrap();
        let (db, audit) = keyed(dir.path()).await;
        audit.append(&entries(5)).await.unwrap();
        let cp = checkpoint_now(&audit).await;
        sqlx::query("UPDATE audit SET key_id = NULL, result = 'refused' WHERE seq = 2")
            .execute(pool(&db))
            .await
            .unwrap();
        sqlx::query("UPDATE audit SET key_id = NULL")
            .execute(pool(&db))
            .await
            .unwrap();
        rechain_sha256(&db, 1).await;
        let report = audit.verify().await.unwrap();
        assert!(report.ok && report.legacy_records == 5, "{report:?}");
        let report = audit.verify_with(std::slice::from_ref(&cp)).await.unwrap();
        assert_eq!(report.problem_seq, Some(5), "{report:?}");

        // A forged or altered checkpoint is refused, naming it.
        let forged = Checkpoint {
            seq: 3,
            ..cp.clone()
        };
        let report = audit.verify_with(&[forged]).await.unwrap();
        assert!(
            report
                .problem
                .as_deref()
                .unwrap()
                .contains("is not valid: its signature does not verify"),
            "{report:?}"
        );
        // Without the key, a checkpoint cannot be checked at all.
        let report = Audit::new(db.clone()).verify_with(&[cp]).await.unwrap();
        assert!(
            report
                .problem
                .as_deref()
                .unwrap()
                .contains("no audit.key_file"),
            "{report:?}"
        );
    }

    /// Records written before the key keep their SHA-256 chain, and the
    /// keyed chain continues it; a log keyed once cannot go back.
    #[tokio::test]
    async fn legacy_records_still_verify_and_the_keyed_chain_continues_them() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::sqlite_in(dir.path()).await;
        let legacy = Audit::new(db.clone());
        legacy.append(&entries(3)).await.unwrap();
        let (_, audit) = keyed(dir.path()).await;
        let audit = Audit::keyed(db.clone(), audit.keys().cloned(), Arc::default());
        audit.append(&entries(2)).await.unwrap();
        let report = audit.verify().await.unwrap();
        assert!(report.ok && report.records == 5, "{report:?}");
        assert_eq!(report.legacy_records, 3);
        let tail = audit.tail(5).await.unwrap();
        assert_eq!(tail[2].key_id, None);
        assert_eq!(tail[3].key_id.as_deref(), Some("a1"));
        assert_eq!(tail[3].prev_hash, tail[2].hash);

        // A broker without the key cannot vouch for keyed records.
        let report = legacy.verify().await.unwrap();
        assert_eq!(report.problem_seq, Some(4));
        assert!(report.problem.unwrap().contains("no audit.key_file"));
        // An unkeyed record after keyed ones (the key file dropped from the
        // config, or a forger) is refused.
        legacy.append(&entries(1)).await.unwrap();
        let report = audit.verify().await.unwrap();
        assert_eq!(report.problem_seq, Some(6), "{report:?}");

        // A key added on top (rotation): old records verify with the old line.
        let dir2 = tempfile::tempdir().unwrap();
        let db2 = Db::sqlite_in(dir2.path()).await;
        let old = dir2.path().join("old");
        generate_key_file(&old, "a1").unwrap();
        let a1 = Audit::keyed(
            db2.clone(),
            Some(Arc::new(AuditKeys::load(&old).unwrap())),
            Arc::default(),
        );
        a1.append(&entries(2)).await.unwrap();
        let new = dir2.path().join("new");
        generate_key_file(&new, "a2").unwrap();
        let both = dir2.path().join("both");
        std::fs::write(
            &both,
            std::fs::read_to_string(&new).unwrap() + &std::fs::read_to_string(&old).unwrap(),
        )
        .unwrap();
        let rotated = Audit::keyed(
            db2.clone(),
            Some(Arc::new(AuditKeys::load(&both).unwrap())),
            Arc::default(),
        );
        rotated.append(&entries(2)).await.unwrap();
        let report = rotated.verify().await.unwrap();
        assert!(report.ok && report.records == 4, "{report:?}");
        assert_eq!(
            rotated.tail(1).await.unwrap()[0].key_id.as_deref(),
            Some("a2")
        );
        // Without the old line, its records cannot be checked.
        let only_new = Audit::keyed(
            db2,
            Some(Arc::new(AuditKeys::load(&new).unwrap())),
            Arc::default(),
        );
        let report = only_new.verify().await.unwrap();
        assert!(
            report
                .problem
                .unwrap()
                .contains("audit key \"a1\", which is not in audit.key_file")
        );
    }

    #[tokio::test]
    async fn a_full_queue_counts_what_it_drops_and_says_so() {
        let status = Arc::new(AuditStatus::default());
        let (tx, _rx) = mpsc::channel(1);
        let auditor = Auditor::new(tx, status.clone());
        for e in entries(3) {
            auditor.record(e);
        }
        assert_eq!(status.dropped.get(), 2);
        let (failing, degraded) = status.readiness();
        assert!(degraded.is_empty());
        assert!(
            failing[0].starts_with("audit: 2 records dropped since start (audit queue full)"),
            "{failing:?}"
        );
        assert_eq!(status.take_unreported(), 2);
        assert_eq!(status.take_unreported(), 0);
        // A minute later the replica is ready again; the count stays.
        status
            .last_drop_ms
            .store(now_ms() - 61_000, Ordering::Relaxed);
        let (failing, degraded) = status.readiness();
        assert!(failing.is_empty());
        assert!(degraded[0].contains("2 records dropped"), "{degraded:?}");
    }
}
