//! What one caller with a valid pod token can make the broker hold, bounded,
//! against the real broker: a Fetch serves a repeated name once and refuses
//! an answer over `server.max_response_bytes`; a Release carries at most 256
//! leases and counts against the workload's rate; one workload's watch
//! streams are bounded.

use secrets_broker::dev::issuer::Workload;
use secrets_broker_e2e::{AUDIENCE, World};
use secrets_broker_proto::v1 as pb;
use tonic::Code;

const ROLES: &str = r#"
[[roles]]
name = "app"
namespaces = ["team-a"]
service_accounts = ["app"]
secrets = ["app/*"]
"#;

fn request<T>(token: &str, msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    req
}

fn fetch(names: &[&str]) -> pb::FetchRequest {
    pb::FetchRequest {
        role: String::new(),
        names: names.iter().map(|n| (*n).to_owned()).collect(),
        ttl_seconds: 0,
    }
}

#[test]
fn one_caller_cannot_make_the_broker_answer_hold_or_audit_without_bound() {
    let world = World::new(ROLES).unwrap();
    // A small answer limit, so 40 KB secrets reach it.
    let cfg = world.broker_config();
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "watch_heartbeat = \"5s\"",
        "watch_heartbeat = \"5s\"\nmax_response_bytes = 65536\nmax_watch_streams_per_workload = 2",
    );
    std::fs::write(&cfg, text).unwrap();
    let big = "x".repeat(40_000);
    world.put("app/a", &big).unwrap();
    world.put("app/b", &big).unwrap();
    let _broker = world.start_broker("broker.log").unwrap();
    let token = world
        .issuer
        .mint(&Workload::new("team-a", "app", AUDIENCE))
        .unwrap();
    world.runtime.block_on(async {
        let ch = world.grpc_channel(world.broker_port).await;
        let mut c = pb::broker_client::BrokerClient::new(ch);

        // 256 copies of one name: served once (not 256 × 40 KB).
        let answer = c
            .fetch(request(&token, fetch(&["app/a"; 256])))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(answer.secrets.len(), 1);
        // Two distinct 40 KB secrets come to more than 64 KiB.
        let status = c
            .fetch(request(&token, fetch(&["app/a", "app/b"])))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert!(
            status
                .message()
                .contains("more than 65536 bytes (server.max_response_bytes)"),
            "{status:?}"
        );
        // More entries than a call may carry, duplicates or not.
        let status = c
            .fetch(request(&token, fetch(&["app/a"; 257])))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

        // Release: at most 256 leases, checked before any lookup...
        let lease = |i: usize| pb::LeaseRef {
            name: "app/a".into(),
            version: 1,
            lease_id: format!("l-{i}"),
        };
        let status = c
            .release(request(
                &token,
                pb::ReleaseRequest {
                    role: String::new(),
                    leases: (0..257).map(lease).collect(),
                },
            ))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(
            status
                .message()
                .contains("257 leases in one call, at most 256"),
            "{status:?}"
        );
        // ...and the workload's rate (20 a second, bursts of 40) applies.
        let mut limited = 0;
        for i in 0..60 {
            let r = c
                .release(request(
                    &token,
                    pb::ReleaseRequest {
                        role: String::new(),
                        leases: vec![lease(i)],
                    },
                ))
                .await;
            if let Err(s) = r {
                assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
                limited += 1;
            }
        }
        assert!(limited > 0, "60 releases at once were all admitted");
    });

    // Watch streams per workload: two open, the third refused naming the key.
    // (A fresh token: the releases above spent the workload's burst.)
    std::thread::sleep(std::time::Duration::from_secs(3));
    world.runtime.block_on(async {
        let ch = world.grpc_channel(world.broker_port).await;
        let mut c = pb::broker_client::BrokerClient::new(ch);
        let watch = || {
            request(
                &token,
                pb::WatchRequest {
                    role: String::new(),
                    names: vec!["app/a".into()],
                },
            )
        };
        let first = c.watch(watch()).await.unwrap();
        let _second = c.watch(watch()).await.unwrap();
        let status = c.watch(watch()).await.unwrap_err();
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert!(
            status.message().contains("team-a/app has 2 watch streams open, its limit (server.max_watch_streams_per_workload)"),
            "{status:?}"
        );
        // Closing one gives its place back.
        drop(first);
        let mut reopened = None;
        for _ in 0..50 {
            if let Ok(s) = c.watch(watch()).await {
                reopened = Some(s);
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert!(reopened.is_some(), "a closed stream's place was not given back");
    });
}

/// The audit log as brokerctl shows it, newest last, each detail parsed.
fn audit_records(world: &World) -> Vec<serde_json::Value> {
    let o = world
        .brokerctl(
            Some("viewer"),
            &["--output", "json", "audit", "tail", "-n", "5000"],
        )
        .unwrap();
    assert!(o.status.success(), "{}", secrets_broker_e2e::out_text(&o));
    let all: Vec<serde_json::Value> = serde_json::from_slice::<Vec<serde_json::Value>>(&o.stdout)
        .or_else(|_| {
            serde_json::from_slice::<serde_json::Value>(&o.stdout)
                .map(|v| v["records"].as_array().cloned().unwrap_or_default())
        })
        .unwrap();
    all.into_iter()
        .map(|mut r| {
            if let Some(text) = r["detail"].as_str() {
                r["detail"] = serde_json::from_str(text).unwrap_or_default();
            }
            r
        })
        .collect()
}

/// Every call takes one path in one order (`api::envelope`): the request's
/// shape is checked before its token (a malformed lease ID with a garbage
/// token is INVALID_ARGUMENT, and nothing is audited), a refusal's record
/// lists a count and a sample of the names, not all of them, and a Watch
/// names each secret once.
#[test]
fn every_call_takes_one_path_shape_first_and_writes_one_bounded_record() {
    let world = World::new(ROLES).unwrap();
    world.put("app/a", "a").unwrap();
    let _broker = world.start_broker("broker.log").unwrap();
    let token = world
        .issuer
        .mint(&Workload::new("team-a", "app", AUDIENCE))
        .unwrap();
    world.runtime.block_on(async {
        let ch = world.grpc_channel(world.broker_port).await;
        let mut c = pb::broker_client::BrokerClient::new(ch);
        // A path-like lease ID is a bad request before any token work.
        let status = c
            .release(request(
                "garbage.token.here",
                pb::ReleaseRequest {
                    role: String::new(),
                    leases: vec![pb::LeaseRef {
                        name: "app/a".into(),
                        version: 1,
                        lease_id: "../../revocations/rv-1".into(),
                    }],
                },
            ))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains("no valid lease ID"), "{status:?}");
        // 256 names the role does not grant: refused, one bounded record.
        let names: Vec<String> = (0..256).map(|i| format!("other/secret-{i:03}")).collect();
        let status = c
            .fetch(request(
                &token,
                pb::FetchRequest {
                    role: String::new(),
                    names: names.clone(),
                    ttl_seconds: 0,
                },
            ))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        // Three copies of one name: watched (and audited) once.
        let watch = c
            .watch(request(
                &token,
                pb::WatchRequest {
                    role: String::new(),
                    names: vec!["app/a".into(); 3],
                },
            ))
            .await
            .unwrap();
        drop(watch);
    });
    let records = secrets_broker_e2e::wait_for(
        "the watch's audit record",
        std::time::Duration::from_secs(20),
        || {
            let all = audit_records(&world);
            all.iter().any(|r| r["action"] == "watch").then_some(all)
        },
    )
    .unwrap();
    assert!(
        !records.iter().any(|r| r["action"] == "release"),
        "a call refused for its shape was audited: {records:?}"
    );
    let refused = records
        .iter()
        .find(|r| r["action"] == "fetch" && r["result"] == "denied")
        .unwrap_or_else(|| panic!("no record of the refused fetch: {records:?}"));
    assert_eq!(refused["detail"]["names"]["count"], 256, "{refused}");
    assert_eq!(
        refused["detail"]["names"]["sample"]
            .as_array()
            .map(Vec::len),
        Some(16),
        "{refused}"
    );
    assert_eq!(refused["detail"]["issuer"], world.issuer.url(), "{refused}");
    let watched = records.iter().find(|r| r["action"] == "watch").unwrap();
    assert_eq!(
        watched["detail"]["secrets"],
        serde_json::json!(["app/a"]),
        "{watched}"
    );
}

/// Eight concurrent Fetches of 256 copies of a 1 MB secret: the broker's
/// memory stays within 64 MiB of where it was (each answer is one copy).
#[test]
fn repeated_names_of_a_large_secret_do_not_grow_the_broker() {
    let world = World::new(ROLES).unwrap();
    world.put("app/large", &"y".repeat(1 << 20)).unwrap();
    let broker = world.start_broker("broker.log").unwrap();
    let pid = broker.child.id();
    let token = world
        .issuer
        .mint(&Workload::new("team-a", "app", AUDIENCE))
        .unwrap();
    let (before, after) = world.runtime.block_on(async {
        let ch = world.grpc_channel(world.broker_port).await;
        let mut c = pb::broker_client::BrokerClient::new(ch.clone());
        // Warm: the value in the cache, the connection's buffers grown.
        c.fetch(request(&token, fetch(&["app/large"])))
            .await
            .unwrap();
        let before = secrets_broker_e2e::status_kib(pid, "VmRSS");
        let mut calls = tokio::task::JoinSet::new();
        for _ in 0..8 {
            let mut c = pb::broker_client::BrokerClient::new(ch.clone());
            let req = request(&token, fetch(&["app/large"; 256]));
            calls.spawn(async move { c.fetch(req).await.map(|r| r.into_inner().secrets.len()) });
        }
        while let Some(served) = calls.join_next().await {
            assert_eq!(served.unwrap().unwrap(), 1);
        }
        (before, secrets_broker_e2e::status_kib(pid, "VmHWM"))
    });
    println!("broker RSS before {before} KiB, peak during the fetches {after} KiB");
    assert!(
        after < before + 64 * 1024,
        "broker peak RSS {after} KiB, from {before} KiB"
    );
}

/// 2,000 logins with garbage tokens from one peer: each is refused and
/// counted in the metrics, but the audit log gets a few of them in full and
/// one summary record with the count, not 2,000 permanent rows.
#[test]
fn refused_logins_are_audited_a_few_in_full_and_the_rest_summarized() {
    let world = World::new(ROLES).unwrap();
    let _broker = world.start_broker("broker.log").unwrap();
    world.runtime.block_on(async {
        let ch = world.grpc_channel(world.broker_port).await;
        let mut c = pb::broker_client::BrokerClient::new(ch);
        for i in 0..2000 {
            let req = request(
                &format!("garbage.{i}.token"),
                pb::LoginRequest {
                    role: String::new(),
                },
            );
            let status = c.login(req).await.unwrap_err();
            assert_eq!(status.code(), Code::Unauthenticated);
        }
    });
    let records = || -> Vec<serde_json::Value> {
        let o = world
            .brokerctl(
                Some("viewer"),
                &["--output", "json", "audit", "tail", "-n", "5000"],
            )
            .unwrap();
        assert!(o.status.success(), "{}", secrets_broker_e2e::out_text(&o));
        serde_json::from_slice::<Vec<serde_json::Value>>(&o.stdout)
            .or_else(|_| {
                serde_json::from_slice::<serde_json::Value>(&o.stdout)
                    .map(|v| v["records"].as_array().cloned().unwrap_or_default())
            })
            .unwrap()
    };
    // (in full, summarized) so far; the summaries come every 10 s.
    let tally = || {
        let all = records();
        let in_full = all
            .iter()
            .filter(|r| r["actor"].as_str().is_some_and(|a| a.starts_with("token:")))
            .count() as u64;
        let counted: u64 = all
            .iter()
            .filter(|r| r["result"] == "refusals_summarized")
            .map(|r| {
                let detail: serde_json::Value = match &r["detail"] {
                    serde_json::Value::String(s) => serde_json::from_str(s).unwrap_or_default(),
                    other => other.clone(),
                };
                detail["refusals"].as_u64().unwrap_or(0)
            })
            .sum();
        (in_full, counted)
    };
    let (in_full, counted) = secrets_broker_e2e::wait_for(
        "every refusal accounted for",
        std::time::Duration::from_secs(60),
        || {
            let (in_full, counted) = tally();
            (in_full + counted == 2000).then_some((in_full, counted))
        },
    )
    .unwrap_or_else(|e| panic!("{e}: {:?}", tally()));
    println!("2,000 refused logins: {in_full} audit records in full, {counted} summarized");
    assert!(in_full < 100, "{in_full} refusals audited in full");
}

/// Connections that never send a TLS ClientHello are closed after the
/// handshake timeout, and one past `server.max_connections` at once; the
/// port serves again as soon as they are gone.
#[test]
fn silent_and_excess_connections_are_closed() {
    use std::io::Read;
    let world = World::new(ROLES).unwrap();
    let cfg = world.broker_config();
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "watch_heartbeat = \"5s\"",
        "watch_heartbeat = \"5s\"\nmax_connections = 3\ntls_handshake_timeout = \"1s\"",
    );
    std::fs::write(&cfg, text).unwrap();
    world.put("app/a", "a-value").unwrap();
    let _broker = world.start_broker("broker.log").unwrap();
    let connect = || {
        let s = std::net::TcpStream::connect(("127.0.0.1", world.broker_port)).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(20)))
            .unwrap();
        s
    };
    // Closed: the read ends (EOF or a reset) instead of timing out.
    let closed = |mut s: std::net::TcpStream| match s.read(&mut [0u8; 16]) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    };
    let silent: Vec<_> = (0..3).map(|_| connect()).collect();
    std::thread::sleep(std::time::Duration::from_millis(200));
    let started = std::time::Instant::now();
    assert!(closed(connect()), "a fourth connection was kept");
    for s in silent {
        assert!(closed(s), "a connection without a ClientHello was kept");
    }
    println!("silent connections closed after {:?}", started.elapsed());
    let token = world
        .issuer
        .mint(&Workload::new("team-a", "app", AUDIENCE))
        .unwrap();
    world.runtime.block_on(async {
        let mut c =
            pb::broker_client::BrokerClient::new(world.grpc_channel(world.broker_port).await);
        c.fetch(request(&token, fetch(&["app/a"]))).await.unwrap();
    });
}
