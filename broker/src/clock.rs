//! Wall-clock time as the broker stores and compares it: Unix seconds for
//! lease and token times, milliseconds for versions and audit records.

use std::time::{SystemTime, UNIX_EPOCH};

fn since_epoch() -> std::time::Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// Unix time in seconds.
pub fn unix_now() -> i64 {
    since_epoch().as_secs() as i64
}

/// Unix time in milliseconds.
pub fn unix_now_ms() -> u64 {
    since_epoch().as_millis() as u64
}
