//! Refusals arrive as the README says them, from the real broker: an
//! oversized token is `UNAUTHENTICATED` naming its size and the limit (not an
//! HTTP 431 seen as `UNKNOWN`, nor a GOAWAY), whatever `max_token_bytes` is
//! set to; a message over the decode limit is `RESOURCE_EXHAUSTED`; protobuf
//! that does not decode (invalid UTF-8 in a name included) is
//! `INVALID_ARGUMENT`.

use bytes::{Buf, BufMut};
use secrets_broker::dev::issuer::Workload;
use secrets_broker_e2e::{AUDIENCE, Proc, World, free_port};
use secrets_broker_proto::v1 as pb;
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;

const ROLES: &str = r#"
[[roles]]
name = "app"
namespaces = ["demo"]
service_accounts = ["app"]
secrets = ["app/*"]
"#;

/// A Fetch with `token` as the bearer.
async fn fetch_with(channel: &Channel, token: &str) -> Result<(), tonic::Status> {
    let mut c = pb::broker_client::BrokerClient::new(channel.clone());
    let mut req = tonic::Request::new(pb::FetchRequest {
        role: String::new(),
        names: vec!["app/key".into()],
        ttl_seconds: 0,
    });
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    c.fetch(req).await.map(|_| ())
}

/// Sends `message` as it is (no protobuf encoding) as a Fetch.
async fn raw_fetch(channel: &Channel, token: &str, message: Vec<u8>) -> tonic::Status {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.unwrap();
    let mut req = tonic::Request::new(message);
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let path =
        tonic::codegen::http::uri::PathAndQuery::from_static("/secretbroker.v1.Broker/Fetch");
    match grpc.unary(req, path, Raw).await {
        Ok(_) => panic!("a raw Fetch of junk was answered"),
        Err(status) => status,
    }
}

/// A codec that sends bytes as they are, to send what no client would encode.
#[derive(Clone, Copy)]
struct Raw;

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let mut v = vec![0; src.remaining()];
        src.copy_to_slice(&mut v);
        Ok(Some(v))
    }
}

fn assert_status(result: Result<(), tonic::Status>, code: Code, message: &str) {
    let status = result.expect_err("refused");
    assert_eq!(status.code(), code, "{status:?}, expected {message:?}");
    assert!(status.message().contains(message), "{status:?}");
}

#[test]
fn oversized_tokens_are_answered_with_their_size_at_any_setting() {
    let world = World::new(ROLES).unwrap();
    world.put("app/key", "v").unwrap();
    let _broker = world.start_broker("broker.log").unwrap();
    // A second broker on the same store with max_token_bytes = 256 KiB.
    let big_port = free_port();
    let config = world.path("big.toml");
    world
        .write_broker_config(&config, big_port, free_port(), ROLES)
        .unwrap();
    let big = std::fs::read_to_string(&config).unwrap().replacen(
        "leeway = \"5s\"",
        "leeway = \"5s\"\nmax_token_bytes = 262144",
        1,
    );
    assert!(big.contains("max_token_bytes = 262144"));
    std::fs::write(&config, big).unwrap();
    let _big_broker: Proc = world.start_broker_with(&config, "big.log").unwrap();

    world.runtime.block_on(async {
        let c = world.grpc_channel(world.broker_port).await;
        // Just over the default 16 KiB, then 6x it: each named, and the
        // connection still serves (no HTTP 431, no GOAWAY). The broker
        // names tokens up to 96 KiB over its limit.
        for len in [16_385, 20_000, 100_000] {
            assert_status(
                fetch_with(&c, &"a".repeat(len)).await,
                Code::Unauthenticated,
                &format!("token is {len} bytes, larger than the 16384-byte limit"),
            );
        }
        let token = world
            .issuer
            .mint(&Workload::new("demo", "app", AUDIENCE))
            .unwrap();
        fetch_with(&c, &token).await.unwrap();

        // With max_token_bytes = 256 KiB, a 200 kB token reaches the token
        // checks (not a JWT: malformed), and a 300 kB one is named.
        let c = world.grpc_channel(big_port).await;
        assert_status(
            fetch_with(&c, &"a".repeat(200_000)).await,
            Code::Unauthenticated,
            "malformed token",
        );
        assert_status(
            fetch_with(&c, &"a".repeat(300_000)).await,
            Code::Unauthenticated,
            "token is 300000 bytes, larger than the 262144-byte limit",
        );
        fetch_with(&c, &token).await.unwrap();
    });
}

#[test]
fn undecodable_and_oversized_messages_get_the_contracts_codes() {
    let world = World::new(ROLES).unwrap();
    world.put("app/key", "v").unwrap();
    let _broker = world.start_broker("broker.log").unwrap();
    let token = world
        .issuer
        .mint(&Workload::new("demo", "app", AUDIENCE))
        .unwrap();
    world.runtime.block_on(async {
        let c = world.grpc_channel(world.broker_port).await;
        // FetchRequest.names (field 2) holding invalid UTF-8.
        let status = raw_fetch(&c, &token, vec![0x12, 0x02, 0xff, 0xfe]).await;
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains("not UTF-8"), "{status:?}");
        // A field longer than the message.
        let status = raw_fetch(&c, &token, vec![0x12, 0x7f, b'x']).await;
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().contains("request does not decode"),
            "{status:?}"
        );
        // Over the 4 MiB decode limit.
        let status = raw_fetch(&c, &token, vec![0; 5 << 20]).await;
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert!(
            status.message().contains(
                "request message too large: found 5242880 bytes, the limit is: 4194304 bytes"
            ),
            "{status:?}"
        );
        // The broker still answers well-formed calls on the connection.
        fetch_with(&c, &token).await.unwrap();
    });
}
