//! Sending export requests: OTLP/gRPC over HTTP/2 without TLS with hyper's client (the
//! request's buffers go to the socket as they are), or OTLP/HTTP with reqwest.

use bytes::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use prost::Message;

use super::super::{OtlpProtocol, TelemetryConfig};
use super::EXPORT_TIMEOUT;

/// What an export request carries: where it goes depends on it. The two services answer
/// with the same message shape (a partial success: field 1, its count and message), so one
/// decoding serves both.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Signal {
    Traces,
    Logs,
}

impl Signal {
    fn grpc_path(self) -> &'static str {
        match self {
            Signal::Traces => "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
            Signal::Logs => "/opentelemetry.proto.collector.logs.v1.LogsService/Export",
        }
    }

    fn http_path(self) -> &'static str {
        match self {
            Signal::Traces => "/v1/traces",
            Signal::Logs => "/v1/logs",
        }
    }
}

/// Why an export request was not taken, and whether sending it again may succeed (a receiver
/// that is down, busy or restarting) or not (it refused the request as invalid).
#[derive(Debug)]
pub(crate) struct ExportError {
    pub(crate) message: String,
    pub(crate) retry: bool,
}

impl From<String> for ExportError {
    fn from(message: String) -> Self {
        Self { message, retry: true }
    }
}

/// Where and how batches go.
#[derive(Debug)]
pub(crate) enum Transport {
    /// gRPC over HTTP/2 without TLS (h2c), with hyper's client: the request's buffers go to the
    /// socket as they are (tonic's client copies a message into a buffer of its own first).
    Grpc {
        client: Box<GrpcClient>,
        uri: http::Uri,
        authorization: Option<http::HeaderValue>,
    },
    Http {
        client: reqwest::Client,
        url: String,
        authorization: Option<String>,
    },
}

pub(crate) type GrpcClient =
    hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Chunks>;

impl Transport {
    pub(crate) fn new(config: &TelemetryConfig, endpoint: &str, signal: Signal) -> Result<Self, String> {
        let bearer = config.token.as_ref().map(|token| format!("Bearer {token}"));
        Ok(match config.protocol {
            OtlpProtocol::Grpc => {
                let authorization = bearer
                    .map(|value| value.parse().map_err(|_| "the OTLP token is not visible ASCII".to_string()))
                    .transpose()?;
                let uri: http::Uri = format!("{}{}", endpoint.trim_end_matches('/'), signal.grpc_path())
                    .parse()
                    .map_err(|error| format!("invalid OTLP/gRPC endpoint {endpoint:?}: {error}"))?;
                if uri.scheme_str() != Some("http") || uri.host().is_none() {
                    return Err(format!(
                        "invalid OTLP/gRPC endpoint {endpoint:?}: expected http://HOST:PORT (TLS is not supported)"
                    ));
                }
                let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
                connector.set_connect_timeout(Some(EXPORT_TIMEOUT));
                connector.set_nodelay(true);
                let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                    .http2_only(true)
                    .build(connector);
                Transport::Grpc { client: Box::new(client), uri, authorization }
            }
            OtlpProtocol::Http => {
                let client = reqwest::Client::builder()
                    .timeout(EXPORT_TIMEOUT)
                    .build()
                    .map_err(|error| format!("cannot build the OTLP/HTTP client: {error}"))?;
                let url = format!("{}{}", endpoint.trim_end_matches('/'), signal.http_path());
                reqwest::Url::parse(&url)
                    .map_err(|error| format!("invalid OTLP/HTTP endpoint {endpoint:?}: {error}"))?;
                Transport::Http { client, url, authorization: bearer }
            }
        })
    }
}

/// Sends one export request, given as the buffers it is made of.
pub(crate) async fn send(transport: &Transport, request: Vec<Bytes>) -> Result<(), ExportError> {
    let response = match transport {
        Transport::Grpc { client, uri, authorization } => {
            tokio::time::timeout(EXPORT_TIMEOUT, send_grpc(client, uri, authorization.as_ref(), request))
                .await
                .map_err(|_| format!("OTLP/gRPC export to {uri} timed out after {EXPORT_TIMEOUT:?}"))??
        }
        Transport::Http { client, url, authorization } => {
            let mut request =
                client.post(url).header(reqwest::header::CONTENT_TYPE, "application/x-protobuf").body(request.concat());
            if let Some(value) = authorization {
                request = request.header(reqwest::header::AUTHORIZATION, value);
            }
            let response =
                request.send().await.map_err(|error| format!("OTLP/HTTP export to {url} failed: {error}"))?;
            let status = response.status();
            let body = response.bytes().await.map_err(|error| format!("OTLP/HTTP export to {url} failed: {error}"))?;
            if !status.is_success() {
                let text = String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
                let message = format!("OTLP/HTTP export to {url} answered {status}: {text}");
                return Err(ExportError { message, retry: status != reqwest::StatusCode::BAD_REQUEST });
            }
            ExportTraceServiceResponse::decode(body).unwrap_or_default()
        }
    };
    if let Some(partial) = response.partial_success
        && partial.rejected_spans > 0
    {
        tracing::warn!(rejected = partial.rejected_spans, message = %partial.error_message, "the OTLP receiver rejected records");
    }
    Ok(())
}

/// A unary gRPC call of `TraceService/Export` (gRPC over HTTP/2: the message behind a 5-byte
/// prefix, the outcome in the `grpc-status` trailer, or header when the server answers with
/// headers only).
async fn send_grpc(
    client: &GrpcClient,
    uri: &http::Uri,
    authorization: Option<&http::HeaderValue>,
    mut request: Vec<Bytes>,
) -> Result<ExportTraceServiceResponse, ExportError> {
    use http_body_util::BodyExt;

    let len: usize = request.iter().map(Bytes::len).sum();
    let len = u32::try_from(len).map_err(|_| format!("an export request of {len} bytes is too large for gRPC"))?;
    let mut prefix = [0u8; 5]; // not compressed, then the length (big-endian)
    prefix[1..].copy_from_slice(&len.to_be_bytes());
    request.insert(0, Bytes::copy_from_slice(&prefix));
    let mut builder = http::Request::post(uri.clone())
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers")
        .header(http::header::USER_AGENT, concat!("sfaas/", env!("CARGO_PKG_VERSION")))
        .header("grpc-timeout", format!("{}m", EXPORT_TIMEOUT.as_millis()));
    if let Some(value) = authorization {
        builder = builder.header(http::header::AUTHORIZATION, value);
    }
    let request = builder.body(Chunks(coalesce(request))).map_err(|error| error.to_string())?;
    let response =
        client.request(request).await.map_err(|error| format!("OTLP/gRPC endpoint {uri} unavailable: {error:?}"))?;
    let (head, body) = response.into_parts();
    if head.status != http::StatusCode::OK {
        return Err(format!("OTLP/gRPC export to {uri} answered HTTP {}", head.status).into());
    }
    let body = body.collect().await.map_err(|error| format!("OTLP/gRPC export to {uri} failed: {error}"))?;
    let trailers = body.trailers();
    let field = |name: &str| trailers.and_then(|t| t.get(name)).or_else(|| head.headers.get(name));
    // Not `tonic::Status::from_header_map`: it panics on a malformed `grpc-status-details`.
    match field("grpc-status").map(|code| tonic::Code::from_bytes(code.as_bytes())) {
        Some(tonic::Code::Ok) => {}
        Some(code) => {
            let message = field("grpc-message").map(|m| percent_encoding::percent_decode(m.as_bytes()));
            let message = message.map(|m| m.decode_utf8_lossy().into_owned()).unwrap_or_default();
            let message = format!("OTLP/gRPC export to {uri} failed: {code:?}: {message}");
            return Err(ExportError { message, retry: code != tonic::Code::InvalidArgument });
        }
        None => return Err(format!("OTLP/gRPC export to {uri}: the answer has no grpc-status").into()),
    }
    let body = body.to_bytes();
    // The answer's message, behind its own 5-byte prefix (a compressed one is not decoded: its
    // only content is the partial-success count, which only a warning reads).
    Ok(match body.get(..5) {
        Some([0, ..]) => ExportTraceServiceResponse::decode(&body[5..]).unwrap_or_default(),
        _ => ExportTraceServiceResponse::default(),
    })
}

/// Chunks below this size are joined with their neighbours before they are sent.
pub(super) const SMALL_CHUNK: usize = 16 << 10;

/// The request's buffers with the small ones joined: each chunk goes out as a DATA frame of its
/// own, and a receiver counts small frames as an attack. The collector's HTTP/2 server (h2)
/// closed the connection with `GOAWAY ENHANCE_YOUR_CALM "too_many_data_frames"` after about 50 s
/// of the demo's exports (5-byte gRPC prefixes and framing pieces, each a frame), and the next
/// export found the connection broken ("broken pipe"). The spans' own buffers, the large part,
/// are still not copied.
pub(super) fn coalesce(request: Vec<Bytes>) -> std::collections::VecDeque<Bytes> {
    let mut chunks = std::collections::VecDeque::with_capacity(request.len());
    let mut small = bytes::BytesMut::new();
    for chunk in request {
        if chunk.len() < SMALL_CHUNK {
            small.extend_from_slice(&chunk);
            continue;
        }
        if !small.is_empty() {
            chunks.push_back(small.split().freeze());
        }
        chunks.push_back(chunk);
    }
    if !small.is_empty() {
        chunks.push_back(small.freeze());
    }
    chunks
}

/// A request body sent as the buffers it is made of, one frame each, without joining them.
#[derive(Debug)]
pub(crate) struct Chunks(std::collections::VecDeque<Bytes>);

impl http_body::Body for Chunks {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        std::task::Poll::Ready(self.get_mut().0.pop_front().map(|chunk| Ok(http_body::Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_empty()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.0.iter().map(|chunk| chunk.len() as u64).sum())
    }
}

// The wire format. Field numbers are those of opentelemetry-proto's `trace.proto`,
// `common.proto` and `resource.proto`. As prost does, scalar fields at their default value are
// left out, while present messages and the members of a `oneof` are always written.
