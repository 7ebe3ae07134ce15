//! Logging setup shared by the binaries: `tracing` with structured fields,
//! human format by default, JSON with `--log-format json` or
//! `SECRETS_BROKER_LOG_FORMAT=json`; levels from `RUST_LOG`.
//!
//! OpenTelemetry: a build with the `otlp` feature exports spans over
//! OTLP/gRPC when the standard `OTEL_EXPORTER_OTLP_ENDPOINT` variable is set
//! (off otherwise). Span fields never carry secrets or tokens: handlers skip
//! request payloads and log a token only as its fingerprint.

pub mod metrics;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Flushes exported spans when dropped; keep it alive in `main`.
#[derive(Default)]
pub struct Guard {
    #[cfg(feature = "otlp")]
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        #[cfg(feature = "otlp")]
        if let Some(p) = self.provider.take() {
            let _ = p.shutdown();
        }
    }
}

/// Installs the global subscriber; logs go to stderr.
pub fn init(json: bool, default_level: &str, service: &'static str) -> Guard {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(secrets_sidecar::log_colour())
        .with_target(false);
    let fmt = if json {
        fmt.json().flatten_event(true).boxed()
    } else {
        fmt.boxed()
    };
    let registry = tracing_subscriber::registry().with(filter).with(fmt);
    let endpoint = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT")
        .ok()
        .filter(|e| !e.is_empty());

    #[cfg(feature = "otlp")]
    if endpoint.is_some() {
        match otlp(service) {
            Ok(provider) => {
                use opentelemetry::trace::TracerProvider;
                let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer(service));
                let _ = registry.with(layer).try_init();
                tracing::info!(
                    endpoint = endpoint.as_deref().unwrap_or_default(),
                    "exporting spans over OTLP"
                );
                return Guard {
                    provider: Some(provider),
                };
            }
            Err(e) => {
                let _ = tracing_subscriber::registry()
                    .with(EnvFilter::new(default_level))
                    .with(
                        tracing_subscriber::fmt::layer()
                            .with_writer(std::io::stderr)
                            .with_ansi(secrets_sidecar::log_colour()),
                    )
                    .try_init();
                tracing::warn!(error = %e, "cannot set up OTLP export; continuing without it");
                return Guard::default();
            }
        }
    }
    let _ = registry.try_init();
    if endpoint.is_some() && !cfg!(feature = "otlp") {
        tracing::warn!(
            service,
            "OTEL_EXPORTER_OTLP_ENDPOINT is set but this build has no OTLP support (build with --features otlp)"
        );
    }
    Guard::default()
}

#[cfg(feature = "otlp")]
fn otlp(service: &'static str) -> Result<opentelemetry_sdk::trace::SdkTracerProvider, String> {
    use opentelemetry_otlp::WithExportConfig;
    let mut builder = opentelemetry_otlp::SpanExporter::builder().with_tonic();
    if let Ok(endpoint) = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT") {
        builder = builder.with_endpoint(endpoint);
    }
    let exporter = builder.build().map_err(|e| e.to_string())?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service)
        .build();
    Ok(opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}
