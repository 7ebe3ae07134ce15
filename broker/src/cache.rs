//! A read cache in front of the secrets backend, with coalesced loads: when
//! many pods ask for the same secret at once, one backend read serves them
//! all. Entries live at most `store.cache_ttl` and are dropped as soon as the
//! rotation poller sees a new version (from any replica), so a cached value is
//! never older than one poll interval after a rotation.

use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::future::Cache;

use crate::backend::SecretVersion;
use crate::backend::embedded::{EmbeddedStore, StoreError};
use crate::telemetry::metrics::{BackendLabels, Metrics, ResultLabels};

/// Why a cached read failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ReadError {
    /// The secret does not exist.
    #[error("not found")]
    NotFound,
    /// The backend failed; shared by every caller that waited on the same load.
    #[error("{0}")]
    Backend(Arc<StoreError>),
}

/// The secret cache. Cheap to clone.
#[derive(Clone)]
pub struct SecretCache {
    cache: Option<Cache<String, Arc<SecretVersion>>>,
    store: EmbeddedStore,
    metrics: Arc<Metrics>,
}

impl SecretCache {
    /// A cache over `store`; `ttl` zero disables caching (every read goes to the store).
    pub fn new(store: EmbeddedStore, ttl: Duration, metrics: Arc<Metrics>) -> SecretCache {
        let cache = (!ttl.is_zero()).then(|| {
            Cache::builder()
                .time_to_live(ttl)
                .max_capacity(100_000)
                .build()
        });
        SecretCache {
            cache,
            store,
            metrics,
        }
    }

    async fn load(&self, name: &str) -> Result<Arc<SecretVersion>, ReadError> {
        let backend = BackendLabels {
            backend: "embedded",
        };
        self.metrics.backend_reads.get_or_create(&backend).inc();
        let start = Instant::now();
        let result = self.store.get(name).await;
        self.metrics
            .backend_read_duration
            .get_or_create(&backend)
            .observe(start.elapsed().as_secs_f64());
        match result {
            Ok(Some(v)) => Ok(Arc::new(v)),
            Ok(None) => Err(ReadError::NotFound),
            Err(e) => Err(ReadError::Backend(Arc::new(e))),
        }
    }

    /// The latest version of `name`.
    pub async fn get(&self, name: &str) -> Result<Arc<SecretVersion>, ReadError> {
        let Some(cache) = &self.cache else {
            self.metrics
                .cache_requests
                .get_or_create(&ResultLabels { result: "miss" })
                .inc();
            return self.load(name).await;
        };
        let entry = cache
            .entry_by_ref(name)
            .or_try_insert_with(self.load(name))
            .await
            .map_err(|e| (*e).clone())?;
        // Fresh: this call loaded it. Otherwise it was cached or another
        // caller's load served this one too.
        let result = if entry.is_fresh() { "miss" } else { "hit" };
        self.metrics
            .cache_requests
            .get_or_create(&ResultLabels { result })
            .inc();
        Ok(entry.into_value())
    }

    /// Drops `name` after it changed.
    pub async fn invalidate(&self, name: &str) {
        if let Some(cache) = &self.cache {
            cache.invalidate(name).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::Db;

    #[tokio::test]
    async fn concurrent_reads_of_one_secret_coalesce_into_one_backend_read() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k");
        crate::backend::embedded::generate_key_file(&key, "k1").unwrap();
        let store = EmbeddedStore::new(Db::sqlite_in(dir.path()).await, &key).unwrap();
        store.put("a", b"value").await.unwrap();
        let metrics = Arc::new(Metrics::new(Default::default()));
        let cache = SecretCache::new(store.clone(), Duration::from_secs(60), metrics.clone());
        let reads = || {
            metrics
                .backend_reads
                .get_or_create(&BackendLabels {
                    backend: "embedded",
                })
                .get()
        };

        let tasks: Vec<_> = (0..100)
            .map(|_| {
                let c = cache.clone();
                tokio::spawn(async move { c.get("a").await.unwrap().version })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap(), 1);
        }
        assert_eq!(reads(), 1, "100 concurrent reads, one backend read");
        assert!(matches!(
            cache.get("missing").await,
            Err(ReadError::NotFound)
        ));

        store.put("a", b"value2").await.unwrap();
        assert_eq!(
            cache.get("a").await.unwrap().version,
            1,
            "cached until invalidated"
        );
        cache.invalidate("a").await;
        assert_eq!(cache.get("a").await.unwrap().version, 2);
    }
}
