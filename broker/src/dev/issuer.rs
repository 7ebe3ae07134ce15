//! A local OIDC token issuer, for `secrets-broker dev` and for tests: it
//! mints Kubernetes-style service-account tokens (ES256, or RS256 as a
//! Kubernetes API server signs them by default) and serves the same
//! documents a Kubernetes API server does, over HTTPS:
//! `/.well-known/openid-configuration` and `/openid/v1/jwks`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::clock::unix_now;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use jsonwebtoken::{EncodingKey, Header};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tracing::debug;

/// The signature algorithm of an issuer's keys.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SigningAlgorithm {
    /// ECDSA P-256 (the default here: small keys, fast to generate).
    #[default]
    Es256,
    /// RSA-2048 with SHA-256: what a Kubernetes API server signs with by
    /// default, and the cheaper of the two to verify.
    Rs256,
}

/// One signing key of the issuer.
struct SigningKey {
    kid: String,
    alg: jsonwebtoken::Algorithm,
    key: EncodingKey,
    jwk: Value,
}

fn new_key(kid: &str, alg: SigningAlgorithm) -> Result<SigningKey, rcgen::Error> {
    match alg {
        SigningAlgorithm::Es256 => {
            let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
            let raw = kp.public_key_raw();
            let jwk = json!({
                "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": kid,
                "x": URL_SAFE_NO_PAD.encode(&raw[1..33]),
                "y": URL_SAFE_NO_PAD.encode(&raw[33..65]),
            });
            Ok(SigningKey {
                kid: kid.to_owned(),
                alg: jsonwebtoken::Algorithm::ES256,
                key: EncodingKey::from_ec_der(&kp.serialize_der()),
                jwk,
            })
        }
        SigningAlgorithm::Rs256 => {
            use x509_parser::prelude::FromDer;
            use x509_parser::public_key::PublicKey;
            let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256)?;
            let spki = rcgen::PublicKeyData::subject_public_key_info(&kp);
            let Ok((_, info)) = x509_parser::x509::SubjectPublicKeyInfo::from_der(&spki) else {
                return Err(rcgen::Error::CouldNotParseKeyPair);
            };
            let Ok(PublicKey::RSA(rsa)) = info.parsed() else {
                return Err(rcgen::Error::CouldNotParseKeyPair);
            };
            let unsigned = |b: &[u8]| {
                let skip = b.iter().take_while(|x| **x == 0).count();
                URL_SAFE_NO_PAD.encode(&b[skip..])
            };
            let jwk = json!({
                "kty": "RSA", "use": "sig", "alg": "RS256", "kid": kid,
                "n": unsigned(rsa.modulus),
                "e": unsigned(rsa.exponent),
            });
            let key = EncodingKey::from_rsa_pem(kp.serialize_pem().as_bytes())
                .map_err(|e| rcgen::Error::PemError(e.to_string()))?;
            Ok(SigningKey {
                kid: kid.to_owned(),
                alg: jsonwebtoken::Algorithm::RS256,
                key,
                jwk,
            })
        }
    }
}

/// How the issuer's HTTPS server misbehaves, for fault tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Fault {
    /// Serves its documents.
    #[default]
    None,
    /// Answers 503 to everything.
    Unavailable,
    /// Accepts requests and never answers.
    Hang,
    /// Answers 200 with a body that is not JSON.
    Garbage,
}

/// The state shared between the HTTPS server and token minting.
struct State {
    fault: Fault,
    /// The first key signs; all are published.
    keys: Vec<SigningKey>,
    /// Of new keys.
    algorithm: SigningAlgorithm,
    /// Documents are served from this URL (the `iss` of minted tokens).
    issuer: String,
}

/// A local token issuer.
#[derive(Clone)]
pub struct Issuer {
    state: Arc<Mutex<State>>,
    /// How many times the JWKS was served (tests check the refresh rate limit).
    jwks_served: Arc<AtomicU64>,
}

/// What a minted service-account token says about its workload.
#[derive(Debug, Clone)]
pub struct Workload {
    pub namespace: String,
    pub service_account: String,
    pub pod: Option<String>,
    pub audiences: Vec<String>,
    pub ttl_seconds: i64,
}

impl Workload {
    pub fn new(namespace: &str, service_account: &str, audience: &str) -> Workload {
        Workload {
            namespace: namespace.into(),
            service_account: service_account.into(),
            pod: Some(format!("{service_account}-0")),
            audiences: vec![audience.into()],
            ttl_seconds: 600,
        }
    }
}

fn pseudo_uid(seed: &str) -> String {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, seed.as_bytes());
    let h = hex::encode(&d.as_ref()[..16]);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

impl Issuer {
    /// A new issuer with one fresh ES256 key. Its URL is set by [`Issuer::serve`].
    pub fn new() -> Result<Issuer, rcgen::Error> {
        Self::with_algorithm(SigningAlgorithm::Es256)
    }

    /// A new issuer whose keys use `algorithm`.
    pub fn with_algorithm(algorithm: SigningAlgorithm) -> Result<Issuer, rcgen::Error> {
        Ok(Issuer {
            state: Arc::new(Mutex::new(State {
                keys: vec![new_key("dev-key-1", algorithm)?],
                algorithm,
                fault: Fault::None,
                issuer: String::new(),
            })),
            jwks_served: Arc::new(AtomicU64::new(0)),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes the server misbehave (or behave again).
    pub fn set_fault(&self, fault: Fault) {
        self.state().fault = fault;
    }

    /// How many times the JWKS document has been served.
    pub fn jwks_served(&self) -> u64 {
        self.jwks_served.load(Ordering::Relaxed)
    }

    /// Mints tokens for the issuer `url` without serving it: for a broker
    /// that reads the keys from a static JWKS file ([`Issuer::jwks`]).
    pub fn set_url(&self, url: &str) {
        self.state().issuer = url.to_owned();
    }

    /// The issuer URL (`iss`), once serving.
    pub fn url(&self) -> String {
        self.state().issuer.clone()
    }

    /// From now on, signs with a new key of `algorithm` (the old keys stay
    /// published). Returns the new key ID.
    pub fn use_algorithm(&self, algorithm: SigningAlgorithm) -> Result<String, rcgen::Error> {
        self.state().algorithm = algorithm;
        self.rotate_key()
    }

    /// Adds a new signing key on top (used for signing from now on); the old
    /// ones stay published. Returns the new key ID.
    pub fn rotate_key(&self) -> Result<String, rcgen::Error> {
        let mut st = self.state();
        let kid = format!("dev-key-{}", st.keys.len() + 1);
        let key = new_key(&kid, st.algorithm)?;
        st.keys.insert(0, key);
        Ok(kid)
    }

    /// The algorithms of the published keys, as the discovery document names them.
    fn algorithms(&self) -> Vec<String> {
        let mut algs: Vec<String> = Vec::new();
        for k in &self.state().keys {
            let name = format!("{:?}", k.alg);
            if !algs.contains(&name) {
                algs.push(name);
            }
        }
        algs
    }

    /// The published JWKS document.
    pub fn jwks(&self) -> Value {
        json!({ "keys": self.state().keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>() })
    }

    /// The claims Kubernetes puts in a projected service-account token.
    pub fn claims(&self, w: &Workload) -> Value {
        let now = unix_now();
        let mut k8s = json!({
            "namespace": w.namespace,
            "serviceaccount": {
                "name": w.service_account,
                "uid": pseudo_uid(&format!("sa/{}/{}", w.namespace, w.service_account)),
            },
        });
        if let Some(pod) = &w.pod {
            k8s["pod"] =
                json!({ "name": pod, "uid": pseudo_uid(&format!("pod/{}/{pod}", w.namespace)) });
        }
        json!({
            "iss": self.url(),
            "sub": format!("system:serviceaccount:{}:{}", w.namespace, w.service_account),
            "aud": w.audiences,
            "iat": now,
            "nbf": now,
            "exp": now + w.ttl_seconds,
            "kubernetes.io": k8s,
        })
    }

    /// Signs arbitrary claims with the current key (tests use this to forge
    /// every kind of bad claim).
    pub fn sign(&self, claims: &Value) -> Result<String, jsonwebtoken::errors::Error> {
        let st = self.state();
        let key = &st.keys[0];
        let mut header = Header::new(key.alg);
        header.kid = Some(key.kid.clone());
        jsonwebtoken::encode(&header, claims, &key.key)
    }

    /// Mints a service-account token for a workload.
    pub fn mint(&self, w: &Workload) -> Result<String, jsonwebtoken::errors::Error> {
        self.sign(&self.claims(w))
    }

    /// Serves the discovery document and JWKS over HTTPS on `listener` until
    /// the task is dropped. Sets the issuer URL to `https://<host>:<port>`.
    pub async fn serve(
        &self,
        listener: TcpListener,
        host: &str,
        tls: Arc<rustls::ServerConfig>,
    ) -> std::io::Result<tokio::task::JoinHandle<()>> {
        let addr: SocketAddr = listener.local_addr()?;
        self.state().issuer = format!("https://{host}:{}", addr.port());
        let acceptor = TlsAcceptor::from(tls);
        let issuer = self.clone();
        Ok(tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                let issuer = issuer.clone();
                tokio::spawn(async move {
                    let Ok(stream) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(move |req| {
                        let issuer = issuer.clone();
                        async move {
                            if issuer.state().fault == Fault::Hang {
                                tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
                            }
                            Ok::<_, Infallible>(issuer.handle(req))
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        }))
    }

    fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        debug!(path = req.uri().path(), "issuer request");
        let url = self.url();
        match self.state().fault {
            Fault::Unavailable => {
                return Response::builder()
                    .status(StatusCode::SERVICE_UNAVAILABLE)
                    .body(Full::new(Bytes::from_static(b"unavailable")))
                    .unwrap_or_default();
            }
            Fault::Garbage => {
                return Response::builder()
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from_static(b"<html>\x00{\"keys\": [")))
                    .unwrap_or_default();
            }
            Fault::None | Fault::Hang => {}
        }
        let body = match req.uri().path() {
            "/.well-known/openid-configuration" => json!({
                "issuer": url,
                "jwks_uri": format!("{url}/openid/v1/jwks"),
                "response_types_supported": ["id_token"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": self.algorithms(),
            }),
            "/openid/v1/jwks" => {
                self.jwks_served.fetch_add(1, Ordering::Relaxed);
                self.jwks()
            }
            _ => {
                return Response::builder()
                    .status(StatusCode::NOT_FOUND)
                    .body(Full::new(Bytes::from_static(b"not found")))
                    .unwrap_or_default();
            }
        };
        Response::builder()
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A token of either algorithm verifies with the key the JWKS publishes
    /// for its `kid`, and with no other.
    #[test]
    fn minted_tokens_verify_with_the_published_key() {
        crate::install_crypto_provider();
        let issuer = Issuer::new().unwrap();
        let es = issuer.mint(&Workload::new("ns", "sa", "aud")).unwrap();
        issuer.use_algorithm(SigningAlgorithm::Rs256).unwrap();
        let rs = issuer.mint(&Workload::new("ns", "sa", "aud")).unwrap();
        assert_eq!(issuer.algorithms(), vec!["RS256", "ES256"]);
        let jwks: jsonwebtoken::jwk::JwkSet = serde_json::from_value(issuer.jwks()).unwrap();
        for (token, alg) in [
            (&es, jsonwebtoken::Algorithm::ES256),
            (&rs, jsonwebtoken::Algorithm::RS256),
        ] {
            let kid = jsonwebtoken::decode_header(token).unwrap().kid.unwrap();
            let mut v = jsonwebtoken::Validation::new(alg);
            v.set_audience(&["aud"]);
            for jwk in &jwks.keys {
                let key = jsonwebtoken::DecodingKey::from_jwk(jwk).unwrap();
                let ok = jsonwebtoken::decode::<Value>(token, &key, &v).is_ok();
                assert_eq!(
                    ok,
                    jwk.common.key_id.as_deref() == Some(kid.as_str()),
                    "{alg:?}"
                );
            }
        }
    }
}
