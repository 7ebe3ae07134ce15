//! The broker's Prometheus metrics: one [`Metrics`] per process, its
//! counters, gauges and histograms, and their label sets. Label values come
//! from small fixed sets: never a secret, a token, a pod UID or a secret
//! value.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::Arc;

/// Labels of the call counter: the gRPC method and a bounded result class.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    pub action: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabels {
    pub action: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    pub backend: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

/// Labels of the TLS reload counter: `grpc` or `admin`, and `ok` or `error`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TlsReloadLabels {
    pub listener: &'static str,
    pub result: &'static str,
}

/// Latency buckets from 0.5 ms to ~8 s.
fn latency() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 15))
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// The broker's metrics.
pub struct Metrics {
    pub registry: Registry,
    /// Calls by action and result class.
    pub calls: Family<CallLabels, Counter>,
    /// Call latency by action, from request to response.
    pub call_duration: HistogramFamily<ActionLabels>,
    /// Reads that reached a backend (cache misses), and their latency.
    pub backend_reads: Family<BackendLabels, Counter>,
    pub backend_read_duration: HistogramFamily<BackendLabels>,
    /// Secrets returned to callers; with `backend_reads`, the coalescing ratio.
    pub secrets_served: Counter,
    /// Cache lookups by hit/miss.
    pub cache_requests: Family<ResultLabels, Counter>,
    /// Watch streams open now.
    pub watch_streams: Gauge,
    /// Leases handed out.
    pub leases_issued: Counter,
    pub view_age: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub rules: Gauge,
    /// Upstream credentials (Vault leases, certificates) revoked because
    /// their pod lease ended.
    pub upstream_revocations: Counter,
    /// Secrets each source cannot serve now, by source (set at each scrape).
    pub unservable: Family<BackendLabels, Gauge>,
    /// TLS files read again after they changed, by listener and result
    /// (see `api::tls_reload`).
    pub tls_reloads: Family<TlsReloadLabels, Counter>,
    /// The audit log's dropped records and checkpoints (shared with the
    /// audit writer and the checkpoint exporter; `/readyz` reads it too).
    pub audit: Arc<crate::state::audit::AuditStatus>,
}

impl Metrics {
    /// Registers every metric; `jwks_refreshes` is owned by the key cache.
    pub fn new(jwks_refreshes: Family<ResultLabels, Counter>) -> Metrics {
        let mut registry = Registry::with_prefix("secrets_broker");
        let calls = Family::<CallLabels, Counter>::default();
        registry.register(
            "calls",
            "Broker gRPC calls by action and result class",
            calls.clone(),
        );
        let call_duration = HistogramFamily::<ActionLabels>::new_with_constructor(latency);
        registry.register(
            "call_duration_seconds",
            "Broker gRPC call latency by action",
            call_duration.clone(),
        );
        let backend_reads = Family::<BackendLabels, Counter>::default();
        registry.register(
            "backend_reads",
            "Secret reads that reached a backend",
            backend_reads.clone(),
        );
        let backend_read_duration = HistogramFamily::<BackendLabels>::new_with_constructor(latency);
        registry.register(
            "backend_read_duration_seconds",
            "Latency of secret reads from a backend",
            backend_read_duration.clone(),
        );
        let secrets_served = Counter::default();
        registry.register(
            "secrets_served",
            "Secrets returned to callers",
            secrets_served.clone(),
        );
        let cache_requests = Family::<ResultLabels, Counter>::default();
        registry.register(
            "cache_requests",
            "Secret cache lookups by result (hit, miss)",
            cache_requests.clone(),
        );
        registry.register(
            "jwks_refreshes",
            "Fetches of the issuer's signing keys by result",
            jwks_refreshes,
        );
        let watch_streams = Gauge::default();
        registry.register(
            "watch_streams",
            "Watch streams open now",
            watch_streams.clone(),
        );
        let leases_issued = Counter::default();
        registry.register("leases_issued", "Leases handed out", leases_issued.clone());
        let view_age = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "revocation_view_age_seconds",
            "Seconds since this replica last read the revocation rules (it fails closed above revocation.max_staleness)",
            view_age.clone(),
        );
        let rules = Gauge::default();
        registry.register(
            "revocation_rules",
            "Revocation rules in force",
            rules.clone(),
        );
        let upstream_revocations = Counter::default();
        registry.register(
            "upstream_revocations",
            "Upstream credentials (Vault leases, PKI certificates) revoked when their pod lease ended",
            upstream_revocations.clone(),
        );
        let unservable = Family::<BackendLabels, Gauge>::default();
        registry.register(
            "unservable_secrets",
            "Secrets this replica cannot serve now, by source (e.g. a Vault KV value with none young enough)",
            unservable.clone(),
        );
        let tls_reloads = Family::<TlsReloadLabels, Counter>::default();
        registry.register(
            "tls_reloads",
            "TLS certificates, keys and client CAs read again after their files changed, by listener and result",
            tls_reloads.clone(),
        );
        let audit = Arc::new(crate::state::audit::AuditStatus::default());
        registry.register(
            "audit_records_dropped",
            "Audit records dropped since start (the audit queue was full, or the database refused them until shutdown)",
            audit.dropped.clone(),
        );
        registry.register(
            "audit_checkpoints_written",
            "Signed audit checkpoints written to audit.checkpoint_file",
            audit.checkpoints_written.clone(),
        );
        registry.register(
            "audit_checkpoint_failures",
            "Audit checkpoints not written: the sink refused the write, or the log no longer matched the last checkpoint",
            audit.checkpoint_failures.clone(),
        );
        Metrics {
            audit,
            tls_reloads,
            upstream_revocations,
            unservable,
            registry,
            calls,
            call_duration,
            backend_reads,
            backend_read_duration,
            secrets_served,
            cache_requests,
            watch_streams,
            leases_issued,
            view_age,
            rules,
        }
    }

    /// Counts a finished call and its latency.
    pub fn call(&self, action: &'static str, result: &'static str, elapsed: std::time::Duration) {
        self.calls
            .get_or_create(&CallLabels { action, result })
            .inc();
        self.call_duration
            .get_or_create(&ActionLabels { action })
            .observe(elapsed.as_secs_f64());
    }
}
