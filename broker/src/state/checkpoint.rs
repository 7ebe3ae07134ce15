//! Signed checkpoints of the audit chain, exported outside the database,
//! and the retention prune that they make safe.
//!
//! At every `audit.checkpoint_interval` (and once more at shutdown, after
//! the last records are written) the exporter checks what was appended to
//! the chain since its last checkpoint (the whole chain the first time),
//! then writes one JSON line to `audit.checkpoint_file` (a file, appended
//! to, or `-` for standard output, for a log shipper):
//!
//! ```json
//! {"kind":"audit_checkpoint","seq":812,"count":812,"head":"…","at_ms":…,"key_id":"audit-1","run":"…","sig":"…"}
//! ```
//!
//! `sig` is an HMAC under a key derived from the audit key. A chain that no
//! longer matches the last checkpoint (rewritten, or truncated below it)
//! stops the export, so a tampered log is never attested: an error in the
//! log, a metric, and a line in `/readyz`. A write that fails is a warning
//! and a metric; the next interval tries again.
//!
//! With `audit.retention`, records older than that are deleted after each
//! export, but only up to the checkpoint just exported, and only once they
//! verify; the chain then starts at a signed anchor ([`Audit::prune`]). A
//! prune is itself audited (`audit.prune`).

use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::json;
use tokio::sync::watch;
use tracing::{error, info, warn};

use super::audit::{Audit, Auditor, Entry};
use super::audit_key::{AuditKeys, CHECKPOINT_KIND, Checkpoint};
use crate::config_check::{ConfigError, Validator};

/// The `[audit]` table as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAudit {
    key_file: Option<PathBuf>,
    checkpoint_file: Option<String>,
    #[serde(default = "default_interval", with = "humantime_serde")]
    checkpoint_interval: Duration,
    #[serde(default, with = "humantime_serde")]
    retention: Duration,
}

fn default_interval() -> Duration {
    Duration::from_secs(60)
}

/// Where checkpoints go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckpointSink {
    /// Standard output (the broker logs to standard error): a log shipper's.
    Stdout,
    /// A file, appended to (created when missing).
    File(PathBuf),
}

impl std::fmt::Display for CheckpointSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CheckpointSink::Stdout => f.write_str("standard output"),
            CheckpointSink::File(p) => write!(f, "{}", p.display()),
        }
    }
}

/// The audit log's integrity settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditConfig {
    /// The audit key file; `None`: the plain SHA-256 chain (not
    /// tamper-evident against a database writer).
    pub key_file: Option<PathBuf>,
    /// Where signed checkpoints go; `None`: none are exported.
    pub checkpoint_file: Option<CheckpointSink>,
    pub checkpoint_interval: Duration,
    /// Records older than this are pruned; `None`: kept forever.
    pub retention: Option<Duration>,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            key_file: None,
            checkpoint_file: None,
            checkpoint_interval: default_interval(),
            retention: None,
        }
    }
}

/// Validates the `[audit]` table.
pub(crate) fn validate(
    v: &Validator<'_>,
    raw: RawAudit,
    resolve: &dyn Fn(PathBuf) -> PathBuf,
) -> Result<AuditConfig, ConfigError> {
    let key_file = raw.key_file.map(resolve);
    let checkpoint_file = match raw.checkpoint_file.as_deref() {
        None => None,
        Some("") => {
            return Err(v.err(
                "audit.checkpoint_file",
                "give a file path, or \"-\" for standard output",
            ));
        }
        Some("-") => Some(CheckpointSink::Stdout),
        Some(p) => Some(CheckpointSink::File(resolve(PathBuf::from(p)))),
    };
    if checkpoint_file.is_some() && key_file.is_none() {
        return Err(v.err(
            "audit.checkpoint_file",
            "checkpoints are signed with the audit key: set audit.key_file too",
        ));
    }
    let checkpoint_interval = v.bounded(
        "audit.checkpoint_interval",
        raw.checkpoint_interval,
        Duration::from_secs(1),
        Duration::from_secs(24 * 3600),
    )?;
    let retention = match raw.retention {
        Duration::ZERO => None,
        r => {
            if checkpoint_file.is_none() {
                return Err(v.err(
                    "audit.retention",
                    "records are pruned only up to an exported checkpoint: set audit.checkpoint_file too (or \"0s\" to keep every record)",
                ));
            }
            Some(v.bounded(
                "audit.retention",
                r,
                Duration::from_secs(3600),
                Duration::from_secs(100 * 366 * 24 * 3600),
            )?)
        }
    };
    Ok(AuditConfig {
        key_file,
        checkpoint_file,
        checkpoint_interval,
        retention,
    })
}

/// Appends one line to the sink (one write, no fsync).
fn write_line(sink: &CheckpointSink, line: &str) -> std::io::Result<()> {
    match sink {
        CheckpointSink::Stdout => {
            let mut out = std::io::stdout().lock();
            out.write_all(line.as_bytes())?;
            out.flush()
        }
        CheckpointSink::File(path) => std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?
            .write_all(line.as_bytes()),
    }
}

/// How much of a checkpoint file's end is read for its last checkpoint.
const TAIL_BYTES: u64 = 256 * 1024;

/// The last checkpoint in `path` that `keys` signed (lines that are not
/// checkpoints, or not signed by this key, are skipped).
pub fn last_in_file(path: &Path, keys: &AuditKeys) -> std::io::Result<Option<Checkpoint>> {
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    f.seek(std::io::SeekFrom::Start(len.saturating_sub(TAIL_BYTES)))?;
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes)?;
    let text = String::from_utf8_lossy(&bytes);
    Ok(text
        .lines()
        .rev()
        .filter_map(Checkpoint::from_line)
        .find(|cp| keys.verify_checkpoint(cp).is_ok()))
}

fn run_id() -> String {
    let mut b = [0u8; 8];
    let _ = aws_lc_rs::rand::fill(&mut b);
    hex::encode(b)
}

/// Makes and writes checkpoints, and prunes.
struct Exporter {
    audit: Audit,
    keys: Arc<AuditKeys>,
    sink: CheckpointSink,
    retention: Option<Duration>,
    run: String,
    /// The last checkpoint written (or found in the sink at start): the
    /// chain up to it is verified, and must stay as it was.
    last: Option<Checkpoint>,
    /// The chain no longer matched `last`: nothing more is exported.
    halted: bool,
}

impl Exporter {
    /// Checks the chain and writes a checkpoint of its head when it moved;
    /// returns the record of a prune, if one happened.
    async fn export(&mut self) -> Option<Entry> {
        if self.halted {
            return None;
        }
        let status = self.audit.status().clone();
        let checked = match &self.last {
            None => self.audit.check_all().await,
            Some(cp) => self.audit.extend_from(cp.seq, &cp.head).await,
        };
        let head = match checked {
            Err(e) => {
                warn!(error = %e, "cannot read the audit log for a checkpoint; retrying at the next interval");
                status.checkpoint_failures.inc();
                status.set_checkpoint_problem(Some(format!(
                    "cannot read the audit log for a checkpoint: {e}"
                )));
                return None;
            }
            Ok(Err(p)) => {
                self.halted = true;
                status.checkpoint_failures.inc();
                let message = format!(
                    "checkpoints stopped at record {}: {}; check with `brokerctl audit verify --checkpoints FILE`",
                    p.seq, p.message
                );
                error!(seq = p.seq, problem = %p.message, "audit log does not verify: no more checkpoints are exported (a tampered log is never attested)");
                status.set_checkpoint_problem(Some(message));
                return None;
            }
            Ok(Ok(head)) => head,
        };
        if head.seq == 0 {
            return None;
        }
        if self.last.as_ref().is_none_or(|l| l.seq != head.seq) {
            let mut cp = Checkpoint {
                kind: CHECKPOINT_KIND.to_owned(),
                seq: head.seq,
                count: head.count,
                head: head.hash,
                at_ms: crate::clock::unix_now_ms() as i64,
                key_id: String::new(),
                run: self.run.clone(),
                sig: String::new(),
            };
            self.keys.sign_checkpoint(&mut cp);
            if let Err(e) = write_line(&self.sink, &cp.to_line()) {
                warn!(error = %e, sink = %self.sink, "cannot write an audit checkpoint; retrying at the next interval");
                status.checkpoint_failures.inc();
                status.set_checkpoint_problem(Some(format!(
                    "cannot write checkpoints to {}: {e}",
                    self.sink
                )));
                return None;
            }
            status.checkpoints_written.inc();
            status.set_checkpoint_problem(None);
            status.set_last_checkpoint(cp.clone());
            self.last = Some(cp);
        }
        let (retention, last) = (self.retention?, self.last.as_ref()?);
        let before = last.at_ms - retention.as_millis() as i64;
        match self.audit.prune(before, last.seq).await {
            Ok(None) => None,
            Ok(Some(p)) => {
                info!(
                    records = p.records,
                    up_to_seq = p.up_to,
                    "audit log: pruned records past audit.retention"
                );
                Some(Entry::new(
                    "broker",
                    "audit.prune",
                    "ok",
                    json!({
                        "records": p.records,
                        "up_to_seq": p.up_to,
                        "retention_seconds": retention.as_secs(),
                    }),
                ))
            }
            Err(e) => {
                warn!(error = %e, "audit log: cannot prune");
                None
            }
        }
    }
}

/// The running exporter: [`Checkpoints::finish`] writes the last
/// checkpoint once the writer has drained.
pub struct Checkpoints {
    exporter: Arc<tokio::sync::Mutex<Exporter>>,
    task: tokio::task::JoinHandle<()>,
}

/// Starts exporting when `config` names a sink and `audit` has a key;
/// `auditor` records prunes (the task drops it at shutdown, so the writer
/// can drain).
pub fn start(
    config: &AuditConfig,
    audit: Audit,
    auditor: Auditor,
    mut down: watch::Receiver<bool>,
) -> Option<Checkpoints> {
    let sink = config.checkpoint_file.clone()?;
    let keys = audit.keys()?.clone();
    let last = match &sink {
        CheckpointSink::Stdout => None,
        CheckpointSink::File(path) => match last_in_file(path, &keys) {
            Ok(last) => last,
            Err(e) => {
                warn!(error = %e, path = %path.display(), "cannot read the audit checkpoint file; starting without its last checkpoint");
                None
            }
        },
    };
    if let Some(cp) = &last {
        audit.status().set_last_checkpoint(cp.clone());
    }
    let exporter = Arc::new(tokio::sync::Mutex::new(Exporter {
        audit,
        keys,
        sink,
        retention: config.retention,
        run: run_id(),
        last,
        halted: false,
    }));
    let every = config.checkpoint_interval;
    let task = tokio::spawn({
        let exporter = exporter.clone();
        async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        if let Some(e) = exporter.lock().await.export().await {
                            auditor.record(e);
                        }
                    }
                    _ = crate::shutdown::until_true(&mut down) => return,
                }
            }
        }
    });
    Some(Checkpoints { exporter, task })
}

impl Checkpoints {
    /// Stops the periodic export and writes one last checkpoint (call once
    /// the writer has written the last records).
    pub async fn finish(self) {
        let _ = self.task.await;
        let _ = self.exporter.lock().await.export().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config_check::Validator;
    use crate::db::Db;
    use crate::state::audit::{AuditStatus, Entry};
    use crate::state::audit_key::tests::keys_in;

    fn parse(toml_text: &str) -> Result<AuditConfig, ConfigError> {
        let raw: RawAudit = toml::from_str(toml_text).unwrap();
        let v = Validator {
            path: Path::new("/etc/sb/broker.toml"),
        };
        validate(&v, raw, &|p: PathBuf| Path::new("/etc/sb").join(p))
    }

    #[test]
    fn the_audit_table_is_validated_naming_the_key() {
        let c = parse("key_file = \"audit.key\"\ncheckpoint_file = \"-\"\nretention = \"90d\"\n")
            .unwrap();
        assert_eq!(c.key_file.as_deref(), Some(Path::new("/etc/sb/audit.key")));
        assert_eq!(c.checkpoint_file, Some(CheckpointSink::Stdout));
        assert_eq!(c.checkpoint_interval, Duration::from_secs(60));
        assert_eq!(c.retention, Some(Duration::from_secs(90 * 24 * 3600)));
        let c = parse("key_file = \"k\"\ncheckpoint_file = \"cp.jsonl\"\nretention = \"0s\"\n")
            .unwrap();
        assert_eq!(
            c.checkpoint_file,
            Some(CheckpointSink::File("/etc/sb/cp.jsonl".into()))
        );
        assert_eq!(c.retention, None);
        for (text, want) in [
            (
                "checkpoint_file = \"-\"",
                "key `audit.checkpoint_file`: checkpoints are signed with the audit key",
            ),
            (
                "key_file = \"k\"\nretention = \"30d\"",
                "key `audit.retention`: records are pruned only up to an exported checkpoint",
            ),
            (
                "key_file = \"k\"\ncheckpoint_file = \"-\"\nretention = \"10m\"",
                "key `audit.retention`: 10m is out of range",
            ),
            (
                "key_file = \"k\"\ncheckpoint_interval = \"0s\"",
                "key `audit.checkpoint_interval`: 0s is out of range",
            ),
            (
                "key_file = \"k\"\ncheckpoint_file = \"\"",
                "give a file path",
            ),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
            assert!(e.contains("broker.toml"), "{e}");
        }
    }

    async fn keyed(dir: &Path) -> (Db, Audit) {
        let db = Db::sqlite_in(dir).await;
        let keys = Arc::new(keys_in(dir, "a1"));
        let audit = Audit::keyed(db.clone(), Some(keys), Arc::new(AuditStatus::default()));
        (db, audit)
    }

    fn exporter(audit: &Audit, sink: CheckpointSink, retention: Option<Duration>) -> Exporter {
        Exporter {
            audit: audit.clone(),
            keys: audit.keys().unwrap().clone(),
            sink,
            retention,
            run: run_id(),
            last: None,
            halted: false,
        }
    }

    fn entries(n: usize, at_ms: i64) -> Vec<Entry> {
        (0..n)
            .map(|i| Entry {
                at_ms,
                ..Entry::new("a/b", "fetch", "ok", json!({ "n": i }))
            })
            .collect()
    }

    #[tokio::test]
    async fn checkpoints_are_written_signed_and_stop_on_a_rewritten_log() {
        let dir = tempfile::tempdir().unwrap();
        let (db, audit) = keyed(dir.path()).await;
        let file = dir.path().join("cp.jsonl");
        let mut ex = exporter(&audit, CheckpointSink::File(file.clone()), None);
        // An empty log: nothing to attest.
        assert!(ex.export().await.is_none());
        assert!(!file.exists());
        audit.append(&entries(3, 1)).await.unwrap();
        ex.export().await;
        // Nothing new: no new line.
        ex.export().await;
        audit.append(&entries(2, 2)).await.unwrap();
        ex.export().await;
        let text = std::fs::read_to_string(&file).unwrap();
        let lines: Vec<Checkpoint> = text.lines().filter_map(Checkpoint::from_line).collect();
        assert_eq!(
            lines.iter().map(|c| (c.seq, c.count)).collect::<Vec<_>>(),
            [(3, 3), (5, 5)]
        );
        let keys = audit.keys().unwrap();
        for cp in &lines {
            keys.verify_checkpoint(cp).unwrap();
        }
        assert_eq!(last_in_file(&file, keys).unwrap().as_ref(), lines.last());
        assert_eq!(audit.status().last_checkpoint().as_ref(), lines.last());
        assert_eq!(audit.status().checkpoints_written.get(), 2);
        let report = audit.verify_with(&lines).await.unwrap();
        assert!(report.ok && report.checkpoints_checked == 2, "{report:?}");

        // A writer without the key removes the last record: the exporter
        // sees it at its next round and stops attesting.
        let Db::Sqlite(pool) = &db else {
            unreachable!()
        };
        sqlx::query("DELETE FROM audit WHERE seq = 5")
            .execute(pool)
            .await
            .unwrap();
        audit.append(&entries(1, 3)).await.unwrap();
        ex.export().await;
        assert!(ex.halted);
        let problem = audit.status().checkpoint_problem().unwrap();
        assert!(
            problem.contains("record 5 no longer matches the last exported checkpoint"),
            "{problem}"
        );
        assert_eq!(audit.status().checkpoint_failures.get(), 1);
        let (failing, degraded) = audit.status().readiness();
        assert!(failing.is_empty());
        assert!(
            degraded[0].starts_with("audit: checkpoints stopped at record 5"),
            "{degraded:?}"
        );
        assert_eq!(std::fs::read_to_string(&file).unwrap().lines().count(), 2);

        // A new exporter (a restart) picks the last checkpoint from the file
        // and refuses too.
        let mut again = exporter(&audit, CheckpointSink::File(file.clone()), None);
        again.last = last_in_file(&file, keys).unwrap();
        again.export().await;
        assert!(again.halted);
    }

    #[tokio::test]
    async fn a_checkpoint_that_cannot_be_written_is_a_warning_and_a_metric() {
        let dir = tempfile::tempdir().unwrap();
        let (_db, audit) = keyed(dir.path()).await;
        let sink = CheckpointSink::File(dir.path().join("missing-dir").join("cp.jsonl"));
        let mut ex = exporter(&audit, sink, None);
        audit.append(&entries(1, 1)).await.unwrap();
        ex.export().await;
        assert!(!ex.halted);
        assert_eq!(audit.status().checkpoint_failures.get(), 1);
        let (_, degraded) = audit.status().readiness();
        assert!(
            degraded[0].contains("cannot write checkpoints to"),
            "{degraded:?}"
        );
        std::fs::create_dir(dir.path().join("missing-dir")).unwrap();
        ex.export().await;
        assert_eq!(audit.status().checkpoints_written.get(), 1);
        assert!(audit.status().readiness().1.is_empty());
    }

    #[tokio::test]
    async fn retention_prunes_only_what_a_checkpoint_covers_and_verify_starts_at_the_anchor() {
        let dir = tempfile::tempdir().unwrap();
        let (db, audit) = keyed(dir.path()).await;
        let file = dir.path().join("cp.jsonl");
        let day = 24 * 3600 * 1000;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        // Ten old records, checkpointed; then five old ones more, not yet.
        audit.append(&entries(10, now - 100 * day)).await.unwrap();
        let mut ex = exporter(&audit, CheckpointSink::File(file.clone()), None);
        ex.export().await;
        audit.append(&entries(5, now - 100 * day)).await.unwrap();
        audit.append(&entries(2, now)).await.unwrap();
        // Pruning up to the checkpoint (seq 10), not past it.
        let pruned = audit.prune(now - 90 * day, 10).await.unwrap().unwrap();
        assert_eq!((pruned.records, pruned.up_to), (10, 10));
        let anchor = audit.anchor().await.unwrap().unwrap();
        assert_eq!(anchor.seq, 11);
        let cps: Vec<Checkpoint> = std::fs::read_to_string(&file)
            .unwrap()
            .lines()
            .filter_map(Checkpoint::from_line)
            .collect();
        let report = audit.verify_with(&cps).await.unwrap();
        assert!(report.ok, "{report:?}");
        assert_eq!(
            (report.first_seq, report.records, report.last_seq),
            (11, 7, 17)
        );
        // The checkpoint at seq 10 is where the anchor links.
        assert_eq!(report.checkpoints_checked, 1);

        // Through the exporter: it checkpoints 17, then prunes the old ones
        // (11-15), records the prune, and the chain still verifies.
        ex.retention = Some(Duration::from_secs(90 * 24 * 3600));
        let entry = ex.export().await.expect("a prune record");
        assert_eq!(entry.action, "audit.prune");
        assert!(entry.detail.contains(r#""records":5"#), "{}", entry.detail);
        audit.append(&[entry]).await.unwrap();
        let report = audit.verify().await.unwrap();
        assert!(report.ok, "{report:?}");
        assert_eq!((report.first_seq, report.last_seq), (16, 18));

        // A replica whose last checkpoint (seq 10) another one pruned past
        // checks the kept chain from its anchor, and goes on.
        let other = dir.path().join("other.jsonl");
        let mut behind = exporter(&audit, CheckpointSink::File(other.clone()), None);
        behind.last = cps.last().cloned();
        behind.export().await;
        assert!(!behind.halted, "{:?}", audit.status().checkpoint_problem());
        assert_eq!(
            last_in_file(&other, audit.keys().unwrap())
                .unwrap()
                .unwrap()
                .seq,
            18
        );

        // The anchor cannot be moved or dropped by a database writer.
        let Db::Sqlite(pool) = &db else {
            unreachable!()
        };
        sqlx::query("UPDATE audit_anchor SET seq = 17")
            .execute(pool)
            .await
            .unwrap();
        let report = audit.verify().await.unwrap();
        assert!(
            report
                .problem
                .as_deref()
                .unwrap()
                .contains("anchor at record 17")
                && !report.ok,
            "{report:?}"
        );
        sqlx::query("DELETE FROM audit_anchor")
            .execute(pool)
            .await
            .unwrap();
        let report = audit.verify().await.unwrap();
        assert_eq!(
            report.problem.as_deref(),
            Some("record 1 is missing (next is 16)")
        );
        assert_eq!(report.problem_seq, Some(1));
    }
}
