//! Distributed tracing: W3C trace context (and B3) in, one span per request per
//! proxy, the context passed on with this span as the parent, spans exported by
//! OTLP (over HTTP, protobuf; or over gRPC) in batches.
//!
//! Off unless an OTLP endpoint is configured: then nothing here runs on the
//! request path. Exporting never blocks a request: spans go to a bounded queue
//! and are dropped (and counted) when it is full or the collector is down.
//!
//! The span is a server span on an edge gateway and a sidecar's inbound side,
//! a client span on a sidecar's outbound side; it covers the request from its
//! head to its response's last byte.

use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Status, span, status};
use prometheus_client::metrics::counter::Counter;
use std::fmt::Write as _;
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;

const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const B3: HeaderName = HeaderName::from_static("b3");
const X_B3_TRACEID: HeaderName = HeaderName::from_static("x-b3-traceid");
const X_B3_SPANID: HeaderName = HeaderName::from_static("x-b3-spanid");
const X_B3_PARENTSPANID: HeaderName = HeaderName::from_static("x-b3-parentspanid");
const X_B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");

/// Spans waiting for export; more are dropped.
const QUEUE: usize = 8192;
/// Spans per export request.
const BATCH: usize = 512;
/// The longest a span waits before its batch goes.
const FLUSH_EVERY: Duration = Duration::from_secs(1);
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// How spans travel to the collector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtlpProtocol {
    /// OTLP/HTTP, protobuf bodies (port 4318 by custom).
    Http,
    /// OTLP/gRPC, `TraceService/Export` (port 4317 by custom).
    Grpc,
}

/// Where spans go and which traces are kept.
#[derive(Debug, Clone)]
pub struct TraceOptions {
    /// The collector: its OTLP/HTTP traces URL (`http://HOST:4318/v1/traces`), or
    /// for gRPC its `http://HOST:4317`; `https://` for TLS.
    pub endpoint: http::Uri,
    pub protocol: OtlpProtocol,
    /// For an `https://` collector: the CA certificates (PEM) that sign its
    /// certificate, instead of the system's.
    pub ca: Option<Vec<u8>>,
    /// The share of new traces sampled (0.0–1.0); a request that arrives with a
    /// trace context keeps its sampling decision.
    pub sample: f64,
    /// `service.name` of the spans.
    pub service: String,
}

/// One request's place in its trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Context {
    pub trace_id: [u8; 16],
    /// This proxy's span.
    pub span_id: [u8; 8],
    /// The caller's span; zero for a new trace.
    pub parent: [u8; 8],
    pub sampled: bool,
}

fn hex_into<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn random<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    // Never all zero: that is "invalid" in both W3C and B3.
    while out.iter().all(|b| *b == 0) {
        out.iter_mut().for_each(|b| *b = fastrand::u8(..));
    }
    out
}

/// The incoming trace id, parent span and sampling decision: W3C `traceparent`,
/// else B3 single (`b3`), else B3 multi (`x-b3-*`; a 64-bit trace id is padded).
fn incoming(h: &HeaderMap) -> Option<([u8; 16], [u8; 8], Option<bool>)> {
    let text = |n: &HeaderName| h.get(n).and_then(|v| v.to_str().ok());
    let trace_id = |s: &str| match s.len() {
        16 => hex_into::<8>(s).map(|t| {
            let mut full = [0u8; 16];
            full[8..].copy_from_slice(&t);
            full
        }),
        _ => hex_into::<16>(s),
    };
    let valid = |t: [u8; 16], p: [u8; 8]| t != [0; 16] && p != [0; 8];
    if let Some(tp) = text(&TRACEPARENT) {
        let mut f = tp.trim().split('-');
        if let (Some(v), Some(t), Some(p), Some(flags)) = (f.next(), f.next(), f.next(), f.next())
            && v.len() == 2
            && v != "ff"
            && let (Some(t), Some(p), Some(flags)) =
                (hex_into::<16>(t), hex_into::<8>(p), hex_into::<1>(flags))
            && valid(t, p)
        {
            return Some((t, p, Some(flags[0] & 1 == 1)));
        }
    }
    if let Some(b3) = text(&B3) {
        let mut f = b3.trim().split('-');
        if let (Some(t), Some(p)) = (f.next(), f.next())
            && let (Some(t), Some(p)) = (trace_id(t), hex_into::<8>(p))
            && valid(t, p)
        {
            let sampled = f.next().map(|s| s == "1" || s == "d");
            return Some((t, p, sampled));
        }
    }
    let (t, p) = (text(&X_B3_TRACEID)?, text(&X_B3_SPANID)?);
    let (t, p) = (trace_id(t)?, hex_into::<8>(p)?);
    let sampled = text(&X_B3_SAMPLED).map(|s| s == "1" || s == "true");
    valid(t, p).then_some((t, p, sampled))
}

impl Context {
    /// This proxy's span for a request with `headers`: a child of the caller's,
    /// or the root of a new trace sampled with probability `sample`.
    pub fn start(headers: &HeaderMap, sample: f64) -> Self {
        let (trace_id, parent, sampled) = match incoming(headers) {
            Some((t, p, s)) => (t, p, s),
            None => (random(), [0; 8], None),
        };
        Self {
            trace_id,
            span_id: random(),
            parent,
            sampled: sampled.unwrap_or_else(|| fastrand::f64() < sample),
        }
    }

    /// Pass the trace on with this span as the parent: `traceparent` always, and
    /// the B3 headers the request came with.
    pub fn propagate(&self, h: &mut HeaderMap) {
        let (t, s) = (hex(&self.trace_id), hex(&self.span_id));
        let flags = if self.sampled { "01" } else { "00" };
        let value = |v: String| HeaderValue::try_from(v).ok();
        if let Some(v) = value(format!("00-{t}-{s}-{flags}")) {
            h.insert(TRACEPARENT, v);
        }
        if h.contains_key(&B3)
            && let Some(v) = value(format!("{t}-{s}-{}", &flags[1..]))
        {
            h.insert(B3, v);
        }
        if h.contains_key(&X_B3_TRACEID) {
            if let Some(v) = value(s) {
                h.insert(X_B3_SPANID, v);
            }
            if let Some(v) = value(hex(&self.parent)) {
                h.insert(X_B3_PARENTSPANID, v);
            }
            h.insert(
                X_B3_SAMPLED,
                HeaderValue::from_static(if self.sampled { "1" } else { "0" }),
            );
        }
    }
}

/// A finished span, as the request's completion hook saw it.
#[derive(Debug)]
pub struct Finished {
    pub context: Context,
    pub client_side: bool,
    pub name: String,
    pub start: SystemTime,
    pub end: SystemTime,
    pub status: u16,
    pub attributes: Vec<(&'static str, String)>,
}

/// Takes finished spans for export.
#[derive(Debug)]
pub struct Tracer {
    pub sample: f64,
    queue: mpsc::Sender<Finished>,
    dropped: Counter,
}

/// What became of the spans: `meshgate_trace_spans_{exported,dropped}_total`.
#[derive(Debug, Clone)]
pub struct SpanCounts {
    pub exported: Counter,
    pub dropped: Counter,
}

impl Tracer {
    /// Start the exporter task.
    pub fn start(o: TraceOptions, counts: SpanCounts) -> Self {
        let (queue, rx) = mpsc::channel(QUEUE);
        let dropped = counts.dropped.clone();
        tokio::spawn(export(o.clone(), rx, counts));
        Self {
            sample: o.sample,
            queue,
            dropped,
        }
    }

    /// Queue a span; never waits (a span finding the queue full is dropped).
    pub fn record(&self, span: Finished) {
        if self.queue.try_send(span).is_err() {
            self.dropped.inc();
        }
    }
}

fn attribute(key: &str, value: String) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value)),
        }),
        ..Default::default()
    }
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn request(service: &str, spans: Vec<Finished>) -> ExportTraceServiceRequest {
    use opentelemetry_proto::tonic::trace::v1::Span;
    let spans = spans
        .into_iter()
        .map(|f| {
            let mut attributes: Vec<KeyValue> = f
                .attributes
                .into_iter()
                .map(|(k, v)| attribute(k, v))
                .collect();
            attributes.push(KeyValue {
                key: "http.response.status_code".into(),
                value: Some(AnyValue {
                    value: Some(any_value::Value::IntValue(f.status.into())),
                }),
                ..Default::default()
            });
            Span {
                trace_id: f.context.trace_id.to_vec(),
                span_id: f.context.span_id.to_vec(),
                parent_span_id: if f.context.parent == [0; 8] {
                    Vec::new()
                } else {
                    f.context.parent.to_vec()
                },
                flags: 0x100 | u32::from(f.context.sampled),
                name: f.name,
                kind: if f.client_side {
                    span::SpanKind::Client
                } else {
                    span::SpanKind::Server
                } as i32,
                start_time_unix_nano: unix_nanos(f.start),
                end_time_unix_nano: unix_nanos(f.end),
                attributes,
                status: Some(Status {
                    message: String::new(),
                    code: if f.status >= 500 {
                        status::StatusCode::Error
                    } else {
                        status::StatusCode::Unset
                    } as i32,
                }),
                ..Default::default()
            }
        })
        .collect();
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![attribute("service.name", service.to_string())],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: "meshgate".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    ..Default::default()
                }),
                spans,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

/// The collector's end of the export: TLS verified against `o.ca` when given,
/// else the system's roots.
enum Sink {
    /// HTTP/1.1 or HTTP/2 posts to the traces URL.
    Http {
        client: reqwest::Client,
        endpoint: String,
    },
    /// One HTTP/2 channel, connected on first use and again after a failure.
    Grpc(TraceServiceClient<tonic::transport::Channel>),
}

impl Sink {
    fn new(o: &TraceOptions) -> Result<Self, String> {
        match o.protocol {
            OtlpProtocol::Http => {
                let mut b = reqwest::Client::builder().timeout(EXPORT_TIMEOUT);
                if let Some(pem) = &o.ca {
                    let certs =
                        reqwest::Certificate::from_pem_bundle(pem).map_err(|e| e.to_string())?;
                    b = b.tls_certs_only(certs);
                }
                Ok(Self::Http {
                    client: b.build().map_err(|e| e.to_string())?,
                    endpoint: o.endpoint.to_string(),
                })
            }
            OtlpProtocol::Grpc => {
                use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
                let mut endpoint = Endpoint::from(o.endpoint.clone())
                    .timeout(EXPORT_TIMEOUT)
                    .connect_timeout(EXPORT_TIMEOUT);
                if o.endpoint.scheme_str() == Some("https") {
                    let tls = match &o.ca {
                        Some(pem) => {
                            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem))
                        }
                        None => ClientTlsConfig::new().with_native_roots(),
                    };
                    endpoint = endpoint.tls_config(tls).map_err(|e| error_chain(&e))?;
                }
                Ok(Self::Grpc(TraceServiceClient::new(endpoint.connect_lazy())))
            }
        }
    }

    async fn send(&mut self, request: ExportTraceServiceRequest) -> Result<(), String> {
        match self {
            Self::Http { client, endpoint } => {
                let sent = client
                    .post(endpoint.as_str())
                    .header(http::header::CONTENT_TYPE, "application/x-protobuf")
                    .body(prost::Message::encode_to_vec(&request))
                    .send()
                    .await;
                match sent {
                    Ok(r) if r.status().is_success() => Ok(()),
                    Ok(r) => Err(format!("the collector answered {}", r.status())),
                    Err(e) => Err(error_chain(&e)),
                }
            }
            Self::Grpc(client) => match client.export(request).await {
                Ok(_) => Ok(()),
                Err(status) if status.code() == tonic::Code::Unavailable => Err(format!(
                    "the collector is unavailable: {}",
                    error_chain(&status)
                )),
                Err(status) => Err(format!(
                    "the collector answered {:?}: {}",
                    status.code(),
                    status.message()
                )),
            },
        }
    }
}

/// An error with its causes: reqwest's own text says little ("error sending
/// request"); the cause says why (refused, unknown issuer).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let _ = write!(text, ": {c}");
        cause = c.source();
    }
    text
}

/// Batch spans and post them to the collector until the queue closes.
async fn export(o: TraceOptions, mut rx: mpsc::Receiver<Finished>, counts: SpanCounts) {
    let mut sink = match Sink::new(&o) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(endpoint = %o.endpoint, error = %e, "cannot export spans; dropping them");
            while rx.recv().await.is_some() {
                counts.dropped.inc();
            }
            return;
        }
    };
    let mut batch = Vec::with_capacity(BATCH);
    let mut tick = tokio::time::interval(FLUSH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        let open = tokio::select! {
            got = rx.recv() => match got {
                Some(s) => {
                    batch.push(s);
                    if batch.len() < BATCH {
                        continue;
                    }
                    true
                }
                None => false,
            },
            _ = tick.tick() => true,
        };
        if !batch.is_empty() {
            let n = batch.len() as u64;
            let sent = sink
                .send(request(&o.service, std::mem::take(&mut batch)))
                .await;
            match &sent {
                Ok(()) => counts.exported.inc_by(n),
                Err(_) => counts.dropped.inc_by(n),
            };
            match sent {
                Ok(()) if failing => {
                    failing = false;
                    tracing::info!(endpoint = %o.endpoint, "span export works again");
                }
                Ok(()) => {}
                // Said once per outage, not once per batch.
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(endpoint = %o.endpoint, error = %e, "span export failed; dropping spans until it works");
                }
                Err(_) => {}
            }
        }
        if !open {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                HeaderName::from_bytes(k.as_bytes()).unwrap_or_else(|e| panic!("{e}")),
                HeaderValue::from_str(v).unwrap_or_else(|e| panic!("{e}")),
            );
        }
        h
    }

    const T: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const P: &str = "00f067aa0ba902b7";

    #[test]
    fn w3c_parent_becomes_ours_on_the_way_out() {
        let mut h = headers(&[("traceparent", &format!("00-{T}-{P}-01"))]);
        let c = Context::start(&h, 0.0);
        assert_eq!(hex(&c.trace_id), T);
        assert_eq!(hex(&c.parent), P);
        assert!(c.sampled, "the caller's decision wins over the sample rate");
        c.propagate(&mut h);
        assert_eq!(
            h["traceparent"],
            format!("00-{T}-{}-01", hex(&c.span_id)).as_str()
        );
    }

    #[test]
    fn b3_single_and_multi_are_read_and_rewritten() {
        let mut h = headers(&[("b3", &format!("{T}-{P}-0"))]);
        let c = Context::start(&h, 1.0);
        assert_eq!((hex(&c.trace_id).as_str(), c.sampled), (T, false));
        c.propagate(&mut h);
        assert_eq!(h["b3"], format!("{T}-{}-0", hex(&c.span_id)).as_str());
        let short = &T[16..];
        let mut h = headers(&[
            ("x-b3-traceid", short),
            ("x-b3-spanid", P),
            ("x-b3-sampled", "1"),
        ]);
        let c = Context::start(&h, 0.0);
        assert_eq!(hex(&c.trace_id), format!("{}{short}", "0".repeat(16)));
        assert!(c.sampled);
        c.propagate(&mut h);
        assert_eq!(h["x-b3-parentspanid"], P);
        assert_eq!(h["x-b3-spanid"], hex(&c.span_id).as_str());
    }

    #[test]
    fn garbage_or_zero_ids_start_a_new_trace() {
        for bad in [
            "nonsense".to_string(),
            format!("00-{}-{P}-01", "0".repeat(32)),
            format!("ff-{T}-{P}-01"),
            format!("00-{T}-{P}"),
        ] {
            let c = Context::start(&headers(&[("traceparent", &bad)]), 1.0);
            assert_ne!(hex(&c.trace_id), T, "{bad}");
            assert_eq!(c.parent, [0; 8], "{bad}");
            assert!(c.sampled);
        }
        let c = Context::start(&HeaderMap::new(), 0.0);
        assert!(!c.sampled);
    }
}
