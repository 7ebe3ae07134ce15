//! Shared state in the broker's database: revocation rules, leases and the
//! audit log. Every replica reads and writes the same tables, so any replica
//! can serve any call.
//!
//! - [`revocation`]: the rules and the in-memory view every call is checked
//!   against, kept fresh (PostgreSQL `LISTEN/NOTIFY` plus a periodic re-read).
//! - [`audit`]: the hash-chained audit log (HMAC-chained with an audit key).
//! - [`audit_key`]: the audit key file, checkpoint and anchor signatures.
//! - [`checkpoint`]: signed checkpoints exported outside the database, and
//!   the retention prune.
//! - [`writer`]: the one task that writes the exchange path's rows (leases
//!   and audit records) in batches.

pub mod audit;
pub mod audit_key;
pub mod checkpoint;
pub mod revocation;
pub mod writer;

use serde::{Deserialize, Serialize};
use sqlx::Row;

use crate::db::{Db, on_db};

/// A lease as recorded when a secret is handed out.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LeaseRecord {
    pub lease_id: String,
    /// The cluster of the identity that holds it.
    pub cluster: Option<String>,
    pub issuer: String,
    pub namespace: String,
    pub service_account: String,
    pub pod_name: Option<String>,
    pub pod_uid: Option<String>,
    pub role: String,
    pub secret: String,
    pub version: u64,
    pub issued_at: i64,
    pub expires_at: i64,
}

const LEASE_COLUMNS: &str = "lease_id, cluster, issuer, namespace, service_account, pod_name, pod_uid, role, secret, version, issued_at, expires_at";

fn lease_from_row<R: Row>(r: &R) -> LeaseRecord
where
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Option<String>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    LeaseRecord {
        lease_id: r.get("lease_id"),
        cluster: r.get("cluster"),
        issuer: r.get("issuer"),
        namespace: r.get("namespace"),
        service_account: r.get("service_account"),
        pod_name: r.get("pod_name"),
        pod_uid: r.get("pod_uid"),
        role: r.get("role"),
        secret: r.get("secret"),
        version: r.get::<i64, _>("version") as u64,
        issued_at: r.get("issued_at"),
        expires_at: r.get("expires_at"),
    }
}

/// Why leases could not be recorded: the database's own error, shared by
/// every call whose leases were in the failed batch.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct RecordError(std::sync::Arc<sqlx::Error>);

impl From<sqlx::Error> for RecordError {
    fn from(e: sqlx::Error) -> RecordError {
        RecordError(std::sync::Arc::new(e))
    }
}

/// Leases handed to the batch writer, and where to say whether they were written.
type Batch = (
    Vec<LeaseRecord>,
    tokio::sync::oneshot::Sender<Result<(), RecordError>>,
);

/// A batch of leases (a JSON array of [`LeaseRecord`]s) into the leases table.
/// `jsonb_each` hands each element over in SQLite's binary JSON, so the
/// twelve `->>` look-ups do not parse its text twelve times.
const INSERT_LEASES_SQLITE: &str = "INSERT INTO leases (lease_id, issuer, namespace, service_account, pod_name, pod_uid, role, secret, version, issued_at, expires_at, cluster)
     SELECT value->>'lease_id', value->>'issuer', value->>'namespace', value->>'service_account', value->>'pod_name', value->>'pod_uid',
            value->>'role', value->>'secret', value->>'version', value->>'issued_at', value->>'expires_at', value->>'cluster'
     FROM jsonb_each($1)";
const INSERT_LEASES_PG: &str = "INSERT INTO leases (lease_id, issuer, namespace, service_account, pod_name, pod_uid, role, secret, version, issued_at, expires_at, cluster)
     SELECT lease_id, issuer, namespace, service_account, pod_name, pod_uid, role, secret, version, issued_at, expires_at, cluster
     FROM jsonb_to_recordset($1::jsonb) AS r(lease_id TEXT, issuer TEXT, namespace TEXT, service_account TEXT, pod_name TEXT, pod_uid TEXT,
          role TEXT, secret TEXT, version BIGINT, issued_at BIGINT, expires_at BIGINT, cluster TEXT)";

/// A batch of leases as the insert statements' one parameter.
fn lease_batch(leases: &[LeaseRecord]) -> Result<String, sqlx::Error> {
    serde_json::to_string(leases).map_err(|e| sqlx::Error::Encode(e.into()))
}

/// Leases, in the shared database.
#[derive(Clone, Debug)]
pub struct Leases {
    db: Db,
    /// Set by [`writer::start`]: concurrent calls' leases are written together.
    batcher: Option<tokio::sync::mpsc::Sender<Batch>>,
}

impl Leases {
    pub fn new(db: Db) -> Leases {
        Leases { db, batcher: None }
    }

    /// Leases whose [`Leases::record`] hands its rows to the batch writer
    /// ([`writer`]) listening on `batcher`.
    fn with_batcher(db: Db, batcher: tokio::sync::mpsc::Sender<Batch>) -> Leases {
        Leases {
            db,
            batcher: Some(batcher),
        }
    }

    /// Records leases just handed out (one row each). Batched (see
    /// [`writer`]), it joins whatever other calls are recording at that
    /// moment, and still returns only once its leases are in the database (a
    /// lease that cannot be recorded cannot be revoked).
    pub async fn record(&self, leases: Vec<LeaseRecord>) -> Result<(), RecordError> {
        let Some(batcher) = &self.batcher else {
            return Ok(self.record_now(&leases).await?);
        };
        let (done, written) = tokio::sync::oneshot::channel();
        let gone = || RecordError::from(sqlx::Error::WorkerCrashed);
        batcher.send((leases, done)).await.map_err(|_| gone())?;
        written.await.map_err(|_| gone())?
    }

    /// Writes leases now, with one statement whose one parameter is the
    /// batch as a JSON array: the same prepared statement for any batch size
    /// (a `VALUES` list of 12 parameters a row is a new statement for every
    /// size, and SQLite looks bound parameters up by name in linear time, so
    /// binding a batch of n rows cost O(n²)).
    async fn record_now(&self, leases: &[LeaseRecord]) -> Result<(), sqlx::Error> {
        if leases.is_empty() {
            return Ok(());
        }
        let batch = lease_batch(leases)?;
        let _turn = self.db.write_turn().await;
        on_db!(&self.db, pool => {
            let sql = if self.db.is_postgres() { INSERT_LEASES_PG } else { INSERT_LEASES_SQLITE };
            sqlx::query(sql).bind(&batch).execute(pool).await.map(|_| ())
        })
    }

    /// [`Leases::record_now`] on an SQLite connection the caller holds.
    async fn insert_sqlite(
        conn: &mut sqlx::SqliteConnection,
        leases: &[LeaseRecord],
    ) -> Result<(), sqlx::Error> {
        if leases.is_empty() {
            return Ok(());
        }
        let batch = lease_batch(leases)?;
        sqlx::query(INSERT_LEASES_SQLITE)
            .bind(&batch)
            .execute(conn)
            .await
            .map(|_| ())
    }

    /// Moves a lease's end; returns false when the lease is unknown.
    pub async fn extend(&self, lease_id: &str, expires_at: i64) -> Result<bool, sqlx::Error> {
        const UPDATE: &str = "UPDATE leases SET expires_at = $1 WHERE lease_id = $2";
        let n = on_db!(&self.db, pool => sqlx::query(UPDATE).bind(expires_at).bind(lease_id).execute(pool).await.map(|r| r.rows_affected()))?;
        Ok(n > 0)
    }

    pub async fn get(&self, lease_id: &str) -> Result<Option<LeaseRecord>, sqlx::Error> {
        let sql = format!("SELECT {LEASE_COLUMNS} FROM leases WHERE lease_id = $1");
        on_db!(&self.db, pool => sqlx::query(sqlx::AssertSqlSafe(sql.as_str()))
            .bind(lease_id)
            .fetch_optional(pool)
            .await
            .map(|r| r.as_ref().map(lease_from_row)))
    }

    /// Leases still running at `now`, newest first, optionally of one namespace.
    pub async fn list_active(
        &self,
        namespace: Option<&str>,
        now: i64,
        limit: i64,
    ) -> Result<Vec<LeaseRecord>, sqlx::Error> {
        let sql = format!(
            "SELECT {LEASE_COLUMNS} FROM leases WHERE expires_at > $1 AND ($2 IS NULL OR namespace = $2)
             ORDER BY issued_at DESC LIMIT $3"
        );
        on_db!(&self.db, pool => sqlx::query(sqlx::AssertSqlSafe(sql.as_str()))
            .bind(now)
            .bind(namespace)
            .bind(limit)
            .fetch_all(pool)
            .await
            .map(|rows| rows.iter().map(lease_from_row).collect()))
    }

    /// Ends every running lease the rule covers (they are refused from now
    /// on anyway; this keeps `leases list` truthful). Returns how many.
    pub async fn end_matching(
        &self,
        rule: &revocation::Rule,
        now: i64,
    ) -> Result<u64, sqlx::Error> {
        const END: &str = "UPDATE leases SET expires_at = $1 WHERE expires_at > $1
             AND ($2 IS NULL OR namespace = $2) AND ($3 IS NULL OR service_account = $3)
             AND ($4 IS NULL OR pod_uid = $4) AND ($5 IS NULL OR secret = $5)
             AND ($6 IS NULL OR cluster = $6)";
        let n = on_db!(&self.db, pool => sqlx::query(END)
            .bind(now)
            .bind(&rule.namespace)
            .bind(&rule.service_account)
            .bind(&rule.pod_uid)
            .bind(&rule.secret)
            .bind(&rule.cluster)
            .execute(pool)
            .await
            .map(|r| r.rows_affected()))?;
        Ok(n)
    }

    /// Ends every running lease of one pod (it is gone). Returns how many.
    pub async fn end_for_pod(&self, pod_uid: &str, now: i64) -> Result<u64, sqlx::Error> {
        const END: &str =
            "UPDATE leases SET expires_at = $1 WHERE expires_at > $1 AND pod_uid = $2";
        on_db!(&self.db, pool => sqlx::query(END)
            .bind(now)
            .bind(pod_uid)
            .execute(pool)
            .await
            .map(|r| r.rows_affected()))
    }

    /// Deletes leases that ended more than `keep` seconds ago.
    pub async fn prune(&self, now: i64, keep: i64) -> Result<u64, sqlx::Error> {
        const PRUNE: &str = "DELETE FROM leases WHERE expires_at < $1";
        Ok(
            on_db!(&self.db, pool => sqlx::query(PRUNE).bind(now - keep).execute(pool).await.map(|r| r.rows_affected()))?,
        )
    }
}
