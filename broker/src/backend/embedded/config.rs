//! `[store]` in the broker's config: the embedded store's key file, read
//! cache and polling for new versions. Every key is documented in
//! `examples/broker.toml`.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::config_check::{ConfigError, Validator};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawStore {
    key_file: PathBuf,
    #[serde(default = "default_cache_ttl", with = "humantime_serde")]
    cache_ttl: Duration,
    #[serde(default = "default_poll", with = "humantime_serde")]
    poll_interval: Duration,
}

fn default_cache_ttl() -> Duration {
    Duration::from_secs(30)
}
fn default_poll() -> Duration {
    Duration::from_secs(2)
}

/// The embedded store, from `[store]`.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub key_file: PathBuf,
    /// How long a read may be served from memory (zero: no cache). A new
    /// version drops the entry at the next poll, whichever replica wrote it.
    pub cache_ttl: Duration,
    /// How often the broker looks for new secret versions to push to watchers.
    pub poll_interval: Duration,
}

/// Validates `[store]`; relative paths are resolved against the config file's directory.
pub(crate) fn validate(
    v: &Validator<'_>,
    raw: RawStore,
    resolve: &dyn Fn(PathBuf) -> PathBuf,
) -> Result<StoreConfig, ConfigError> {
    Ok(StoreConfig {
        key_file: resolve(raw.key_file),
        cache_ttl: v.bounded(
            "store.cache_ttl",
            raw.cache_ttl,
            Duration::ZERO,
            Duration::from_secs(3600),
        )?,
        poll_interval: v.bounded(
            "store.poll_interval",
            raw.poll_interval,
            Duration::from_millis(100),
            Duration::from_secs(3600),
        )?,
    })
}
