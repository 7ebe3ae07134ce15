//! Hashing records into the chain, and appending batches of them.

use aws_lc_rs::digest::{SHA256, digest};
use serde::Serialize;

use super::{Audit, Entry};
use crate::db::on_db;
use crate::state::audit_key::{AuditKeys, encode};

/// Hash that starts the chain.
pub(super) const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// Advisory lock key that serialises chain appends (and prunes) across replicas.
pub(super) const CHAIN_LOCK: i64 = 0x5365_6372_6574_4175;

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
pub(super) fn record_hash(
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

pub(super) fn same(a: &str, b: &str) -> bool {
    aws_lc_rs::constant_time::verify_slices_are_equal(a.as_bytes(), b.as_bytes()).is_ok()
}

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
}
