//! Asking the Kubernetes API server about a token (`authentication.k8s.io/v1`
//! `TokenReview`), with the broker's own credentials (in-cluster, or a
//! kubeconfig). Offline JWKS verification cannot tell that a pod was
//! deleted; the API server can. Results are cached for a few seconds per
//! token, so renewals of many pods cost few API calls.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};
use moka::future::Cache;

/// How an issuer's tokens are verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Offline, with the issuer's keys (the default).
    Jwks,
    /// The API server decides every login (no offline check).
    TokenReview,
    /// Offline on every call, confirmed with the API server (cached).
    JwksAndTokenReview,
}

impl Mode {
    pub fn parse(s: &str) -> Result<Mode, String> {
        match s {
            "jwks" => Ok(Mode::Jwks),
            "tokenreview" => Ok(Mode::TokenReview),
            "jwks+tokenreview" => Ok(Mode::JwksAndTokenReview),
            other => Err(format!(
                "{other:?}: use jwks, tokenreview or jwks+tokenreview"
            )),
        }
    }

    pub fn reviews(self) -> bool {
        self != Mode::Jwks
    }
}

/// What the API server said about a token.
#[derive(Debug, Clone)]
pub enum Review {
    Authenticated {
        username: String,
        uid: String,
        pod_name: Option<String>,
        pod_uid: Option<String>,
        audiences: Vec<String>,
    },
    /// Not authenticated; the API server's reason (e.g. the pod is gone).
    Rejected(String),
}

/// A TokenReview client for one issuer.
pub struct Reviewer {
    client: kube::Client,
    audiences: Vec<String>,
    cache: Cache<String, Review>,
    timeout: Duration,
    calls: Arc<AtomicU64>,
}

impl Reviewer {
    /// Connects with a kubeconfig file, or the in-cluster service account.
    pub async fn new(
        kubeconfig: Option<&Path>,
        audiences: Vec<String>,
        cache_ttl: Duration,
        timeout: Duration,
    ) -> Result<Reviewer, String> {
        let config = match kubeconfig {
            Some(path) => {
                let kc = kube::config::Kubeconfig::read_from(path)
                    .map_err(|e| format!("kubeconfig {}: {e}", path.display()))?;
                kube::Config::from_custom_kubeconfig(
                    kc,
                    &kube::config::KubeConfigOptions::default(),
                )
                .await
                .map_err(|e| format!("kubeconfig {}: {e}", path.display()))?
            }
            None => kube::Config::incluster().map_err(|e| format!("in-cluster config: {e}"))?,
        };
        let client =
            kube::Client::try_from(config).map_err(|e| format!("Kubernetes client: {e}"))?;
        Ok(Reviewer {
            client,
            audiences,
            cache: Cache::builder()
                .time_to_live(cache_ttl.max(Duration::from_millis(1)))
                .max_capacity(100_000)
                .build(),
            timeout,
            calls: Arc::new(AtomicU64::new(0)),
        })
    }

    /// TokenReview calls made so far (cache misses).
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    /// Reviews a token (cached). `Err` means the API server could not be asked.
    pub async fn review(&self, token: &str) -> Result<Review, String> {
        let key = {
            hex::encode(aws_lc_rs::digest::digest(
                &aws_lc_rs::digest::SHA256,
                token.as_bytes(),
            ))
        };
        if let Some(hit) = self.cache.get(&key).await {
            return Ok(hit);
        }
        self.calls.fetch_add(1, Ordering::Relaxed);
        let request = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(self.audiences.clone()),
            },
            ..Default::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let answer =
            tokio::time::timeout(self.timeout, api.create(&PostParams::default(), &request))
                .await
                .map_err(|_| format!("the API server did not answer within {:?}", self.timeout))?
                .map_err(|e| format!("TokenReview failed: {e}"))?;
        let status = answer.status.unwrap_or_default();
        let review = if status.authenticated == Some(true) {
            let user = status.user.unwrap_or_default();
            let extra = user.extra.unwrap_or_default();
            let first = |k: &str| extra.get(k).and_then(|v| v.first()).cloned();
            Review::Authenticated {
                username: user.username.unwrap_or_default(),
                uid: user.uid.unwrap_or_default(),
                pod_name: first("authentication.kubernetes.io/pod-name"),
                pod_uid: first("authentication.kubernetes.io/pod-uid"),
                audiences: status.audiences.unwrap_or_default(),
            }
        } else {
            Review::Rejected(
                status
                    .error
                    .unwrap_or_else(|| "token not authenticated".into()),
            )
        };
        self.cache.insert(key, review.clone()).await;
        Ok(review)
    }
}
