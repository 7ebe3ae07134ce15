//! The loop that revokes upstream credentials once their pod lease ends.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{info, warn};

use super::{UpstreamLeases, Vault};
use crate::clock::unix_now;

/// Revokes upstream credentials as soon as their pod lease ends (expiry,
/// release, kill switch), checking every `interval`. A failed revocation is
/// retried on the next pass.
pub async fn keep_upstream_revoked(
    vault: Arc<Vault>,
    leases: UpstreamLeases,
    interval: Duration,
    revoked: prometheus_client::metrics::counter::Counter,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = crate::shutdown::until_true(&mut shutdown) => return,
        }
        let now = unix_now();
        let due = match leases.due(now).await {
            Ok(d) => d,
            Err(e) => {
                warn!(error = %e, "cannot list upstream credentials to revoke");
                continue;
            }
        };
        for (lease_id, kind, mount, upstream_id) in due {
            match leases.claim(&lease_id, now).await {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => {
                    warn!(error = %e, "cannot claim an upstream credential");
                    continue;
                }
            }
            match vault.revoke_upstream(&kind, &mount, &upstream_id).await {
                Ok(()) => {
                    revoked.inc();
                    info!(lease_id = %lease_id, kind = %kind, "upstream credential revoked");
                }
                Err(e) => {
                    warn!(lease_id = %lease_id, kind = %kind, error = %e, "upstream revocation failed; retrying");
                    let _ = leases.unclaim(&lease_id).await;
                }
            }
        }
        if now % 600 == 0 {
            let _ = leases.prune(now, 24 * 3600).await;
        }
    }
}
