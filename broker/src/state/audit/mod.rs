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
//!
//! Layout: this file (records, and reading them back), `chain.rs` (hashing
//! and appending), `verify.rs` (walking the chain, against checkpoints and
//! from the anchor), `prune.rs` (retention), `queue.rs` (the [`Auditor`]
//! handle calls use and the [`AuditStatus`] it reports to).

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sqlx::Row;

use super::audit_key::{Anchor, AuditKeys};
use crate::db::{Db, on_db};

mod chain;
mod prune;
mod queue;
mod verify;

pub use chain::{ChainEnd, sha256_chain_hash};
pub use prune::{PruneError, Pruned};
pub(in crate::state) use queue::Queued;
pub use queue::{AuditStatus, Auditor, DROP_NOT_READY};
pub use verify::VerifyReport;

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
    crate::clock::unix_now_ms() as i64
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

/// The audit log in the shared database.
#[derive(Clone, Debug)]
pub struct Audit {
    db: Db,
    keys: Option<Arc<AuditKeys>>,
    status: Arc<AuditStatus>,
}

const COLUMNS: &str = "seq, at_ms, actor, action, result, detail, prev_hash, hash, key_id";

const ANCHOR: &str =
    "SELECT seq, prev_hash, at_ms, key_id, sig FROM audit_anchor ORDER BY seq DESC LIMIT 1";

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
}
