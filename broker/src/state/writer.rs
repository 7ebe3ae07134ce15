//! The one task that writes the exchange path's rows: the leases of every
//! `Fetch` (the caller waits until they are in the database) and the audit
//! records of every call (queued; no caller waits for them).
//!
//! Under load many calls share each write. The task takes every lease
//! queued, writes them with one statement and answers their callers. Audit
//! records wait until 256 are queued or the oldest has waited 100 ms (or a
//! reader of the log asks, [`Auditor::flush`]), then go out in statements of
//! 32 records: a commit costs SQLite a few pages of log however few rows it
//! holds, and a lease batch queued meanwhile is written between two of them,
//! so its caller waits for 32 records at most, not 256. On SQLite all these
//! statements go over one connection with no transaction around them (each statement is atomic on its own), and the
//! audit chain's end is remembered from one batch to the next instead of
//! read again inside a transaction; each round trip to the connection's
//! thread wakes that thread and then this task. On PostgreSQL, whose
//! replicas share one chain, each audit batch is a transaction under the
//! chain lock ([`Audit::append`]).
//!
//! The writer also keeps SQLite's write-ahead log from growing without end.
//! A log starts over only when a checkpoint has copied all of it into the
//! database file and no write came in between, which a checkpoint beside
//! writes that never stop never achieves (the log grew by gigabytes in a
//! minute of load). So every second a passive checkpoint copies the bulk
//! beside the writes and syncs the database file, a second one copies what
//! came in during the first, then the writer, between two batches, copies
//! the rest (what came in during the second: a pause of 1–5 ms under load,
//! where copying all that came in since the first and syncing a second's
//! copied pages was 5–22 ms), and its next write starts the log over.

use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::warn;

use super::audit::{Audit, Auditor, ChainEnd, Entry, Queued};
use super::{Batch, LeaseRecord, Leases, RecordError};
use crate::db::Db;

/// Most leases written by one statement.
const MAX_LEASES: usize = 500;
/// Most audit records in one batch.
const MAX_RECORDS: usize = 256;
/// Most audit records written by one statement. A lease batch that comes in
/// while audit records are written waits for the statement running, and a
/// statement of 256 records held the connection 1.5 ms at the median and
/// 2.5 ms at the 90th percentile at 6,100 exchanges/s, which put the writes
/// of a full batch in the paced p99.
const AUDIT_CHUNK: usize = 32;
/// Calls' lease batches that may wait for the writer (each caller waits too).
const LEASE_QUEUE: usize = 4096;
/// Audit records that may wait; [`Auditor::record`] drops beyond, counts
/// what it dropped, and the writer audits the count once it has room.
const AUDIT_QUEUE: usize = 65_536;
/// Longest an audit record waits for more to share its write. A commit
/// costs SQLite a few pages of its write-ahead log however few rows it
/// holds, and the log is what its checkpoints copy and fsync: writing the
/// records of each lease batch on their own made half the commits.
const AUDIT_DELAY: Duration = Duration::from_millis(100);
/// Backoff between attempts at an audit batch the database refused.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// How often the write-ahead log is checkpointed and started over.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
/// Checkpoints beside the writes, one after the other, before the writer's
/// own: the second copies what came in during the first, so that the writer
/// pauses only for what came in during the second.
const BESIDE_ROUNDS: u32 = 2;

/// Where a caller learns whether its leases were written.
type Waiter = oneshot::Sender<Result<(), RecordError>>;
/// Where a reader of the audit log learns that what was queued before it is written.
type Flush = oneshot::Sender<()>;

/// Answers every caller of a lease batch.
fn answer(waiters: &mut Vec<Waiter>, result: Result<(), RecordError>) {
    for w in waiters.drain(..) {
        let _ = w.send(result.clone());
    }
}

/// Moves the lease batches queued on `rx` into `leases` (up to
/// [`MAX_LEASES`]) and their callers into `waiters`, without waiting.
fn take_queued(
    rx: &mut mpsc::Receiver<Batch>,
    leases: &mut Vec<LeaseRecord>,
    waiters: &mut Vec<Waiter>,
) {
    while leases.len() < MAX_LEASES
        && let Ok((mut more, done)) = rx.try_recv()
    {
        leases.append(&mut more);
        waiters.push(done);
    }
}

/// Moves what came off the audit queue into records and readers' flushes.
fn split_queued(incoming: &mut Vec<Queued>, records: &mut Vec<Entry>, flushes: &mut Vec<Flush>) {
    for q in incoming.drain(..) {
        match q {
            Queued::Record(e) => records.push(e),
            Queued::Flush(f) => flushes.push(f),
        }
    }
}

/// Starts the writer on `db` and returns the handles calls use. The task
/// ends once every handle is dropped and what they queued is written; audit
/// records the database refuses are retried with backoff, and dropped with
/// a warning only at shutdown, once the backoff has reached its maximum.
pub fn start(db: Db) -> (Leases, Auditor, tokio::task::JoinHandle<()>) {
    start_with(Audit::new(db))
}

/// [`start`] with the audit log as configured: its key chains the records,
/// and its status counts the records dropped.
pub fn start_with(audit: Audit) -> (Leases, Auditor, tokio::task::JoinHandle<()>) {
    let db = audit.db().clone();
    let (lease_tx, lease_rx) = mpsc::channel(LEASE_QUEUE);
    let (audit_tx, audit_rx) = mpsc::channel(AUDIT_QUEUE);
    let auditor = Auditor::new(audit_tx, audit.status().clone());
    let writer = Writer {
        leases: Leases::new(db.clone()),
        audit,
        db: db.clone(),
        conn: None,
        end: None,
    };
    let task = tokio::spawn(writer.run(lease_rx, audit_rx));
    (Leases::with_batcher(db, lease_tx), auditor, task)
}

struct Writer {
    db: Db,
    /// Unbatched, for PostgreSQL.
    leases: Leases,
    audit: Audit,
    /// SQLite: the writer's own connection, out of the pool, so its page
    /// cache holds the pages it writes (a pool connection another one wrote
    /// through since re-reads them from the log).
    conn: Option<sqlx::SqliteConnection>,
    /// SQLite: the audit chain's last record as this task wrote it (`None`:
    /// read it before the next append).
    end: Option<ChainEnd>,
}

impl Writer {
    async fn run(
        mut self,
        mut lease_rx: mpsc::Receiver<Batch>,
        mut audit_rx: mpsc::Receiver<Queued>,
    ) {
        let mut leases: Vec<LeaseRecord> = Vec::new();
        let mut waiters: Vec<Waiter> = Vec::new();
        let mut records: Vec<Entry> = Vec::with_capacity(MAX_RECORDS);
        let mut incoming: Vec<Queued> = Vec::with_capacity(MAX_RECORDS);
        // When the oldest of `records` was queued.
        let mut oldest: Option<Instant> = None;
        // Readers waiting until the records queued before them (all in
        // `records` by now, or written) are written.
        let mut flushes: Vec<Flush> = Vec::new();
        let (mut leases_open, mut audit_open) = (true, true);
        // After a refused audit batch: when to try it again, and the wait after that.
        let mut retry: Option<Instant> = None;
        let mut backoff = FIRST_BACKOFF;
        let sqlite = matches!(self.db, Db::Sqlite(_));
        let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // A checkpoint running beside the writes; when it is done, the writer
        // copies the rest.
        let mut checkpoint: Option<(u32, oneshot::Receiver<()>)> = None;
        loop {
            if records.is_empty() {
                for f in flushes.drain(..) {
                    let _ = f.send(());
                }
            }
            // Records wait in the queue while a refused batch waits for its retry.
            let room = MAX_RECORDS - records.len();
            let take_records = audit_open && retry.is_none() && room > 0;
            let due = oldest.map(|t| t + AUDIT_DELAY);
            tokio::select! {
                batch = lease_rx.recv(), if leases_open => match batch {
                    Some((mut more, done)) => {
                        leases.append(&mut more);
                        waiters.push(done);
                    }
                    None => leases_open = false,
                },
                n = audit_rx.recv_many(&mut incoming, room), if take_records => {
                    audit_open = n > 0;
                    split_queued(&mut incoming, &mut records, &mut flushes);
                    if !records.is_empty() && oldest.is_none() {
                        oldest = Some(Instant::now());
                    }
                }
                () = tokio::time::sleep_until(retry.unwrap_or_else(Instant::now)), if retry.is_some() => {
                    retry = None;
                }
                // The oldest record has waited long enough: write what there is.
                () = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if retry.is_none() && due.is_some() => {}
                _ = tick.tick(), if sqlite && checkpoint.is_none() && (leases_open || audit_open) => {
                    checkpoint = Some((1, self.checkpoint_beside()));
                }
                _ = async { (&mut checkpoint.as_mut().expect("enabled only when running").1).await }, if checkpoint.is_some() => {
                    let (round, _) = checkpoint.take().expect("enabled only when running");
                    if round < BESIDE_ROUNDS {
                        checkpoint = Some((round + 1, self.checkpoint_beside()));
                    } else {
                        self.finish_checkpoint().await;
                    }
                }
                else => break,
            }
            // Calls already running get to queue their leases for this write:
            // none at low load (the yield costs a poll), many under load.
            if !leases.is_empty() {
                tokio::task::yield_now().await;
            }
            // Whatever else is queued joins this write.
            take_queued(&mut lease_rx, &mut leases, &mut waiters);
            // Audit records go out in batches: when a batch is full, when the
            // oldest has waited AUDIT_DELAY, when a reader waits, at shutdown.
            let write_records = retry.is_none()
                && !records.is_empty()
                && (records.len() >= MAX_RECORDS
                    || due.is_some_and(|due| due <= Instant::now())
                    || !flushes.is_empty()
                    || !audit_open);
            if write_records {
                while records.len() + incoming.len() < MAX_RECORDS
                    && let Ok(q) = audit_rx.try_recv()
                {
                    incoming.push(q);
                }
                split_queued(&mut incoming, &mut records, &mut flushes);
            }
            if leases.is_empty() && !write_records {
                continue;
            }
            let mut none = Vec::new();
            let audited = self
                .write(
                    &leases,
                    &mut waiters,
                    if write_records {
                        &mut records
                    } else {
                        &mut none
                    },
                    Some(&mut lease_rx),
                )
                .await;
            leases.clear();
            if !write_records {
                continue;
            }
            match audited {
                Ok(()) => {
                    oldest = None;
                    backoff = FIRST_BACKOFF;
                    // Records the full queue dropped: now that it has room,
                    // the log says how many (with the next batch).
                    let dropped = self.audit.status().take_unreported();
                    if dropped > 0 {
                        records.push(Entry::new(
                            "broker",
                            "audit.dropped",
                            "dropped",
                            serde_json::json!({
                                "records": dropped,
                                "reason": "audit queue full",
                                "dropped_since_start": self.audit.status().dropped.get(),
                            }),
                        ));
                        oldest = Some(Instant::now());
                    }
                }
                Err(e) if audit_rx.is_closed() && backoff >= MAX_BACKOFF => {
                    warn!(error = %e, records = records.len(), "dropping audit records at shutdown: database unreachable");
                    self.audit
                        .status()
                        .count_dropped_at_shutdown(records.len() as u64);
                    records.clear();
                    oldest = None;
                }
                Err(e) => {
                    warn!(error = %e, records = records.len(), "cannot write audit records; retrying");
                    retry = Some(Instant::now() + backoff);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Writes `leases` and answers their callers, then appends `records`
    /// in chunks of [`AUDIT_CHUNK`], taking them out as they are written;
    /// returns how the append went. Between two chunks, the leases that came
    /// in on `more` meanwhile are written first: their callers wait for one
    /// chunk at most, not for the whole batch.
    async fn write(
        &mut self,
        leases: &[LeaseRecord],
        waiters: &mut Vec<Waiter>,
        records: &mut Vec<Entry>,
        mut more: Option<&mut mpsc::Receiver<Batch>>,
    ) -> Result<(), RecordError> {
        let pool = match &self.db {
            Db::Sqlite(pool) => pool,
            Db::Postgres(_) => {
                answer(
                    waiters,
                    self.leases
                        .record_now(leases)
                        .await
                        .map_err(RecordError::from),
                );
                self.audit.append(records).await?;
                records.clear();
                return Ok(());
            }
        };
        let _turn = self.db.write_turn().await;
        let conn = match &mut self.conn {
            Some(conn) => conn,
            None => match pool.acquire().await {
                Ok(conn) => self.conn.insert(conn.detach()),
                Err(e) => {
                    let e = RecordError::from(e);
                    answer(waiters, Err(e.clone()));
                    return Err(e);
                }
            },
        };
        let written = Leases::insert_sqlite(conn, leases)
            .await
            .map_err(RecordError::from);
        let mut failed = written.is_err();
        answer(waiters, written);
        let mut audited = Ok(());
        while !records.is_empty() {
            let n = records.len().min(AUDIT_CHUNK);
            audited = self
                .audit
                .append_sqlite(conn, &mut self.end, &records[..n])
                .await
                .map_err(RecordError::from);
            if audited.is_err() {
                break;
            }
            records.drain(..n);
            if let Some(more) = more.as_deref_mut()
                && !records.is_empty()
            {
                let (mut late, mut late_waiters) = (Vec::new(), Vec::new());
                take_queued(more, &mut late, &mut late_waiters);
                let written = Leases::insert_sqlite(conn, &late)
                    .await
                    .map_err(RecordError::from);
                failed |= written.is_err();
                answer(&mut late_waiters, written);
            }
        }
        if failed || audited.is_err() {
            // Whatever went wrong, the next batch starts on a new connection.
            self.conn = None;
        }
        audited
    }

    /// Starts a checkpoint beside the writes, on a connection of the pool.
    fn checkpoint_beside(&self) -> oneshot::Receiver<()> {
        let (done, finished) = oneshot::channel();
        let db = self.db.clone();
        tokio::spawn(async move {
            db.checkpoint().await;
            let _ = done.send(());
        });
        finished
    }

    /// SQLite, after a checkpoint beside the writes: copies the frames
    /// written meanwhile, between two batches, so that the next write starts
    /// the log over.
    async fn finish_checkpoint(&mut self) {
        let Some(conn) = &mut self.conn else { return };
        let _turn = self.db.write_turn().await;
        if let Err(e) = sqlx::query(crate::db::CHECKPOINT).execute(conn).await {
            tracing::warn!(error = %e, "cannot checkpoint the SQLite write-ahead log; retrying");
            self.conn = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use sqlx::Row;

    fn lease(id: &str) -> LeaseRecord {
        LeaseRecord {
            lease_id: id.to_owned(),
            cluster: Some("c".into()),
            issuer: "https://issuer".into(),
            namespace: "payments".into(),
            service_account: "api".into(),
            pod_name: Some("api-0".into()),
            pod_uid: Some("uid-0".into()),
            role: "payments".into(),
            secret: "payments/db".into(),
            version: 1,
            issued_at: 1,
            expires_at: i64::MAX,
        }
    }

    /// A writer on `db` that no task runs: the tests call its steps.
    fn writer_on(db: &Db) -> Writer {
        Writer {
            leases: Leases::new(db.clone()),
            audit: Audit::new(db.clone()),
            db: db.clone(),
            conn: None,
            end: None,
        }
    }

    /// Polls until the audit log holds `n` records (the writer is asynchronous).
    async fn wait_for_records(audit: &Audit, n: usize) -> Vec<super::super::audit::Record> {
        for _ in 0..500 {
            let tail = audit.tail(100).await.unwrap();
            if tail.len() >= n {
                return tail;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the writer did not write {n} audit records");
    }

    #[tokio::test]
    async fn a_refused_batch_fails_its_callers_and_the_next_one_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::sqlite_in(dir.path()).await;
        let (leases, _auditor, _task) = start(db.clone());
        leases.record(vec![lease("l1")]).await.unwrap();
        // The same lease again breaks the primary key: its caller is told.
        let e = leases.record(vec![lease("l1")]).await.unwrap_err();
        assert!(e.to_string().contains("UNIQUE"), "{e}");
        // The writer goes on, on a new connection.
        leases.record(vec![lease("l2")]).await.unwrap();
        for id in ["l1", "l2"] {
            assert_eq!(leases.get(id).await.unwrap(), Some(lease(id)));
        }
    }

    #[tokio::test]
    async fn the_chain_survives_an_append_the_writer_did_not_make() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::sqlite_in(dir.path()).await;
        let audit = Audit::new(db.clone());
        let (_leases, auditor, _task) = start(db.clone());
        auditor.record(Entry::new("a/b", "fetch", "ok", json!({"n": 1})));
        wait_for_records(&audit, 1).await;
        // Another process appends: the writer's remembered end is stale, its
        // next insert collides on the sequence number, and it re-reads the end.
        audit
            .append(&[Entry::new("admin", "admin.revoke", "ok", json!({"n": 2}))])
            .await
            .unwrap();
        auditor.record(Entry::new("a/b", "fetch", "ok", json!({"n": 3})));
        let records = wait_for_records(&audit, 3).await;
        let details: Vec<&str> = records.iter().map(|r| r.detail.as_str()).collect();
        assert_eq!(details, [r#"{"n":1}"#, r#"{"n":2}"#, r#"{"n":3}"#]);
        let report = audit.verify().await.unwrap();
        assert!(report.ok && report.records == 3, "{report:?}");
    }

    #[tokio::test]
    async fn a_flush_waits_for_the_records_queued_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::sqlite_in(dir.path()).await;
        let audit = Audit::new(db.clone());
        let (_leases, auditor, _task) = start(db.clone());
        // Nothing queued: a flush returns at once.
        auditor.flush().await;
        // A batch and a bit: the full batch goes out at once, the other 44
        // records would wait AUDIT_DELAY (100 ms) for more, and the flush
        // returns only once they are in the log.
        let queued = std::time::Instant::now();
        for n in 0..300 {
            auditor.record(Entry::new("a/b", "fetch", "ok", json!({ "n": n })));
        }
        auditor.flush().await;
        let waited = queued.elapsed();
        assert_eq!(audit.tail(1000).await.unwrap().len(), 300);
        // A flush that gave up (after 2 s) would return too.
        assert!(
            waited < Duration::from_millis(1500),
            "the flush took {waited:?}"
        );
        let report = audit.verify().await.unwrap();
        assert!(report.ok && report.records == 300, "{report:?}");
    }

    #[tokio::test]
    async fn a_lease_queued_during_an_audit_batch_is_written_between_its_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::sqlite_in(dir.path()).await;
        let audit = Audit::new(db.clone());
        let leases = Leases::new(db.clone());
        let mut writer = writer_on(&db);
        let mut records: Vec<Entry> = (0..AUDIT_CHUNK * 3 + 5)
            .map(|n| Entry::new("a/b", "fetch", "ok", json!({ "n": n })))
            .collect();
        // A caller's batch is already queued when the audit batch starts.
        let (tx, mut rx) = mpsc::channel(4);
        let (done, answered) = oneshot::channel();
        tx.send((vec![lease("late")], done)).await.unwrap();
        let mut none = Vec::new();
        writer
            .write(&[lease("first")], &mut none, &mut records, Some(&mut rx))
            .await
            .unwrap();
        // Its caller has its answer when the batch is done, not later.
        answered.await.unwrap().unwrap();
        assert_eq!(leases.get("late").await.unwrap(), Some(lease("late")));
        // Every record is written once, in order, on one chain.
        assert!(records.is_empty(), "{} records left", records.len());
        let tail = audit.tail(1000).await.unwrap();
        assert_eq!(tail.len(), AUDIT_CHUNK * 3 + 5);
        for (n, r) in tail.iter().enumerate() {
            assert_eq!(r.detail, format!(r#"{{"n":{n}}}"#));
        }
        let report = audit.verify().await.unwrap();
        assert!(report.ok, "{report:?}");
    }

    #[tokio::test]
    async fn the_writer_chains_with_the_key_and_audits_what_a_full_queue_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::sqlite_in(dir.path()).await;
        let keys = std::sync::Arc::new(crate::state::audit_key::tests::keys_in(dir.path(), "a1"));
        let audit = Audit::keyed(db.clone(), Some(keys), Default::default());
        let (_leases, auditor, _task) = start_with(audit.clone());
        // As if a full queue had dropped three records.
        audit.status().note_drops(3);
        auditor.record(Entry::new("a/b", "fetch", "ok", json!({"n": 1})));
        let records = wait_for_records(&audit, 2).await;
        assert_eq!(records[0].action, "fetch");
        assert_eq!(records[1].action, "audit.dropped");
        assert!(
            records[1].detail.contains(r#""records":3"#),
            "{}",
            records[1].detail
        );
        assert!(records.iter().all(|r| r.key_id.as_deref() == Some("a1")));
        assert_eq!(audit.status().dropped.get(), 3);
        assert_eq!(audit.status().take_unreported(), 0);
        let report = audit.verify().await.unwrap();
        assert!(report.ok && report.legacy_records == 0, "{report:?}");
    }

    /// Frames in the write-ahead log, as a passive checkpoint reports them.
    async fn log_frames(db: &Db) -> i64 {
        let Db::Sqlite(pool) = db else { unreachable!() };
        let row = sqlx::query(crate::db::CHECKPOINT)
            .fetch_one(pool)
            .await
            .unwrap();
        row.get::<i64, _>(1)
    }

    #[tokio::test]
    async fn after_the_writers_checkpoint_the_log_starts_over() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::sqlite_in(dir.path()).await;
        let mut writer = writer_on(&db);
        let mut none = Vec::new();
        for i in 0..20 {
            writer
                .write(&[lease(&format!("a{i}"))], &mut none, &mut Vec::new(), None)
                .await
                .unwrap();
        }
        let grown = log_frames(&db).await;
        assert!(grown >= 20, "{grown} frames after 20 commits");
        writer.finish_checkpoint().await;
        writer
            .write(&[lease("b")], &mut none, &mut Vec::new(), None)
            .await
            .unwrap();
        let restarted = log_frames(&db).await;
        assert!(
            restarted < grown,
            "the log did not start over: {restarted} frames, {grown} before"
        );
    }
}
