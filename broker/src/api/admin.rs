//! The admin API: HTTPS with client-certificate authentication, JSON bodies,
//! an OpenAPI document at `/v1/openapi.json`. Each certificate maps to a role
//! (`viewer` < `revoker` < `admin`) by one typed field: the subject CN (only
//! when the subject has exactly one), or a SAN of one type (`uri:`, `dns:`,
//! `email:`). Every call is written to the audit log as a bounded summary;
//! the role is checked before a request body is read, and bodies are limited
//! to [`MAX_BODY_BYTES`] (a secret's value to [`MAX_SECRET_BODY_BYTES`]).
//!
//! | method | path | role |
//! |---|---|---|
//! | GET | `/v1/revocations` | viewer |
//! | POST | `/v1/revocations` | revoker |
//! | DELETE | `/v1/revocations/{id}` | revoker |
//! | GET | `/v1/leases?namespace=&limit=` | viewer |
//! | GET | `/v1/audit?after=&limit=` or `?tail=N` | viewer |
//! | GET | `/v1/audit/verify` | viewer |
//! | POST | `/v1/audit/verify` (body: exported checkpoints) | viewer |
//! | GET | `/v1/secrets` | viewer (names and versions only) |
//! | GET, PUT, DELETE | `/v1/secrets/{name}` | admin |

use std::sync::Arc;

use axum::extract::{Extension, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use rustls_pki_types::CertificateDer;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::api::grpc::Rotations;
use crate::api::tls_reload::{ConfigFile, ReloadingTls, TlsFiles};
use crate::backend::embedded::{EmbeddedStore, StoreError};
use crate::clock::unix_now;
use crate::config::{AdminClient, AdminConfig, AdminRole};
use crate::state::Leases;
use crate::state::audit::{Audit, Auditor, Entry};
use crate::state::audit_key::Checkpoint;
use crate::state::revocation::{NewRule, Revocations, RuleError, View};

/// Largest request body read, and only once the caller's role allows the call.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Largest body of `PUT /v1/secrets/{name}`: the largest value the store
/// takes, base64-encoded, and a little JSON around it.
pub const MAX_SECRET_BODY_BYTES: usize = crate::backend::MAX_SECRET_BYTES.div_ceil(3) * 4 + 1024;

/// Longest string from a request kept in an audit record or an error.
const MAX_SUMMARY_CHARS: usize = 128;

/// A string from a request as it may appear in an audit record or an error:
/// at most [`MAX_SUMMARY_CHARS`] characters, and the full length when cut.
fn summary(s: &str) -> String {
    match s.char_indices().nth(MAX_SUMMARY_CHARS) {
        None => s.to_owned(),
        Some((at, _)) => format!("{}…({} bytes)", &s[..at], s.len()),
    }
}

/// Reads a JSON request body of at most `limit` bytes; call it only after
/// [`authorize`], so that a caller without the role costs no read.
async fn read_json<T: serde::de::DeserializeOwned>(
    body: axum::body::Body,
    limit: usize,
) -> Result<T, ApiError> {
    let bytes = axum::body::to_bytes(body, limit).await.map_err(|_| {
        ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body larger than the {limit}-byte limit (or cut off)"),
        )
    })?;
    let bytes = zeroize::Zeroizing::new(bytes.to_vec());
    serde_json::from_slice(&bytes).map_err(|e| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("invalid request body: {}", summary(&e.to_string())),
        )
    })
}

/// Who is calling, from the TLS handshake.
#[derive(Debug, Clone)]
pub enum Caller {
    /// No client certificate was presented.
    Anonymous,
    /// A verified certificate that matches no configured client.
    Unknown {
        subject: String,
    },
    Known {
        name: String,
        role: AdminRole,
    },
}

impl Caller {
    fn actor(&self) -> String {
        match self {
            Caller::Anonymous => "admin:anonymous".into(),
            Caller::Unknown { subject } => format!("admin:unknown({subject})"),
            Caller::Known { name, .. } => format!("admin:{name}"),
        }
    }
}

/// What the handlers share.
#[derive(Clone)]
pub struct AdminState {
    pub revocations: Revocations,
    pub leases: Leases,
    pub audit: Audit,
    pub auditor: Auditor,
    pub store: EmbeddedStore,
    /// This replica's view of the rules, re-read after a change so that the
    /// change is in force here when the call returns.
    pub view: Arc<View>,
    /// This replica's record of secret versions, brought up to date after a
    /// write so that a fetch here serves the new value when the call returns.
    pub rotations: Arc<Rotations>,
}

/// An error answer: a status and a message a person can act on.
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> ApiError {
        warn!(error = %e, "admin API: database error");
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "the state database is unavailable; retry later".into(),
        )
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match e {
            StoreError::Invalid(m) => ApiError(StatusCode::BAD_REQUEST, m),
            StoreError::Database(e) => e.into(),
            other => {
                warn!(error = %other, "admin API: store error");
                ApiError(StatusCode::INTERNAL_SERVER_ERROR, other.to_string())
            }
        }
    }
}

/// Checks the caller's role, and audits the call either way.
fn authorize(
    state: &AdminState,
    caller: &Caller,
    need: AdminRole,
    action: &str,
    detail: &Value,
) -> Result<(), ApiError> {
    let refusal = match caller {
        Caller::Anonymous => Some(ApiError(
            StatusCode::UNAUTHORIZED,
            "client certificate required: call with --cert and --key of a certificate signed by the admin client CA".into(),
        )),
        Caller::Unknown { subject } => Some(ApiError(
            StatusCode::FORBIDDEN,
            format!("certificate {subject:?} is not mapped to a role in [[admin.clients]]"),
        )),
        Caller::Known { role, .. } if *role < need => Some(ApiError(
            StatusCode::FORBIDDEN,
            format!("role {} may not {action}; it needs {}", role_name(*role), role_name(need)),
        )),
        Caller::Known { .. } => None,
    };
    let result = if refusal.is_some() { "forbidden" } else { "ok" };
    state.auditor.record(Entry::new(
        caller.actor(),
        &format!("admin.{action}"),
        result,
        detail.clone(),
    ));
    match refusal {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn role_name(r: AdminRole) -> &'static str {
    match r {
        AdminRole::Viewer => "viewer",
        AdminRole::Revoker => "revoker",
        AdminRole::Admin => "admin",
    }
}

/// The router, without TLS (tests and the server wrap it).
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/v1/openapi.json", get(openapi))
        .route(
            "/v1/revocations",
            get(list_revocations).post(create_revocation),
        )
        .route(
            "/v1/revocations/{id}",
            axum::routing::delete(delete_revocation),
        )
        .route("/v1/leases", get(list_leases))
        .route("/v1/audit", get(audit_records))
        .route(
            "/v1/audit/verify",
            get(audit_verify).post(audit_verify_with),
        )
        .route("/v1/secrets", get(list_secrets))
        .route(
            "/v1/secrets/{*name}",
            get(get_secret).put(put_secret).delete(delete_secret),
        )
        .fallback(|| async {
            ApiError(
                StatusCode::NOT_FOUND,
                "no such endpoint; see /v1/openapi.json".into(),
            )
        })
        .with_state(state)
}

async fn openapi() -> Json<Value> {
    Json(openapi_document())
}

async fn list_revocations(
    State(s): State<AdminState>,
    Extension(c): Extension<Caller>,
) -> Result<Json<Value>, ApiError> {
    authorize(&s, &c, AdminRole::Viewer, "revocations.list", &json!({}))?;
    Ok(Json(json!({ "revocations": s.revocations.list().await? })))
}

async fn create_revocation(
    State(s): State<AdminState>,
    Extension(c): Extension<Caller>,
    body: axum::body::Body,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    authorize(&s, &c, AdminRole::Revoker, "revoke", &json!({}))?;
    let new: NewRule = read_json(body, MAX_BODY_BYTES).await?;
    let rule = s
        .revocations
        .create(new, &c.actor(), &s.leases)
        .await
        .map_err(|e| match e {
            RuleError::Invalid(m) => ApiError(StatusCode::BAD_REQUEST, m),
            RuleError::UnknownLease(_) => ApiError(StatusCode::NOT_FOUND, e.to_string()),
            RuleError::Database(e) => e.into(),
        })?;
    enforce_here(&s).await;
    let ended = s.leases.end_matching(&rule, unix_now()).await?;
    info!(rule = %rule.id, by = %c.actor(), reason = %rule.reason, leases_ended = ended, "revocation rule created");
    s.auditor.record(Entry::new(
        c.actor(),
        "revoke",
        "ok",
        json!({ "rule": rule, "leases_ended": ended }),
    ));
    Ok((
        StatusCode::CREATED,
        Json(json!({ "rule": rule, "leases_ended": ended })),
    ))
}

/// Re-reads the rules into this replica's view after a change. The change is
/// stored either way; when the read fails the view's own loop catches up.
async fn enforce_here(s: &AdminState) {
    if let Err(e) = s.view.refresh(&s.revocations).await {
        warn!(error = %e, "cannot re-read the revocation rules after a change; the next refresh will");
    }
}

/// Puts a secret write in force on this replica before the call returns.
async fn serve_here(s: &AdminState) {
    if let Err(e) = s.rotations.refresh().await {
        warn!(error = %e, "cannot re-read secret versions after a write; the next poll will");
    }
}

async fn delete_revocation(
    State(s): State<AdminState>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    authorize(
        &s,
        &c,
        AdminRole::Revoker,
        "revocations.delete",
        &json!({ "rule_id": summary(&id) }),
    )?;
    if !s.revocations.delete(&id).await? {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("revocation rule {:?} does not exist", summary(&id)),
        ));
    }
    enforce_here(&s).await;
    info!(rule = %id, by = %c.actor(), "revocation rule deleted");
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
struct LeaseQuery {
    namespace: Option<String>,
    limit: Option<i64>,
}

async fn list_leases(
    State(s): State<AdminState>,
    Extension(c): Extension<Caller>,
    Query(q): Query<LeaseQuery>,
) -> Result<Json<Value>, ApiError> {
    authorize(
        &s,
        &c,
        AdminRole::Viewer,
        "leases.list",
        &json!({ "namespace": q.namespace.as_deref().map(summary) }),
    )?;
    let limit = q.limit.unwrap_or(1000).clamp(1, 10_000);
    let leases = s
        .leases
        .list_active(q.namespace.as_deref(), unix_now(), limit)
        .await?;
    Ok(Json(json!({ "leases": leases })))
}

#[derive(Deserialize)]
struct AuditQuery {
    after: Option<i64>,
    limit: Option<i64>,
    tail: Option<i64>,
}

async fn audit_records(
    State(s): State<AdminState>,
    Extension(c): Extension<Caller>,
    Query(q): Query<AuditQuery>,
) -> Result<Json<Value>, ApiError> {
    authorize(&s, &c, AdminRole::Viewer, "audit.read", &json!({}))?;
    // What was audited before this call is in the log, this one's included.
    s.auditor.flush().await;
    let records = match q.tail {
        Some(n) => s.audit.tail(n.clamp(1, 10_000)).await?,
        None => {
            s.audit
                .after(
                    q.after.unwrap_or(0),
                    q.limit.unwrap_or(100).clamp(1, 10_000),
                )
                .await?
        }
    };
    Ok(Json(json!({ "records": records })))
}

async fn audit_verify(
    State(s): State<AdminState>,
    Extension(c): Extension<Caller>,
) -> Result<Json<Value>, ApiError> {
    authorize(&s, &c, AdminRole::Viewer, "audit.verify", &json!({}))?;
    verify_against(&s, Vec::new()).await
}

/// Most checkpoints one `POST /v1/audit/verify` may bring.
const MAX_CHECKPOINTS: usize = 200;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VerifyBody {
    #[serde(default)]
    checkpoints: Vec<Checkpoint>,
}

/// `POST /v1/audit/verify`: the chain, and the log against checkpoints the
/// caller read from the sink (`brokerctl audit verify --checkpoints FILE`).
async fn audit_verify_with(
    State(s): State<AdminState>,
    Extension(c): Extension<Caller>,
    body: axum::body::Body,
) -> Result<Json<Value>, ApiError> {
    authorize(&s, &c, AdminRole::Viewer, "audit.verify", &json!({}))?;
    let body: VerifyBody = read_json(body, MAX_BODY_BYTES).await?;
    if body.checkpoints.len() > MAX_CHECKPOINTS {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!(
                "{} checkpoints in one call, at most {MAX_CHECKPOINTS}",
                body.checkpoints.len()
            ),
        ));
    }
    verify_against(&s, body.checkpoints).await
}

/// Verifies after what this replica had queued is written, against the
/// given checkpoints and the last one this replica exported.
async fn verify_against(
    s: &AdminState,
    mut checkpoints: Vec<Checkpoint>,
) -> Result<Json<Value>, ApiError> {
    s.auditor.flush().await;
    if let Some(own) = s.audit.status().last_checkpoint() {
        checkpoints.push(own);
    }
    Ok(Json(
        serde_json::to_value(s.audit.verify_with(&checkpoints).await?).unwrap_or_default(),
    ))
}

async fn list_secrets(
    State(s): State<AdminState>,
    Extension(c): Extension<Caller>,
) -> Result<Json<Value>, ApiError> {
    authorize(&s, &c, AdminRole::Viewer, "secrets.list", &json!({}))?;
    let mut names: Vec<(String, u64)> = s.store.latest_versions().await?.into_iter().collect();
    names.sort();
    let list: Vec<Value> = names
        .into_iter()
        .map(|(n, v)| json!({ "name": n, "version": v }))
        .collect();
    Ok(Json(json!({ "secrets": list })))
}

async fn get_secret(
    State(s): State<AdminState>,
    Extension(c): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    authorize(
        &s,
        &c,
        AdminRole::Admin,
        "secrets.get",
        &json!({ "secret": summary(&name) }),
    )?;
    let v = s.store.get(&name).await?.ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            format!("secret {:?} does not exist", summary(&name)),
        )
    })?;
    Ok(Json(
        json!({ "name": v.name, "version": v.version, "value_base64": STANDARD.encode(v.value()) }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PutSecret {
    value_base64: String,
}

async fn put_secret(
    State(s): State<AdminState>,
    Extension(c): Extension<Caller>,
    Path(name): Path<String>,
    body: axum::body::Body,
) -> Result<Json<Value>, ApiError> {
    authorize(
        &s,
        &c,
        AdminRole::Admin,
        "secrets.put",
        &json!({ "secret": summary(&name) }),
    )?;
    let body: PutSecret = read_json(body, MAX_SECRET_BODY_BYTES).await?;
    let value =
        zeroize::Zeroizing::new(STANDARD.decode(body.value_base64.as_bytes()).map_err(|_| {
            ApiError(
                StatusCode::BAD_REQUEST,
                "value_base64 is not valid base64".into(),
            )
        })?);
    drop(zeroize::Zeroizing::new(body.value_base64));
    let version = s.store.put(&name, &value).await?;
    serve_here(&s).await;
    s.auditor.record(Entry::new(
        c.actor(),
        "secrets.version",
        "ok",
        json!({ "secret": name, "version": version }),
    ));
    Ok(Json(json!({ "name": name, "version": version })))
}

async fn delete_secret(
    State(s): State<AdminState>,
    Extension(c): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    authorize(
        &s,
        &c,
        AdminRole::Admin,
        "secrets.delete",
        &json!({ "secret": summary(&name) }),
    )?;
    let n = s.store.delete(&name).await?;
    serve_here(&s).await;
    if n == 0 {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("secret {:?} does not exist", summary(&name)),
        ));
    }
    Ok(Json(json!({ "name": name, "versions_deleted": n })))
}

/// A SAN of one type, as a certificate carries it or a rule names it.
#[derive(Debug, PartialEq, Eq)]
enum San<'a> {
    Dns(&'a str),
    Email(&'a str),
    Uri(&'a str),
}

impl<'a> San<'a> {
    /// The SAN an `[[admin.clients]] san` names: typed by its prefix
    /// (`uri:`, `dns:`, `email:`), else by its shape (`://` a URI, `@` an
    /// email address, anything else a DNS name). It matches a SAN of that
    /// type only, so a DNS name never satisfies a rule meant for a URI.
    fn of_rule(rule: &'a str) -> San<'a> {
        if let Some(v) = rule.strip_prefix("uri:") {
            San::Uri(v)
        } else if let Some(v) = rule.strip_prefix("dns:") {
            San::Dns(v)
        } else if let Some(v) = rule.strip_prefix("email:") {
            San::Email(v)
        } else if rule.contains("://") {
            San::Uri(rule)
        } else if rule.contains('@') {
            San::Email(rule)
        } else {
            San::Dns(rule)
        }
    }
}

/// Maps a verified client certificate to a caller. A `subject_cn` rule
/// matches only a subject with exactly one CN (`CN=nobody, CN=admin` is
/// nobody's); a `san` rule matches one SAN of its own type.
pub fn identify(cert: Option<&CertificateDer<'_>>, clients: &[AdminClient]) -> Caller {
    let Some(cert) = cert else {
        return Caller::Anonymous;
    };
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return Caller::Unknown {
            subject: "unparsable certificate".into(),
        };
    };
    let cns: Vec<Option<&str>> = parsed
        .subject()
        .iter_common_name()
        .map(|cn| cn.as_str().ok())
        .collect();
    let cn = match cns.as_slice() {
        [Some(one)] => Some(*one),
        _ => None,
    };
    let mut sans: Vec<San<'_>> = Vec::new();
    if let Ok(Some(ext)) = parsed.subject_alternative_name() {
        for name in &ext.value.general_names {
            use x509_parser::extensions::GeneralName as G;
            match name {
                G::DNSName(s) => sans.push(San::Dns(s)),
                G::RFC822Name(s) => sans.push(San::Email(s)),
                G::URI(s) => sans.push(San::Uri(s)),
                _ => {}
            }
        }
    }
    for c in clients {
        let by_cn = c.subject_cn.as_deref().is_some_and(|want| cn == Some(want));
        let by_san = c
            .san
            .as_deref()
            .is_some_and(|want| sans.contains(&San::of_rule(want)));
        if by_cn || by_san {
            return Caller::Known {
                name: c.name.clone(),
                role: c.role,
            };
        }
    }
    Caller::Unknown {
        subject: summary(&parsed.subject().to_string()),
    }
}

/// Loads the TLS config, read again when its files change (see
/// [`crate::api::tls_reload`]): client certificates are verified against
/// the client CA when presented, and not required at the handshake, so that
/// a caller without one gets a clear 401 instead of a TLS alert.
pub fn tls_config(cfg: &AdminConfig) -> Result<Arc<ReloadingTls>, String> {
    let files = TlsFiles {
        listener: "admin",
        cert: ConfigFile::new("admin.tls_cert_file", &cfg.tls_cert_file),
        key: ConfigFile::new("admin.tls_key_file", &cfg.tls_key_file),
        client_ca: Some(ConfigFile::new("admin.client_ca_file", &cfg.client_ca_file)),
        alpn: vec![b"h2".to_vec(), b"http/1.1".to_vec()],
    };
    let (tls, leaf) = ReloadingTls::load(files).map_err(|e| e.to_string())?;
    crate::api::tls_reload::log_loaded(&tls, &leaf);
    Ok(Arc::new(tls))
}

/// Reads a PEM certificate chain and its private key (the key bytes are
/// zeroized after parsing). Errors name the file.
pub fn load_cert_and_key(
    cert_file: &std::path::Path,
    key_file: &std::path::Path,
) -> Result<
    (
        Vec<CertificateDer<'static>>,
        rustls_pki_types::PrivateKeyDer<'static>,
    ),
    String,
> {
    use rustls_pki_types::PrivateKeyDer;
    use rustls_pki_types::pem::PemObject;
    let read = |p: &std::path::Path| {
        std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()))
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&read(cert_file)?)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", cert_file.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no CERTIFICATE block", cert_file.display()));
    }
    let key = PrivateKeyDer::from_pem_slice(&zeroize::Zeroizing::new(read(key_file)?))
        .map_err(|e| format!("{}: {e}", key_file.display()))?;
    Ok((certs, key))
}

/// Serves the admin API on `listener` until `shutdown` flips; each
/// connection's handshake uses the TLS config current at its start.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<ReloadingTls>,
    clients: Arc<Vec<AdminClient>>,
    state: AdminState,
    mut shutdown: watch::Receiver<bool>,
) {
    let app = router(state);
    info!(addr = ?listener.local_addr().ok(), "admin API listening (HTTPS, client certificates)");
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "admin accept failed");
                    continue;
                }
            },
            _ = crate::shutdown::until_true(&mut shutdown) => return,
        };
        let acceptor = tls.acceptor();
        let app = app.clone();
        let clients = clients.clone();
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(
                std::time::Duration::from_secs(10),
                acceptor.accept(tcp),
            )
            .await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    warn!(peer = %peer, error = %e, "admin TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let caller = identify(
                stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first()),
                &clients,
            );
            let service = TowerToHyperService::new(app.layer(Extension(caller)));
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// The OpenAPI 3.0 document of this API.
pub fn openapi_document() -> Value {
    let err = json!({ "description": "error", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } } });
    let ok = |schema: &str| json!({ "description": "ok", "content": { "application/json": { "schema": { "$ref": format!("#/components/schemas/{schema}") } } } });
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "secrets-broker admin API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "HTTPS with client certificates. Roles: viewer < revoker < admin. Every call is audited."
        },
        "paths": {
            "/v1/revocations": {
                "get": { "summary": "List revocation rules in force (viewer)", "responses": { "200": ok("RuleList"), "401": err, "403": err } },
                "post": {
                    "summary": "Create a revocation rule (revoker); affected sidecars remove the secrets within about a second",
                    "requestBody": { "required": true, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/NewRule" } } } },
                    "responses": { "201": ok("Created"), "400": err, "401": err, "403": err, "404": err }
                }
            },
            "/v1/revocations/{id}": {
                "delete": {
                    "summary": "Lift a revocation rule (revoker)",
                    "parameters": [{ "name": "id", "in": "path", "required": true, "schema": { "type": "string" } }],
                    "responses": { "204": { "description": "deleted" }, "401": err, "403": err, "404": err }
                }
            },
            "/v1/leases": {
                "get": {
                    "summary": "Leases still running (viewer)",
                    "parameters": [
                        { "name": "namespace", "in": "query", "schema": { "type": "string" } },
                        { "name": "limit", "in": "query", "schema": { "type": "integer", "minimum": 1, "maximum": 10000 } }
                    ],
                    "responses": { "200": ok("LeaseList"), "401": err, "403": err }
                }
            },
            "/v1/audit": {
                "get": {
                    "summary": "Audit records (viewer): after a sequence number, or the last N",
                    "parameters": [
                        { "name": "after", "in": "query", "schema": { "type": "integer" } },
                        { "name": "limit", "in": "query", "schema": { "type": "integer" } },
                        { "name": "tail", "in": "query", "schema": { "type": "integer" } }
                    ],
                    "responses": { "200": ok("AuditList"), "401": err, "403": err }
                }
            },
            "/v1/audit/verify": {
                "get": { "summary": "Check the chain of the audit log, and against the last checkpoint this replica exported (viewer)", "responses": { "200": ok("VerifyReport"), "401": err, "403": err } },
                "post": {
                    "summary": "Check the chain of the audit log and against exported checkpoints (viewer)",
                    "requestBody": { "required": true, "content": { "application/json": { "schema": {
                        "type": "object", "additionalProperties": false,
                        "properties": { "checkpoints": { "type": "array", "maxItems": 200, "items": { "$ref": "#/components/schemas/Checkpoint" } } }
                    } } } },
                    "responses": { "200": ok("VerifyReport"), "400": err, "401": err, "403": err, "413": err }
                }
            },
            "/v1/secrets": {
                "get": { "summary": "Secret names and latest versions, never values (viewer)", "responses": { "200": ok("SecretList"), "401": err, "403": err } }
            },
            "/v1/secrets/{name}": {
                "parameters": [{ "name": "name", "in": "path", "required": true, "schema": { "type": "string" }, "description": "may contain '/'" }],
                "get": { "summary": "Latest version and value (admin)", "responses": { "200": ok("SecretValue"), "401": err, "403": err, "404": err } },
                "put": {
                    "summary": "Store a new version (admin); running sidecars receive it as a rotation",
                    "requestBody": { "required": true, "content": { "application/json": { "schema": { "type": "object", "required": ["value_base64"], "properties": { "value_base64": { "type": "string", "format": "byte" } } } } } },
                    "responses": { "200": ok("SecretVersion"), "400": err, "401": err, "403": err }
                },
                "delete": { "summary": "Delete every version (admin)", "responses": { "200": { "description": "deleted" }, "401": err, "403": err, "404": err } }
            }
        },
        "components": {
            "schemas": {
                "Error": { "type": "object", "required": ["error"], "properties": { "error": { "type": "string" } } },
                "NewRule": {
                    "type": "object", "required": ["reason"], "additionalProperties": false,
                    "properties": {
                        "cluster": { "type": "string" }, "namespace": { "type": "string" }, "service_account": { "type": "string" },
                        "pod_uid": { "type": "string" }, "lease_id": { "type": "string" }, "secret": { "type": "string" },
                        "reason": { "type": "string" }, "for_seconds": { "type": "integer", "minimum": 1 }
                    }
                },
                "Rule": {
                    "type": "object",
                    "properties": {
                        "id": { "type": "string" }, "cluster": { "type": "string", "nullable": true }, "namespace": { "type": "string", "nullable": true },
                        "service_account": { "type": "string", "nullable": true }, "pod_uid": { "type": "string", "nullable": true },
                        "lease_id": { "type": "string", "nullable": true }, "secret": { "type": "string", "nullable": true },
                        "reason": { "type": "string" }, "created_by": { "type": "string" },
                        "created_at": { "type": "integer" }, "expires_at": { "type": "integer", "nullable": true }
                    }
                },
                "Created": { "type": "object", "properties": { "rule": { "$ref": "#/components/schemas/Rule" }, "leases_ended": { "type": "integer" } } },
                "RuleList": { "type": "object", "properties": { "revocations": { "type": "array", "items": { "$ref": "#/components/schemas/Rule" } } } },
                "Lease": {
                    "type": "object",
                    "properties": {
                        "lease_id": { "type": "string" }, "issuer": { "type": "string" }, "namespace": { "type": "string" },
                        "service_account": { "type": "string" }, "pod_name": { "type": "string", "nullable": true },
                        "pod_uid": { "type": "string", "nullable": true }, "role": { "type": "string" }, "secret": { "type": "string" },
                        "version": { "type": "integer" }, "issued_at": { "type": "integer" }, "expires_at": { "type": "integer" }
                    }
                },
                "LeaseList": { "type": "object", "properties": { "leases": { "type": "array", "items": { "$ref": "#/components/schemas/Lease" } } } },
                "AuditRecord": {
                    "type": "object",
                    "properties": {
                        "seq": { "type": "integer" }, "at_ms": { "type": "integer" }, "actor": { "type": "string" },
                        "action": { "type": "string" }, "result": { "type": "string" }, "detail": { "type": "string" },
                        "prev_hash": { "type": "string" }, "hash": { "type": "string" },
                        "key_id": { "type": "string", "nullable": true }
                    }
                },
                "Checkpoint": {
                    "type": "object", "required": ["kind", "seq", "count", "head", "at_ms", "key_id", "sig"],
                    "properties": {
                        "kind": { "type": "string", "enum": ["audit_checkpoint"] }, "seq": { "type": "integer" }, "count": { "type": "integer" },
                        "head": { "type": "string" }, "at_ms": { "type": "integer" }, "key_id": { "type": "string" },
                        "run": { "type": "string" }, "sig": { "type": "string" }
                    }
                },
                "AuditList": { "type": "object", "properties": { "records": { "type": "array", "items": { "$ref": "#/components/schemas/AuditRecord" } } } },
                "VerifyReport": {
                    "type": "object",
                    "properties": {
                        "ok": { "type": "boolean" }, "records": { "type": "integer" }, "last_seq": { "type": "integer" },
                        "problem": { "type": "string", "nullable": true }, "problem_seq": { "type": "integer", "nullable": true },
                        "first_seq": { "type": "integer" }, "legacy_records": { "type": "integer" }, "keyed": { "type": "boolean" },
                        "checkpoints_checked": { "type": "integer" }, "checkpoint_seq": { "type": "integer", "nullable": true },
                        "notes": { "type": "array", "items": { "type": "string" } }
                    }
                },
                "SecretList": { "type": "object", "properties": { "secrets": { "type": "array", "items": { "$ref": "#/components/schemas/SecretVersion" } } } },
                "SecretVersion": { "type": "object", "properties": { "name": { "type": "string" }, "version": { "type": "integer" } } },
                "SecretValue": { "type": "object", "properties": { "name": { "type": "string" }, "version": { "type": "integer" }, "value_base64": { "type": "string", "format": "byte" } } }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{DnType, DnValue, SanType};

    /// A self-signed certificate with these subject CNs (in order) and SANs.
    fn cert(cns: &[&str], sans: Vec<SanType>) -> CertificateDer<'static> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        for (i, cn) in cns.iter().enumerate() {
            // rcgen keeps one value per type: further CNs go in under the
            // CN's OID (2.5.4.3) as a "custom" type.
            let ty = if i == 0 {
                DnType::CommonName
            } else {
                DnType::CustomDnType(vec![2, 5, 4, 3])
            };
            params
                .distinguished_name
                .push(ty, DnValue::Utf8String((*cn).to_owned()));
        }
        params.subject_alt_names = sans;
        params.self_signed(&key).unwrap().der().clone()
    }

    fn client(name: &str, cn: Option<&str>, san: Option<&str>, role: AdminRole) -> AdminClient {
        AdminClient {
            name: name.into(),
            subject_cn: cn.map(Into::into),
            san: san.map(Into::into),
            role,
        }
    }

    fn role_of(cert: &CertificateDer<'_>, clients: &[AdminClient]) -> Option<String> {
        match identify(Some(cert), clients) {
            Caller::Known { name, .. } => Some(name),
            _ => None,
        }
    }

    #[test]
    fn a_subject_with_two_cns_matches_no_cn_rule() {
        let clients = [
            client("admin", Some("admin"), None, AdminRole::Admin),
            client("nobody", Some("nobody"), None, AdminRole::Viewer),
        ];
        let two = cert(&["nobody", "admin"], vec![]);
        let x509 = x509_parser::parse_x509_certificate(two.as_ref()).unwrap().1;
        assert_eq!(x509.subject().iter_common_name().count(), 2, "fixture");
        assert_eq!(role_of(&two, &clients), None);
        assert_eq!(
            role_of(&cert(&["admin"], vec![]), &clients).as_deref(),
            Some("admin")
        );
    }

    #[test]
    fn a_san_rule_matches_only_a_san_of_its_type() {
        let ia5 = |s: &str| rcgen::string::Ia5String::try_from(s).unwrap();
        let spiffe = "spiffe://cluster.local/ns/ops/sa/oncall";
        let clients = [
            client("by-uri", None, Some(spiffe), AdminRole::Admin),
            client(
                "by-dns",
                None,
                Some("uri:dashboards.svc"),
                AdminRole::Viewer,
            ),
        ];
        // A DNS SAN spelled like the URI does not match the URI rule.
        let dns = cert(&["x"], vec![SanType::DnsName(ia5(spiffe))]);
        assert_eq!(role_of(&dns, &clients), None);
        let uri = cert(&["x"], vec![SanType::URI(ia5(spiffe))]);
        assert_eq!(role_of(&uri, &clients).as_deref(), Some("by-uri"));
        // An explicitly typed rule: `uri:` never matches a DNS SAN.
        let dns = cert(&["x"], vec![SanType::DnsName(ia5("dashboards.svc"))]);
        assert_eq!(role_of(&dns, &clients), None);
        let typed = [client(
            "dash",
            None,
            Some("dns:dashboards.svc"),
            AdminRole::Viewer,
        )];
        assert_eq!(role_of(&dns, &typed).as_deref(), Some("dash"));
        let untyped = [client(
            "dash",
            None,
            Some("dashboards.svc"),
            AdminRole::Viewer,
        )];
        assert_eq!(role_of(&dns, &untyped).as_deref(), Some("dash"));
        assert_eq!(role_of(&uri, &untyped), None);
    }

    #[test]
    fn summaries_are_bounded() {
        assert_eq!(summary("INC-1"), "INC-1");
        let long = "é".repeat(100_000);
        let s = summary(&long);
        assert!(s.len() < 400, "{}", s.len());
        assert!(s.ends_with("…(200000 bytes)"), "{s}");
    }
}
