//! The shutdown signal every background task watches: a `watch` channel
//! that flips to `true` once.

use tokio::sync::watch;

/// Completes once `rx` has seen `true` (or its sender is gone).
pub async fn until_true(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}
