//! A fleet of simulated proxies for the control plane's scale bench
//! (`bench/push_scale.py`). Each simulated proxy holds its own push stream, on its
//! own TCP connection, as `meshgate proxy` does: it says hello, takes the snapshot,
//! and ACKs every revision at once (it compiles nothing, so what is measured is the
//! control plane and the wire).
//!
//! Once every proxy has its snapshot, the fleet changes one Api through the admin
//! API, `--changes` times, and measures for each change how long until every proxy
//! received it, how long until the control plane recorded every ACK, and how many
//! bytes each proxy was sent. It prints one JSON report.
//!
//! Usage: `push-fleet --control URL --nodes N --api NAME [--changes K]`, with the
//! token in `MESHGATE_ADMIN_TOKEN` (used for the stream and the admin API).

use meshgate_control::push::pb;
use prost::Message as _;
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

struct Args {
    control: String,
    nodes: usize,
    api: String,
    changes: usize,
    token: String,
}

fn args() -> Result<Args, String> {
    let mut a = Args {
        control: "http://127.0.0.1:7400".into(),
        nodes: 1000,
        api: String::new(),
        changes: 5,
        token: std::env::var("MESHGATE_ADMIN_TOKEN").unwrap_or_default(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--control" => a.control = value,
            "--nodes" => a.nodes = value.parse().map_err(|e| format!("--nodes: {e}"))?,
            "--api" => a.api = value,
            "--changes" => a.changes = value.parse().map_err(|e| format!("--changes: {e}"))?,
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if a.api.is_empty() || a.token.is_empty() {
        return Err("give --api NAME, and the token in MESHGATE_ADMIN_TOKEN".into());
    }
    Ok(a)
}

/// What a simulated proxy tells the fleet.
enum Event {
    /// Its first message (a snapshot): revision, encoded bytes.
    Synced(u64, usize),
    /// A later message: revision, encoded bytes, when it arrived.
    Received(u64, usize, Instant),
    Failed(String),
}

fn main() -> std::process::ExitCode {
    let a = match args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("push-fleet: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("push-fleet: {e}");
            return std::process::ExitCode::from(3);
        }
    };
    match rt.block_on(run(a)) {
        Ok(report) => {
            println!("{report}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("push-fleet: {e}");
            std::process::ExitCode::from(1)
        }
    }
}

async fn run(a: Args) -> Result<Value, String> {
    let (events, mut rx) = mpsc::unbounded_channel();
    let started = Instant::now();
    for i in 0..a.nodes {
        let (url, token, events) = (a.control.clone(), a.token.clone(), events.clone());
        tokio::spawn(async move {
            if let Err(e) = node(i, &url, &token, &events).await {
                let _ = events.send(Event::Failed(format!("fleet-{i}: {e}")));
            }
        });
    }
    let mut snapshot_bytes = 0;
    let mut revision = 0;
    let mut synced = 0;
    while synced < a.nodes {
        match tokio::time::timeout(Duration::from_secs(600), rx.recv()).await {
            Ok(Some(Event::Synced(rev, bytes))) => {
                synced += 1;
                snapshot_bytes = bytes;
                revision = revision.max(rev);
            }
            Ok(Some(Event::Failed(e))) => return Err(e),
            Ok(Some(Event::Received(..))) => {}
            Ok(None) | Err(_) => return Err(format!("only {synced} proxies synced")),
        }
    }
    let sync_seconds = started.elapsed().as_secs_f64();

    let http = reqwest::Client::new();
    let admin = |m: reqwest::Method, path: &str| {
        http.request(m, format!("{}{path}", a.control))
            .bearer_auth(&a.token)
    };
    let path = format!("/api/v1/apis/{}", a.api);
    let mut changes = Vec::new();
    for k in 1..=a.changes {
        let current: Value = json_of(admin(reqwest::Method::GET, &path)).await?;
        let mut resource = current["resource"].clone();
        resource["spec"]["invoke"] =
            json!({"mock": {"status": 200, "body": format!("change {k}")}});
        let t0 = Instant::now();
        let answer: Value = json_of(
            admin(reqwest::Method::PUT, &path)
                .header("x-meshgate-message", format!("scale bench change {k}"))
                .body(resource.to_string()),
        )
        .await?;
        let write_ms = t0.elapsed().as_secs_f64() * 1e3;
        let rev = answer["revision"]
            .as_u64()
            .ok_or(format!("the write failed: {answer}"))?;
        // Every proxy received it (and ACKed at once).
        let mut bytes = Vec::new();
        let mut last = t0;
        while bytes.len() < a.nodes {
            match tokio::time::timeout(Duration::from_secs(60), rx.recv()).await {
                Ok(Some(Event::Received(r, b, at))) if r >= rev => {
                    bytes.push(b);
                    last = last.max(at);
                }
                Ok(Some(Event::Failed(e))) => return Err(e),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => {
                    return Err(format!(
                        "change {k}: only {} of {} proxies received revision {rev}",
                        bytes.len(),
                        a.nodes
                    ));
                }
            }
        }
        let received_ms = last.saturating_duration_since(t0).as_secs_f64() * 1e3;
        // The control plane recorded every ACK.
        let acked_ms = loop {
            let nodes: Value = json_of(admin(reqwest::Method::GET, "/api/v1/nodes")).await?;
            let done = nodes["items"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|n| {
                    n["name"].as_str().is_some_and(|s| s.starts_with("fleet-"))
                        && n["revision"].as_u64().is_some_and(|r| r >= rev)
                })
                .count();
            if done >= a.nodes {
                break t0.elapsed().as_secs_f64() * 1e3;
            }
            if t0.elapsed() > Duration::from_secs(60) {
                return Err(format!(
                    "change {k}: the control plane recorded {done} ACKs of revision {rev}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let total: usize = bytes.iter().sum();
        changes.push(json!({
            "revision": rev,
            "writeMs": round(write_ms),
            "allReceivedMs": round(received_ms),
            "allAckedMs": round(acked_ms),
            "bytesPerProxy": total / a.nodes,
            "bytesTotal": total,
        }));
    }
    Ok(json!({
        "nodes": a.nodes,
        "syncSeconds": round(sync_seconds),
        "snapshotRevision": revision,
        "snapshotBytesPerProxy": snapshot_bytes,
        "changes": changes,
    }))
}

/// Send an admin API request and read its JSON answer.
async fn json_of(req: reqwest::RequestBuilder) -> Result<Value, String> {
    let text = req
        .send()
        .await
        .map_err(|e| e.to_string())?
        .text()
        .await
        .map_err(|e| e.to_string())?;
    serde_json::from_str(&text).map_err(|e| format!("{e}: {text}"))
}

fn round(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// One simulated proxy: hello, then ACK everything, with heartbeats.
async fn node(
    i: usize,
    url: &str,
    token: &str,
    events: &mpsc::UnboundedSender<Event>,
) -> Result<(), String> {
    use pb::node_message::Message;
    let endpoint = tonic::transport::Endpoint::from_shared(url.to_string())
        .map_err(|e| e.to_string())?
        .tcp_nodelay(true);
    // A thousand connections at once can overflow the listen queue: retry, as a
    // real proxy's agent does with its backoff.
    let mut tries = 0;
    let channel = loop {
        match endpoint.connect().await {
            Ok(c) => break c,
            Err(e) if tries >= 10 => return Err(format!("connect: {e:?}")),
            Err(_) => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(100 * tries)).await;
            }
        }
    };
    let mut client = pb::push_client::PushClient::new(channel).max_decoding_message_size(1 << 30);
    let (tx, rx) = mpsc::channel(16);
    let hello = pb::Hello {
        node: format!("fleet-{i}"),
        labels: [("zone".to_string(), format!("z{}", i % 3))].into(),
        role: "edge".into(),
        gateway: "edge".into(),
        version: "fleet".into(),
        store_id: String::new(),
        revision: 0,
        ..Default::default()
    };
    let say = |m: Message| pb::NodeMessage { message: Some(m) };
    let _ = tx.send(say(Message::Hello(hello))).await;
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    let bearer = format!("Bearer {token}")
        .parse()
        .map_err(|_| "bad token".to_string())?;
    request.metadata_mut().insert("authorization", bearer);
    let mut inbound = client
        .stream(request)
        .await
        .map_err(|s| format!("{s:?}"))?
        .into_inner();
    let mut beat = tokio::time::interval(meshgate_control::push::HEARTBEAT);
    let mut first = true;
    let mut snapshot_bytes = 0;
    loop {
        tokio::select! {
            _ = beat.tick() => {
                let _ = tx.send(say(Message::Heartbeat(pb::Heartbeat {}))).await;
            }
            msg = inbound.message() => {
                let Some(msg) = msg.map_err(|s| format!("{s:?}"))? else {
                    return Err("the control plane closed the stream".into());
                };
                let at = Instant::now();
                let bytes = msg.encoded_len();
                let revision = match &msg.message {
                    // A snapshot comes in parts; it is answered once whole.
                    Some(pb::control_message::Message::Snapshot(s)) => {
                        snapshot_bytes += bytes;
                        if s.more {
                            continue;
                        }
                        s.revision
                    }
                    Some(pb::control_message::Message::Delta(d)) => d.revision,
                    // The registry and certificates: none asked for in this bench,
                    // and not config.
                    Some(
                        pb::control_message::Message::Endpoints(_)
                        | pb::control_message::Message::Certificate(_),
                    )
                    | None => continue,
                };
                let _ = tx.send(say(Message::Ack(pb::Ack { revision }))).await;
                let e = if first {
                    Event::Synced(revision, std::mem::take(&mut snapshot_bytes))
                } else {
                    Event::Received(revision, bytes, at)
                };
                first = false;
                let _ = events.send(e);
            }
        }
    }
}
