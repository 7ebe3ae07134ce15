//! Checking the chain: each record's hash and link, the anchor a prune
//! left, and exported checkpoints.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::chain::{GENESIS, record_hash, same};
use super::{Audit, Record};
use crate::db::on_db;
use crate::state::audit_key::Checkpoint;

/// The result of checking the chain.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VerifyReport {
    pub ok: bool,
    pub records: i64,
    pub last_seq: i64,
    /// The first problem found, naming the record.
    pub problem: Option<String>,
    /// The sequence number the problem is at.
    #[serde(default)]
    pub problem_seq: Option<i64>,
    /// Where the chain starts: 1, or the anchor a retention prune left.
    #[serde(default)]
    pub first_seq: i64,
    /// Records chained with plain SHA-256 (before the audit key, or with
    /// none): not tamper-evident against a database writer.
    #[serde(default)]
    pub legacy_records: i64,
    /// Whether this broker has an audit key (so keyed records were checked).
    #[serde(default)]
    pub keyed: bool,
    /// Exported checkpoints the log was compared with, and the newest one's seq.
    #[serde(default)]
    pub checkpoints_checked: usize,
    #[serde(default)]
    pub checkpoint_seq: Option<i64>,
    /// What was not checked, and why (a checkpoint older than the kept log).
    #[serde(default)]
    pub notes: Vec<String>,
}

/// A problem in the chain, at a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Problem {
    pub seq: i64,
    pub message: String,
}

fn problem(seq: i64, message: String) -> Problem {
    Problem { seq, message }
}

/// Where a walk along the chain is.
#[derive(Debug, Clone)]
pub(super) struct Cursor {
    /// The next record expected, and the hash it must link to.
    pub(super) next_seq: i64,
    pub(super) prev: String,
    /// A keyed record was seen: no unkeyed one may follow.
    keyed: bool,
    count: i64,
    legacy: i64,
}

impl Cursor {
    fn at(next_seq: i64, prev: String, keyed: bool) -> Cursor {
        Cursor {
            next_seq,
            prev,
            keyed,
            count: 0,
            legacy: 0,
        }
    }
}

/// The chain's head as verified: its last record and the records kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Head {
    pub seq: i64,
    pub hash: String,
    pub count: i64,
}

impl Audit {
    /// Where the chain starts: after a checked anchor, or at the genesis.
    pub(super) async fn start(&self) -> Result<Result<Cursor, Problem>, sqlx::Error> {
        let Some(a) = self.anchor().await? else {
            return Ok(Ok(Cursor::at(1, GENESIS.to_owned(), false)));
        };
        let checked = match &self.keys {
            None => Err(format!(
                "signed with audit key {:?}, and this broker has no audit.key_file to check it",
                a.key_id
            )),
            Some(k) => k.verify_anchor(&a),
        };
        Ok(match checked {
            Ok(()) => Ok(Cursor::at(a.seq, a.prev_hash, false)),
            Err(e) => Err(problem(
                a.seq,
                format!(
                    "the chain's start (the anchor at record {} left by a retention prune) is not valid: {e}",
                    a.seq
                ),
            )),
        })
    }

    /// What is wrong with `r` as the record after `cur`, if anything.
    fn check(&self, cur: &Cursor, r: &Record) -> Option<Problem> {
        if r.seq != cur.next_seq {
            return Some(problem(
                cur.next_seq,
                format!("record {} is missing (next is {})", cur.next_seq, r.seq),
            ));
        }
        if r.prev_hash != cur.prev {
            return Some(problem(
                r.seq,
                format!("record {} does not link to record {}", r.seq, r.seq - 1),
            ));
        }
        let keys = self.keys.as_deref();
        match r.key_id.as_deref() {
            None if cur.keyed => {
                return Some(problem(
                    r.seq,
                    format!(
                        "record {} is chained without the audit key after keyed records: it was rewritten by someone without the key",
                        r.seq
                    ),
                ));
            }
            Some(id) if keys.is_none() => {
                return Some(problem(
                    r.seq,
                    format!(
                        "record {} is chained with audit key {id:?}, and this broker has no audit.key_file to check it",
                        r.seq
                    ),
                ));
            }
            _ => {}
        }
        match record_hash(
            keys,
            r.key_id.as_deref(),
            &r.prev_hash,
            r.seq,
            r.at_ms,
            &r.actor,
            &r.action,
            &r.result,
            &r.detail,
        ) {
            None => Some(problem(
                r.seq,
                format!(
                    "record {} is chained with audit key {:?}, which is not in audit.key_file",
                    r.seq,
                    r.key_id.as_deref().unwrap_or_default()
                ),
            )),
            Some(h) if !same(&h, &r.hash) => Some(problem(
                r.seq,
                format!(
                    "record {} was altered (its hash does not match its content)",
                    r.seq
                ),
            )),
            Some(_) => None,
        }
    }

    /// Walks the chain from `cur` to `until` (included; `None`: its end),
    /// checking each record, and the hash of each record `marks` names
    /// (seq → the hash it must have, and what says so).
    pub(super) async fn walk(
        &self,
        cur: &mut Cursor,
        until: Option<i64>,
        marks: &BTreeMap<i64, (String, String)>,
    ) -> Result<Option<Problem>, sqlx::Error> {
        loop {
            let left = until.map_or(1000, |u| (u - cur.next_seq + 1).clamp(0, 1000));
            if left == 0 {
                return Ok(None);
            }
            let batch = self.after(cur.next_seq - 1, left).await?;
            if batch.is_empty() {
                return Ok(None);
            }
            for r in batch {
                if until.is_some_and(|u| r.seq > u) {
                    return Ok(None);
                }
                if let Some(p) = self.check(cur, &r) {
                    return Ok(Some(p));
                }
                if let Some((head, what)) = marks.get(&r.seq)
                    && !same(head, &r.hash)
                {
                    return Ok(Some(problem(
                        r.seq,
                        format!(
                            "record {} does not match {what}: the log was rewritten",
                            r.seq
                        ),
                    )));
                }
                cur.keyed |= r.key_id.is_some();
                if r.key_id.is_none() {
                    cur.legacy += 1;
                }
                cur.prev = r.hash;
                cur.next_seq += 1;
                cur.count += 1;
            }
        }
    }

    /// Walks the whole chain: every record's hash must recompute, link to its
    /// predecessor, and sequence numbers must have no gap.
    pub async fn verify(&self) -> Result<VerifyReport, sqlx::Error> {
        self.verify_with(&[]).await
    }

    /// [`Audit::verify`], and the log must agree with each exported
    /// checkpoint: each must be signed by the audit key, its record must
    /// exist with the checkpoint's head hash, and the log may not start
    /// before the first record it counted. So a rewrite, and the removal of
    /// records up to the newest checkpoint, are detected.
    pub async fn verify_with(
        &self,
        checkpoints: &[Checkpoint],
    ) -> Result<VerifyReport, sqlx::Error> {
        Ok(self.examine(checkpoints).await?.0)
    }

    /// The report, and the head as walked.
    pub(crate) async fn examine(
        &self,
        checkpoints: &[Checkpoint],
    ) -> Result<(VerifyReport, Head), sqlx::Error> {
        let mut report = VerifyReport {
            ok: true,
            records: 0,
            last_seq: 0,
            problem: None,
            problem_seq: None,
            first_seq: 1,
            legacy_records: 0,
            keyed: self.keys.is_some(),
            checkpoints_checked: 0,
            checkpoint_seq: None,
            notes: Vec::new(),
        };
        let fail = |mut report: VerifyReport, cur: &Cursor, p: Problem| -> (VerifyReport, Head) {
            report.ok = false;
            report.records = cur.count;
            report.legacy_records = cur.legacy;
            report.last_seq = cur.next_seq - 1;
            report.problem = Some(p.message);
            report.problem_seq = Some(p.seq);
            let head = Head {
                seq: cur.next_seq - 1,
                hash: cur.prev.clone(),
                count: cur.count,
            };
            (report, head)
        };
        let mut cur = match self.start().await? {
            Ok(c) => c,
            Err(p) => {
                let c = Cursor::at(p.seq, GENESIS.to_owned(), false);
                return Ok(fail(report, &c, p));
            }
        };
        report.first_seq = cur.next_seq;
        let mut marks = BTreeMap::new();
        for cp in checkpoints {
            let what = format!(
                "the exported checkpoint of record {} (made at {})",
                cp.seq,
                rfc3339(cp.at_ms)
            );
            let signed = match &self.keys {
                None => Err("this broker has no audit.key_file to check it".to_owned()),
                Some(k) => k.verify_checkpoint(cp),
            };
            if let Err(e) = signed {
                return Ok(fail(
                    report,
                    &cur,
                    problem(cp.seq, format!("{what} is not valid: {e}")),
                ));
            }
            let counted_from = cp.seq - cp.count + 1;
            if cur.next_seq < counted_from {
                return Ok(fail(
                    report,
                    &cur,
                    problem(
                        cur.next_seq,
                        format!(
                            "the log starts at record {}, but {what} counted records from {counted_from}: records were added before them",
                            cur.next_seq
                        ),
                    ),
                ));
            }
            if cp.seq < cur.next_seq - 1 {
                report.notes.push(format!(
                    "{what} is older than the kept log (it starts at record {}): not compared",
                    cur.next_seq
                ));
                continue;
            }
            if cp.seq == cur.next_seq - 1 {
                // The anchor links to it.
                if !same(&cp.head, &cur.prev) {
                    return Ok(fail(
                        report,
                        &cur,
                        problem(
                            cp.seq,
                            format!(
                                "record {} (the chain's anchor) does not match {what}: the log was rewritten",
                                cp.seq
                            ),
                        ),
                    ));
                }
            } else {
                marks.insert(cp.seq, (cp.head.clone(), what));
            }
            report.checkpoints_checked += 1;
            report.checkpoint_seq = report.checkpoint_seq.max(Some(cp.seq));
        }
        if let Some(p) = self.walk(&mut cur, None, &marks).await? {
            return Ok(fail(report, &cur, p));
        }
        let last = cur.next_seq - 1;
        if let Some((seq, (_, what))) = marks.range(cur.next_seq..).next_back() {
            let removed = if last + 1 == *seq {
                format!("record {seq} was removed")
            } else {
                format!("records {} to {seq} were removed", last + 1)
            };
            let p = problem(
                last + 1,
                format!("the log ends at record {last}, but {what} covers record {seq}: {removed}"),
            );
            return Ok(fail(report, &cur, p));
        }
        report.records = cur.count;
        report.legacy_records = cur.legacy;
        report.last_seq = last;
        let head = Head {
            seq: last,
            hash: cur.prev,
            count: cur.count,
        };
        Ok((report, head))
    }

    /// Checks the whole chain; returns its head, or the first problem.
    pub(crate) async fn check_all(&self) -> Result<Result<Head, Problem>, sqlx::Error> {
        let (report, head) = self.examine(&[]).await?;
        Ok(if report.ok {
            Ok(head)
        } else {
            Err(problem(
                report.problem_seq.unwrap_or(report.last_seq + 1),
                report.problem.unwrap_or_default(),
            ))
        })
    }

    /// Checks the chain from record `seq`, which must still have the hash
    /// `head` (the last checkpoint exported), to its end; returns the new
    /// head. Only what was added since is walked.
    pub(crate) async fn extend_from(
        &self,
        seq: i64,
        head: &str,
    ) -> Result<Result<Head, Problem>, sqlx::Error> {
        let anchor = self.anchor().await?;
        let first = anchor.as_ref().map_or(1, |a| a.seq);
        let at: Option<(String, Option<String>)> = on_db!(&self.db, pool => sqlx::query_as("SELECT hash, key_id FROM audit WHERE seq = $1")
            .bind(seq)
            .fetch_optional(pool)
            .await)?;
        let (hash, keyed) = match (at, anchor) {
            (Some((h, k)), _) => (h, k.is_some()),
            // Pruned just now: the anchor links to it.
            (None, Some(a)) if a.seq == seq + 1 => (a.prev_hash, false),
            // Pruned past it (by another replica, whose checkpoint was
            // newer): the whole kept chain is checked from its anchor.
            (None, Some(a)) if a.seq > seq + 1 => return self.check_all().await,
            (None, _) => {
                return Ok(Err(problem(
                    seq,
                    format!(
                        "record {seq}, the head of the last exported checkpoint, is gone: the log was truncated"
                    ),
                )));
            }
        };
        if !same(&hash, head) {
            return Ok(Err(problem(
                seq,
                format!(
                    "record {seq} no longer matches the last exported checkpoint: the log was rewritten"
                ),
            )));
        }
        let mut cur = Cursor::at(seq + 1, hash, keyed);
        if let Some(p) = self.walk(&mut cur, None, &BTreeMap::new()).await? {
            return Ok(Err(p));
        }
        let last = cur.next_seq - 1;
        Ok(Ok(Head {
            seq: last,
            hash: cur.prev,
            count: last - first + 1,
        }))
    }
}

/// Unix milliseconds as RFC 3339, for messages.
fn rfc3339(at_ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(at_ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| at_ms.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::Db;
    use crate::state::audit::{Entry, now_ms, sha256_chain_hash};
    use crate::state::audit_key::AuditKeys;
    use crate::state::audit_key::tests::keys_in;
    use crate::state::audit_key::{CHECKPOINT_KIND, generate_key_file};
    use serde_json::json;
    use std::sync::Arc;

    fn pool(db: &Db) -> &sqlx::SqlitePool {
        match db {
            Db::Sqlite(p) => p,
            Db::Postgres(_) => unreachable!(),
        }
    }

    fn entries(n: usize) -> Vec<Entry> {
        (0..n)
            .map(|i| Entry::new("payments/api", "fetch", "ok", json!({ "n": i })))
            .collect()
    }

    /// An audit log on a fresh SQLite database, chained with key `a1`.
    async fn keyed(dir: &std::path::Path) -> (Db, Audit) {
        let db = Db::sqlite_in(dir).await;
        let keys = Arc::new(keys_in(dir, "a1"));
        let audit = Audit::keyed(db.clone(), Some(keys), Arc::default());
        (db, audit)
    }

    /// What a script with write access to the database and without the
    /// key does: delete record `seq`, renumber the ones after it, and
    /// chain every record from there again with SHA-256. With `unkeyed`,
    /// it also marks the rewritten records as written without a key.
    async fn delete_and_rechain(db: &Db, seq: i64, unkeyed: bool) {
        let p = pool(db);
        sqlx::query("DELETE FROM audit WHERE seq = $1")
            .bind(seq)
            .execute(p)
            .await
            .unwrap();
        sqlx::query("UPDATE audit SET seq = seq - 1 WHERE seq > $1")
            .bind(seq)
            .execute(p)
            .await
            .unwrap();
        if unkeyed {
            sqlx::query("UPDATE audit SET key_id = NULL WHERE seq >= $1")
                .bind(seq)
                .execute(p)
                .await
                .unwrap();
        }
        rechain_sha256(db, seq).await;
    }

    /// Chains records from `from` on again with SHA-256, as the attacker can.
    async fn rechain_sha256(db: &Db, from: i64) {
        let p = pool(db);
        let rows: Vec<(i64, i64, String, String, String, String, String)> = sqlx::query_as(
            "SELECT seq, at_ms, actor, action, result, detail, prev_hash FROM audit WHERE seq >= $1 ORDER BY seq",
        )
        .bind(from)
        .fetch_all(p)
        .await
        .unwrap();
        let mut prev: Option<String> = sqlx::query_scalar("SELECT hash FROM audit WHERE seq = $1")
            .bind(from - 1)
            .fetch_optional(p)
            .await
            .unwrap();
        for (seq, at_ms, actor, action, result, detail, old_prev) in rows {
            let prev_hash = prev.take().unwrap_or(old_prev);
            let hash = sha256_chain_hash(&prev_hash, seq, at_ms, &actor, &action, &result, &detail);
            sqlx::query("UPDATE audit SET prev_hash = $1, hash = $2 WHERE seq = $3")
                .bind(&prev_hash)
                .bind(&hash)
                .bind(seq)
                .execute(p)
                .await
                .unwrap();
            prev = Some(hash);
        }
    }

    /// A checkpoint of the log as it is now, signed with the log's key.
    async fn checkpoint_now(audit: &Audit) -> Checkpoint {
        let (report, head) = audit.examine(&[]).await.unwrap();
        assert!(report.ok, "{report:?}");
        let mut cp = Checkpoint {
            kind: CHECKPOINT_KIND.into(),
            seq: head.seq,
            count: head.count,
            head: head.hash,
            at_ms: now_ms(),
            key_id: String::new(),
            run: "test".into(),
            sig: String::new(),
        };
        audit.keys().unwrap().sign_checkpoint(&mut cp);
        cp
    }

    #[tokio::test]
    async fn chain_detects_alteration_and_removal() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::sqlite_in(dir.path()).await;
        let audit = Audit::new(db.clone());
        let entries = entries(5);
        audit.append(&entries[..2]).await.unwrap();
        audit.append(&entries[2..]).await.unwrap();
        let report = audit.verify().await.unwrap();
        assert!(report.ok && report.records == 5, "{report:?}");
        assert_eq!(report.legacy_records, 5);
        assert_eq!(
            audit
                .tail(2)
                .await
                .unwrap()
                .iter()
                .map(|r| r.seq)
                .collect::<Vec<_>>(),
            vec![4, 5]
        );

        let pool = pool(&db);
        sqlx::query("UPDATE audit SET result = 'refused' WHERE seq = 3")
            .execute(pool)
            .await
            .unwrap();
        let report = audit.verify().await.unwrap();
        assert_eq!(
            report.problem.as_deref(),
            Some("record 3 was altered (its hash does not match its content)")
        );
        assert_eq!(report.problem_seq, Some(3));
        sqlx::query("UPDATE audit SET result = 'ok' WHERE seq = 3")
            .execute(pool)
            .await
            .unwrap();
        assert!(audit.verify().await.unwrap().ok);
        sqlx::query("DELETE FROM audit WHERE seq = 2")
            .execute(pool)
            .await
            .unwrap();
        let report = audit.verify().await.unwrap();
        assert_eq!(
            report.problem.as_deref(),
            Some("record 2 is missing (next is 3)")
        );
    }

    /// The script: without the key, a SHA-256 chain recomputed over
    /// a deleted or rewritten record passed `audit verify`. With the key it
    /// cannot.
    #[tokio::test]
    async fn the_keyed_chain_detects_a_rewrite_by_a_database_writer_without_the_key() {
        for unkeyed in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let (db, audit) = keyed(dir.path()).await;
            audit.append(&entries(3)).await.unwrap();
            audit.append(&entries(3)).await.unwrap();
            let report = audit.verify().await.unwrap();
            assert!(report.ok && report.records == 6, "{report:?}");
            assert_eq!((report.legacy_records, report.keyed), (0, true));
            let tail = audit.tail(6).await.unwrap();
            assert!(tail.iter().all(|r| r.key_id.as_deref() == Some("a1")));
            // The stored hash is not the SHA-256 anyone could compute.
            let r = &tail[0];
            assert_ne!(
                r.hash,
                sha256_chain_hash(
                    &r.prev_hash,
                    r.seq,
                    r.at_ms,
                    &r.actor,
                    &r.action,
                    &r.result,
                    &r.detail
                )
            );

            delete_and_rechain(&db, 3, unkeyed).await;
            let report = audit.verify().await.unwrap();
            assert!(!report.ok);
            assert_eq!(report.problem_seq, Some(3), "{report:?}");
            let want = if unkeyed {
                "record 3 is chained without the audit key after keyed records"
            } else {
                "record 3 was altered"
            };
            assert!(
                report.problem.as_deref().unwrap().starts_with(want),
                "{report:?}"
            );
        }

        // Rewriting one record's content and re-chaining the rest.
        let dir = tempfile::tempdir().unwrap();
        let (db, audit) = keyed(dir.path()).await;
        audit.append(&entries(4)).await.unwrap();
        sqlx::query("UPDATE audit SET result = 'refused' WHERE seq = 2")
            .execute(pool(&db))
            .await
            .unwrap();
        rechain_sha256(&db, 2).await;
        let report = audit.verify().await.unwrap();
        assert_eq!(report.problem_seq, Some(2), "{report:?}");
    }

    /// A writer who rewrites every record as an unkeyed one leaves a chain
    /// that verifies on its own (reported as not tamper-evident), but not
    /// against a checkpoint; removing the tail is caught by one too.
    #[tokio::test]
    async fn checkpoints_catch_a_whole_rewrite_and_a_removed_tail() {
        let dir = tempfile::tempdir().unwrap();
        let (db, audit) = keyed(dir.path()).await;
        audit.append(&entries(5)).await.unwrap();
        let cp = checkpoint_now(&audit).await;
        assert_eq!((cp.seq, cp.count), (5, 5));
        let report = audit.verify_with(std::slice::from_ref(&cp)).await.unwrap();
        assert!(report.ok, "{report:?}");
        assert_eq!(
            (report.checkpoints_checked, report.checkpoint_seq),
            (1, Some(5))
        );

        // The tail removed.
        sqlx::query("DELETE FROM audit WHERE seq >= 4")
            .execute(pool(&db))
            .await
            .unwrap();
        assert!(
            audit.verify().await.unwrap().ok,
            "the chain alone cannot tell"
        );
        let report = audit.verify_with(std::slice::from_ref(&cp)).await.unwrap();
        assert!(!report.ok);
        assert_eq!(report.problem_seq, Some(4));
        let p = report.problem.unwrap();
        assert!(
            p.starts_with("the log ends at record 3, but the exported checkpoint of record 5")
                && p.ends_with("records 4 to 5 were removed"),
            "{p}"
        );
        // New records appended after the cut: record 5 differs.
        audit.append(&entries(3)).await.unwrap();
        let report = audit.verify_with(std::slice::from_ref(&cp)).await.unwrap();
        assert_eq!(report.problem_seq, Some(5), "{report:?}");
        assert!(
            report
                .problem
                .unwrap()
                .contains("does not match the exported checkpoint")
        );

        // Everything rewritten as unkeyed records.
        let dir = tempfile::tempdir().unwrap();
        let (db, audit) = keyed(dir.path()).await;
        audit.append(&entries(5)).await.unwrap();
        let cp = checkpoint_now(&audit).await;
        sqlx::query("UPDATE audit SET key_id = NULL, result = 'refused' WHERE seq = 2")
            .execute(pool(&db))
            .await
            .unwrap();
        sqlx::query("UPDATE audit SET key_id = NULL")
            .execute(pool(&db))
            .await
            .unwrap();
        rechain_sha256(&db, 1).await;
        let report = audit.verify().await.unwrap();
        assert!(report.ok && report.legacy_records == 5, "{report:?}");
        let report = audit.verify_with(std::slice::from_ref(&cp)).await.unwrap();
        assert_eq!(report.problem_seq, Some(5), "{report:?}");

        // A forged or altered checkpoint is refused, naming it.
        let forged = Checkpoint {
            seq: 3,
            ..cp.clone()
        };
        let report = audit.verify_with(&[forged]).await.unwrap();
        assert!(
            report
                .problem
                .as_deref()
                .unwrap()
                .contains("is not valid: its signature does not verify"),
            "{report:?}"
        );
        // Without the key, a checkpoint cannot be checked at all.
        let report = Audit::new(db.clone()).verify_with(&[cp]).await.unwrap();
        assert!(
            report
                .problem
                .as_deref()
                .unwrap()
                .contains("no audit.key_file"),
            "{report:?}"
        );
    }

    /// Records written before the key keep their SHA-256 chain, and the
    /// keyed chain continues it; a log keyed once cannot go back.
    #[tokio::test]
    async fn legacy_records_still_verify_and_the_keyed_chain_continues_them() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::sqlite_in(dir.path()).await;
        let legacy = Audit::new(db.clone());
        legacy.append(&entries(3)).await.unwrap();
        let (_, audit) = keyed(dir.path()).await;
        let audit = Audit::keyed(db.clone(), audit.keys().cloned(), Arc::default());
        audit.append(&entries(2)).await.unwrap();
        let report = audit.verify().await.unwrap();
        assert!(report.ok && report.records == 5, "{report:?}");
        assert_eq!(report.legacy_records, 3);
        let tail = audit.tail(5).await.unwrap();
        assert_eq!(tail[2].key_id, None);
        assert_eq!(tail[3].key_id.as_deref(), Some("a1"));
        assert_eq!(tail[3].prev_hash, tail[2].hash);

        // A broker without the key cannot vouch for keyed records.
        let report = legacy.verify().await.unwrap();
        assert_eq!(report.problem_seq, Some(4));
        assert!(report.problem.unwrap().contains("no audit.key_file"));
        // An unkeyed record after keyed ones (the key file dropped from the
        // config, or a forger) is refused.
        legacy.append(&entries(1)).await.unwrap();
        let report = audit.verify().await.unwrap();
        assert_eq!(report.problem_seq, Some(6), "{report:?}");

        // A key added on top (rotation): old records verify with the old line.
        let dir2 = tempfile::tempdir().unwrap();
        let db2 = Db::sqlite_in(dir2.path()).await;
        let old = dir2.path().join("old");
        generate_key_file(&old, "a1").unwrap();
        let a1 = Audit::keyed(
            db2.clone(),
            Some(Arc::new(AuditKeys::load(&old).unwrap())),
            Arc::default(),
        );
        a1.append(&entries(2)).await.unwrap();
        let new = dir2.path().join("new");
        generate_key_file(&new, "a2").unwrap();
        let both = dir2.path().join("both");
        std::fs::write(
            &both,
            std::fs::read_to_string(&new).unwrap() + &std::fs::read_to_string(&old).unwrap(),
        )
        .unwrap();
        let rotated = Audit::keyed(
            db2.clone(),
            Some(Arc::new(AuditKeys::load(&both).unwrap())),
            Arc::default(),
        );
        rotated.append(&entries(2)).await.unwrap();
        let report = rotated.verify().await.unwrap();
        assert!(report.ok && report.records == 4, "{report:?}");
        assert_eq!(
            rotated.tail(1).await.unwrap()[0].key_id.as_deref(),
            Some("a2")
        );
        // Without the old line, its records cannot be checked.
        let only_new = Audit::keyed(
            db2,
            Some(Arc::new(AuditKeys::load(&new).unwrap())),
            Arc::default(),
        );
        let report = only_new.verify().await.unwrap();
        assert!(
            report
                .problem
                .unwrap()
                .contains("audit key \"a1\", which is not in audit.key_file")
        );
    }
}
