//! Broker configuration: a TOML file parsed strictly (`deny_unknown_fields`),
//! then validated into a typed [`Config`] whose errors name the file and key.
//!
//! This file holds the top level, `[server]`, `[database]`, `[revocation]`
//! and the checks across sections; each other section is validated beside
//! what it configures (`identity::config`, `policy`, `api::admin::config`,
//! `backend::embedded::config`, `backend::vault::config`,
//! `backend::aws::config`, `state::checkpoint`), all with
//! `config_check::Validator`.
//!
//! Every key is documented in `examples/broker.toml`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::api::admin::config::{AdminConfig, RawAdmin};
use crate::backend::embedded::config::{RawStore, StoreConfig};
use crate::config_check::Validator;
use crate::db::DatabaseConfig;
use crate::identity::config::{IdentityConfig, RawIdentity};
use crate::policy::{RawRole, RoleConfig};

/// A configuration problem, reported before the broker binds any port: the
/// sidecar's type, so every binary words config errors alike.
pub use secrets_sidecar::strict_toml::ConfigError;

/// The file as written by an operator; see `examples/broker.toml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    server: RawServer,
    /// One issuer (one cluster)…
    identity: Option<RawIdentity>,
    /// …or several, each its own cluster.
    #[serde(default)]
    issuers: Vec<RawIdentity>,
    database: RawDatabase,
    store: RawStore,
    #[serde(default)]
    revocation: RawRevocation,
    admin: Option<RawAdmin>,
    vault: Option<crate::backend::vault::config::RawVault>,
    aws: Option<crate::backend::aws::config::RawAws>,
    /// The audit log's key, checkpoints and retention.
    audit: Option<crate::state::checkpoint::RawAudit>,
    #[serde(default)]
    roles: Vec<RawRole>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: String,
    ops_listen: Option<String>,
    tls_cert_file: PathBuf,
    tls_key_file: PathBuf,
    #[serde(default = "default_shutdown_grace", with = "humantime_serde")]
    shutdown_grace: Duration,
    #[serde(default = "default_heartbeat", with = "humantime_serde")]
    watch_heartbeat: Duration,
    #[serde(default = "default_max_in_flight")]
    max_in_flight: usize,
    #[serde(default = "default_max_watch_streams")]
    max_watch_streams: usize,
    #[serde(default = "default_max_streams_per_connection")]
    max_streams_per_connection: u32,
    #[serde(default = "default_rate_per_identity")]
    rate_per_identity: u32,
    #[serde(default = "default_burst_per_identity")]
    burst_per_identity: u32,
    /// Off (0) by default: a replica's capacity depends on its CPU, so only
    /// the operator can size it; unset, only `max_in_flight` bounds the total.
    #[serde(default)]
    rate_global: u32,
    /// Unset: one second's worth of `rate_global`.
    burst_global: Option<u32>,
    #[serde(default = "default_max_watch_streams_per_workload")]
    max_watch_streams_per_workload: usize,
    #[serde(default = "default_max_response_bytes")]
    max_response_bytes: usize,
    #[serde(default = "default_server_max_connections")]
    max_connections: usize,
    #[serde(default = "default_tls_handshake_timeout", with = "humantime_serde")]
    tls_handshake_timeout: Duration,
    #[serde(default = "default_tls_reload_interval", with = "humantime_serde")]
    tls_reload_interval: Duration,
    #[serde(default = "default_max_connection_age", with = "humantime_serde")]
    max_connection_age: Duration,
    #[serde(default = "default_max_connection_age_grace", with = "humantime_serde")]
    max_connection_age_grace: Duration,
}

fn default_max_watch_streams_per_workload() -> usize {
    4
}
fn default_max_response_bytes() -> usize {
    4 * 1024 * 1024
}
fn default_server_max_connections() -> usize {
    20_000
}
fn default_tls_handshake_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_tls_reload_interval() -> Duration {
    Duration::from_secs(10)
}
fn default_max_connection_age() -> Duration {
    Duration::from_secs(30 * 60)
}
fn default_max_connection_age_grace() -> Duration {
    Duration::from_secs(30)
}

fn default_max_in_flight() -> usize {
    512
}
fn default_max_watch_streams() -> usize {
    20_000
}
fn default_max_streams_per_connection() -> u32 {
    256
}
fn default_rate_per_identity() -> u32 {
    20
}
fn default_burst_per_identity() -> u32 {
    40
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDatabase {
    url: String,
    password_file: Option<PathBuf>,
    #[serde(default = "default_max_connections")]
    max_connections: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRevocation {
    #[serde(default = "default_revocation_refresh", with = "humantime_serde")]
    refresh_interval: Duration,
    #[serde(default = "default_max_staleness", with = "humantime_serde")]
    max_staleness: Duration,
}

impl Default for RawRevocation {
    fn default() -> Self {
        RawRevocation {
            refresh_interval: default_revocation_refresh(),
            max_staleness: default_max_staleness(),
        }
    }
}

fn default_shutdown_grace() -> Duration {
    Duration::from_secs(20)
}
fn default_heartbeat() -> Duration {
    Duration::from_secs(30)
}
fn default_max_connections() -> u32 {
    8
}
fn default_revocation_refresh() -> Duration {
    Duration::from_secs(1)
}
fn default_max_staleness() -> Duration {
    Duration::from_secs(10)
}

/// Validated configuration of a broker.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    /// The trusted token issuers, one per cluster.
    pub issuers: Vec<IdentityConfig>,
    pub database: DatabaseConfig,
    pub store: StoreConfig,
    pub revocation: RevocationConfig,
    /// The HTTPS admin API; absent when not configured.
    pub admin: Option<AdminConfig>,
    /// Vault or OpenBao as a source of some secrets.
    pub vault: Option<crate::backend::vault::config::VaultConfig>,
    /// AWS STS and Secrets Manager as a source of some secrets.
    pub aws: Option<crate::backend::aws::config::AwsConfig>,
    /// The audit log's key, checkpoints and retention (`[audit]`; without
    /// it, the plain SHA-256 chain).
    pub audit: crate::state::checkpoint::AuditConfig,
    pub roles: Vec<RoleConfig>,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: std::net::SocketAddr,
    /// Plain-HTTP port for `/metrics`, `/healthz`, `/readyz`; off when unset.
    pub ops_listen: Option<std::net::SocketAddr>,
    pub tls_cert_file: PathBuf,
    pub tls_key_file: PathBuf,
    /// How long in-flight calls may take to finish after a shutdown signal;
    /// keep it below the pod's `terminationGracePeriodSeconds`.
    pub shutdown_grace: Duration,
    /// Interval of heartbeats on watch streams, so dead peers are noticed.
    pub watch_heartbeat: Duration,
    /// Unary calls in flight before RESOURCE_EXHAUSTED.
    pub max_in_flight: usize,
    /// Watch streams open before RESOURCE_EXHAUSTED.
    pub max_watch_streams: usize,
    /// HTTP/2 streams (calls and watches) one connection may have open; a
    /// client's further calls wait on its side, not in the broker's memory.
    pub max_streams_per_connection: u32,
    /// Calls per second per workload (0: unlimited) and its burst.
    pub rate_per_identity: u32,
    pub burst_per_identity: u32,
    /// Calls per second over all workloads together (0: unlimited) and its
    /// burst, so many workloads each within their own rate cannot together
    /// push the replica past what it serves well.
    pub rate_global: u32,
    pub burst_global: u32,
    /// Watch streams one workload (cluster, namespace, service account, pod)
    /// may hold open at once; a sidecar needs one per 256 secrets.
    pub max_watch_streams_per_workload: usize,
    /// The most secret bytes one Fetch answers; more is RESOURCE_EXHAUSTED.
    pub max_response_bytes: usize,
    /// TCP connections the gRPC port keeps open; more are closed at accept.
    pub max_connections: usize,
    /// How long a new connection has to finish its TLS handshake.
    pub tls_handshake_timeout: Duration,
    /// How often the TLS files (gRPC and admin: certificate, key, client CA)
    /// are read for a change; cert-manager renewals apply without a restart.
    pub tls_reload_interval: Duration,
    /// A connection older than this (±10 %, drawn once per replica) is told
    /// to go away (HTTP/2 GOAWAY), so long-lived sidecar connections spread
    /// over replicas an autoscaler adds; `None`: never (`0s`).
    pub max_connection_age: Option<Duration>,
    /// How long streams on an aged connection may go on (a watch never
    /// ends by itself) before it is closed.
    pub max_connection_age_grace: Duration,
}

/// How fresh the revocation view must be.
#[derive(Debug, Clone)]
pub struct RevocationConfig {
    /// The rules are re-read this often (PostgreSQL also pushes changes at once).
    pub refresh_interval: Duration,
    /// A replica whose view is older than this refuses new issuance (fails
    /// closed) until it can read the rules again.
    pub max_staleness: Duration,
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        secrets_sidecar::strict_toml::load(path, Self::parse)
    }

    /// Parses and validates config text; `path` names the source in errors and
    /// anchors relative paths.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = secrets_sidecar::strict_toml::parse(text, path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        let v = Validator { path };
        let resolve = |p: PathBuf| if p.is_relative() { base.join(p) } else { p };

        let listen = raw.server.listen.parse().map_err(|e| {
            v.err(
                "server.listen",
                format!("not an address like 0.0.0.0:8443: {e}"),
            )
        })?;
        let ops_listen = match raw.server.ops_listen {
            None => None,
            Some(a) => Some(a.parse().map_err(|e| {
                v.err(
                    "server.ops_listen",
                    format!("not an address like 0.0.0.0:9090: {e}"),
                )
            })?),
        };
        let server = ServerConfig {
            listen,
            ops_listen,
            tls_cert_file: resolve(raw.server.tls_cert_file),
            tls_key_file: resolve(raw.server.tls_key_file),
            shutdown_grace: raw.server.shutdown_grace,
            max_in_flight: match raw.server.max_in_flight {
                n @ 1..=1_000_000 => n,
                _ => return Err(v.err("server.max_in_flight", "must be 1 to 1000000")),
            },
            max_watch_streams: match raw.server.max_watch_streams {
                n @ 1..=10_000_000 => n,
                _ => return Err(v.err("server.max_watch_streams", "must be 1 to 10000000")),
            },
            max_streams_per_connection: match raw.server.max_streams_per_connection {
                n @ 1..=100_000 => n,
                _ => {
                    return Err(v.err("server.max_streams_per_connection", "must be 1 to 100000"));
                }
            },
            rate_per_identity: raw.server.rate_per_identity,
            burst_per_identity: if raw.server.rate_per_identity > 0
                && raw.server.burst_per_identity < raw.server.rate_per_identity
            {
                return Err(v.err(
                    "server.burst_per_identity",
                    "must be at least server.rate_per_identity",
                ));
            } else {
                raw.server.burst_per_identity
            },
            rate_global: raw.server.rate_global,
            burst_global: match raw.server.burst_global {
                None => raw.server.rate_global,
                Some(b) if raw.server.rate_global > 0 && b < raw.server.rate_global => {
                    return Err(v.err("server.burst_global", "must be at least server.rate_global"));
                }
                Some(b) => b,
            },
            watch_heartbeat: v.bounded(
                "server.watch_heartbeat",
                raw.server.watch_heartbeat,
                Duration::from_secs(1),
                Duration::from_secs(600),
            )?,
            max_watch_streams_per_workload: match raw.server.max_watch_streams_per_workload {
                n @ 1..=1000 => n,
                _ => {
                    return Err(v.err("server.max_watch_streams_per_workload", "must be 1 to 1000"));
                }
            },
            max_response_bytes: match raw.server.max_response_bytes {
                n @ 65_536..=67_108_864 => n,
                _ => {
                    return Err(v.err(
                        "server.max_response_bytes",
                        "must be 65536 (64 KiB) to 67108864 (64 MiB)",
                    ));
                }
            },
            max_connections: match raw.server.max_connections {
                n @ 1..=1_000_000 => n,
                _ => return Err(v.err("server.max_connections", "must be 1 to 1000000")),
            },
            tls_handshake_timeout: v.bounded(
                "server.tls_handshake_timeout",
                raw.server.tls_handshake_timeout,
                Duration::from_millis(100),
                Duration::from_secs(120),
            )?,
            tls_reload_interval: v.bounded(
                "server.tls_reload_interval",
                raw.server.tls_reload_interval,
                Duration::from_secs(1),
                Duration::from_secs(3600),
            )?,
            max_connection_age: match raw.server.max_connection_age {
                Duration::ZERO => None,
                age => Some(v.bounded(
                    "server.max_connection_age",
                    age,
                    Duration::from_secs(1),
                    Duration::from_secs(7 * 24 * 3600),
                )?),
            },
            max_connection_age_grace: v.bounded(
                "server.max_connection_age_grace",
                raw.server.max_connection_age_grace,
                Duration::ZERO,
                Duration::from_secs(3600),
            )?,
        };

        let issuers = crate::identity::config::issuers(&v, raw.identity, raw.issuers, &resolve)?;

        let database = match raw.database.url.split_once(':') {
            Some(("sqlite", rest)) => {
                let path = rest.trim_start_matches("//");
                if path.is_empty() || raw.database.password_file.is_some() {
                    return Err(v.err(
                        "database.url",
                        "use sqlite://<path> (no password_file) or postgres://user@host/db",
                    ));
                }
                DatabaseConfig::Sqlite {
                    path: resolve(PathBuf::from(path)),
                }
            }
            Some(("postgres" | "postgresql", _)) => {
                let password = match raw.database.password_file {
                    None => None,
                    Some(file) => {
                        let file = resolve(file);
                        let text = std::fs::read_to_string(&file).map_err(|e| {
                            v.err(
                                "database.password_file",
                                format!("cannot read {}: {e}", file.display()),
                            )
                        })?;
                        Some(secrecy::SecretString::from(
                            text.trim_end_matches(['\r', '\n']).to_owned(),
                        ))
                    }
                };
                if !(1..=200).contains(&raw.database.max_connections) {
                    return Err(v.err("database.max_connections", "must be between 1 and 200"));
                }
                DatabaseConfig::Postgres {
                    url: secrecy::SecretString::from(raw.database.url),
                    password,
                    max_connections: raw.database.max_connections,
                }
            }
            _ => {
                return Err(v.err(
                    "database.url",
                    "use sqlite://<path> (one replica) or postgres://user@host/db (several replicas)",
                ));
            }
        };
        let revocation = RevocationConfig {
            refresh_interval: v.bounded(
                "revocation.refresh_interval",
                raw.revocation.refresh_interval,
                Duration::from_millis(50),
                Duration::from_secs(60),
            )?,
            max_staleness: v.bounded(
                "revocation.max_staleness",
                raw.revocation.max_staleness,
                Duration::from_millis(500),
                Duration::from_secs(3600),
            )?,
        };
        if revocation.max_staleness <= revocation.refresh_interval {
            return Err(v.err(
                "revocation.max_staleness",
                "must be longer than revocation.refresh_interval",
            ));
        }

        let admin = match raw.admin {
            None => None,
            Some(a) => Some(crate::api::admin::config::validate(
                &v,
                a,
                &resolve,
                &server.tls_cert_file,
                &server.tls_key_file,
            )?),
        };

        let store = crate::backend::embedded::config::validate(&v, raw.store, &resolve)?;

        let roles = crate::policy::roles(&v, raw.roles)?;
        for (i, r) in roles.iter().enumerate() {
            if let Some(c) = r
                .clusters
                .iter()
                .find(|c| !issuers.iter().any(|x| x.cluster == **c))
            {
                return Err(v.err(
                    &format!("roles[{i}].clusters"),
                    format!("no issuer has cluster {c:?}"),
                ));
            }
        }
        let vault = match raw.vault {
            None => None,
            Some(raw) => Some(crate::backend::vault::config::validate(&v, raw, &resolve)?),
        };
        let aws = match raw.aws {
            None => None,
            Some(raw) => Some(crate::backend::aws::config::validate(&v, raw)?),
        };
        if let (Some(vc), Some(ac)) = (&vault, &aws)
            && let Some(m) = ac
                .secrets
                .iter()
                .find(|m| vc.secrets.iter().any(|o| o.name == m.name))
        {
            return Err(v.err(
                "aws.secrets.name",
                format!("{:?} is mapped to both Vault and AWS", m.name),
            ));
        }
        let audit = match raw.audit {
            None => crate::state::checkpoint::AuditConfig::default(),
            Some(raw) => crate::state::checkpoint::validate(&v, raw, &resolve)?,
        };
        if audit.key_file.is_some() && audit.key_file.as_ref() == Some(&store.key_file) {
            return Err(v.err(
                "audit.key_file",
                "use a key file of its own, not store.key_file",
            ));
        }
        Ok(Config {
            server,
            issuers,
            database,
            store,
            revocation,
            admin,
            vault,
            aws,
            audit,
            roles,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::config::KeySource;

    const GOOD: &str = r#"
[server]
listen = "127.0.0.1:8443"
tls_cert_file = "tls.crt"
tls_key_file = "tls.key"

[identity]
issuer = "https://issuer.example"
audiences = ["secrets-broker"]

[database]
url = "sqlite://store.db"

[store]
key_file = "store.key"

[[roles]]
name = "api"
namespaces = ["payments"]
service_accounts = ["api-*"]
secrets = ["payments/*"]
ttl = "5m"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/sb/broker.toml"))
    }

    #[test]
    fn example_file_is_valid() {
        let text = include_str!("../../examples/broker.toml");
        let cfg = parse(text).expect("examples/broker.toml must stay valid");
        assert!(!cfg.roles.is_empty());
        assert_eq!(
            cfg.audit.key_file.as_deref(),
            Some(Path::new("/etc/secrets-broker/audit.key"))
        );
        assert_eq!(
            cfg.audit.retention,
            Some(Duration::from_secs(90 * 24 * 3600))
        );
    }

    #[test]
    fn the_audit_table_is_optional_and_its_key_is_not_the_store_key() {
        let cfg = parse(GOOD).unwrap();
        assert_eq!(cfg.audit, crate::state::checkpoint::AuditConfig::default());
        let err = parse(&format!("{GOOD}\n[audit]\nkey_file = \"store.key\"\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("key `audit.key_file`: use a key file of its own"),
            "{err}"
        );
        let err = parse(&format!("{GOOD}\n[audit]\nkeyfile = \"a.key\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("keyfile"), "{err}");
    }

    #[test]
    fn vault_example_is_valid() {
        use crate::backend::vault::config::{MappingKind, VaultAuth};
        let text = format!(
            "{}\n{}",
            include_str!("../../examples/broker.toml"),
            include_str!("../../examples/vault.toml")
        );
        let cfg = parse(&text).expect("examples/vault.toml must stay valid");
        let vault = cfg.vault.expect("a [vault] table");
        assert!(matches!(vault.auth, VaultAuth::Kubernetes { .. }));
        assert_eq!(vault.secrets.len(), 3);
        match &vault.secrets[0].kind {
            MappingKind::Kv {
                poll_interval, key, ..
            } => {
                assert_eq!(*poll_interval, Duration::from_secs(10));
                assert_eq!(key.as_deref(), Some("password"));
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(vault.secrets[1].is_dynamic() && vault.secrets[2].is_dynamic());
    }

    #[test]
    fn bad_vault_values_name_their_key() {
        let base = "[vault]\naddress = \"https://vault:8200\"\n[vault.auth]\nmethod = \"token\"\ntoken_file = \"t\"\n";
        let kv = "[[vault.secrets]]\nname = \"a/b\"\nkind = \"kv\"\nmount = \"secret\"\npath = \"a/b\"\n";
        let cases = [
            (
                base.replace("https://vault:8200", "vault:8200"),
                "vault.address",
            ),
            (base.replace("\"token\"", "\"ldap\""), "vault.auth.method"),
            (
                base.replace("token_file = \"t\"\n", ""),
                "vault.auth.token_file",
            ),
            (base.replace("token_file", "role_id"), "vault.auth.role"),
            (
                base.replace("\"token\"", "\"approle\""),
                "vault.auth.token_file",
            ),
            (
                base.replace("method = \"token\"\ntoken_file = \"t\"", "method = \"jwt\""),
                "vault.auth.role",
            ),
            (
                format!(
                    "{base}{}",
                    kv.replace("path = \"a/b\"", "path = \"../sys\"")
                ),
                "vault.secrets[0].path",
            ),
            (
                format!("{base}{}", kv.replace("name = \"a/b\"", "name = \"a b\"")),
                "vault.secrets[0].name",
            ),
            (
                format!("{base}{}", kv.replace("\"kv\"", "\"kv1\"")),
                "vault.secrets[0].kind",
            ),
            (
                format!("{base}{}", kv.replace("\"kv\"", "\"database\"")),
                "vault.secrets[0].path",
            ),
            (format!("{base}{kv}{kv}"), "vault.secrets[1].name"),
            (
                format!(
                    "{base}[[vault.secrets]]\nname = \"t\"\nkind = \"pki\"\nmount = \"pki\"\nrole = \"r\"\ncommon_name = \"{{pods}}.x\"\n"
                ),
                "vault.secrets[0].common_name",
            ),
            (
                format!(
                    "{base}{}",
                    kv.replace("path = \"a/b\"", "path = \"a/b\"\npoll_interval = \"1ms\"")
                ),
                "vault.secrets[0].poll_interval",
            ),
        ];
        for (vault, key) in cases {
            let err = parse(&format!("{GOOD}\n{vault}")).unwrap_err().to_string();
            assert!(err.contains(&format!("`{key}`")), "{key}: {err}");
        }
    }

    #[test]
    fn good_config_resolves_paths_and_defaults() {
        let cfg = parse(GOOD).unwrap();
        match &cfg.database {
            DatabaseConfig::Sqlite { path } => assert_eq!(path, Path::new("/etc/sb/store.db")),
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(cfg.roles[0].ttl, Duration::from_secs(300));
        match &cfg.issuers[0].keys {
            KeySource::Discovery { url, .. } => {
                assert_eq!(
                    url,
                    "https://issuer.example/.well-known/openid-configuration"
                )
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn global_rate_is_off_unless_set_and_its_burst_defaults_to_one_second() {
        let off = parse(GOOD).unwrap().server;
        assert_eq!((off.rate_global, off.burst_global), (0, 0));
        let with = |keys: &str| {
            parse(&GOOD.replace(
                "tls_key_file = \"tls.key\"",
                &format!("tls_key_file = \"tls.key\"\n{keys}"),
            ))
            .unwrap()
            .server
        };
        let set = with("rate_global = 2000");
        assert_eq!((set.rate_global, set.burst_global), (2000, 2000));
        let set = with("rate_global = 2000\nburst_global = 5000");
        assert_eq!((set.rate_global, set.burst_global), (2000, 5000));
        // 0 is off whatever the burst says, as for the per-workload rate.
        let set = with("rate_global = 0\nburst_global = 0");
        assert_eq!(set.rate_global, 0);
    }

    #[test]
    fn connections_age_out_after_30_minutes_unless_told_otherwise() {
        let with = |keys: &str| {
            parse(&GOOD.replace(
                "tls_key_file = \"tls.key\"",
                &format!("tls_key_file = \"tls.key\"\n{keys}"),
            ))
        };
        let default = parse(GOOD).unwrap().server;
        assert_eq!(default.max_connection_age, Some(Duration::from_secs(1800)));
        assert_eq!(default.max_connection_age_grace, Duration::from_secs(30));
        let off = with("max_connection_age = \"0s\"").unwrap().server;
        assert_eq!(off.max_connection_age, None);
        // TLS files are read for a change every 10 s unless told otherwise.
        assert_eq!(default.tls_reload_interval, Duration::from_secs(10));
        let every = with("tls_reload_interval = \"2s\"").unwrap().server;
        assert_eq!(every.tls_reload_interval, Duration::from_secs(2));
        let err = with("tls_reload_interval = \"100ms\"")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("key `server.tls_reload_interval`: 100ms is out of range"),
            "{err}"
        );
        let err = with("max_connection_age = \"500ms\"")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("key `server.max_connection_age`: 500ms is out of range"),
            "{err}"
        );
    }

    #[test]
    fn unknown_key_is_named() {
        let text = GOOD.replace("[store]", "[store]\nkey_fiel = \"x\"");
        let err = parse(&text).unwrap_err().to_string();
        // The same `config file F: key K: …` form as every other config error,
        // on one line, with the valid keys and the one that was meant.
        assert!(
            err.starts_with(
                "config file /etc/sb/broker.toml: key `store.key_fiel`: unknown key (line "
            ),
            "{err}"
        );
        assert!(err.contains("did you mean `key_file`?"), "{err}");
        assert!(err.contains("the keys of `store` are `key_file`"), "{err}");
        assert!(!err.contains('\n'), "{err}");
        // In an array of tables, the index.
        let text = GOOD.replacen("[[roles]]", "[[roles]]\nttll = \"1m\"", 1);
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("key `roles[0].ttll`"), "{err}");
        assert!(err.contains("did you mean `ttl`?"), "{err}");
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            (
                "listen = \"127.0.0.1:8443\"",
                "listen = \"nope\"",
                "server.listen",
            ),
            (
                "https://issuer.example",
                "http://issuer.example",
                "identity.issuer",
            ),
            ("ttl = \"5m\"", "ttl = \"5h\"", "roles[0].ttl"),
            ("[\"api-*\"]", "[\"a[b\"]", "roles[0].service_accounts"),
            ("name = \"api\"", "name = \"Bad Name\"", "roles[0].name"),
            (
                "audiences = [\"secrets-broker\"]",
                "audiences = []",
                "identity.audiences",
            ),
            ("sqlite://store.db", "mysql://x", "database.url"),
            (
                "[store]",
                "[revocation]\nmax_staleness = \"10ms\"\n[store]",
                "revocation.max_staleness",
            ),
            (
                "tls_key_file = \"tls.key\"",
                "tls_key_file = \"tls.key\"\nrate_global = 100\nburst_global = 50",
                "server.burst_global",
            ),
        ];
        for (from, to, key) in cases {
            let err = parse(&GOOD.replace(from, to)).unwrap_err().to_string();
            assert!(err.contains(&format!("`{key}`")), "{to}: {err}");
        }
        let err = parse(&GOOD.replace("[identity]", "[identity]\nalgorithms = [\"HS256\"]"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("identity.algorithms") && err.contains("HMAC"),
            "{err}"
        );
    }

    #[test]
    fn several_issuers_are_clusters() {
        let two = GOOD.replace(
            "[identity]\nissuer = \"https://issuer.example\"\naudiences = [\"secrets-broker\"]\n",
            "[[issuers]]\ncluster = \"a\"\nissuer = \"https://a.example\"\naudiences = [\"sb\"]\n\n[[issuers]]\ncluster = \"b\"\nissuer = \"https://b.example\"\naudiences = [\"sb\"]\n",
        );
        let cfg = parse(&two).unwrap();
        assert_eq!(cfg.issuers.len(), 2);
        assert_eq!(cfg.issuers[1].cluster, "b");
        let dup = two.replace("cluster = \"b\"", "cluster = \"a\"");
        assert!(
            parse(&dup)
                .unwrap_err()
                .to_string()
                .contains("`issuers[1].cluster`")
        );
        let both = format!("{two}\n").replace(
            "[database]",
            "[identity]\nissuer = \"https://c.example\"\naudiences = [\"x\"]\n[database]",
        );
        assert!(parse(&both).unwrap_err().to_string().contains("not both"));
        let unknown = two.replace("name = \"api\"", "name = \"api\"\nclusters = [\"zzz\"]");
        let err = parse(&unknown).unwrap_err().to_string();
        assert!(
            err.contains("`roles[0].clusters`") && err.contains("zzz"),
            "{err}"
        );
        let none = GOOD.replace(
            "[identity]\nissuer = \"https://issuer.example\"\naudiences = [\"secrets-broker\"]\n",
            "",
        );
        assert!(
            parse(&none)
                .unwrap_err()
                .to_string()
                .contains("configure the token issuer")
        );
    }

    #[test]
    fn no_roles_is_refused() {
        let text = GOOD.split("[[roles]]").next().unwrap();
        let err = parse(text).unwrap_err().to_string();
        assert!(err.contains("deny by default"), "{err}");
    }

    proptest::proptest! {
        /// Arbitrary text never panics the parser; errors name the file.
        #[test]
        fn arbitrary_text_never_panics(text in "\\PC{0,300}") {
            if let Err(e) = parse(&text) {
                proptest::prop_assert!(e.to_string().contains("broker.toml"));
            }
        }

        /// Mutating one value of a good file either parses or names the problem.
        #[test]
        fn mutated_values_are_reported(value in "[ -~]{0,20}") {
            let text = GOOD.replace("\"5m\"", &format!("{value:?}"));
            if let Err(e) = parse(&text) {
                proptest::prop_assert!(e.to_string().contains("broker.toml"));
            }
        }
    }
}
