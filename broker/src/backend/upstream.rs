//! Upstream credentials of pod leases (Vault leases, certificates, STS
//! keys), in the shared database, for every backend that issues per-pod
//! credentials.

use crate::backend::source::Upstream;
use crate::db::{Db, on_db};

/// Upstream credentials of pod leases, in the shared database, so any
/// replica can renew or revoke them and a restart forgets none.
#[derive(Clone, Debug)]
pub struct UpstreamLeases {
    db: Db,
}

impl UpstreamLeases {
    pub fn new(db: Db) -> UpstreamLeases {
        UpstreamLeases { db }
    }

    pub async fn record(&self, lease_id: &str, up: &Upstream) -> Result<(), sqlx::Error> {
        const INSERT: &str = "INSERT INTO upstream_leases (lease_id, kind, mount, upstream_id, expires_at) VALUES ($1, $2, $3, $4, $5)";
        on_db!(&self.db, pool => sqlx::query(INSERT)
            .bind(lease_id).bind(up.kind).bind(&up.mount).bind(&up.id).bind(up.expires_at)
            .execute(pool).await.map(|_| ()))
    }

    pub async fn get(&self, lease_id: &str) -> Result<Option<Upstream>, sqlx::Error> {
        const GET: &str = "SELECT kind, mount, upstream_id, expires_at FROM upstream_leases WHERE lease_id = $1 AND revoked_at IS NULL";
        let row: Option<(String, String, String, i64)> = on_db!(&self.db, pool => sqlx::query_as(GET).bind(lease_id).fetch_optional(pool).await)?;
        Ok(row.map(|(kind, mount, id, expires_at)| Upstream {
            kind: match kind.as_str() {
                "pki" => "pki",
                "sts" => "sts",
                _ => "database",
            },
            mount,
            id,
            expires_at,
        }))
    }

    pub async fn set_expiry(&self, lease_id: &str, expires_at: i64) -> Result<(), sqlx::Error> {
        const SET: &str = "UPDATE upstream_leases SET expires_at = $1 WHERE lease_id = $2";
        on_db!(&self.db, pool => sqlx::query(SET).bind(expires_at).bind(lease_id).execute(pool).await.map(|_| ()))
    }

    /// Upstream credentials whose pod lease has ended but which are not yet revoked.
    pub(crate) async fn due(
        &self,
        now: i64,
    ) -> Result<Vec<(String, String, String, String)>, sqlx::Error> {
        const DUE: &str = "SELECT u.lease_id, u.kind, u.mount, u.upstream_id FROM upstream_leases u
             JOIN leases l ON l.lease_id = u.lease_id
             WHERE u.revoked_at IS NULL AND l.expires_at <= $1 LIMIT 256";
        on_db!(&self.db, pool => sqlx::query_as(DUE).bind(now).fetch_all(pool).await)
    }

    /// Claims a row for revocation; false when another replica got it first.
    pub(crate) async fn claim(&self, lease_id: &str, now: i64) -> Result<bool, sqlx::Error> {
        const CLAIM: &str =
            "UPDATE upstream_leases SET revoked_at = $1 WHERE lease_id = $2 AND revoked_at IS NULL";
        let n = on_db!(&self.db, pool => sqlx::query(CLAIM).bind(now).bind(lease_id).execute(pool).await.map(|r| r.rows_affected()))?;
        Ok(n == 1)
    }

    pub(crate) async fn unclaim(&self, lease_id: &str) -> Result<(), sqlx::Error> {
        const UNCLAIM: &str = "UPDATE upstream_leases SET revoked_at = NULL WHERE lease_id = $1";
        on_db!(&self.db, pool => sqlx::query(UNCLAIM).bind(lease_id).execute(pool).await.map(|_| ()))
    }

    /// Forgets rows revoked more than `keep` seconds ago.
    pub async fn prune(&self, now: i64, keep: i64) -> Result<u64, sqlx::Error> {
        const PRUNE: &str =
            "DELETE FROM upstream_leases WHERE revoked_at IS NOT NULL AND revoked_at < $1";
        on_db!(&self.db, pool => sqlx::query(PRUNE).bind(now - keep).execute(pool).await.map(|r| r.rows_affected()))
    }
}
