use super::*;
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;

fn head(raw: &str, method: &Method) -> Result<Option<Parsed>, H1Error> {
    let mut buf = BytesMut::from(raw.as_bytes());
    parse_head(&mut buf, method, false)
}

fn framing_of(raw: &str, method: &Method) -> (String, bool) {
    match head(raw, method) {
        Ok(Some(p)) => (format!("{:?}", p.framing), p.reusable),
        Ok(None) => ("partial".into(), false),
        Err(e) => (format!("error: {e}"), false),
    }
}

#[test]
fn response_framing_follows_rfc_9112() {
    let get = Method::GET;
    let cases: &[(&str, &Method, &str, bool)] = &[
        (
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n",
            &get,
            "Length(5)",
            true,
        ),
        (
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
            &get,
            "Chunked",
            true,
        ),
        // Transfer-Encoding wins over Content-Length, and the connection closes after.
        (
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n",
            &get,
            "Chunked",
            false,
        ),
        (
            "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n",
            &get,
            "Eof",
            false,
        ),
        ("HTTP/1.1 200 OK\r\n\r\n", &get, "Eof", false),
        ("HTTP/1.1 204 No Content\r\n\r\n", &get, "Length(0)", true),
        (
            "HTTP/1.1 304 Not Modified\r\ncontent-length: 9\r\n\r\n",
            &get,
            "Length(0)",
            true,
        ),
        (
            "HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n",
            &Method::HEAD,
            "Length(0)",
            true,
        ),
        (
            "HTTP/1.1 200 OK\r\ncontent-length: 1\r\nconnection: close\r\n\r\n",
            &get,
            "Length(1)",
            false,
        ),
        (
            "HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n",
            &get,
            "Length(1)",
            false,
        ),
        (
            "HTTP/1.0 200 OK\r\ncontent-length: 1\r\nconnection: keep-alive\r\n\r\n",
            &get,
            "Length(1)",
            true,
        ),
        // Informational responses are skipped.
        (
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n",
            &get,
            "Length(2)",
            true,
        ),
        (
            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 2\r\n\r\n",
            &get,
            "Length(2)",
            true,
        ),
        (
            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\n",
            &get,
            "error: invalid response from upstream: conflicting content-length",
            false,
        ),
        (
            "HTTP/1.1 200 OK\r\ncontent-length: +2\r\n\r\n",
            &get,
            "error: invalid response from upstream: invalid content-length",
            false,
        ),
        (
            "HTTP/1.1 200 OK\r\ncontent-length: 99999999999999999999\r\n\r\n",
            &get,
            "error: invalid response from upstream: invalid content-length",
            false,
        ),
        (
            "HTTP/1.1 101 Switching Protocols\r\n\r\n",
            &get,
            "error: invalid response from upstream: unexpected protocol switch",
            false,
        ),
        ("HTTP/1.1 200 OK\r\ncontent-len", &get, "partial", false),
        (
            "HTTP/1.1 2000 OK\r\n\r\n",
            &get,
            "error: invalid response from upstream: malformed response head",
            false,
        ),
        (
            "garbage\r\n\r\n",
            &get,
            "error: invalid response from upstream: malformed response head",
            false,
        ),
    ];
    for (raw, method, want, reusable) in cases {
        let (got, reuse) = framing_of(raw, method);
        assert_eq!(&got, want, "{raw:?}");
        assert_eq!(reuse, *reusable, "reusable for {raw:?}");
    }
}

#[test]
fn a_protocol_switch_is_the_answer_only_to_a_request_that_asked() {
    let raw = "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n\x01\x02hi";
    let mut buf = BytesMut::from(raw.as_bytes());
    let p = parse_head(&mut buf, &Method::GET, true)
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("partial"));
    assert_eq!(p.status, StatusCode::SWITCHING_PROTOCOLS);
    assert!(matches!(p.framing, ResponseFraming::Switched) && !p.reusable);
    assert_eq!(p.headers["upgrade"], "websocket");
    // The new protocol's first bytes stay for the relay.
    assert_eq!(&buf[..], b"\x01\x02hi");
    // A 100 Continue before it is skipped as ever.
    let mut buf = BytesMut::from(format!("HTTP/1.1 100 Continue\r\n\r\n{raw}").as_bytes());
    let p = parse_head(&mut buf, &Method::GET, true);
    assert!(matches!(p, Ok(Some(p)) if p.status == StatusCode::SWITCHING_PROTOCOLS));
}

#[test]
fn response_headers_keep_order_and_repeats() {
    let raw = "HTTP/1.1 404 Not Found\r\nSet-Cookie: a=1\r\nX-Y: z\r\nset-cookie: b=2\r\ncontent-length: 0\r\n\r\nrest";
    let mut buf = BytesMut::from(raw.as_bytes());
    let p = parse_head(&mut buf, &Method::GET, false).unwrap_or_else(|e| panic!("{e}"));
    let p = p.unwrap_or_else(|| panic!("partial"));
    assert_eq!(p.status, StatusCode::NOT_FOUND);
    let cookies: Vec<_> = p.headers.get_all("set-cookie").iter().collect();
    assert_eq!(cookies, ["a=1", "b=2"]);
    assert_eq!(p.headers["x-y"], "z");
    assert_eq!(&buf[..], b"rest", "only the head is consumed");
    assert_eq!(
        &p.after[..],
        b"rest",
        "what followed a small head is copied along"
    );
}

#[test]
fn what_follows_a_head_is_copied_along_only_when_small() {
    for (filler, body_len) in [(0, 13), (150, 13), (150, 300), (2000, 13)] {
        let body = "b".repeat(body_len);
        let raw = format!(
            "HTTP/1.1 200 OK\r\nx-filler: {}\r\ncontent-length: {body_len}\r\n\r\n{body}",
            "f".repeat(filler)
        );
        let mut buf = BytesMut::from(raw.as_bytes());
        let p = parse_head(&mut buf, &Method::GET, false)
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("partial"));
        assert_eq!(&buf[..], body.as_bytes(), "{filler}/{body_len}");
        let want: &[u8] = if raw.len() < COPY_BELOW {
            body.as_bytes()
        } else {
            b""
        };
        assert_eq!(&p.after[..], want, "{filler}/{body_len}");
        assert_eq!(p.headers["x-filler"].len(), filler, "{filler}/{body_len}");
        assert_eq!(p.headers["content-length"], body_len.to_string().as_str());
    }
}

#[test]
fn copies_hold_their_bytes_at_every_size() {
    for n in [0, 1, INLINE_COPY - 1, INLINE_COPY, INLINE_COPY + 1, 900] {
        let data: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
        let copy = copy_of(&data);
        assert_eq!(&copy[..], &data[..], "{n}");
        if n > 2 {
            assert_eq!(&copy.slice(1..n - 1)[..], &data[1..n - 1], "{n}");
        }
    }
}

#[test]
fn chunk_sizes() {
    let ok: &[(&[u8], u64)] = &[
        (b"0", 0),
        (b"a", 10),
        (b"FF", 255),
        (b"10;ext=1", 16),
        (b"10 ;x", 16),
    ];
    for (line, n) in ok {
        assert_eq!(parse_chunk_size(line).ok(), Some(*n), "{line:?}");
    }
    for line in [&b""[..], b"x", b"-1", b"1x", b"0x10", b"1000000000000000"] {
        assert!(parse_chunk_size(line).is_err(), "{line:?}");
    }
}

/// A one-shot upstream: accepts connections and answers each request with the next
/// raw response from `script`, recording the requests it read.
async fn upstream(
    script: Vec<&'static [u8]>,
) -> (SocketAddr, tokio::task::JoinHandle<Vec<String>>) {
    let l = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let addr = l.local_addr().unwrap_or_else(|e| panic!("{e}"));
    let task = tokio::spawn(async move {
        let mut seen = Vec::new();
        let (mut s, _) = l.accept().await.unwrap_or_else(|e| panic!("{e}"));
        for reply in script {
            let mut buf = vec![0u8; 4096];
            let n = s.read(&mut buf).await.unwrap_or(0);
            seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            s.write_all(reply).await.unwrap_or_else(|e| panic!("{e}"));
        }
        seen
    });
    (addr, task)
}

async fn get(
    pool: &Arc<H1Pool>,
    addr: SocketAddr,
) -> Result<(StatusCode, Bytes, Option<HeaderMap>), String> {
    let authority = Authority::from_static("up.test");
    let path = PathAndQuery::from_static("/p?q=1");
    let resp = pool
        .send(
            addr,
            Head {
                authority: &authority,
                method: &Method::GET,
                path: &path,
                headers: &HeaderMap::new(),
                forwarded: &forwarded(),
                upgrade: None,
            },
            UpstreamBody::Empty,
            &AtomicBool::new(false),
        )
        .await
        .map_err(|e| e.to_string())?;
    let status = resp.status();
    let collected = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    let trailers = collected.trailers().cloned();
    Ok((status, collected.to_bytes(), trailers))
}

fn pool() -> Arc<H1Pool> {
    H1Pool::new(
        Duration::from_secs(1),
        Duration::from_secs(60),
        Gauge::default(),
        ConnLimits::default(),
    )
}

#[tokio::test]
async fn chunked_body_with_trailers_then_reuse() {
    let (addr, task) = upstream(vec![
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6;x=y\r\n world\r\n0\r\ngrpc-status: 0\r\n\r\n",
        b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok",
    ])
    .await;
    let pool = pool();
    let (status, body, trailers) = get(&pool, addr).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "hello world");
    assert_eq!(
        trailers.and_then(|t| t.get("grpc-status").cloned()),
        Some(HeaderValue::from_static("0"))
    );
    // The second request reuses the connection: the upstream accepts only one.
    let (status, body, _) = get(&pool, addr).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((status, &body[..]), (StatusCode::CREATED, &b"ok"[..]));
    let seen = task.await.unwrap_or_else(|e| panic!("{e}"));
    assert!(
        seen[0].starts_with("GET /p?q=1 HTTP/1.1\r\nhost: up.test\r\n"),
        "{seen:?}"
    );
    assert_eq!(pool.open.get(), 1);
}

#[tokio::test]
async fn truncated_bodies_are_errors() {
    let (addr, _task) = upstream(vec![b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort"]).await;
    let err = get(&pool(), addr).await.err().unwrap_or_default();
    assert!(err.contains("before the body ended"), "{err}");

    let (addr, _task) = upstream(vec![
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhel",
    ])
    .await;
    let err = get(&pool(), addr).await.err().unwrap_or_default();
    assert!(err.contains("before the body ended"), "{err}");

    let (addr, _task) = upstream(vec![
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
    ])
    .await;
    let err = get(&pool(), addr).await.err().unwrap_or_default();
    assert!(err.contains("invalid chunk size"), "{err}");
}

#[tokio::test]
async fn body_until_close_is_complete_at_eof() {
    let (addr, _task) = upstream(vec![b"HTTP/1.1 200 OK\r\n\r\nall of it"]).await;
    let pool = pool();
    let (_, body, _) = get(&pool, addr).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(body, "all of it");
    assert_eq!(pool.open.get(), 0, "a body framed by close is not pooled");
}

#[tokio::test]
async fn refused_connection_is_a_connect_error() {
    let l = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let addr = l.local_addr().unwrap_or_else(|e| panic!("{e}"));
    drop(l);
    let authority = Authority::from_static("up.test");
    let err = pool()
        .send(
            addr,
            Head {
                authority: &authority,
                method: &Method::GET,
                path: &PathAndQuery::from_static("/"),
                headers: &HeaderMap::new(),
                forwarded: &forwarded(),
                upgrade: None,
            },
            UpstreamBody::Empty,
            &AtomicBool::new(false),
        )
        .await
        .err();
    assert!(err.is_some_and(|e| e.is_connect()));
}

#[tokio::test]
async fn closed_pooled_connection_is_replaced() {
    // First connection answers once then closes; the pooled connection is dead and a
    // fresh one answers the second request.
    let l = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let addr = l.local_addr().unwrap_or_else(|e| panic!("{e}"));
    tokio::spawn(async move {
        for body in [&b"one"[..], b"two"] {
            let (mut s, _) = l.accept().await.unwrap_or_else(|e| panic!("{e}"));
            let mut buf = vec![0u8; 4096];
            let _ = s.read(&mut buf).await;
            let mut reply = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\n".to_vec();
            reply.extend_from_slice(body);
            let _ = s.write_all(&reply).await;
        }
    });
    let pool = pool();
    let (_, body, _) = get(&pool, addr).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(body, "one");
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (_, body, _) = get(&pool, addr).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(body, "two");
}

#[test]
fn request_heads() {
    let mut h = HeaderMap::new();
    h.insert("x-a", HeaderValue::from_static("1"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("4"));
    h.insert(header::EXPECT, HeaderValue::from_static("100-continue"));
    let a = Authority::from_static("svc:80");
    let p = PathAndQuery::from_static("/x");
    let f = forwarded();
    let text = |h: &HeaderMap, framing| {
        let mut out = Vec::new();
        let head = Head {
            authority: &a,
            method: &Method::POST,
            path: &p,
            headers: h,
            forwarded: &f,
            upgrade: None,
        };
        encode_head(&mut out, &head, framing);
        String::from_utf8(out).unwrap_or_default()
    };
    let fwd = "x-request-id: id-1\r\nx-forwarded-for: 10.0.0.1\r\nx-forwarded-proto: http\r\n";
    assert_eq!(
        text(&h, RequestFraming::Length(4)),
        format!("POST /x HTTP/1.1\r\nhost: svc:80\r\nx-a: 1\r\n{fwd}content-length: 4\r\n\r\n")
    );
    assert_eq!(
        text(&h, RequestFraming::Declared),
        format!("POST /x HTTP/1.1\r\nhost: svc:80\r\nx-a: 1\r\ncontent-length: 4\r\n{fwd}\r\n")
    );
    assert_eq!(
        text(&h, RequestFraming::Chunked),
        format!(
            "POST /x HTTP/1.1\r\nhost: svc:80\r\nx-a: 1\r\n{fwd}transfer-encoding: chunked\r\n\r\n"
        )
    );
    // The request's own Host is written where it stands, and only it.
    h.insert(header::HOST, HeaderValue::from_static("api.example"));
    assert_eq!(
        text(&h, RequestFraming::Declared),
        format!(
            "POST /x HTTP/1.1\r\nx-a: 1\r\ncontent-length: 4\r\nhost: api.example\r\n{fwd}\r\n"
        )
    );
    // A WebSocket handshake asks for the switch itself, after the forwarding fields.
    let mut out = Vec::new();
    let websocket = HeaderValue::from_static("websocket");
    let head = Head {
        authority: &a,
        method: &Method::GET,
        path: &p,
        headers: &HeaderMap::new(),
        forwarded: &f,
        upgrade: Some(&websocket),
    };
    encode_head(&mut out, &head, RequestFraming::None);
    assert_eq!(
        String::from_utf8(out).unwrap_or_default(),
        format!(
            "GET /x HTTP/1.1\r\nhost: svc:80\r\n{fwd}connection: upgrade\r\nupgrade: websocket\r\n\r\n"
        )
    );
}

/// The forwarding fields of a request from 10.0.0.1 over plain HTTP.
fn forwarded() -> Forwarded {
    Forwarded::take(
        &mut HeaderMap::new(),
        false,
        HeaderValue::from_static("id-1"),
        &HeaderValue::from_static("10.0.0.1"),
        "http",
        None,
    )
}

/// An upstream on many connections that answers every request `delay` after reading
/// it; counts the connections it accepted and saw closed.
async fn slow_upstream(delay: Duration) -> (SocketAddr, Arc<AtomicU32>, Arc<AtomicU32>) {
    let l = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let addr = l.local_addr().unwrap_or_else(|e| panic!("{e}"));
    let accepted = Arc::new(AtomicU32::new(0));
    let closed = Arc::new(AtomicU32::new(0));
    let (a, c) = (accepted.clone(), closed.clone());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            a.fetch_add(1, Ordering::SeqCst);
            let c = c.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {
                    tokio::time::sleep(delay).await;
                    if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
                c.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    (addr, accepted, closed)
}

fn limited(max_connections: u32, max_pending: Option<u32>) -> Arc<H1Pool> {
    H1Pool::new(
        Duration::from_secs(1),
        Duration::from_secs(60),
        Gauge::default(),
        ConnLimits {
            max_connections: Some(max_connections),
            max_pending,
        },
    )
}

async fn spawn_get(
    pool: &Arc<H1Pool>,
    addr: SocketAddr,
) -> tokio::task::JoinHandle<Result<StatusCode, String>> {
    let pool = pool.clone();
    let task = tokio::spawn(async move { get(&pool, addr).await.map(|(s, _, _)| s) });
    // Let it reach the pool before the next one starts.
    tokio::time::sleep(Duration::from_millis(20)).await;
    task
}

async fn joined(
    task: tokio::task::JoinHandle<Result<StatusCode, String>>,
) -> Result<StatusCode, String> {
    task.await.unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::test]
async fn at_max_connections_requests_wait_for_a_free_connection() {
    let (addr, accepted, _) = slow_upstream(Duration::from_millis(200)).await;
    let pool = limited(1, None);
    let mut tasks = Vec::new();
    for _ in 0..3 {
        tasks.push(spawn_get(&pool, addr).await);
    }
    assert_eq!(
        pool.limits().map(|l| (l.connections, l.pending)),
        Some((1, 2)),
        "one request is on the connection, two wait"
    );
    for t in tasks {
        assert_eq!(joined(t).await, Ok(StatusCode::OK));
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    assert_eq!(pool.limits().map(|l| l.pending), Some(0));
}

#[tokio::test]
async fn beyond_max_pending_a_request_is_refused_at_once() {
    let (addr, _, _) = slow_upstream(Duration::from_millis(200)).await;
    let pool = limited(1, Some(1));
    let first = spawn_get(&pool, addr).await;
    let second = spawn_get(&pool, addr).await;
    let third = spawn_get(&pool, addr).await;
    assert_eq!(joined(third).await, Err(H1Error::Overflow.to_string()));
    assert_eq!(joined(first).await, Ok(StatusCode::OK));
    assert_eq!(joined(second).await, Ok(StatusCode::OK));
    assert_eq!(pool.limits().map(|l| l.overflowed), Some(1));
}

#[tokio::test]
async fn at_the_limit_an_idle_connection_elsewhere_gives_up_its_slot() {
    let (a, _, a_closed) = slow_upstream(Duration::ZERO).await;
    let (b, b_accepted, _) = slow_upstream(Duration::ZERO).await;
    let pool = limited(1, None);
    assert_eq!(get(&pool, a).await.map(|r| r.0), Ok(StatusCode::OK));
    // A's connection is idle and holds the only slot: B's request closes it.
    let r = tokio::time::timeout(Duration::from_secs(1), get(&pool, b)).await;
    assert_eq!(r.ok().map(|r| r.map(|r| r.0)), Some(Ok(StatusCode::OK)));
    assert_eq!(b_accepted.load(Ordering::SeqCst), 1);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(a_closed.load(Ordering::SeqCst), 1);
    assert_eq!(pool.limits().map(|l| l.connections), Some(1));
}

#[tokio::test]
async fn a_connection_freed_while_another_endpoint_waits_is_closed_for_it() {
    let (a, _, a_closed) = slow_upstream(Duration::from_millis(100)).await;
    let (b, _, _) = slow_upstream(Duration::ZERO).await;
    let pool = limited(1, None);
    let on_a = spawn_get(&pool, a).await;
    let on_b = spawn_get(&pool, b).await;
    assert_eq!(joined(on_a).await, Ok(StatusCode::OK));
    assert_eq!(joined(on_b).await, Ok(StatusCode::OK));
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        a_closed.load(Ordering::SeqCst),
        1,
        "A's connection went for B's sake"
    );
}

#[test]
fn header_names_read_as_from_bytes_reads_them() {
    let spellings = [
        "host",
        "Host",
        "HOST",
        "hOsT",
        "date",
        "Date",
        "content-length",
        "Content-Length",
        "CONTENT-LENGTH",
        "content-type",
        "Content-Type",
        "connection",
        "Connection",
        "user-agent",
        "User-Agent",
        "accept",
        "Accept",
        "accept-encoding",
        "Accept-Encoding",
        "server",
        "Server",
        "transfer-encoding",
        "Transfer-Encoding",
        "cache-control",
        "Cache-Control",
        "authorization",
        "Authorization",
        "content-encoding",
        "Content-Encoding",
        "x-request-id",
        "X-Request-Id",
        "etag",
        "hosts",
        "hos",
        "content-lengt",
        "content-lengths",
    ];
    for raw in spellings {
        let want = HeaderName::from_bytes(raw.as_bytes()).unwrap_or_else(|e| panic!("{raw}: {e}"));
        assert_eq!(header_name(raw.as_bytes()).ok(), Some(want), "{raw}");
    }
    for bad in ["", "ho st", "host:", "content-length\r", "dat\u{e9}"] {
        assert!(header_name(bad.as_bytes()).is_err(), "{bad:?}");
    }
}
