//! Overload protection. Beyond what the broker can serve well, a call is
//! refused at once with `RESOURCE_EXHAUSTED` (the sidecar backs off and
//! retries) instead of queueing until every caller times out:
//!
//! - a global bound on unary calls in flight (`server.max_in_flight`);
//! - a rate per workload (namespace + service account + pod), a GCRA token
//!   bucket (`server.rate_per_identity` per second, bursts of
//!   `server.burst_per_identity`), so one misbehaving pod cannot starve the
//!   others. Watch streams are long-lived and counted separately
//!   (`server.max_watch_streams`).

use std::num::NonZeroU32;
use std::sync::Arc;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::identity::Identity;

/// The limits of one broker replica.
pub struct Limits {
    in_flight: Arc<Semaphore>,
    max_in_flight: usize,
    streams: Arc<Semaphore>,
    max_streams: usize,
    per_identity: Option<(DefaultKeyedRateLimiter<String>, u32)>,
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
}

impl Limits {
    /// `rate` 0 disables the per-identity limit.
    pub fn new(max_in_flight: usize, max_streams: usize, rate: u32, burst: u32) -> Limits {
        let per_identity = NonZeroU32::new(rate).map(|r| {
            let burst = NonZeroU32::new(burst.max(rate)).unwrap_or(r);
            (
                RateLimiter::keyed(Quota::per_second(r).allow_burst(burst)),
                rate,
            )
        });
        Limits {
            in_flight: Arc::new(Semaphore::new(max_in_flight)),
            max_in_flight,
            streams: Arc::new(Semaphore::new(max_streams)),
            max_streams,
            per_identity,
        }
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

    /// Counts a call against the workload's rate.
    pub fn check(&self, id: &Identity) -> Result<(), Overloaded> {
        let Some((limiter, rate)) = &self.per_identity else {
            return Ok(());
        };
        let key = format!(
            "{}/{}/{}/{}",
            id.cluster,
            id.namespace,
            id.service_account,
            id.pod_uid.as_deref().unwrap_or("")
        );
        limiter.check_key(&key).map_err(|_| Overloaded::Rate {
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

    #[test]
    fn in_flight_is_bounded_and_released() {
        let l = Limits::new(2, 1, 0, 0);
        let a = l.admit().unwrap();
        let _b = l.admit().unwrap();
        assert!(matches!(l.admit(), Err(Overloaded::InFlight(2))));
        drop(a);
        assert!(l.admit().is_ok());
        let _s = l.admit_stream().unwrap();
        assert!(l.admit_stream().is_err());
    }

    #[test]
    fn rate_is_per_workload() {
        let l = Limits::new(10, 10, 2, 3);
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
}
