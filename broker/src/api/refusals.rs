//! Refused calls in the audit log, bounded per source.
//!
//! A call whose token is refused is refused before the per-workload rate can
//! apply (there is no workload yet), so a flood of garbage tokens from one
//! peer would write a permanent audit row each. Refusals are still counted
//! in the metrics, always; in the audit log each peer gets a few records a
//! second in full, and the rest are counted and written as one summary record
//! per peer, call and kind at every [`SUMMARY_INTERVAL`] ("N refusals of kind
//! K from peer P").

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::Duration;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

/// How often the counted refusals are written as summary records.
pub const SUMMARY_INTERVAL: Duration = Duration::from_secs(10);
/// Refusals a peer may have audited one by one: per second, and in a burst.
const PER_SECOND: u32 = 2;
const BURST: u32 = 10;
/// Distinct (peer, call, kind) counted between two summaries; past it, the
/// refusals of new keys go into one "other peers" count, so the table stays
/// bounded however many addresses a flood comes from.
const MAX_KEYS: usize = 10_000;

/// One summary: `count` refusals of `kind` on `action` from `peer`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub peer: String,
    pub action: &'static str,
    pub kind: &'static str,
    pub count: u64,
}

/// Decides which refusals are audited in full, and counts the others.
pub struct RefusalAudit {
    limiter: DefaultKeyedRateLimiter<IpAddr>,
    counted: Mutex<HashMap<(String, &'static str, &'static str), u64>>,
}

impl Default for RefusalAudit {
    fn default() -> Self {
        let quota = Quota::per_second(NonZeroU32::new(PER_SECOND).unwrap_or(NonZeroU32::MIN))
            .allow_burst(NonZeroU32::new(BURST).unwrap_or(NonZeroU32::MIN));
        RefusalAudit {
            limiter: RateLimiter::keyed(quota),
            counted: Mutex::default(),
        }
    }
}

impl RefusalAudit {
    /// True when this refusal from `peer` is to be audited in full; false
    /// when it is only counted for the next summary. A call without a peer
    /// address (a test transport) is always audited.
    pub fn admit(&self, peer: Option<IpAddr>, action: &'static str, kind: &'static str) -> bool {
        let Some(ip) = peer else { return true };
        if self.limiter.check_key(&ip).is_ok() {
            return true;
        }
        let mut counted = self.counted.lock().unwrap_or_else(|e| e.into_inner());
        let key = (ip.to_string(), action, kind);
        let key = if counted.len() < MAX_KEYS || counted.contains_key(&key) {
            key
        } else {
            ("other peers".to_owned(), action, kind)
        };
        *counted.entry(key).or_insert(0) += 1;
        false
    }

    /// The refusals counted since the last call, and forgets them (and the
    /// rate buckets of quiet peers).
    pub fn drain(&self) -> Vec<Summary> {
        self.limiter.retain_recent();
        let counted = std::mem::take(&mut *self.counted.lock().unwrap_or_else(|e| e.into_inner()));
        let mut out: Vec<Summary> = counted
            .into_iter()
            .map(|((peer, action, kind), count)| Summary {
                peer,
                action,
                kind,
                count,
            })
            .collect();
        out.sort_by(|a, b| (&a.peer, a.action, a.kind).cmp(&(&b.peer, b.action, b.kind)));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_from_one_peer_is_audited_a_few_times_and_summarized_once() {
        let r = RefusalAudit::default();
        let flood: IpAddr = "10.0.0.7".parse().unwrap();
        let other: IpAddr = "10.0.0.8".parse().unwrap();
        let full = (0..2000)
            .filter(|_| r.admit(Some(flood), "login", "token_invalid"))
            .count();
        assert!(full <= BURST as usize + 2, "{full} audited in full");
        assert!(
            r.admit(Some(other), "login", "token_invalid"),
            "another peer has its own"
        );
        assert!(r.admit(None, "login", "token_invalid"));
        let summaries = r.drain();
        assert_eq!(summaries.len(), 1);
        assert_eq!(summaries[0].peer, "10.0.0.7");
        assert_eq!(summaries[0].count as usize, 2000 - full);
        assert!(r.drain().is_empty(), "counted once");
    }

    #[test]
    fn the_table_of_counted_peers_is_bounded() {
        let r = RefusalAudit::default();
        for i in 0..(MAX_KEYS as u32 + 500) {
            let ip = IpAddr::from(i.to_be_bytes());
            for _ in 0..=BURST {
                r.admit(Some(ip), "login", "token_invalid");
            }
        }
        let summaries = r.drain();
        assert_eq!(summaries.len(), MAX_KEYS + 1);
        assert!(
            summaries
                .iter()
                .any(|s| s.peer == "other peers" && s.count == 500)
        );
    }
}
