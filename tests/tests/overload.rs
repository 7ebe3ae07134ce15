//! Overload: past its limits the broker refuses calls at once with
//! RESOURCE_EXHAUSTED (naming the limit), keeps serving what it admits, and
//! one noisy workload does not starve the others.

use std::time::Duration;

use secrets_broker::dev::issuer::Workload;
use secrets_broker_e2e::{AUDIENCE, World, http_get};
use secrets_broker_proto::v1 as pb;

const ROLES: &str = r#"
[[roles]]
name = "app"
namespaces = ["demo"]
service_accounts = ["*"]
secrets = ["app/*"]
"#;

/// A world whose broker config has `limits` added to `[server]`.
fn world_with(limits: &str) -> World {
    let world = World::new(ROLES).unwrap();
    let path = world.broker_config();
    let text = std::fs::read_to_string(&path).unwrap().replacen(
        "watch_heartbeat = \"5s\"",
        &format!("watch_heartbeat = \"5s\"\n{limits}"),
        1,
    );
    std::fs::write(&path, text).unwrap();
    world.put("app/key", "overload-secret").unwrap();
    world
}

async fn client(world: &World) -> pb::broker_client::BrokerClient<tonic::transport::Channel> {
    let ca = std::fs::read(&world.tls.ca).unwrap();
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca))
        .domain_name("localhost");
    let channel =
        tonic::transport::Endpoint::from_shared(format!("https://127.0.0.1:{}", world.broker_port))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .unwrap();
    pb::broker_client::BrokerClient::new(channel)
}

/// Fires every token's fetch at once; returns the results.
async fn burst(
    c: &pb::broker_client::BrokerClient<tonic::transport::Channel>,
    tokens: &[String],
) -> Vec<Result<(), tonic::Status>> {
    let tasks: Vec<_> = tokens
        .iter()
        .map(|t| {
            let mut c = c.clone();
            let mut req = tonic::Request::new(pb::FetchRequest {
                role: String::new(),
                names: vec!["app/key".into()],
                ttl_seconds: 0,
            });
            req.metadata_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
            tokio::spawn(async move { c.fetch(req).await.map(|_| ()) })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

fn pod(sa: &str, pod: &str) -> Workload {
    let mut w = Workload::new("demo", sa, AUDIENCE);
    w.pod = Some(pod.into());
    w
}

#[test]
fn a_noisy_workload_is_rate_limited_and_the_others_are_not() {
    let world = world_with("rate_per_identity = 5\nburst_per_identity = 5");
    let broker = world.start_broker("broker.log").unwrap();
    let noisy = world.issuer.mint(&pod("noisy", "noisy-0")).unwrap();
    let quiet = world.issuer.mint(&pod("quiet", "quiet-0")).unwrap();
    world.runtime.block_on(async {
        let c = client(&world).await;
        let results = burst(&c, &vec![noisy.clone(); 40]).await;
        let ok = results.iter().filter(|r| r.is_ok()).count();
        let refused: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
        assert!((5..40).contains(&ok), "{ok} admitted");
        for e in &refused {
            assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
            assert!(
                e.message()
                    .contains("demo/noisy exceeds 5 calls per second"),
                "{e:?}"
            );
        }
        // Another workload is served at once.
        assert!(burst(&c, std::slice::from_ref(&quiet)).await[0].is_ok());
        // The noisy one is served again once its bucket refills.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert!(burst(&c, std::slice::from_ref(&noisy)).await[0].is_ok());
    });
    let (_, metrics) = http_get(world.ops_port, "/metrics").unwrap();
    assert!(
        metrics.contains("action=\"fetch\",result=\"overloaded\""),
        "{metrics}"
    );
    assert!(!broker.log_text().contains("overload-secret"));
}

#[test]
fn calls_beyond_the_in_flight_limit_are_refused_at_once() {
    let world = world_with("max_in_flight = 1\nrate_per_identity = 0");
    let _broker = world.start_broker("broker.log").unwrap();
    let tokens: Vec<String> = (0..200)
        .map(|i| {
            world
                .issuer
                .mint(&pod(&format!("sa-{i}"), &format!("p-{i}")))
                .unwrap()
        })
        .collect();
    world.runtime.block_on(async {
        let c = client(&world).await;
        // Retry the burst until calls overlapped (they practically always do).
        let mut refused = Vec::new();
        for _ in 0..5 {
            let results = burst(&c, &tokens).await;
            let ok = results.iter().filter(|r| r.is_ok()).count();
            assert!(ok >= 1, "admitted calls are served");
            refused = results.into_iter().filter_map(Result::err).collect();
            if !refused.is_empty() {
                break;
            }
        }
        assert!(!refused.is_empty(), "200 concurrent calls never overlapped");
        for e in &refused {
            assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
            assert!(
                e.message().contains("1 calls in flight, its limit"),
                "{e:?}"
            );
        }
        // Once the burst is over, calls are served again.
        wait_for_ok(&c, &tokens[0]).await;
    });
}

async fn wait_for_ok(c: &pb::broker_client::BrokerClient<tonic::transport::Channel>, t: &str) {
    for _ in 0..100 {
        if burst(c, &[t.to_owned()]).await[0].is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("never served again");
}
