//! When to renew and how long to wait after a failure.

use std::time::Duration;

/// Time until renewal of a lease of `ttl`: about two thirds of it, with ±10%
/// jitter so a fleet of sidecars started together does not renew together.
pub fn renew_after(ttl: Duration, jitter: f64) -> Duration {
    let jitter = jitter.clamp(0.0, 1.0);
    let base = ttl.as_secs_f64() * 2.0 / 3.0;
    Duration::from_secs_f64((base * (0.9 + 0.2 * jitter)).max(0.05))
}

/// Capped exponential backoff with full jitter between half and all of the
/// step (`retry_initial`, doubling, capped at `retry_max`).
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            initial,
            max,
            attempt: 0,
        }
    }

    /// The next delay, given a random `jitter` in [0, 1].
    pub fn next_delay(&mut self, jitter: f64) -> Duration {
        let step = self
            .initial
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        step.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renews_at_about_two_thirds() {
        let ttl = Duration::from_secs(300);
        for j in [0.0, 0.5, 1.0] {
            let d = renew_after(ttl, j).as_secs_f64();
            assert!((180.0..=220.0).contains(&d), "{d}");
        }
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let delays: Vec<Duration> = (0..10).map(|_| b.next_delay(1.0)).collect();
        assert_eq!(delays[0], Duration::from_millis(100));
        assert_eq!(delays[1], Duration::from_millis(200));
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(2)));
        assert_eq!(delays[9], Duration::from_secs(2));
        assert!(b.next_delay(0.0) >= Duration::from_secs(1));
        b.reset();
        assert_eq!(b.next_delay(1.0), Duration::from_millis(100));
    }

    proptest::proptest! {
        /// Delays stay within [step/2, step] and never exceed the cap; renewal
        /// always comes before the lease ends.
        #[test]
        fn backoff_and_renewal_bounds(initial_ms in 1u64..5_000, max_ms in 5_000u64..120_000, jitters in proptest::collection::vec(0.0f64..=1.0, 1..40), ttl_s in 1u64..100_000) {
            let max = Duration::from_millis(max_ms);
            let mut b = Backoff::new(Duration::from_millis(initial_ms), max);
            for j in jitters {
                let d = b.next_delay(j);
                proptest::prop_assert!(d <= max);
                proptest::prop_assert!(d >= Duration::from_millis(initial_ms) / 2);
                let ttl = Duration::from_secs(ttl_s);
                proptest::prop_assert!(renew_after(ttl, j) < ttl);
            }
        }
    }
}
