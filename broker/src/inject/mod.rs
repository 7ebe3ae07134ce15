//! `secrets-broker inject`: a mutating admission webhook that adds the
//! secrets sidecar to pods that ask for it with annotations.
//!
//! A review reads top to bottom in [`review`]: parse the `AdmissionReview`
//! → only pod creations → [`Injector::decide`] (excluded namespace?
//! injected already? annotations valid? the pod compatible?) → an answer
//! that allows with a JSON Patch that only adds, allows unchanged, or denies
//! with a message naming the annotation and the problem.
//!
//! Layout:
//! - [`layout`]: the names, paths and modes of what the injector adds, and
//!   where the secrets may be mounted (a leaf, used by all below).
//! - [`k8s`]: Kubernetes quantities and DNS labels (a leaf).
//! - [`annotations`]: the pure annotation parser and its error type.
//! - [`config`]: `inject.toml` → a validated [`Config`].
//! - [`patch`]: pod + annotations → the sidecar, its volumes and the patch,
//!   with `exec_check` (what mode exec needs of the pod), `sidecar_file`
//!   (the config each sidecar gets) and `ops` (the JSON Patch operations).
//! - [`server`]: HTTPS (`POST /mutate`), probes, metrics, certificate reload.

pub mod annotations;
pub mod config;
mod exec_check;
pub mod k8s;
pub mod layout;
mod ops;
pub mod patch;
pub mod server;
mod sidecar_file;

#[cfg(test)]
mod fixtures;

use std::future::Future;
use std::sync::Arc;

use base64::Engine;
use k8s_openapi::api::core::v1::Pod;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionReview, Operation};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tracing::{debug, info};

pub use config::Config;
pub use patch::{Decision, Injector};

/// The answer to one review body.
pub struct Outcome {
    /// The `AdmissionReview` response as JSON, or why the body is not a
    /// usable review (answered with 400).
    pub response: Result<String, String>,
    /// The metrics label: injected, not_requested, already_injected,
    /// excluded, denied, ignored or bad_request.
    pub result: &'static str,
}

/// Answers one `AdmissionReview` (admission.k8s.io/v1) request body.
pub fn review(injector: &Injector, body: &[u8]) -> Outcome {
    let bad = |m: String| Outcome {
        response: Err(m),
        result: "bad_request",
    };
    let review: AdmissionReview<DynamicObject> = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => return bad(format!("not an AdmissionReview: {e}")),
    };
    if review.types.api_version != "admission.k8s.io/v1" || review.types.kind != "AdmissionReview" {
        return bad(format!(
            "expected apiVersion admission.k8s.io/v1, kind AdmissionReview; got {} {}",
            review.types.api_version, review.types.kind
        ));
    }
    let req: AdmissionRequest<DynamicObject> = match review.try_into() {
        Ok(r) => r,
        Err(_) => return bad("the AdmissionReview has no request".into()),
    };
    let uid = req.uid.clone();
    let is_pod = req.kind.group.is_empty() && req.kind.version == "v1" && req.kind.kind == "Pod";
    let object = match (
        &req.operation,
        is_pod,
        req.sub_resource.as_deref(),
        &req.object,
    ) {
        (Operation::Create, true, None, Some(obj)) => obj,
        _ => {
            debug!(uid = %uid, kind = %req.kind.kind, operation = ?req.operation, "not a pod creation: allowed unchanged");
            return answer(&uid, Verdict::Allow, "ignored");
        }
    };
    let pod: Pod = match serde_json::to_value(object).and_then(serde_json::from_value) {
        Ok(p) => p,
        Err(e) => {
            return answer(
                &uid,
                Verdict::Deny(format!("the pod cannot be read: {e}")),
                "denied",
            );
        }
    };
    let namespace = req
        .namespace
        .clone()
        .or_else(|| pod.metadata.namespace.clone())
        .unwrap_or_default();
    let name = pod
        .metadata
        .name
        .clone()
        .filter(|n| !n.is_empty())
        .or_else(|| pod.metadata.generate_name.clone().map(|g| format!("{g}*")))
        .unwrap_or_default();
    match injector.decide(&namespace, &pod) {
        Decision::Excluded => {
            debug!(uid = %uid, namespace, pod = name, "namespace excluded: allowed unchanged");
            answer(&uid, Verdict::Allow, "excluded")
        }
        Decision::NotRequested => {
            debug!(uid = %uid, namespace, pod = name, "no injection requested: allowed unchanged");
            answer(&uid, Verdict::Allow, "not_requested")
        }
        Decision::AlreadyInjected => {
            info!(uid = %uid, namespace, pod = name, "already injected: allowed unchanged");
            answer(&uid, Verdict::Allow, "already_injected")
        }
        Decision::Denied(message) => {
            info!(uid = %uid, namespace, pod = name, reason = %message, "pod denied");
            answer(&uid, Verdict::Deny(message), "denied")
        }
        Decision::Inject {
            patch,
            mode,
            warnings,
        } => {
            let bytes = match serde_json::to_vec(&patch) {
                Ok(b) => b,
                Err(e) => {
                    return answer(
                        &uid,
                        Verdict::Deny(format!("internal error: {e}")),
                        "denied",
                    );
                }
            };
            info!(
                uid = %uid,
                namespace,
                pod = name,
                mode = mode.as_str(),
                operations = patch.0.len(),
                "sidecar injected"
            );
            answer(&uid, Verdict::Patch { bytes, warnings }, "injected")
        }
    }
}

enum Verdict {
    Allow,
    Patch {
        bytes: Vec<u8>,
        warnings: Vec<String>,
    },
    Deny(String),
}

/// The response document. Built by hand, not with kube's
/// `AdmissionResponse`, whose `patch` serializes as a JSON array of numbers
/// where the API server wants base64 (kube-rs issue 1781).
fn answer(uid: &str, verdict: Verdict, result: &'static str) -> Outcome {
    let response = match verdict {
        Verdict::Allow => json!({ "uid": uid, "allowed": true }),
        Verdict::Patch { bytes, warnings } => {
            let mut r = json!({
                "uid": uid,
                "allowed": true,
                "patchType": "JSONPatch",
                "patch": base64::engine::general_purpose::STANDARD.encode(bytes),
            });
            if !warnings.is_empty() {
                r["warnings"] = json!(warnings);
            }
            r
        }
        Verdict::Deny(message) => json!({
            "uid": uid,
            "allowed": false,
            "status": {
                "status": "Failure",
                "code": 400,
                "reason": "BadRequest",
                "message": message,
            },
        }),
    };
    let doc: Value = json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": response,
    });
    Outcome {
        response: Ok(doc.to_string()),
        result,
    }
}

/// Why the injector could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The serving certificate or key cannot be read or parsed.
    #[error("TLS: {0}")]
    Tls(String),
    /// A listener could not be bound (address in use, permissions).
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// Runs the webhook on `listener` until `shutdown` completes. The
/// certificate is loaded and the operations port bound before anything is
/// served, so their errors stop the start.
pub async fn run(
    injector: Injector,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    crate::install_crypto_provider();
    let s = &injector.config().server;
    let cert = server::ReloadingCert::load(s.tls_cert_file.clone(), s.tls_key_file.clone())
        .map_err(RunError::Tls)?;
    let ops = match s.ops_listen {
        None => None,
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|source| RunError::Listen { addr, source })?,
        ),
    };
    let bound = server::Bound {
        listener,
        ops,
        cert: Arc::new(cert),
    };
    server::serve(injector, bound, shutdown).await;
    Ok(())
}
