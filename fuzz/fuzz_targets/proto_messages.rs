//! Protobuf messages from the network (the broker decodes requests, the
//! sidecar decodes responses and watch events): decoding arbitrary bytes
//! must never panic.
#![no_main]

use prost::Message;
use secrets_broker_proto::v1 as pb;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = pb::LoginRequest::decode(data);
    let _ = pb::FetchRequest::decode(data);
    let _ = pb::RenewRequest::decode(data);
    let _ = pb::ReleaseRequest::decode(data);
    let _ = pb::WatchRequest::decode(data);
    let _ = pb::FetchResponse::decode(data);
    let _ = pb::WatchEvent::decode(data);
});
