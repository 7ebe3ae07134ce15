//! The queue calls hand records to, and what this replica's audit
//! machinery reports (drops, checkpoints).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

use super::{Entry, now_ms};
use crate::state::audit_key::Checkpoint;

/// What this replica's audit machinery has to report: records dropped
/// (a metric and `/readyz`), checkpoints written or not, and the last
/// checkpoint it exported (for `audit verify`).
#[derive(Debug, Default)]
pub struct AuditStatus {
    /// Records dropped since start: the queue was full, or the database
    /// refused them until shutdown.
    pub dropped: Counter,
    /// Drops not yet written to the log as an `audit.dropped` record.
    unreported: AtomicU64,
    last_drop_ms: AtomicI64,
    /// Checkpoints written to the sink, and failures (a write, or a log
    /// that no longer matches the last checkpoint).
    pub checkpoints_written: Counter,
    pub checkpoint_failures: Counter,
    checkpoint_problem: Mutex<Option<String>>,
    last_checkpoint: Mutex<Option<Checkpoint>>,
}

/// How long after a dropped record `/readyz` answers 503.
pub const DROP_NOT_READY: Duration = Duration::from_secs(60);

impl AuditStatus {
    /// Counts one dropped record; true when none was dropped in the second
    /// before (so that a flood of drops logs a few warnings, not one each).
    pub(in crate::state) fn note_drops(&self, n: u64) -> bool {
        self.dropped.inc_by(n);
        self.unreported.fetch_add(n, Ordering::Relaxed);
        let now = now_ms();
        now - self.last_drop_ms.swap(now, Ordering::Relaxed) > 1000
    }

    /// Drops not yet audited, now to be (the count goes back to zero).
    pub(in crate::state) fn take_unreported(&self) -> u64 {
        self.unreported.swap(0, Ordering::Relaxed)
    }

    pub(in crate::state) fn count_dropped_at_shutdown(&self, n: u64) {
        self.dropped.inc_by(n);
    }

    pub(crate) fn set_checkpoint_problem(&self, p: Option<String>) {
        *self
            .checkpoint_problem
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = p;
    }

    pub(crate) fn checkpoint_problem(&self) -> Option<String> {
        self.checkpoint_problem
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn set_last_checkpoint(&self, cp: Checkpoint) {
        *self
            .last_checkpoint
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(cp);
    }

    /// The last checkpoint this replica exported (or found in its sink at start).
    pub fn last_checkpoint(&self) -> Option<Checkpoint> {
        self.last_checkpoint
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// For `/readyz`: lines that make the replica not ready (records
    /// dropped within [`DROP_NOT_READY`]: it cannot keep up auditing, let
    /// the others take its calls), and lines that only degrade it (drops
    /// longer ago, checkpoints failing).
    pub fn readiness(&self) -> (Vec<String>, Vec<String>) {
        let (mut failing, mut degraded) = (Vec::new(), Vec::new());
        let dropped = self.dropped.get();
        if dropped > 0 {
            let ago = (now_ms() - self.last_drop_ms.load(Ordering::Relaxed)).max(0);
            let line = format!(
                "audit: {dropped} records dropped since start (audit queue full), the last {}s ago",
                ago / 1000
            );
            if ago < DROP_NOT_READY.as_millis() as i64 {
                failing.push(line);
            } else {
                degraded.push(line);
            }
        }
        if let Some(p) = self.checkpoint_problem() {
            degraded.push(format!("audit: {p}"));
        }
        (failing, degraded)
    }
}

/// What calls queue for the writer task: records, and a reader's request
/// to be told once the records queued before it are written.
#[derive(Debug)]
pub(in crate::state) enum Queued {
    Record(Entry),
    Flush(oneshot::Sender<()>),
}

/// The handle calls use: queues records for the writer task.
#[derive(Clone, Debug)]
pub struct Auditor {
    tx: mpsc::Sender<Queued>,
    status: Arc<AuditStatus>,
}

/// Longest [`Auditor::flush`] waits (the database may be down).
const FLUSH_WAIT: Duration = Duration::from_secs(2);

impl Auditor {
    /// A handle on the queue that [`crate::state::writer`] drains.
    pub(in crate::state) fn new(tx: mpsc::Sender<Queued>, status: Arc<AuditStatus>) -> Auditor {
        Auditor { tx, status }
    }

    /// Queues a record; never blocks a call. A full queue drops the record:
    /// it is counted (a metric, `/readyz`), a warning is logged (at most
    /// about one a second), and the writer audits the count once it has
    /// room again.
    pub fn record(&self, entry: Entry) {
        if let Err(e) = self.tx.try_send(Queued::Record(entry))
            && self.status.note_drops(1)
        {
            warn!(error = %e, dropped_since_start = self.status.dropped.get(), "audit queue full; record dropped");
        }
    }

    /// Waits until the records queued before this call are written (the
    /// writer holds records back to write many at once), for readers of the
    /// log: an operator's `audit tail` shows the call made a moment ago.
    /// Gives up after [`FLUSH_WAIT`], so that a reader still gets what the
    /// log holds while the database refuses writes.
    pub async fn flush(&self) {
        let (done, written) = oneshot::channel();
        let _ = tokio::time::timeout(FLUSH_WAIT, async {
            if self.tx.send(Queued::Flush(done)).await.is_ok() {
                let _ = written.await;
            }
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn entries(n: usize) -> Vec<Entry> {
        (0..n)
            .map(|i| Entry::new("payments/api", "fetch", "ok", json!({ "n": i })))
            .collect()
    }

    #[tokio::test]
    async fn a_full_queue_counts_what_it_drops_and_says_so() {
        let status = Arc::new(AuditStatus::default());
        let (tx, _rx) = mpsc::channel(1);
        let auditor = Auditor::new(tx, status.clone());
        for e in entries(3) {
            auditor.record(e);
        }
        assert_eq!(status.dropped.get(), 2);
        let (failing, degraded) = status.readiness();
        assert!(degraded.is_empty());
        assert!(
            failing[0].starts_with("audit: 2 records dropped since start (audit queue full)"),
            "{failing:?}"
        );
        assert_eq!(status.take_unreported(), 2);
        assert_eq!(status.take_unreported(), 0);
        // A minute later the replica is ready again; the count stays.
        status
            .last_drop_ms
            .store(now_ms() - 61_000, Ordering::Relaxed);
        let (failing, degraded) = status.readiness();
        assert!(failing.is_empty());
        assert!(degraded[0].contains("2 records dropped"), "{degraded:?}");
    }
}
