//! Every failure becomes a response here: the SPEC's JSON body for HTTP clients,
//! `grpc-status` for gRPC clients, and `x-request-id` on both.

use crate::body::ResponseBody;
use http::{HeaderValue, Response, header};
use meshgate_core::{GatewayError, RequestCtx};

/// The request id field, spelt once: as written into an HTTP/1 head, and as a map key.
pub const REQUEST_ID: &str = "x-request-id";
pub const X_REQUEST_ID: header::HeaderName = header::HeaderName::from_static(REQUEST_ID);

pub fn error(err: &GatewayError, ctx: &RequestCtx) -> Response<ResponseBody> {
    let mut resp = if ctx.grpc {
        // A trailers-only gRPC response: HTTP 200 with the status in the headers.
        let mut r = Response::new(ResponseBody::empty());
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert(
            "grpc-status",
            HeaderValue::from(u16::from(err.grpc_status())),
        );
        let msg = percent_encoding::utf8_percent_encode(&err.message, GRPC_MESSAGE).to_string();
        if let Ok(v) = HeaderValue::from_str(&msg) {
            h.insert("grpc-message", v);
        }
        r
    } else {
        let mut r = Response::new(ResponseBody::full(err.json_body(ctx.request_id.as_str())));
        *r.status_mut() = err.http_status();
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        r
    };
    for (n, v) in &err.headers {
        resp.headers_mut().insert(n.clone(), v.clone());
    }
    resp.headers_mut()
        .insert(X_REQUEST_ID, ctx.request_id.header_value().clone());
    resp
}

/// grpc-message is percent-encoded: everything outside printable ASCII, and '%'.
const GRPC_MESSAGE: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS.add(b'%');

/// A gateway-made response from parts a filter or a mock produced.
pub fn from_bytes(resp: Response<bytes::Bytes>) -> Response<ResponseBody> {
    resp.map(ResponseBody::full)
}
