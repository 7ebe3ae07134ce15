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
const SCHEMA_VERSION: i64 = 5;

/// Changes after version 1, applied in order to a database at an older version.
const MIGRATIONS: &[(i64, &str)] = &[
    // Several clusters: a revocation rule may name one.
    (2, "ALTER TABLE revocations ADD COLUMN cluster TEXT"),
    (2, "ALTER TABLE leases ADD COLUMN cluster TEXT"),
    // The embedded store's associated data binds the version too (`aad` 2);
    // rows written before say 1 and are sealed again at the next start.
    (
        4,
        "ALTER TABLE secret_versions ADD COLUMN aad BIGINT NOT NULL DEFAULT 1",
    ),
    // The audit chain's key: records chained with an HMAC under an audit
    // key name it; rows written before (NULL) keep their SHA-256 chain.
    (5, "ALTER TABLE audit ADD COLUMN key_id TEXT"),
];

fn schema(postgres: bool) -> Vec<String> {
    let blob = if postgres { "BYTEA" } else { "BLOB" };
    // SQLite, for a database created by this version: fewer b-trees to
    // update per row written on the exchange path. The leases table is its
    // primary key's b-tree (no rowid table beside it), and the audit
    // sequence number is the rowid (no index beside the table). Older
    // databases keep their tables; the queries are the same on both.
    let (leases_sqlite, seq) = if postgres {
        ("", "BIGINT")
    } else {
        (" WITHOUT ROWID", "INTEGER")
    };
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
        format!(
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
            expires_at BIGINT NOT NULL){leases_sqlite}"
        ),
        "CREATE INDEX IF NOT EXISTS leases_expires ON leases (expires_at)".into(),
        // Dropped: an index on (namespace, service_account) that no query
        // used (their `$n IS NULL OR namespace = $n` filters search by
        // expiry, which the leases_expires index serves), yet every lease
        // written updated it, a page of its own per workload in a batch.
        "DROP INDEX IF EXISTS leases_namespace".into(),
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
        format!(
            "CREATE TABLE IF NOT EXISTS audit (
            seq {seq} PRIMARY KEY,
            at_ms BIGINT NOT NULL,
            actor TEXT NOT NULL,
            action TEXT NOT NULL,
            result TEXT NOT NULL,
            detail TEXT NOT NULL,
            prev_hash TEXT NOT NULL,
            hash TEXT NOT NULL)"
        ),
        // Version 5: where the audit chain starts after a retention prune
        // (the first kept record and the hash it links to, signed with the
        // audit key); the row with the highest seq is the one in force.
        "CREATE TABLE IF NOT EXISTS audit_anchor (
            seq BIGINT PRIMARY KEY,
            prev_hash TEXT NOT NULL,
            at_ms BIGINT NOT NULL,
            key_id TEXT NOT NULL,
            sig TEXT NOT NULL)"
            .into(),
    ]
}

#[cfg(test)]
impl Db {
    /// The SQLite database `state.db` in `dir` (made and migrated when new),
    /// for unit tests.
    pub(crate) async fn sqlite_in(dir: &std::path::Path) -> Db {
        Db::connect(&DatabaseConfig::Sqlite {
            path: dir.join("state.db"),
        })
        .await
        .unwrap()
    }
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
                    // Pages are read through a shared mapping instead of a
                    // read() per page miss.
                    .pragma("mmap_size", "134217728")
                    // No checkpoint inside a commit: one copies the WAL into
                    // the database file and fsyncs both (5–20 ms here), and
                    // every call waiting on that commit waited for it too.
                    // The broker's writer checkpoints instead, mostly
                    // beside the writes ([`crate::state::writer`]); SQLite
                    // still checkpoints when the last connection closes.
                    .pragma("wal_autocheckpoint", "0")
                    // A log that starts over keeps its file; one that grew
                    // past this under a burst is cut back to it.
                    .pragma("journal_size_limit", "67108864")
                    .busy_timeout(Duration::from_secs(10));
                Db::Sqlite(
                    SqlitePoolOptions::new()
                        .max_connections(4)
                        // A ping before each use is a round trip to the
                        // connection's thread (a wake-up each way) and proves
                        // nothing about a local file.
                        .test_before_acquire(false)
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

impl Db {
    /// SQLite: copies what the write-ahead log holds into the database file
    /// on a connection of the pool, beside any writer (a passive checkpoint
    /// waits for no one and blocks no one), then syncs that file. Nothing on
    /// PostgreSQL. On its own it never lets a log that is written all the
    /// time start over; see [`crate::state::writer`] for the step that does.
    pub async fn checkpoint(&self) {
        let Db::Sqlite(pool) = self else { return };
        if let Err(e) = sqlx::query(CHECKPOINT).execute(pool).await {
            tracing::warn!(error = %e, "cannot checkpoint the SQLite write-ahead log; retrying");
            return;
        }
        // SQLite syncs the database file only after a checkpoint that
        // copied the whole log, which one beside the writes never does: the
        // writer's checkpoint would then flush a second of copied pages while
        // every write waits for it. Flushing them here leaves it the few
        // pages it copies itself.
        let path = pool.connect_options().get_filename().to_owned();
        let synced =
            tokio::task::spawn_blocking(move || std::fs::File::open(path)?.sync_data()).await;
        if let Ok(Err(e)) = synced {
            tracing::warn!(error = %e, "cannot sync the SQLite database file");
        }
    }
}

/// A checkpoint that waits for no one.
pub(crate) const CHECKPOINT: &str = "PRAGMA wal_checkpoint(PASSIVE)";

/// SQLite has one writer at a time, and a connection that finds the write
/// lock taken sleeps in SQLite's busy handler (1, 2, 5, 10… ms). Writers of
/// batches (the writer task, [`crate::state::writer`], and unbatched lease
/// and audit writes) take turns here instead, without sleeping.
static SQLITE_WRITES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

impl Db {
    /// Held while writing, on SQLite (see [`SQLITE_WRITES`]); `None` on
    /// PostgreSQL, which has row locks.
    pub async fn write_turn(&self) -> Option<tokio::sync::MutexGuard<'static, ()>> {
        match self {
            Db::Sqlite(_) => Some(SQLITE_WRITES.lock().await),
            Db::Postgres(_) => None,
        }
    }

    /// Tells every replica listening on `channel` that something changed
    /// (PostgreSQL `NOTIFY`; nothing on SQLite, which has one replica).
    /// Best effort: the others see the change at their next re-read anyway.
    pub async fn notify(&self, channel: &str) {
        if let Db::Postgres(pool) = self
            && let Err(e) = sqlx::query("SELECT pg_notify($1, '')")
                .bind(channel)
                .execute(pool)
                .await
        {
            tracing::warn!(error = %e, channel, "cannot notify other replicas; they will see the change at their next re-read");
        }
    }
}

/// `NOTIFY`s on one PostgreSQL channel, for a loop that otherwise re-reads
/// on a timer. Reconnects when the connection is lost; on SQLite it never
/// fires.
pub struct Notifications {
    db: Db,
    channel: &'static str,
    listener: Option<sqlx::postgres::PgListener>,
}

impl Notifications {
    pub fn new(db: &Db, channel: &'static str) -> Notifications {
        Notifications {
            db: db.clone(),
            channel,
            listener: None,
        }
    }

    /// Listens if not listening yet (a failure is logged, and retried at
    /// the next call). Call before re-reading, so no change falls between.
    pub async fn connect(&mut self) {
        let Db::Postgres(pool) = &self.db else { return };
        if self.listener.is_some() {
            return;
        }
        match sqlx::postgres::PgListener::connect_with(pool).await {
            Ok(mut l) => match l.listen(self.channel).await {
                Ok(()) => self.listener = Some(l),
                Err(e) => {
                    tracing::warn!(error = %e, channel = self.channel, "cannot LISTEN; relying on re-reads")
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, channel = self.channel, "cannot LISTEN; relying on re-reads")
            }
        }
    }

    /// Waits for the next notification. Returns at once when the connection
    /// was lost (the caller re-reads; the next `connect` listens again), and
    /// never when not listening.
    pub async fn recv(&mut self) {
        let Some(l) = self.listener.as_mut() else {
            return std::future::pending().await;
        };
        if let Err(e) = l.recv().await {
            tracing::warn!(error = %e, channel = self.channel, "notifications lost; reconnecting");
            self.listener = None;
        }
    }
}
