//! The broker's database: SQLite for a single replica (the embedded default)
//! or PostgreSQL shared by several replicas. Same tables on both; the schema
//! is migrated at start. Every query is written once and run on either pool
//! through [`on_db!`].

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

/// Where the broker keeps its state.
#[derive(Clone)]
pub enum DatabaseConfig {
    /// One SQLite file (created 0600 if missing).
    Sqlite { path: PathBuf },
    /// A PostgreSQL URL; the password may come from a file instead of the URL.
    Postgres {
        url: SecretString,
        password: Option<SecretString>,
        max_connections: u32,
    },
}

impl std::fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DatabaseConfig::Sqlite { path } => write!(f, "Sqlite({})", path.display()),
            DatabaseConfig::Postgres { .. } => write!(f, "Postgres([redacted])"),
        }
    }
}

/// A connection pool on either engine.
#[derive(Clone, Debug)]
pub enum Db {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// Runs the same body on whichever pool the database is, with `$pool`
/// bound to it: `on_db!(db, pool => sqlx::query(SQL).execute(pool).await)`.
macro_rules! on_db {
    ($db:expr, $pool:ident => $body:expr) => {
        match $db {
            $crate::db::Db::Sqlite($pool) => $body,
            $crate::db::Db::Postgres($pool) => $body,
        }
    };
}
pub(crate) use on_db;

/// Schema version this build migrates to.
const SCHEMA_VERSION: i64 = 3;

/// Changes after version 1, applied in order to a database at an older version.
const MIGRATIONS: &[(i64, &str)] = &[
    // Several clusters: a revocation rule may name one.
    (2, "ALTER TABLE revocations ADD COLUMN cluster TEXT"),
    (2, "ALTER TABLE leases ADD COLUMN cluster TEXT"),
];

fn schema(postgres: bool) -> Vec<String> {
    let blob = if postgres { "BYTEA" } else { "BLOB" };
    vec![
        "CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)".into(),
        format!(
            "CREATE TABLE IF NOT EXISTS secret_versions (
                name TEXT NOT NULL,
                version BIGINT NOT NULL,
                key_id TEXT NOT NULL,
                nonce {blob} NOT NULL,
                ciphertext {blob} NOT NULL,
                created_at BIGINT NOT NULL,
                PRIMARY KEY (name, version))"
        ),
        "CREATE TABLE IF NOT EXISTS revocations (
            id TEXT PRIMARY KEY,
            namespace TEXT,
            service_account TEXT,
            pod_uid TEXT,
            lease_id TEXT,
            secret TEXT,
            reason TEXT NOT NULL,
            created_by TEXT NOT NULL,
            created_at BIGINT NOT NULL,
            expires_at BIGINT)"
            .into(),
        "CREATE TABLE IF NOT EXISTS leases (
            lease_id TEXT PRIMARY KEY,
            issuer TEXT NOT NULL,
            namespace TEXT NOT NULL,
            service_account TEXT NOT NULL,
            pod_name TEXT,
            pod_uid TEXT,
            role TEXT NOT NULL,
            secret TEXT NOT NULL,
            version BIGINT NOT NULL,
            issued_at BIGINT NOT NULL,
            expires_at BIGINT NOT NULL)"
            .into(),
        "CREATE INDEX IF NOT EXISTS leases_expires ON leases (expires_at)".into(),
        "CREATE INDEX IF NOT EXISTS leases_namespace ON leases (namespace, service_account)".into(),
        // Version 3: upstream credentials (Vault leases, certificate serials)
        // of pod leases, revoked when the pod lease ends.
        "CREATE TABLE IF NOT EXISTS upstream_leases (
            lease_id TEXT PRIMARY KEY,
            kind TEXT NOT NULL,
            mount TEXT NOT NULL,
            upstream_id TEXT NOT NULL,
            expires_at BIGINT NOT NULL,
            revoked_at BIGINT)"
            .into(),
        "CREATE INDEX IF NOT EXISTS upstream_leases_open ON upstream_leases (revoked_at)".into(),
        "CREATE TABLE IF NOT EXISTS audit (
            seq BIGINT PRIMARY KEY,
            at_ms BIGINT NOT NULL,
            actor TEXT NOT NULL,
            action TEXT NOT NULL,
            result TEXT NOT NULL,
            detail TEXT NOT NULL,
            prev_hash TEXT NOT NULL,
            hash TEXT NOT NULL)"
            .into(),
    ]
}

impl Db {
    /// Connects and migrates the schema.
    pub async fn connect(cfg: &DatabaseConfig) -> Result<Db, sqlx::Error> {
        let db = match cfg {
            DatabaseConfig::Sqlite { path } => {
                if !path.exists() {
                    use std::os::unix::fs::OpenOptionsExt;
                    std::fs::OpenOptions::new()
                        .create(true)
                        .write(true)
                        .truncate(false)
                        .mode(0o600)
                        .open(path)
                        .map_err(sqlx::Error::Io)?;
                }
                let options = SqliteConnectOptions::from_str("sqlite://")?
                    .filename(path)
                    .create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal)
                    .synchronous(SqliteSynchronous::Normal)
                    .busy_timeout(Duration::from_secs(10));
                Db::Sqlite(
                    SqlitePoolOptions::new()
                        .max_connections(4)
                        .connect_with(options)
                        .await?,
                )
            }
            DatabaseConfig::Postgres {
                url,
                password,
                max_connections,
            } => {
                let mut options = PgConnectOptions::from_str(url.expose_secret())?
                    .application_name("secrets-broker");
                if let Some(p) = password {
                    options = options.password(p.expose_secret());
                }
                Db::Postgres(
                    PgPoolOptions::new()
                        .max_connections(*max_connections)
                        .acquire_timeout(Duration::from_secs(5))
                        .connect_with(options)
                        .await?,
                )
            }
        };
        db.migrate().await?;
        Ok(db)
    }

    pub fn is_postgres(&self) -> bool {
        matches!(self, Db::Postgres(_))
    }

    async fn migrate(&self) -> Result<(), sqlx::Error> {
        for stmt in schema(self.is_postgres()) {
            on_db!(self, pool => sqlx::query(sqlx::AssertSqlSafe(stmt.as_str())).execute(pool).await.map(|_| ()))?;
        }
        let current: Option<i64> = on_db!(self, pool => sqlx::query_scalar("SELECT MAX(version) FROM schema_version").fetch_one(pool).await)?;
        if current.is_none_or(|v| v < SCHEMA_VERSION) {
            let from = current.unwrap_or(1);
            for (version, stmt) in MIGRATIONS.iter().filter(|(v, _)| *v > from) {
                if let Err(e) =
                    on_db!(self, pool => sqlx::query(*stmt).execute(pool).await.map(|_| ()))
                {
                    // Another replica may have applied it a moment ago.
                    let again = on_db!(self, pool => sqlx::query_scalar::<_, Option<i64>>("SELECT MAX(version) FROM schema_version")
                        .fetch_one(pool)
                        .await)?;
                    if again.is_none_or(|v| v < *version) {
                        return Err(e);
                    }
                }
            }
            on_db!(self, pool => sqlx::query("INSERT INTO schema_version (version) VALUES ($1)")
                .bind(SCHEMA_VERSION)
                .execute(pool)
                .await
                .map(|_| ()))?;
        } else if current.is_some_and(|v| v > SCHEMA_VERSION) {
            return Err(sqlx::Error::Protocol(format!(
                "database schema version {} is newer than this broker's ({SCHEMA_VERSION}): upgrade the broker",
                current.unwrap_or_default()
            )));
        }
        Ok(())
    }

    /// Cheap liveness check.
    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        on_db!(self, pool => sqlx::query("SELECT 1").execute(pool).await.map(|_| ()))
    }

    pub async fn close(&self) {
        on_db!(self, pool => pool.close().await)
    }
}

/// Unix time in seconds.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs() as i64
}
