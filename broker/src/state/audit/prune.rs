//! Retention: removing records a checkpoint covers, leaving a signed anchor.

use std::collections::BTreeMap;

use super::chain::CHAIN_LOCK;
use super::{Audit, now_ms};
use crate::db::on_db;

/// Most records one prune deletes (the rest go at the next one), so that
/// it holds the write lock briefly.
const PRUNE_BATCH: i64 = 50_000;

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

impl Audit {
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
