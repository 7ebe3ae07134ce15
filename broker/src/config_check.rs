//! What every section of the broker's config file is checked with: a
//! [`Validator`] whose errors name the file and the key, and bounds on
//! durations. A leaf that imports nothing else of the crate, so each
//! section's own config module (`identity::config`, `policy`,
//! `backend::*::config`, `state::checkpoint`) uses it while [`crate::config`]
//! imports the sections: the imports run one way.

use std::path::Path;
use std::time::Duration;

/// A configuration problem, reported before the broker binds any port: the
/// sidecar's type, so every binary words config errors alike.
pub(crate) use secrets_sidecar::strict_toml::ConfigError;

/// Checks the values of one config file; every error it makes names that file.
pub(crate) struct Validator<'a> {
    pub(crate) path: &'a Path,
}

impl Validator<'_> {
    /// The error for `key` (dotted, as written in the file: `roles[0].ttl`).
    pub(crate) fn err(&self, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_owned(),
            key: key.to_owned(),
            message: message.into(),
        }
    }

    /// `value` if it is within `min..=max`, else an error that names the range.
    pub(crate) fn bounded(
        &self,
        key: &str,
        value: Duration,
        min: Duration,
        max: Duration,
    ) -> Result<Duration, ConfigError> {
        if value < min || value > max {
            return Err(self.err(
                key,
                format!(
                    "{} is out of range: use {} to {}",
                    humantime::format_duration(value),
                    humantime::format_duration(min),
                    humantime::format_duration(max)
                ),
            ));
        }
        Ok(value)
    }
}
