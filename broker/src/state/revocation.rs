//! Revocation: rules in the shared database, and the in-memory view that
//! every call is checked against.
//!
//! A rule's selectors combine with AND: a namespace (optionally one service
//! account in it), a pod UID, a secret, a lease (which pins the lease's pod
//! and secret). A rule without a secret cuts the workload off entirely
//! (logins included); a rule with one withholds just that secret.
//!
//! The view is re-read every `refresh_interval`, and at once when a
//! PostgreSQL `NOTIFY` says a rule changed (any replica). A replica whose
//! view is older than `max_staleness` refuses new issuance: it fails closed,
//! while leases already issued simply run out.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sqlx::Row;
use tokio::sync::broadcast;
use tracing::{info, warn};

use crate::clock::unix_now;
use crate::db::{Db, on_db};
use crate::identity::Identity;

/// The PostgreSQL channel replicas use to tell each other a rule changed.
pub const NOTIFY_CHANNEL: &str = "secrets_broker_revocations";

/// One revocation rule.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Rule {
    pub id: String,
    /// Limits the rule to identities of one cluster; `None`: every cluster.
    #[serde(default)]
    pub cluster: Option<String>,
    pub namespace: Option<String>,
    pub service_account: Option<String>,
    pub pod_uid: Option<String>,
    pub lease_id: Option<String>,
    pub secret: Option<String>,
    pub reason: String,
    pub created_by: String,
    pub created_at: i64,
    /// When the rule lapses by itself; `None` for never.
    pub expires_at: Option<i64>,
}

/// What an operator asks to revoke.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NewRule {
    pub cluster: Option<String>,
    pub namespace: Option<String>,
    pub service_account: Option<String>,
    pub pod_uid: Option<String>,
    pub lease_id: Option<String>,
    pub secret: Option<String>,
    pub reason: String,
    /// Seconds after which the rule lapses; absent for a permanent rule.
    pub for_seconds: Option<u64>,
}

/// Why a rule cannot be created.
#[derive(Debug, thiserror::Error)]
pub enum RuleError {
    #[error("{0}")]
    Invalid(String),
    #[error("lease {0:?} does not exist")]
    UnknownLease(String),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

impl Rule {
    fn covers_identity(&self, id: &Identity) -> bool {
        self.cluster.as_ref().is_none_or(|c| *c == id.cluster)
            && self.namespace.as_ref().is_none_or(|n| *n == id.namespace)
            && self
                .service_account
                .as_ref()
                .is_none_or(|s| *s == id.service_account)
            && self
                .pod_uid
                .as_ref()
                .is_none_or(|u| Some(u) == id.pod_uid.as_ref())
    }

    /// Whether the rule is in force at `now`.
    pub fn active(&self, now: i64) -> bool {
        self.expires_at.is_none_or(|e| e > now)
    }

    /// The secrets among `names` this rule takes away from `id`: all of them
    /// for a rule without a secret, else the one it names.
    pub fn affected<'a>(&self, id: &Identity, names: &'a [String]) -> Vec<&'a str> {
        if !self.covers_identity(id) {
            return Vec::new();
        }
        names
            .iter()
            .filter(|n| self.secret.as_ref().is_none_or(|s| s == *n))
            .map(String::as_str)
            .collect()
    }

    fn refusal(&self) -> Revoked {
        Revoked {
            rule_id: self.id.clone(),
            reason: self.reason.clone(),
        }
    }

    /// Whether the rule cuts `id` off entirely.
    pub fn blocks_identity(&self, id: &Identity) -> bool {
        self.secret.is_none() && self.covers_identity(id)
    }
}

/// A refusal because of a rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("revoked (rule id {rule_id}, reason {reason:?})")]
pub struct Revoked {
    pub rule_id: String,
    pub reason: String,
}

/// The view cannot be trusted: the database has not been read recently enough.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "revocation view is stale (last read {age:?} ago, bound {bound:?}): refusing to issue until the database is reachable"
)]
pub struct Stale {
    pub age: Duration,
    pub bound: Duration,
}

/// Revocation rules in the shared database.
#[derive(Clone, Debug)]
pub struct Revocations {
    db: Db,
}

const RULE_COLUMNS: &str = "id, namespace, service_account, pod_uid, lease_id, secret, reason, created_by, created_at, expires_at, cluster";

impl Revocations {
    pub fn new(db: Db) -> Revocations {
        Revocations { db }
    }

    /// Validates and stores a rule; a lease rule is pinned to the lease's pod
    /// and secret. Tells the other replicas.
    pub async fn create(
        &self,
        new: NewRule,
        created_by: &str,
        leases: &super::Leases,
    ) -> Result<Rule, RuleError> {
        let clean = |v: Option<String>| v.map(|s| s.trim().to_owned()).filter(|s| !s.is_empty());
        let mut rule = Rule {
            id: random_id(),
            cluster: clean(new.cluster),
            namespace: clean(new.namespace),
            service_account: clean(new.service_account),
            pod_uid: clean(new.pod_uid),
            lease_id: clean(new.lease_id),
            secret: clean(new.secret),
            reason: new.reason.trim().to_owned(),
            created_by: created_by.to_owned(),
            created_at: unix_now(),
            expires_at: new
                .for_seconds
                .map(|s| unix_now().saturating_add(s.min(10 * 365 * 86400) as i64)),
        };
        if rule.reason.is_empty() || rule.reason.len() > 500 {
            return Err(RuleError::Invalid(
                "give a reason (1-500 characters)".into(),
            ));
        }
        // A newline in the reason would forge a line in the broker's and the
        // sidecars' logs, which quote the reason.
        if rule.reason.chars().any(char::is_control) {
            return Err(RuleError::Invalid(
                "the reason contains a control character (newline, tab, escape): give one line of plain text".into(),
            ));
        }
        if rule.service_account.is_some() && rule.namespace.is_none() {
            return Err(RuleError::Invalid(
                "a service account needs its namespace".into(),
            ));
        }
        for v in [
            &rule.cluster,
            &rule.namespace,
            &rule.service_account,
            &rule.pod_uid,
            &rule.lease_id,
            &rule.secret,
        ]
        .into_iter()
        .flatten()
        {
            if v.len() > 253 || v.chars().any(char::is_control) {
                return Err(RuleError::Invalid(format!(
                    "selector {v:?} is not a valid name"
                )));
            }
        }
        if let Some(lease_id) = &rule.lease_id {
            let lease = leases
                .get(lease_id)
                .await?
                .ok_or_else(|| RuleError::UnknownLease(lease_id.clone()))?;
            rule.cluster = lease.cluster;
            rule.namespace = Some(lease.namespace);
            rule.service_account = Some(lease.service_account);
            rule.pod_uid = lease.pod_uid;
            rule.secret = Some(lease.secret);
        }
        if rule.namespace.is_none() && rule.pod_uid.is_none() && rule.secret.is_none() {
            return Err(RuleError::Invalid(
                "name what to revoke: a namespace (and service account), a pod UID, a lease or a secret".into(),
            ));
        }
        let sql = format!(
            "INSERT INTO revocations ({RULE_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
        );
        on_db!(&self.db, pool => sqlx::query(sqlx::AssertSqlSafe(sql.as_str()))
            .bind(&rule.id)
            .bind(&rule.namespace)
            .bind(&rule.service_account)
            .bind(&rule.pod_uid)
            .bind(&rule.lease_id)
            .bind(&rule.secret)
            .bind(&rule.reason)
            .bind(&rule.created_by)
            .bind(rule.created_at)
            .bind(rule.expires_at)
            .bind(&rule.cluster)
            .execute(pool)
            .await
            .map(|_| ()))?;
        self.notify().await;
        Ok(rule)
    }

    /// Deletes a rule; returns false when it did not exist.
    pub async fn delete(&self, id: &str) -> Result<bool, sqlx::Error> {
        let n = on_db!(&self.db, pool => sqlx::query("DELETE FROM revocations WHERE id = $1").bind(id).execute(pool).await.map(|r| r.rows_affected()))?;
        self.notify().await;
        Ok(n > 0)
    }

    /// Every rule still in force.
    pub async fn list(&self) -> Result<Vec<Rule>, sqlx::Error> {
        let sql = format!(
            "SELECT {RULE_COLUMNS} FROM revocations WHERE expires_at IS NULL OR expires_at > $1 ORDER BY created_at, id"
        );
        on_db!(&self.db, pool => sqlx::query(sqlx::AssertSqlSafe(sql.as_str())).bind(unix_now()).fetch_all(pool).await.map(|rows| {
            rows.iter()
                .map(|r| Rule {
                    id: r.get("id"),
                    cluster: r.get("cluster"),
                    namespace: r.get("namespace"),
                    service_account: r.get("service_account"),
                    pod_uid: r.get("pod_uid"),
                    lease_id: r.get("lease_id"),
                    secret: r.get("secret"),
                    reason: r.get("reason"),
                    created_by: r.get("created_by"),
                    created_at: r.get("created_at"),
                    expires_at: r.get("expires_at"),
                })
                .collect()
        }))
    }

    async fn notify(&self) {
        self.db.notify(NOTIFY_CHANNEL).await;
    }
}

fn random_id() -> String {
    let mut b = [0u8; 8];
    let _ = aws_lc_rs::rand::fill(&mut b);
    format!("rv-{}", hex::encode(b))
}

struct Snapshot {
    rules: Arc<Vec<Rule>>,
    read_at: Option<Instant>,
}

/// The in-memory view of the rules, shared by every call of a replica.
pub struct View {
    snapshot: RwLock<Snapshot>,
    max_staleness: Duration,
    /// New rules, for watch streams to push to sidecars.
    added: broadcast::Sender<Rule>,
    /// One read of the rules at a time, so that a read which began before a
    /// change cannot replace the view after a read which saw it.
    reading: tokio::sync::Mutex<()>,
}

impl View {
    pub fn new(max_staleness: Duration) -> View {
        View {
            snapshot: RwLock::new(Snapshot {
                rules: Arc::new(Vec::new()),
                read_at: None,
            }),
            max_staleness,
            added: broadcast::channel(1024).0,
            reading: tokio::sync::Mutex::new(()),
        }
    }

    /// Reads the rules from the database and replaces the view with them.
    /// The admin API calls this after a change, so that the replica which
    /// made it enforces it before the call returns.
    pub async fn refresh(&self, rules: &Revocations) -> Result<(), sqlx::Error> {
        let _one = self.reading.lock().await;
        self.replace(rules.list().await?);
        Ok(())
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Rule> {
        self.added.subscribe()
    }

    /// How old the view is; `None` before the first read.
    pub fn age(&self) -> Option<Duration> {
        self.snapshot
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .read_at
            .map(|t| t.elapsed())
    }

    pub fn rules(&self) -> Arc<Vec<Rule>> {
        self.snapshot
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .rules
            .clone()
    }

    /// Fails when the view is too old to trust for new issuance.
    pub fn ensure_fresh(&self) -> Result<(), Stale> {
        match self.age() {
            Some(age) if age <= self.max_staleness => Ok(()),
            age => Err(Stale {
                age: age.unwrap_or(Duration::MAX),
                bound: self.max_staleness,
            }),
        }
    }

    /// Refuses `id` when a rule cuts it off, or withholds one of `secrets`.
    pub fn check(&self, id: &Identity, secrets: &[String]) -> Result<(), Revoked> {
        let now = unix_now();
        for rule in self.rules().iter().filter(|r| r.active(now)) {
            if rule.blocks_identity(id) || !rule.affected(id, secrets).is_empty() {
                return Err(Revoked {
                    rule_id: rule.id.clone(),
                    reason: rule.reason.clone(),
                });
            }
        }
        Ok(())
    }

    /// Like [`View::check`] for a call that can serve part of what it asks
    /// for (Fetch, Watch): refuses `id` when a rule cuts it off entirely, or
    /// when rules with a secret withhold every one of `secrets`; a set of
    /// which some are withheld passes, and [`View::withheld`] names those.
    pub fn check_partial(&self, id: &Identity, secrets: &[String]) -> Result<(), Revoked> {
        let now = unix_now();
        let rules = self.rules();
        let active = || rules.iter().filter(|r| r.active(now));
        if let Some(rule) = active().find(|r| r.blocks_identity(id)) {
            return Err(rule.refusal());
        }
        let withheld = self.withheld(id, secrets);
        match withheld.first() {
            Some((_, first)) if secrets.iter().all(|n| withheld.iter().any(|(w, _)| w == n)) => {
                Err(first.clone())
            }
            _ => Ok(()),
        }
    }

    /// The names among `secrets` that rules with a secret withhold from
    /// `id`, each with the first rule that does.
    pub fn withheld<'a>(&self, id: &Identity, secrets: &'a [String]) -> Vec<(&'a str, Revoked)> {
        let now = unix_now();
        let rules = self.rules();
        let mut out: Vec<(&'a str, Revoked)> = Vec::new();
        for rule in rules.iter().filter(|r| r.active(now) && r.secret.is_some()) {
            for name in rule.affected(id, secrets) {
                if !out.iter().any(|(n, _)| *n == name) {
                    out.push((name, rule.refusal()));
                }
            }
        }
        out
    }

    /// Replaces the rules with a fresh read; announces the new ones.
    pub fn replace(&self, rules: Vec<Rule>) {
        let new: Vec<Rule> = {
            let mut snap = self.snapshot.write().unwrap_or_else(|e| e.into_inner());
            let known: HashSet<&str> = snap.rules.iter().map(|r| r.id.as_str()).collect();
            let new = rules
                .iter()
                .filter(|r| !known.contains(r.id.as_str()))
                .cloned()
                .collect();
            snap.rules = Arc::new(rules);
            snap.read_at = Some(Instant::now());
            new
        };
        for rule in new {
            info!(rule = %rule.id, reason = %rule.reason, "revocation rule in force");
            let _ = self.added.send(rule);
        }
    }
}

/// Keeps `view` fresh until `shutdown`: re-reads every `interval`, and at
/// once on a PostgreSQL notification (a change through any replica).
pub async fn keep_fresh(
    view: Arc<View>,
    rules: Revocations,
    db: Db,
    interval: Duration,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut notes = crate::db::Notifications::new(&db, NOTIFY_CHANNEL);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        notes.connect().await;
        if let Err(e) = view.refresh(&rules).await {
            warn!(error = %e, age = ?view.age(), "cannot read revocation rules");
        }
        tokio::select! {
            _ = tick.tick() => {}
            _ = notes.recv() => {}
            _ = crate::shutdown::until_true(&mut shutdown) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(ns: Option<&str>, sa: Option<&str>, pod: Option<&str>, secret: Option<&str>) -> Rule {
        Rule {
            id: "r1".into(),
            cluster: None,
            namespace: ns.map(Into::into),
            service_account: sa.map(Into::into),
            pod_uid: pod.map(Into::into),
            lease_id: None,
            secret: secret.map(Into::into),
            reason: "test".into(),
            created_by: "t".into(),
            created_at: 0,
            expires_at: None,
        }
    }

    #[test]
    fn selectors_combine_with_and() {
        let mut id = Identity::for_test("payments", "api");
        id.pod_uid = Some("pod-1".into());
        let names = vec!["payments/a".to_owned(), "payments/b".to_owned()];
        assert!(rule(Some("payments"), None, None, None).blocks_identity(&id));
        assert!(rule(Some("payments"), Some("api"), None, None).blocks_identity(&id));
        assert!(!rule(Some("payments"), Some("worker"), None, None).blocks_identity(&id));
        assert!(rule(None, None, Some("pod-1"), None).blocks_identity(&id));
        assert!(!rule(None, None, Some("pod-2"), None).blocks_identity(&id));
        let secret_rule = rule(None, None, None, Some("payments/b"));
        assert!(!secret_rule.blocks_identity(&id));
        assert_eq!(secret_rule.affected(&id, &names), vec!["payments/b"]);
        assert_eq!(
            rule(Some("payments"), None, None, None)
                .affected(&id, &names)
                .len(),
            2
        );
    }

    #[tokio::test]
    async fn a_refresh_after_a_change_puts_it_in_force_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::sqlite_in(dir.path()).await;
        let (rules, leases) = (Revocations::new(db.clone()), super::super::Leases::new(db));
        let view = View::new(Duration::from_secs(5));
        let mut announced = view.subscribe();
        let id = Identity::for_test("payments", "api");
        view.refresh(&rules).await.unwrap();
        assert!(view.check(&id, &[]).is_ok());
        let new = NewRule {
            namespace: Some("payments".into()),
            reason: "INC-1".into(),
            ..NewRule::default()
        };
        let rule = rules.create(new, "oncall", &leases).await.unwrap();
        view.refresh(&rules).await.unwrap();
        assert_eq!(view.check(&id, &[]).unwrap_err().rule_id, rule.id);
        assert_eq!(
            announced.try_recv().unwrap().id,
            rule.id,
            "watch streams hear of it"
        );
        assert!(rules.delete(&rule.id).await.unwrap());
        view.refresh(&rules).await.unwrap();
        assert!(view.check(&id, &[]).is_ok(), "lifted at once too");
    }

    #[tokio::test]
    async fn a_reason_with_control_characters_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::sqlite_in(dir.path()).await;
        let (rules, leases) = (Revocations::new(db.clone()), super::super::Leases::new(db));
        for reason in [
            "INC-1\n2026-12-08T00:00:00Z INFO forged line",
            "INC-1\rforged",
            "INC\u{1b}[2Jcleared",
            "a\tb",
        ] {
            let new = NewRule {
                namespace: Some("payments".into()),
                reason: reason.into(),
                ..NewRule::default()
            };
            let err = rules.create(new, "oncall", &leases).await.unwrap_err();
            assert!(
                err.to_string().contains("control character"),
                "{reason:?}: {err}"
            );
        }
        assert!(rules.list().await.unwrap().is_empty());
    }

    #[test]
    fn view_checks_and_fails_closed_when_stale() {
        let view = View::new(Duration::from_secs(5));
        let id = Identity::for_test("payments", "api");
        assert!(view.ensure_fresh().is_err(), "never read: not fresh");
        view.replace(vec![rule(Some("payments"), Some("api"), None, None)]);
        assert!(view.ensure_fresh().is_ok());
        let err = view.check(&id, &[]).unwrap_err();
        assert_eq!(err.to_string(), "revoked (rule id r1, reason \"test\")");
        assert!(
            view.check(&Identity::for_test("payments", "worker"), &[])
                .is_ok()
        );
        let mut lapsed = rule(Some("payments"), None, None, None);
        lapsed.expires_at = Some(1);
        view.replace(vec![lapsed]);
        assert!(view.check(&id, &[]).is_ok(), "a lapsed rule does not apply");
    }

    #[test]
    fn a_rule_with_a_secret_withholds_just_that_secret_from_a_partial_call() {
        let view = View::new(Duration::from_secs(5));
        let id = Identity::for_test("payments", "api");
        let names: Vec<String> = ["payments/a", "payments/s3", "payments/b"]
            .map(String::from)
            .into();
        view.replace(vec![rule(
            Some("payments"),
            None,
            None,
            Some("payments/s3"),
        )]);
        // A whole-set call (Renew) is refused; a partial one (Fetch) passes
        // and names what it leaves out.
        assert!(view.check(&id, &names).is_err());
        assert!(view.check_partial(&id, &names).is_ok());
        let withheld = view.withheld(&id, &names);
        assert_eq!(withheld.len(), 1);
        assert_eq!(withheld[0].0, "payments/s3");
        assert_eq!(withheld[0].1.rule_id, "r1");
        // Nothing left to serve: refused, as a whole-set call.
        let only = vec!["payments/s3".to_owned()];
        assert_eq!(
            view.check_partial(&id, &only).unwrap_err().to_string(),
            "revoked (rule id r1, reason \"test\")"
        );
        // Another namespace keeps it.
        let other = Identity::for_test("shop", "api");
        assert!(view.withheld(&other, &names).is_empty());
        // A rule without a secret still cuts the identity off entirely.
        view.replace(vec![rule(Some("payments"), Some("api"), None, None)]);
        assert!(view.check_partial(&id, &names).is_err());
        assert!(view.withheld(&id, &names).is_empty());
    }
}
