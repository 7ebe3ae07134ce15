//! Overload protection. Beyond what the broker can serve well, a call is
//! refused at once with `RESOURCE_EXHAUSTED` (the sidecar backs off and
//! retries) instead of queueing until every caller times out:
//!
//! - a global bound on unary calls in flight (`server.max_in_flight`);
//! - a rate per workload (namespace + service account + pod), a GCRA token
//!   bucket (`server.rate_per_identity` per second, bursts of
//!   `server.burst_per_identity`), so one misbehaving pod cannot starve the
//!   others;
//! - a global rate over all workloads together (`server.rate_global` per
//!   second, bursts of `server.burst_global`; off unless set), so many
//!   workloads each within their own rate cannot together drive the replica
//!   past what it can serve. It is checked after the per-workload rate, so a
//!   noisy workload refused by its own bucket does not spend the others'
//!   share of the global one.
//!
//! Watch streams are long-lived and counted separately
//! (`server.max_watch_streams`).
//!
//! A request's headers are bounded by HTTP/2 ([`header_list_limit`]) well
//! above `identity.max_token_bytes`, so that an oversized token reaches the
//! size check and is answered `UNAUTHENTICATED: token is N bytes, larger
//! than the …-byte limit`, not refused by the transport without a word.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};

use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::identity::Identity;

/// Room for the request's headers other than the token (`:path`,
/// `content-type`, `user-agent`, `grpc-timeout`, `x-request-id`, HPACK's 32
/// octets of overhead per field…), a few hundred octets in practice.
const HEADER_HEADROOM: usize = 16 * 1024;
/// How far over `identity.max_token_bytes` a token may be and still be
/// answered by the size check: a token several times the default limit
/// (16 KiB) is a mistake to name, not a reason to drop the call unexplained.
const OVERSIZE_NAMED: usize = 96 * 1024;

/// SETTINGS_MAX_HEADER_LIST_SIZE of the gRPC port: the largest
/// `identity.max_token_bytes` of any issuer, plus [`OVERSIZE_NAMED`], plus
/// [`HEADER_HEADROOM`] (128 KiB with the default 16 KiB). Any token up to
/// 96 KiB over the limit is answered by the size check; a larger header
/// block `h2` refuses itself (HTTP 431, and a GOAWAY past about twice the
/// limit), as hyper's default of 16 KiB would have done to a token just
/// under the default `max_token_bytes`.
pub fn header_list_limit(max_token_bytes: usize) -> u32 {
    let bytes = max_token_bytes + OVERSIZE_NAMED + HEADER_HEADROOM;
    u32::try_from(bytes).unwrap_or(u32::MAX)
}

/// The limits of one broker replica.
pub struct Limits {
    in_flight: Arc<Semaphore>,
    max_in_flight: usize,
    streams: Arc<Semaphore>,
    max_streams: usize,
    per_identity: Option<(DefaultKeyedRateLimiter<String>, u32)>,
    global: Option<(DefaultDirectRateLimiter, u32)>,
    /// Watch streams open per workload (only workloads with one open).
    workload_streams: Arc<Mutex<HashMap<String, usize>>>,
    max_workload_streams: usize,
}

/// One workload's watch stream, counted until dropped.
pub struct WorkloadStream {
    open: Arc<Mutex<HashMap<String, usize>>>,
    key: String,
}

impl Drop for WorkloadStream {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// The unit of the per-workload limits: a pod of a service account.
fn workload_key(id: &Identity) -> String {
    format!(
        "{}/{}/{}/{}",
        id.cluster,
        id.namespace,
        id.service_account,
        id.pod_uid.as_deref().unwrap_or("")
    )
}

/// A GCRA rate: calls per second (0: no limit) and the burst allowed above it.
#[derive(Debug, Clone, Copy)]
pub struct Rate {
    pub per_second: u32,
    pub burst: u32,
}

impl Rate {
    /// The quota, or `None` when the rate is 0 (no limit). A burst below the
    /// rate is raised to it (config validation refuses that anyway).
    fn quota(self) -> Option<Quota> {
        let r = NonZeroU32::new(self.per_second)?;
        let burst = NonZeroU32::new(self.burst.max(self.per_second)).unwrap_or(r);
        Some(Quota::per_second(r).allow_burst(burst))
    }
}

/// Why a call was refused for load.
#[derive(Debug, thiserror::Error)]
pub enum Overloaded {
    #[error("the broker has {0} calls in flight, its limit; retry with backoff")]
    InFlight(usize),
    #[error("the broker has {0} watch streams open, its limit; retry with backoff")]
    Streams(usize),
    #[error("{identity} exceeds {rate} calls per second; retry with backoff")]
    Rate { identity: String, rate: u32 },
    #[error(
        "{identity} has {limit} watch streams open, its limit (server.max_watch_streams_per_workload); close one, or retry with backoff"
    )]
    WorkloadStreams { identity: String, limit: usize },
    /// All workloads together are over the replica's global rate: the
    /// replica is busy, not the caller misbehaving.
    #[error(
        "the broker is at its global limit of {0} calls per second (all workloads together); retry with backoff"
    )]
    GlobalRate(u32),
}

impl Overloaded {
    /// Which limit refused, a bounded label for the calls metric: an
    /// operator tells a runaway workload (`overloaded`, its own rate) from a
    /// replica at its global rate (`overloaded_global_rate`), which needs
    /// more replicas or a higher `server.rate_global`.
    pub fn class(&self) -> &'static str {
        match self {
            Overloaded::InFlight(_)
            | Overloaded::Streams(_)
            | Overloaded::Rate { .. }
            | Overloaded::WorkloadStreams { .. } => "overloaded",
            Overloaded::GlobalRate(_) => "overloaded_global_rate",
        }
    }
}

impl Limits {
    /// A rate of 0 disables that limit (per identity, or global).
    pub fn new(
        max_in_flight: usize,
        max_streams: usize,
        per_identity: Rate,
        global: Rate,
    ) -> Limits {
        Limits {
            in_flight: Arc::new(Semaphore::new(max_in_flight)),
            max_in_flight,
            streams: Arc::new(Semaphore::new(max_streams)),
            max_streams,
            per_identity: per_identity
                .quota()
                .map(|q| (RateLimiter::keyed(q), per_identity.per_second)),
            global: global
                .quota()
                .map(|q| (RateLimiter::direct(q), global.per_second)),
            workload_streams: Arc::default(),
            max_workload_streams: usize::MAX,
        }
    }

    /// At most `max` watch streams open per workload.
    pub fn with_workload_streams(mut self, max: usize) -> Limits {
        self.max_workload_streams = max;
        self
    }

    /// Admits one more watch stream of `id`'s workload; it counts until the
    /// returned guard is dropped.
    pub fn admit_workload_stream(&self, id: &Identity) -> Result<WorkloadStream, Overloaded> {
        let key = workload_key(id);
        let mut open = self
            .workload_streams
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let n = open.entry(key.clone()).or_insert(0);
        if *n >= self.max_workload_streams {
            return Err(Overloaded::WorkloadStreams {
                identity: format!("{}/{}", id.namespace, id.service_account),
                limit: self.max_workload_streams,
            });
        }
        *n += 1;
        Ok(WorkloadStream {
            open: self.workload_streams.clone(),
            key,
        })
    }

    /// Admits a unary call; the permit is held until the call ends.
    pub fn admit(&self) -> Result<OwnedSemaphorePermit, Overloaded> {
        self.in_flight
            .clone()
            .try_acquire_owned()
            .map_err(|_| Overloaded::InFlight(self.max_in_flight))
    }

    /// Admits a watch stream; the permit is held while it is open.
    pub fn admit_stream(&self) -> Result<OwnedSemaphorePermit, Overloaded> {
        self.streams
            .clone()
            .try_acquire_owned()
            .map_err(|_| Overloaded::Streams(self.max_streams))
    }

    /// Counts a call against the workload's rate, then against the global
    /// rate.
    pub fn check(&self, id: &Identity) -> Result<(), Overloaded> {
        self.check_identity(id)?;
        match &self.global {
            Some((limiter, rate)) => limiter.check().map_err(|_| Overloaded::GlobalRate(*rate)),
            None => Ok(()),
        }
    }

    fn check_identity(&self, id: &Identity) -> Result<(), Overloaded> {
        let Some((limiter, rate)) = &self.per_identity else {
            return Ok(());
        };
        limiter
            .check_key(&workload_key(id))
            .map_err(|_| Overloaded::Rate {
                identity: format!("{}/{}", id.namespace, id.service_account),
                rate: *rate,
            })
    }

    /// Forgets the buckets of workloads that have been quiet (bounded memory).
    pub fn forget_idle(&self) {
        if let Some((limiter, _)) = &self.per_identity {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OFF: Rate = Rate {
        per_second: 0,
        burst: 0,
    };

    fn rate(per_second: u32, burst: u32) -> Rate {
        Rate { per_second, burst }
    }

    #[test]
    fn in_flight_is_bounded_and_released() {
        let l = Limits::new(2, 1, OFF, OFF);
        let a = l.admit().unwrap();
        let _b = l.admit().unwrap();
        assert!(matches!(l.admit(), Err(Overloaded::InFlight(2))));
        drop(a);
        assert!(l.admit().is_ok());
        let _s = l.admit_stream().unwrap();
        assert!(l.admit_stream().is_err());
    }

    #[test]
    fn watch_streams_are_bounded_per_workload_and_given_back() {
        let l = Limits::new(10, 100, OFF, OFF).with_workload_streams(2);
        let pod = |uid: &str| {
            let mut id = Identity::for_test("team-a", "app");
            id.pod_uid = Some(uid.into());
            id
        };
        let a = l.admit_workload_stream(&pod("p1")).unwrap();
        let _b = l.admit_workload_stream(&pod("p1")).unwrap();
        let err = l
            .admit_workload_stream(&pod("p1"))
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("team-a/app has 2 watch streams open, its limit (server.max_watch_streams_per_workload)"),
            "{err}"
        );
        assert!(
            l.admit_workload_stream(&pod("p2")).is_ok(),
            "another pod has its own"
        );
        drop(a);
        assert!(l.admit_workload_stream(&pod("p1")).is_ok());
        assert!(l.workload_streams.lock().unwrap().len() <= 2);
    }

    #[test]
    fn rate_is_per_workload() {
        let l = Limits::new(10, 10, rate(2, 3), OFF);
        let noisy = Identity::for_test("payments", "api");
        let quiet = Identity::for_test("payments", "worker");
        let admitted = (0..10).filter(|_| l.check(&noisy).is_ok()).count();
        assert_eq!(admitted, 3, "the burst, then refused");
        let err = l.check(&noisy).unwrap_err().to_string();
        assert!(
            err.contains("payments/api exceeds 2 calls per second"),
            "{err}"
        );
        assert!(l.check(&quiet).is_ok(), "another workload is not affected");
        l.forget_idle();
    }

    #[test]
    fn global_rate_bounds_all_workloads_together() {
        let l = Limits::new(10, 10, rate(2, 2), rate(5, 5));
        let workloads: Vec<_> = (0..10)
            .map(|i| Identity::for_test("payments", &format!("api-{i}")))
            .collect();
        // Each workload is within its own rate, yet only the global burst
        // is admitted; the rest are refused naming the global limit.
        let results: Vec<_> = workloads.iter().map(|id| l.check(id)).collect();
        assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 5);
        for e in results.into_iter().filter_map(Result::err) {
            assert!(matches!(e, Overloaded::GlobalRate(5)), "{e:?}");
            assert_eq!(e.class(), "overloaded_global_rate");
            let msg = e.to_string();
            assert!(msg.contains("global limit of 5 calls per second"), "{msg}");
            assert!(!msg.contains("payments"), "not blamed on a workload: {msg}");
        }
    }

    #[test]
    fn a_workload_over_its_own_rate_does_not_spend_the_global_rate() {
        let l = Limits::new(10, 10, rate(2, 2), rate(3, 3));
        let noisy = Identity::for_test("payments", "api");
        let refusals: Vec<_> = (0..20).filter_map(|_| l.check(&noisy).err()).collect();
        assert_eq!(refusals.len(), 18, "its own burst, then refused");
        assert!(
            refusals
                .iter()
                .all(|e| matches!(e, Overloaded::Rate { .. }) && e.class() == "overloaded"),
            "{refusals:?}"
        );
        // The global bucket spent only the 2 admitted calls: one is left.
        assert!(l.check(&Identity::for_test("payments", "worker")).is_ok());
        assert!(matches!(
            l.check(&Identity::for_test("payments", "cron")),
            Err(Overloaded::GlobalRate(3))
        ));
    }

    #[test]
    fn headers_leave_room_for_any_token_the_size_check_names() {
        assert_eq!(header_list_limit(16 * 1024), 128 * 1024);
        assert_eq!(header_list_limit(256), 256 + 112 * 1024);
        // The largest setting the config allows (1 MiB).
        assert_eq!(header_list_limit(1 << 20), (1 << 20) + 112 * 1024);
    }

    #[test]
    fn a_global_rate_of_zero_is_no_limit() {
        let l = Limits::new(10, 10, OFF, OFF);
        let id = Identity::for_test("payments", "api");
        assert!((0..10_000).all(|_| l.check(&id).is_ok()));
    }
}
