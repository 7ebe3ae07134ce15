//! The codes of requests that never reach a handler, as the gRPC contract
//! says them.
//!
//! tonic decodes a request's message before it calls the `Broker` handler,
//! and answers one it cannot decode itself, with codes of its own:
//! `OUT_OF_RANGE` for a message over the decode limit (gRPC says
//! `RESOURCE_EXHAUSTED`), `INTERNAL` for protobuf that does not decode
//! (invalid UTF-8 in a `string`, a truncated field: the caller's fault, so
//! `INVALID_ARGUMENT`) and for a call without a message. [`DecodeErrorsLayer`]
//! wraps the whole gRPC server and rewrites those answers (trailers-only
//! responses, whose status is in the headers) in this one place; every other
//! status passes untouched.

use std::task::{Context, Poll};

use futures_util::TryFutureExt;
use futures_util::future::MapOk;
use hyper::http;
use tonic::{Code, Status};
use tower::{Layer, Service};

/// What tonic's codec says when a message is over the decode limit.
const TOO_LARGE: &str = "Error, decoded message length too large: ";
/// What tonic-prost says when protobuf does not decode.
const UNDECODABLE: &str = "failed to decode Protobuf message";
/// What tonic says when a unary call carries no message.
const MISSING: &str = "Missing request message.";

/// Rewrites tonic's decode refusals (see the module's doc).
#[derive(Debug, Clone, Copy, Default)]
pub struct DecodeErrorsLayer;

impl<S> Layer<S> for DecodeErrorsLayer {
    type Service = DecodeErrors<S>;

    fn layer(&self, inner: S) -> DecodeErrors<S> {
        DecodeErrors { inner }
    }
}

/// The service [`DecodeErrorsLayer`] makes.
#[derive(Debug, Clone)]
pub struct DecodeErrors<S> {
    inner: S,
}

type Rewrite<B> = fn(http::Response<B>) -> http::Response<B>;

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for DecodeErrors<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = MapOk<S::Future, Rewrite<ResBody>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        self.inner
            .call(req)
            .map_ok(rewrite::<ResBody> as Rewrite<ResBody>)
    }
}

fn rewrite<B>(mut response: http::Response<B>) -> http::Response<B> {
    if let Some(status) = remapped(response.headers()) {
        let headers = response.headers_mut();
        headers.remove("grpc-status-details-bin");
        // Only fails for a message that cannot be a header value; ours are ASCII.
        let _ = status.add_header(headers);
    }
    response
}

/// The status to answer instead of the one in `headers`, if it is one of
/// tonic's decode refusals.
fn remapped(headers: &http::HeaderMap) -> Option<Status> {
    let status = Status::from_header_map(headers)?;
    let message = status.message();
    match status.code() {
        Code::OutOfRange => message
            .strip_prefix(TOO_LARGE)
            .map(|rest| Status::resource_exhausted(format!("request message too large: {rest}"))),
        Code::Internal if message.starts_with(UNDECODABLE) => Some(Status::invalid_argument(
            format!("request does not decode: {message}"),
        )),
        Code::Internal if message == MISSING => Some(Status::invalid_argument(
            "request has no message: a unary call carries exactly one",
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    /// A gRPC request to the health service (tonic's generated server and
    /// codec, as for `Broker`) whose body is `frame`.
    fn request(frame: Vec<u8>) -> http::Request<tonic::body::Body> {
        http::Request::builder()
            .method("POST")
            .uri("http://localhost/grpc.health.v1.Health/Check")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(tonic::body::Body::new(
                http_body_util::Full::new(Bytes::from(frame)).map_err(|e| match e {}),
            ))
            .unwrap()
    }

    /// A gRPC message frame: uncompressed, length, message.
    fn framed(message: &[u8]) -> Vec<u8> {
        let mut f = vec![0];
        f.extend_from_slice(&(message.len() as u32).to_be_bytes());
        f.extend_from_slice(message);
        f
    }

    async fn call(layered: bool, frame: Vec<u8>) -> Status {
        let (_, server) = tonic_health::server::health_reporter();
        let response = if layered {
            DecodeErrorsLayer
                .layer(server)
                .oneshot(request(frame))
                .await
                .unwrap()
        } else {
            server.oneshot(request(frame)).await.unwrap()
        };
        Status::from_header_map(response.headers()).expect("a trailers-only refusal")
    }

    #[tokio::test]
    async fn decode_refusals_answer_the_contracts_codes() {
        // Field 1 (service, a string) holding invalid UTF-8.
        let bad_utf8 = framed(&[0x0a, 0x02, 0xff, 0xfe]);
        // A length-delimited field longer than the message.
        let truncated = framed(&[0x0a, 0x7f, b'x']);
        // Over the default 4 MiB decode limit (the length prefix is enough).
        let mut too_large = vec![0];
        too_large.extend_from_slice(&(5u32 << 20).to_be_bytes());
        for (frame, tonic_code, ours, words) in [
            (bad_utf8, Code::Internal, Code::InvalidArgument, "not UTF-8"),
            (
                truncated,
                Code::Internal,
                Code::InvalidArgument,
                "request does not decode",
            ),
            (
                too_large,
                Code::OutOfRange,
                Code::ResourceExhausted,
                "request message too large: found 5242880 bytes, the limit is: 4194304 bytes",
            ),
            (
                Vec::new(),
                Code::Internal,
                Code::InvalidArgument,
                "no message",
            ),
        ] {
            // What tonic answers by itself, so a tonic upgrade that changes
            // its wording fails here rather than slip past the rewrite.
            let raw = call(false, frame.clone()).await;
            assert_eq!(raw.code(), tonic_code, "{raw:?}");
            let status = call(true, frame).await;
            assert_eq!(status.code(), ours, "{status:?}");
            assert!(status.message().contains(words), "{status:?}");
        }
    }

    #[test]
    fn other_statuses_pass_untouched() {
        for status in [
            Status::internal("failed to write the audit record"),
            Status::out_of_range("ttl 99999999s is beyond max_ttl"),
            Status::unauthenticated("token is 20000 bytes, larger than the 16384-byte limit"),
            Status::ok(""),
        ] {
            let mut headers = http::HeaderMap::new();
            status.add_header(&mut headers).unwrap();
            assert!(remapped(&headers).is_none(), "{status:?}");
        }
        assert!(remapped(&http::HeaderMap::new()).is_none());
    }
}
