//! `brokerctl`: the operators' CLI over the broker's admin API (HTTPS with a
//! client certificate). Exit codes: 0 success, 1 the API refused or failed
//! (or `audit verify` found a problem), 2 usage or local errors.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::{Value, json};

mod api;
mod table;

use api::{Api, Failure};
use table::{RULE_HEADERS, rule_rows, s, table, when};

/// Operate a secrets-broker: revoke access, inspect leases and the audit
/// log, manage the embedded store.
#[derive(Parser)]
#[command(name = "brokerctl", version)]
struct Cli {
    /// Admin API base URL.
    #[arg(
        long,
        global = true,
        env = "BROKERCTL_SERVER",
        default_value = "https://127.0.0.1:8444"
    )]
    server: String,
    /// Client certificate (PEM) mapped to a role in the broker's [[admin.clients]].
    #[arg(long, global = true, env = "BROKERCTL_CERT")]
    cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, global = true, env = "BROKERCTL_KEY")]
    key: Option<PathBuf>,
    /// CA bundle that signed the admin API's server certificate.
    #[arg(long, global = true, env = "BROKERCTL_CA")]
    ca: Option<PathBuf>,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value = "table")]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Revoke access now: affected sidecars remove the secrets within about a
    /// second, and new logins and fetches are refused until the rule is lifted.
    Revoke {
        /// Only identities of this cluster (an issuer's `cluster` in the broker config).
        #[arg(long)]
        cluster: Option<String>,
        #[arg(long)]
        namespace: Option<String>,
        /// Needs --namespace.
        #[arg(long)]
        service_account: Option<String>,
        #[arg(long)]
        pod_uid: Option<String>,
        /// A lease ID: revokes it and keeps its pod from fetching that secret again.
        #[arg(long)]
        lease: Option<String>,
        /// A secret name: withheld from everyone the other selectors match.
        #[arg(long)]
        secret: Option<String>,
        /// Why (recorded in the rule, the audit log and sidecar logs).
        #[arg(long)]
        reason: String,
        /// Lift the rule by itself after this long (e.g. 30m, 2h); default: never.
        #[arg(long = "for", value_parser = humantime::parse_duration)]
        for_duration: Option<Duration>,
    },
    /// Manage revocation rules.
    Revocations {
        #[command(subcommand)]
        command: RevocationsCommand,
    },
    /// Inspect leases.
    Leases {
        #[command(subcommand)]
        command: LeasesCommand,
    },
    /// Read and check the audit log.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Manage secrets in the embedded store.
    Secrets {
        #[command(subcommand)]
        command: SecretsCommand,
    },
}

#[derive(Subcommand)]
enum RevocationsCommand {
    /// Rules in force.
    List,
    /// Lift a rule.
    Delete { id: String },
}

#[derive(Subcommand)]
enum LeasesCommand {
    /// Who holds what, until when.
    List {
        #[arg(long)]
        namespace: Option<String>,
        #[arg(long, default_value_t = 1000)]
        limit: i64,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// The last N records.
    Tail {
        #[arg(short = 'n', long, default_value_t = 20)]
        lines: i64,
    },
    /// Check the audit chain; exit 1 when a record was altered or removed.
    ///
    /// The broker checks every record's hash (an HMAC under its audit key,
    /// when it has one) and the log against the last checkpoint it
    /// exported. With --checkpoints, also against the checkpoints in FILE
    /// (the sink of audit.checkpoint_file, or a log shipper's copy): the
    /// last one of each broker run, so removing the newest records, or
    /// rewriting and chaining them again, is detected up to the newest
    /// checkpoint.
    Verify {
        /// A file of exported checkpoint lines (other lines are skipped).
        #[arg(long, value_name = "FILE")]
        checkpoints: Option<PathBuf>,
    },
}

/// Most checkpoints sent with one `audit verify` (the API takes 200).
const MAX_CHECKPOINTS: usize = 200;

/// The checkpoints worth checking in a sink's text: the last one of each
/// broker run (a run's later checkpoints extend its earlier ones), the
/// newest runs first, at most [`MAX_CHECKPOINTS`]. Lines that are not
/// checkpoints (a log shipper's stream) are skipped, and so is whatever
/// precedes the JSON on a line (a timestamp).
fn checkpoints_in(text: &str) -> Vec<Value> {
    let mut last_of_run: Vec<(String, Value)> = Vec::new();
    for line in text.lines() {
        let Some(start) = line.find('{') else {
            continue;
        };
        let Ok(v) = serde_json::from_str::<Value>(line[start..].trim_end()) else {
            continue;
        };
        if v["kind"] != "audit_checkpoint" {
            continue;
        }
        let run = v["run"].as_str().unwrap_or_default().to_owned();
        last_of_run.retain(|(r, _)| *r != run);
        last_of_run.push((run, v));
    }
    last_of_run
        .into_iter()
        .rev()
        .take(MAX_CHECKPOINTS)
        .map(|(_, v)| v)
        .collect()
}

#[derive(Subcommand)]
enum SecretsCommand {
    /// Store a new version (read from --value-file, or standard input).
    Put {
        name: String,
        #[arg(long, default_value = "-")]
        value_file: PathBuf,
    },
    /// Print the latest value (raw bytes to standard output; JSON with --output json).
    Get { name: String },
    /// Names and latest versions.
    List,
    /// Delete every version.
    Delete { name: String },
}

/// The API path of a secret, refused before anything is sent when the
/// broker would refuse the name: each `/`-separated part is one segment.
fn secret_path(name: &str) -> Result<Vec<&str>, Failure> {
    secrets_broker::backend::validate_secret_name(name).map_err(Failure::Local)?;
    Ok(["v1", "secrets"]
        .into_iter()
        .chain(name.split('/'))
        .collect())
}

/// A revocation rule ID as the broker makes them (`rv-` and hex): anything
/// else names no rule, and is refused before it is sent.
fn check_rule_id(id: &str) -> Result<(), Failure> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'));
    if ok {
        Ok(())
    } else {
        Err(Failure::Local(format!(
            "{id:?} is not a revocation rule ID (like rv-0123456789abcdef; see `brokerctl revocations list`)"
        )))
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let api = Api::new(&cli)?;
    let json_out = cli.output == Output::Json;
    let print_json =
        |v: &Value| println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    use reqwest::Method;
    match cli.command {
        Command::Revoke {
            cluster,
            namespace,
            service_account,
            pod_uid,
            lease,
            secret,
            reason,
            for_duration,
        } => {
            let body = json!({
                "cluster": cluster, "namespace": namespace, "service_account": service_account, "pod_uid": pod_uid,
                "lease_id": lease, "secret": secret, "reason": reason,
                "for_seconds": for_duration.map(|d| d.as_secs().max(1)),
            });
            let v = api
                .call(Method::POST, &["v1", "revocations"], &[], Some(body))
                .await?;
            if json_out {
                print_json(&v);
            } else {
                table(&RULE_HEADERS, rule_rows(std::slice::from_ref(&v["rule"])));
                println!("leases ended: {}", s(&v, "leases_ended"));
            }
        }
        Command::Revocations { command } => match command {
            RevocationsCommand::List => {
                let v = api
                    .call(Method::GET, &["v1", "revocations"], &[], None)
                    .await?;
                if json_out {
                    print_json(&v);
                } else {
                    table(
                        &RULE_HEADERS,
                        rule_rows(
                            v["revocations"]
                                .as_array()
                                .map(Vec::as_slice)
                                .unwrap_or_default(),
                        ),
                    );
                }
            }
            RevocationsCommand::Delete { id } => {
                check_rule_id(&id)?;
                api.call(Method::DELETE, &["v1", "revocations", &id], &[], None)
                    .await?;
                if json_out {
                    print_json(&json!({ "deleted": id }));
                } else {
                    println!("deleted rule {id}");
                }
            }
        },
        Command::Leases {
            command: LeasesCommand::List { namespace, limit },
        } => {
            let mut query = vec![("limit", limit.to_string())];
            if let Some(ns) = namespace {
                query.push(("namespace", ns));
            }
            let v = api
                .call(Method::GET, &["v1", "leases"], &query, None)
                .await?;
            if json_out {
                print_json(&v);
            } else {
                let rows = v["leases"]
                    .as_array()
                    .map(Vec::as_slice)
                    .unwrap_or_default()
                    .iter()
                    .map(|l| {
                        vec![
                            s(l, "lease_id"),
                            s(l, "namespace"),
                            s(l, "service_account"),
                            s(l, "pod_name"),
                            s(l, "secret"),
                            s(l, "version"),
                            when(l, "expires_at"),
                        ]
                    })
                    .collect();
                table(
                    &[
                        "lease",
                        "namespace",
                        "service account",
                        "pod",
                        "secret",
                        "version",
                        "expires",
                    ],
                    rows,
                );
            }
        }
        Command::Audit { command } => match command {
            AuditCommand::Tail { lines } => {
                let v = api
                    .call(
                        Method::GET,
                        &["v1", "audit"],
                        &[("tail", lines.to_string())],
                        None,
                    )
                    .await?;
                if json_out {
                    print_json(&v);
                } else {
                    let rows = v["records"]
                        .as_array()
                        .map(Vec::as_slice)
                        .unwrap_or_default()
                        .iter()
                        .map(|r| {
                            let at = r["at_ms"].as_i64().unwrap_or_default();
                            let at = time::OffsetDateTime::from_unix_timestamp_nanos(
                                i128::from(at) * 1_000_000,
                            )
                            .ok()
                            .and_then(|t| {
                                t.format(&time::format_description::well_known::Rfc3339)
                                    .ok()
                            })
                            .unwrap_or_default();
                            vec![
                                s(r, "seq"),
                                at,
                                s(r, "actor"),
                                s(r, "action"),
                                s(r, "result"),
                                s(r, "detail"),
                            ]
                        })
                        .collect();
                    table(
                        &["seq", "time", "actor", "action", "result", "detail"],
                        rows,
                    );
                }
            }
            AuditCommand::Verify { checkpoints } => {
                let v = match checkpoints {
                    None => {
                        api.call(Method::GET, &["v1", "audit", "verify"], &[], None)
                            .await?
                    }
                    Some(file) => {
                        let text = std::fs::read(&file).map_err(|e| {
                            Failure::Local(format!("cannot read {}: {e}", file.display()))
                        })?;
                        let found = checkpoints_in(&String::from_utf8_lossy(&text));
                        if found.is_empty() {
                            return Err(Failure::Local(format!(
                                "{} holds no audit checkpoint line (\"kind\":\"audit_checkpoint\")",
                                file.display()
                            )));
                        }
                        api.call(
                            Method::POST,
                            &["v1", "audit", "verify"],
                            &[],
                            Some(json!({ "checkpoints": found })),
                        )
                        .await?
                    }
                };
                if json_out {
                    print_json(&v);
                } else if v["ok"] == true {
                    println!(
                        "audit log intact: {} records, last seq {}",
                        s(&v, "records"),
                        s(&v, "last_seq")
                    );
                    if let Some(seq) = v["checkpoint_seq"].as_i64() {
                        println!(
                            "matches {} exported checkpoints (the newest at seq {seq})",
                            s(&v, "checkpoints_checked")
                        );
                    }
                    if v["first_seq"].as_i64().is_some_and(|f| f > 1) {
                        println!(
                            "the log starts at seq {} (older records pruned by audit.retention)",
                            s(&v, "first_seq")
                        );
                    }
                    let legacy = v["legacy_records"].as_i64().unwrap_or_default();
                    if legacy > 0 {
                        println!(
                            "warning: {legacy} records are chained with plain SHA-256 (no audit key when they were written): not tamper-evident against a database writer"
                        );
                    }
                    for note in v["notes"].as_array().map(Vec::as_slice).unwrap_or_default() {
                        println!("note: {}", note.as_str().unwrap_or_default());
                    }
                }
                if v["ok"] != true {
                    return Err(Failure::Remote(format!(
                        "audit log check failed: {}",
                        s(&v, "problem")
                    )));
                }
            }
        },
        Command::Secrets { command } => match command {
            SecretsCommand::Put { name, value_file } => {
                let path = secret_path(&name)?;
                let value = zeroize::Zeroizing::new(if value_file.as_os_str() == "-" {
                    let mut buf = Vec::new();
                    std::io::stdin()
                        .read_to_end(&mut buf)
                        .map_err(|e| Failure::Local(format!("cannot read standard input: {e}")))?;
                    buf
                } else {
                    std::fs::read(&value_file).map_err(|e| {
                        Failure::Local(format!("cannot read {}: {e}", value_file.display()))
                    })?
                });
                let body = json!({ "value_base64": STANDARD.encode(&*value) });
                let v = api.call(Method::PUT, &path, &[], Some(body)).await?;
                if json_out {
                    print_json(&v);
                } else {
                    println!("{name} version {}", s(&v, "version"));
                }
            }
            SecretsCommand::Get { name } => {
                let v = api
                    .call(Method::GET, &secret_path(&name)?, &[], None)
                    .await?;
                if json_out {
                    print_json(&v);
                } else {
                    let bytes = zeroize::Zeroizing::new(
                        STANDARD
                            .decode(v["value_base64"].as_str().unwrap_or_default())
                            .map_err(|_| {
                                Failure::Remote("the API returned an invalid value".into())
                            })?,
                    );
                    use std::io::Write;
                    std::io::stdout()
                        .write_all(&bytes)
                        .map_err(|e| Failure::Local(e.to_string()))?;
                }
            }
            SecretsCommand::List => {
                let v = api.call(Method::GET, &["v1", "secrets"], &[], None).await?;
                if json_out {
                    print_json(&v);
                } else {
                    let rows = v["secrets"]
                        .as_array()
                        .map(Vec::as_slice)
                        .unwrap_or_default()
                        .iter()
                        .map(|x| vec![s(x, "name"), s(x, "version")])
                        .collect();
                    table(&["name", "version"], rows);
                }
            }
            SecretsCommand::Delete { name } => {
                let v = api
                    .call(Method::DELETE, &secret_path(&name)?, &[], None)
                    .await?;
                if json_out {
                    print_json(&v);
                } else {
                    println!("deleted {name} ({} versions)", s(&v, "versions_deleted"));
                }
            }
        },
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    secrets_broker::install_crypto_provider();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Local(m)) => {
            eprintln!("error: {m}");
            ExitCode::from(2)
        }
        Err(Failure::Remote(m)) => {
            eprintln!("error: {m}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_checkpoint_of_each_run_is_sent_newest_first() {
        let cp = |run: &str, seq: i64| {
            format!(
                r#"{{"kind":"audit_checkpoint","seq":{seq},"count":{seq},"head":"h","at_ms":1,"key_id":"a1","run":"{run}","sig":"s"}}"#
            )
        };
        let text = [
            cp("r1", 3),
            "broker started".to_owned(),
            cp("r1", 5),
            format!("2026-01-01T00:00:00Z stdout F {}", cp("r2", 9)),
            r#"{"kind":"other","seq":10}"#.to_owned(),
            "{not json".to_owned(),
            cp("r2", 12),
        ]
        .join("\n");
        let found: Vec<(String, i64)> = checkpoints_in(&text)
            .iter()
            .map(|v| (s(v, "run"), v["seq"].as_i64().unwrap()))
            .collect();
        assert_eq!(found, [("r2".to_owned(), 12), ("r1".to_owned(), 5)]);
        assert!(checkpoints_in("nothing here\n").is_empty());
    }
}
