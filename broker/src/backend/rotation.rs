//! New versions of secrets: the embedded store's version poller, the map
//! of the latest version of each secret, and the [`Rotation`] broadcast that
//! every backend's poller sends and every watch stream receives.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, watch};
use tracing::{info, warn};

use crate::backend::embedded::{EmbeddedStore, StoreError};
use crate::cache::SecretCache;

/// Latest version per secret name, as the rotation poller last saw it.
pub type Versions = Arc<std::sync::RwLock<HashMap<String, u64>>>;

/// A new version of a secret, broadcast to watch streams.
#[derive(Debug, Clone)]
pub struct Rotation {
    pub name: String,
    pub version: u64,
}

/// This replica's record of the store's latest versions. One step reads
/// them, updates the shared version map, drops changed secrets from the
/// cache and tells the watch streams; the poller runs it on a timer and
/// after every announced write, and the admin API after its own writes, so
/// that a write is served here when the call that made it returns.
pub struct Rotations {
    store: EmbeddedStore,
    versions: Versions,
    cache: SecretCache,
    tx: broadcast::Sender<Rotation>,
    /// Held for a whole step, so that two steps never announce one change
    /// twice; `false` until the first step, which only learns the versions.
    primed: tokio::sync::Mutex<bool>,
}

impl Rotations {
    pub fn new(
        store: EmbeddedStore,
        versions: Versions,
        cache: SecretCache,
        tx: broadcast::Sender<Rotation>,
    ) -> Rotations {
        Rotations {
            store,
            versions,
            cache,
            tx,
            primed: tokio::sync::Mutex::new(false),
        }
    }

    /// Re-reads the latest versions and acts on every change since the last step.
    pub async fn refresh(&self) -> Result<(), StoreError> {
        let mut primed = self.primed.lock().await;
        let current = self.store.latest_versions().await?;
        let known = self
            .versions
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for (name, version) in &current {
            if *primed && known.get(name) != Some(version) {
                info!(secret = %name, version, "new secret version");
                self.cache.invalidate(name).await;
                let _ = self.tx.send(Rotation {
                    name: name.clone(),
                    version: *version,
                });
            }
        }
        for name in known.keys().filter(|n| !current.contains_key(*n)) {
            self.cache.invalidate(name).await; // deleted
        }
        *self.versions.write().unwrap_or_else(|e| e.into_inner()) = current;
        *primed = true;
        Ok(())
    }
}

/// Runs a [`Rotations`] step every `interval`, and at once after a write
/// announced by the store.
pub async fn poll_rotations(
    rotations: Arc<Rotations>,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.reset();
    let store = &rotations.store;
    let mut notes =
        crate::db::Notifications::new(store.db(), crate::backend::embedded::VERSIONS_CHANNEL);
    let mut first = true;
    loop {
        if !first {
            // A write through this replica, or (PostgreSQL) any other, is
            // pushed at once; the timer catches the rest (e.g. `store put`
            // on SQLite, or a lost notification).
            tokio::select! {
                _ = tick.tick() => {}
                _ = store.changed() => {}
                _ = notes.recv() => {}
                _ = crate::shutdown::until_true(&mut shutdown) => return,
            }
        }
        first = false;
        notes.connect().await;
        if let Err(e) = rotations.refresh().await {
            warn!(error = %e, "cannot read secret versions");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_refresh_after_a_write_serves_the_new_version_and_announces_it_once() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k");
        crate::backend::embedded::generate_key_file(&key, "k1").unwrap();
        let store = EmbeddedStore::new(crate::db::Db::sqlite_in(dir.path()).await, &key).unwrap();
        let metrics = Arc::new(crate::telemetry::metrics::Metrics::new(Default::default()));
        let cache = SecretCache::new(store.clone(), Duration::from_secs(600), metrics);
        let versions = Versions::default();
        let (tx, mut rx) = broadcast::channel(16);
        let rotations = Rotations::new(store.clone(), versions.clone(), cache.clone(), tx);
        store.put("a", b"one").await.unwrap();
        rotations.refresh().await.unwrap();
        assert!(
            rx.try_recv().is_err(),
            "the first step only learns versions"
        );
        assert_eq!(cache.get("a").await.unwrap().value(), b"one"); // now cached

        store.put("a", b"two").await.unwrap();
        assert_eq!(
            cache.get("a").await.unwrap().value(),
            b"one",
            "stale until a step"
        );
        rotations.refresh().await.unwrap();
        assert_eq!(cache.get("a").await.unwrap().value(), b"two");
        assert_eq!(versions.read().unwrap().get("a"), Some(&2));
        let r = rx.try_recv().unwrap();
        assert_eq!((r.name.as_str(), r.version), ("a", 2));
        rotations.refresh().await.unwrap();
        assert!(rx.try_recv().is_err(), "one change, one announcement");

        store.delete("a").await.unwrap();
        rotations.refresh().await.unwrap();
        assert!(matches!(
            cache.get("a").await,
            Err(crate::cache::ReadError::NotFound)
        ));
        assert_eq!(versions.read().unwrap().get("a"), None);
    }
}
