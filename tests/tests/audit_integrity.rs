//! The audit log against someone who can write the database (issue 29,
//! section 3): the real broker with an audit key and a checkpoint file,
//! stopped, its database tampered with as a script with write access would
//! (a record deleted and the chain recomputed with SHA-256; the newest
//! records removed), started again, and `brokerctl audit verify` must fail
//! naming the record. On SQLite and on PostgreSQL.

use std::path::{Path, PathBuf};
use std::time::Duration;

use secrets_broker::state::audit::sha256_chain_hash;
use secrets_broker_e2e::pg::Database;
use secrets_broker_e2e::{Proc, World, http_get, out_text, wait_for};
use serde_json::Value;
use sqlx::Connection;

const LONG: Duration = Duration::from_secs(60);

const CONFIG: &str = r#"
[audit]
key_file = "audit.key"
checkpoint_file = "checkpoints.jsonl"
checkpoint_interval = "1s"

[[roles]]
name = "payments"
namespaces = ["payments"]
service_accounts = ["api"]
secrets = ["payments/*"]
ttl = "20s"
"#;

/// A world whose broker chains its audit log with a fresh audit key and
/// writes checkpoints to `checkpoints.jsonl`.
fn world(database: Option<&str>) -> World {
    let world = match database {
        None => World::new(CONFIG),
        Some(url) => World::with_database(CONFIG, url),
    }
    .unwrap();
    let key = world.path("audit.key");
    let o = world
        .run(
            "secrets-broker",
            &[
                "store",
                "keygen",
                "--out",
                key.to_str().unwrap(),
                "--key-id",
                "audit-1",
            ],
        )
        .unwrap();
    assert!(o.status.success(), "{}", out_text(&o));
    world
}

/// The checkpoints in a file, in order.
fn checkpoints(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["kind"] == "audit_checkpoint")
        .collect()
}

/// Audited admin calls, then waits for a checkpoint covering them; stops
/// the broker (which writes a last checkpoint) and returns that last one.
fn audited_calls_then_stop(world: &World, mut broker: Proc) -> Value {
    for _ in 0..8 {
        let o = world
            .brokerctl(Some("viewer"), &["--output", "json", "revocations", "list"])
            .unwrap();
        assert!(o.status.success(), "{}", out_text(&o));
    }
    let o = world
        .brokerctl(Some("viewer"), &["audit", "verify"])
        .unwrap();
    assert!(o.status.success(), "{}", out_text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("audit log intact"),
        "{}",
        out_text(&o)
    );
    let file = world.path("checkpoints.jsonl");
    wait_for("a checkpoint of the calls", LONG, || {
        checkpoints(&file)
            .last()
            .is_some_and(|c| c["seq"].as_i64() >= Some(9))
            .then_some(())
    })
    .unwrap();
    broker.signal("TERM");
    broker.wait_exit(LONG).unwrap();
    let last = checkpoints(&file).pop().unwrap();
    for field in ["seq", "count", "head", "at_ms", "key_id", "run", "sig"] {
        assert!(!last[field].is_null(), "{field} missing: {last}");
    }
    assert_eq!(last["key_id"], "audit-1");
    last
}

/// A connection to the broker's database, as the attacker has one.
enum Conn {
    Sqlite(sqlx::SqliteConnection),
    Pg(sqlx::PgConnection),
}

macro_rules! on {
    ($c:expr, $x:ident => $body:expr) => {
        match $c {
            Conn::Sqlite($x) => $body,
            Conn::Pg($x) => $body,
        }
    };
}

type Row = (i64, i64, String, String, String, String, String, String);

impl Conn {
    async fn open(world: &World, pg: Option<&str>) -> Conn {
        match pg {
            Some(url) => Conn::Pg(sqlx::PgConnection::connect(url).await.unwrap()),
            None => {
                let path: PathBuf = world.path("store.db");
                let url = format!("sqlite://{}", path.display());
                Conn::Sqlite(sqlx::SqliteConnection::connect(&url).await.unwrap())
            }
        }
    }

    async fn exec(&mut self, sql: &str, n: i64) {
        let sql = sqlx::AssertSqlSafe(sql.to_owned());
        on!(self, c => sqlx::query(sql).bind(n).execute(&mut *c).await.map(|_| ())).unwrap();
    }

    async fn rows(&mut self) -> Vec<Row> {
        const ALL: &str = "SELECT seq, at_ms, actor, action, result, detail, prev_hash, hash FROM audit ORDER BY seq";
        on!(self, c => sqlx::query_as::<_, Row>(ALL).fetch_all(&mut *c).await).unwrap()
    }

    /// The issue's script: delete record `seq`, renumber the ones after it,
    /// chain them again with SHA-256 and mark them unkeyed (a key ID the
    /// attacker cannot produce a MAC for would give it away at once).
    async fn delete_and_rechain(&mut self, seq: i64) {
        let rows = self.rows().await;
        let mut prev = rows
            .iter()
            .find(|r| r.0 == seq - 1)
            .map(|r| r.7.clone())
            .unwrap();
        self.exec("DELETE FROM audit WHERE seq >= $1", seq).await;
        for (i, r) in rows.iter().filter(|r| r.0 > seq).enumerate() {
            let new_seq = seq + i as i64;
            let hash = sha256_chain_hash(&prev, new_seq, r.1, &r.2, &r.3, &r.4, &r.5);
            const INSERT: &str = "INSERT INTO audit (seq, at_ms, actor, action, result, detail, prev_hash, hash, key_id)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, NULL)";
            on!(self, c => sqlx::query(INSERT)
                .bind(new_seq)
                .bind(r.1)
                .bind(&r.2)
                .bind(&r.3)
                .bind(&r.4)
                .bind(&r.5)
                .bind(&prev)
                .bind(&hash)
                .execute(&mut *c)
                .await
                .map(|_| ()))
            .unwrap();
            prev = hash;
        }
    }
}

fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn deleted_and_rechained_record_is_detected(pg: Option<&str>) {
    let world = world(pg);
    let broker = world.start_broker("broker.log").unwrap();
    audited_calls_then_stop(&world, broker);

    block_on(async {
        let mut c = Conn::open(&world, pg).await;
        c.delete_and_rechain(3).await;
    });

    let _broker = world.start_broker("broker-2.log").unwrap();
    let o = world
        .brokerctl(Some("viewer"), &["audit", "verify"])
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", out_text(&o));
    assert!(
        stderr(&o).contains(
            "audit log check failed: record 3 is chained without the audit key after keyed records"
        ),
        "{}",
        out_text(&o)
    );
    let file = world.path("checkpoints.jsonl");
    let o = world
        .brokerctl(
            Some("viewer"),
            &[
                "--output",
                "json",
                "audit",
                "verify",
                "--checkpoints",
                file.to_str().unwrap(),
            ],
        )
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", out_text(&o));
    let report: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["problem_seq"], 3, "{report}");
    // The restarted broker refuses to attest the tampered log, and says so.
    wait_for("/readyz names the stopped checkpoints", LONG, || {
        let (_, body) = http_get(world.ops_port, "/readyz").ok()?;
        body.contains("audit: checkpoints stopped at record")
            .then_some(())
    })
    .unwrap();
}

#[test]
fn a_deleted_record_with_the_chain_recomputed_is_detected_on_sqlite() {
    deleted_and_rechained_record_is_detected(None);
}

#[test]
fn a_deleted_record_with_the_chain_recomputed_is_detected_on_postgres() {
    let db = Database::create().unwrap();
    deleted_and_rechained_record_is_detected(Some(&db.url));
}

fn removed_tail_is_detected_by_the_checkpoint(pg: Option<&str>) {
    let world = world(pg);
    let broker = world.start_broker("broker.log").unwrap();
    let last = audited_calls_then_stop(&world, broker);
    let seq = last["seq"].as_i64().unwrap();

    // The newest records removed: what is left is a valid chain.
    block_on(async {
        let mut c = Conn::open(&world, pg).await;
        c.exec("DELETE FROM audit WHERE seq > $1", seq - 3).await;
    });
    // The checkpoints went to a log shipper; the broker restarts without
    // them (a new file), so it cannot know.
    let shipped = world.path("shipped.jsonl");
    std::fs::rename(world.path("checkpoints.jsonl"), &shipped).unwrap();
    let _broker = world.start_broker("broker-2.log").unwrap();
    let o = world
        .brokerctl(Some("viewer"), &["audit", "verify"])
        .unwrap();
    assert!(
        o.status.success() && String::from_utf8_lossy(&o.stdout).contains("audit log intact"),
        "the chain alone cannot tell: {}",
        out_text(&o)
    );
    let o = world
        .brokerctl(
            Some("viewer"),
            &[
                "audit",
                "verify",
                "--checkpoints",
                shipped.to_str().unwrap(),
            ],
        )
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", out_text(&o));
    let err = stderr(&o);
    assert!(
        err.contains(&format!("the exported checkpoint of record {seq}")),
        "{}",
        out_text(&o)
    );
    assert!(
        err.contains("was removed")
            || err.contains("were removed")
            || err.contains(&format!("record {seq} does not match")),
        "{}",
        out_text(&o)
    );
    // Intact output and exit code are unchanged when the checkpoints agree.
    let fresh = world.path("checkpoints.jsonl");
    wait_for("the restarted broker's checkpoint", LONG, || {
        (!checkpoints(&fresh).is_empty()).then_some(())
    })
    .unwrap();
    let o = world
        .brokerctl(
            Some("viewer"),
            &["audit", "verify", "--checkpoints", fresh.to_str().unwrap()],
        )
        .unwrap();
    assert!(o.status.success(), "{}", out_text(&o));
}

#[test]
fn a_removed_tail_is_detected_by_the_checkpoint_on_sqlite() {
    removed_tail_is_detected_by_the_checkpoint(None);
}

#[test]
fn a_removed_tail_is_detected_by_the_checkpoint_on_postgres() {
    let db = Database::create().unwrap();
    removed_tail_is_detected_by_the_checkpoint(Some(&db.url));
}
