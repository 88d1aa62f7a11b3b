//! Shadow copies that `mirror` filters asked for: each goes to its Service in a task
//! of its own, with no retries, and its answer is read to the end and dropped.
//!
//! A copy needs the request body. An empty or already buffered body is shared; a
//! streamed body with a `Content-Length` within the copy's `maxBodyBytes` is read
//! first (as the retry path does for small bodies); any other body is not copied, and
//! the copy counts as skipped. The main request never waits for a copy's answer.

use crate::body::Inbound;
use crate::forwarded::Outgoing;
use crate::invoke;
use crate::state::Active;
use bytes::Bytes;
use http::{HeaderValue, header};
use meshgate_config::{Split, Upstream};
use meshgate_core::{GatewayError, MirrorOutcome, MirrorTo, Mirrors, RequestCtx};
use meshgate_upstream::RetryPolicy;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

/// Start every copy; returns the body for the main request (buffered if a copy
/// needed it read).
pub async fn start(
    active: &Arc<Active>,
    mirrors: Mirrors,
    ctx: &RequestCtx,
    out: &Outgoing,
    body: Inbound,
    limit: u64,
) -> Result<Inbound, GatewayError> {
    let (body, copy) = body_copy(body, &out.parts, &mirrors, limit).await?;
    for to in mirrors.0 {
        match copy
            .as_ref()
            .filter(|b| b.len() as u64 <= to.max_body_bytes)
        {
            Some(bytes) => send(
                active.clone(),
                to,
                ctx.clone(),
                shadow(out),
                bytes.clone(),
                limit,
            ),
            None => to.ticket.finished(MirrorOutcome::Skipped),
        }
    }
    Ok(body)
}

/// The body for the main request and, when it can be copied, the copy.
async fn body_copy(
    body: Inbound,
    parts: &http::request::Parts,
    mirrors: &Mirrors,
    limit: u64,
) -> Result<(Inbound, Option<Bytes>), GatewayError> {
    use http_body::Body;
    let incoming = match body {
        Inbound::Buffered(b) => return Ok((Inbound::Buffered(b.clone()), Some(b))),
        Inbound::Stream(s) if s.is_end_stream() => {
            return Ok((Inbound::Stream(s), Some(Bytes::new())));
        }
        Inbound::Stream(s) => s,
    };
    let largest = mirrors
        .0
        .iter()
        .map(|m| m.max_body_bytes)
        .max()
        .unwrap_or(0);
    match crate::body::content_length(&parts.headers) {
        Some(n) if n <= largest => {
            let exceeded = Arc::new(AtomicBool::new(false));
            let bytes = invoke::collect_limited(incoming, limit, &exceeded).await?;
            Ok((Inbound::Buffered(bytes.clone()), Some(bytes)))
        }
        _ => Ok((Inbound::Stream(incoming), None)),
    }
}

/// The copy's head: the request as it goes upstream, with `-shadow` added to the
/// host (as Envoy does) so the mirror Service can tell copies apart.
fn shadow(out: &Outgoing) -> Outgoing {
    let parts = &out.parts;
    let mut req = http::Request::new(());
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = parts.uri.clone();
    *req.headers_mut() = parts.headers.clone();
    let (mut copy, ()) = req.into_parts();
    if let Some(host) = parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
    {
        let name = crate::dispatch::strip_port(host);
        let shadow = format!("{name}-shadow{}", &host[name.len()..]);
        if let Ok(v) = HeaderValue::from_str(&shadow) {
            copy.headers.insert(header::HOST, v);
        }
    }
    Outgoing {
        parts: copy,
        forwarded: out.forwarded.clone(),
    }
}

fn send(
    active: Arc<Active>,
    to: MirrorTo,
    ctx: RequestCtx,
    mut out: Outgoing,
    body: Bytes,
    limit: u64,
) {
    tokio::spawn(async move {
        let up = Upstream {
            service: to.service.to_string(),
            rewrite: None,
            timeout: to.timeout,
            retry: RetryPolicy::default(),
            split: Split::default(),
        };
        let deadline = tokio::time::Instant::now() + to.timeout;
        let call = invoke::call(
            &active,
            None,
            &up,
            &ctx,
            &mut out,
            Inbound::Buffered(body),
            limit,
        );
        let outcome = match tokio::time::timeout_at(deadline, call).await {
            Ok(Ok(answer)) => {
                let failed = answer.response.status().is_server_error();
                // Read the answer to its end so the connection can be reused.
                let drained = tokio::time::timeout_at(deadline, async {
                    use http_body_util::BodyExt;
                    answer.response.into_body().collect().await.is_ok()
                });
                match drained.await {
                    Ok(true) if !failed => MirrorOutcome::Answered,
                    _ => MirrorOutcome::Failed,
                }
            }
            _ => MirrorOutcome::Failed,
        };
        to.ticket.finished(outcome);
    });
}
