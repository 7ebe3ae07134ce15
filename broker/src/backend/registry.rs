//! The one place the broker's sources are made: the embedded store for
//! every name, then each configured backend for the names it maps. A new
//! backend is a folder under `backend/` and one `register` line here.

use std::sync::Arc;

use crate::backend::aws::{Aws, AwsSource};
use crate::backend::embedded::EmbeddedSource;
use crate::backend::source::Sources;
use crate::backend::upstream::UpstreamLeases;
use crate::backend::vault::{Vault, VaultSource};
use crate::config::Config;
use crate::db::Db;
use crate::telemetry::metrics::{BackendLabels, Metrics};

/// Every source the config names, each name going to the source that maps
/// it and the rest to `embedded`. Errors name the setting that cannot be used.
pub async fn build(
    config: &Config,
    db: &Db,
    metrics: &Metrics,
    embedded: EmbeddedSource,
    upstream: &UpstreamLeases,
) -> Result<Sources, String> {
    let reads = |backend| {
        metrics
            .backend_reads
            .get_or_create(&BackendLabels { backend })
            .clone()
    };
    let mut sources = Sources::new(Arc::new(embedded));
    if let Some(vc) = &config.vault {
        let vault = Arc::new(Vault::new(vc.clone(), reads("vault"))?);
        sources = sources.register(Arc::new(VaultSource::new(
            vault,
            upstream.clone(),
            config.revocation.refresh_interval,
            metrics.upstream_revocations.clone(),
        )))?;
    }
    if let Some(ac) = &config.aws {
        let aws = Arc::new(Aws::new(ac.clone(), reads("aws")).await);
        sources = sources.register(Arc::new(AwsSource::new(aws, upstream.clone(), db.clone())))?;
    }
    Ok(sources)
}
