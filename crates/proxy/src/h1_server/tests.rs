use super::*;

const LIMITS: GuardLimits = GuardLimits {
    max_request_line: 1024,
    max_header_bytes: 8192,
    max_headers: 100,
    header_read_timeout: std::time::Duration::from_secs(1),
};

/// `head` as the server makes it a request: scanned, then built from its layout.
fn try_parsed(head: &'static [u8]) -> Result<(Request<()>, Meta), Rejection> {
    let mut scan = Scanner::new(LIMITS);
    let Step::Pass(n) = scan.step(head) else {
        panic!("the scanner did not pass {}", String::from_utf8_lossy(head));
    };
    parse(
        &Bytes::from_static(&head[..n]),
        scan.layout(),
        scan.in_body(),
    )
}

fn parsed(head: &'static [u8]) -> (Request<()>, Meta) {
    match try_parsed(head) {
        Ok(p) => p,
        Err(r) => panic!("refused: {r:?}"),
    }
}

#[test]
fn a_head_becomes_a_request_sharing_its_bytes() {
    let (req, meta) = parsed(b"GET /a/b?c=1 HTTP/1.1\r\nHost: x\r\nX-Two: 1\r\nx-two: 2\r\n\r\n");
    assert_eq!(req.method(), Method::GET);
    assert_eq!(req.uri(), "/a/b?c=1");
    assert_eq!(req.version(), Version::HTTP_11);
    let two: Vec<_> = req.headers().get_all("x-two").iter().collect();
    assert_eq!(two, ["1", "2"]);
    assert!(meta.keep_alive && !meta.head && !meta.expect_continue);
}

#[test]
fn upgrade_requests_are_served_as_plain_http_1_1() {
    let (req, _) = parsed(
        b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMA\r\nX: 1\r\n\r\n",
    );
    let names: Vec<_> = req
        .headers()
        .keys()
        .map(header::HeaderName::as_str)
        .collect();
    assert_eq!(names, ["host", "x"]);
    assert!(req.extensions().get::<UpgradeRequest>().is_none());
}

#[test]
fn only_a_websocket_handshake_asks_upstream_to_switch() {
    let asks = |head: &'static [u8]| {
        let (req, meta) = parsed(head);
        let asked = req
            .extensions()
            .get::<UpgradeRequest>()
            .map(|u| u.0.clone());
        assert_eq!(asked, meta.upgrade, "{}", String::from_utf8_lossy(head));
        assert!(req.headers().get(header::UPGRADE).is_none());
        asked.is_some()
    };
    assert!(asks(
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Upgrade\r\nUpgrade: WebSocket\r\n\r\n"
    ));
    // Not without `Connection: upgrade`, over HTTP/1.0, for another method or with a body.
    assert!(!asks(
        b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n"
    ));
    assert!(!asks(
        b"GET /ws HTTP/1.0\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"
    ));
    assert!(!asks(
        b"POST /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"
    ));
    assert!(!asks(
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\nContent-Length: 2\r\n\r\nhi"
    ));
}

#[test]
fn keep_alive_follows_the_version_and_connection_header() {
    let cases: [(&'static [u8], bool); 5] = [
        (b"GET / HTTP/1.1\r\n\r\n", true),
        (
            b"GET / HTTP/1.1\r\nConnection: keep-alive, Close\r\n\r\n",
            false,
        ),
        (b"GET / HTTP/1.0\r\n\r\n", false),
        (b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n", true),
        (
            b"GET / HTTP/1.0\r\nConnection: keep-alive\r\nConnection: close\r\n\r\n",
            false,
        ),
    ];
    for (head, keep) in cases {
        assert_eq!(
            parsed(head).1.keep_alive,
            keep,
            "{}",
            String::from_utf8_lossy(head)
        );
    }
}

#[test]
fn expect_te_and_head_are_noted() {
    let (_, meta) =
        parsed(b"HEAD / HTTP/1.1\r\nExpect: 100-Continue\r\nTE: gzip, trailers\r\n\r\n");
    assert!(meta.head && meta.expect_continue && meta.trailers);
}

#[test]
fn a_target_the_uri_type_refuses_is_a_400() {
    let r = try_parsed(b"GET http://[::1 HTTP/1.1\r\n\r\n");
    assert!(matches!(
        r,
        Err(Rejection {
            code: ErrorCode::InvalidRequest,
            ..
        })
    ));
}

/// A connected pair of loopback sockets: the server's end as a `Stream`.
async fn socket_pair() -> (Stream, TcpStream) {
    let Ok(listener) = tokio::net::TcpListener::bind("127.0.0.1:0").await else {
        panic!("bind");
    };
    let Ok(addr) = listener.local_addr() else {
        panic!("addr")
    };
    let Ok(client) = TcpStream::connect(addr).await else {
        panic!("connect")
    };
    let Ok((server, _)) = listener.accept().await else {
        panic!("accept")
    };
    (Stream::Plain(server), client)
}

/// What `respond` writes for `resp` to a request described by `meta` (the date line
/// and the one `x-request-id` line left out), and whether it kept the connection.
async fn written(resp: Response<ResponseBody>, meta: Meta) -> (String, bool) {
    let (text, kept) = written_raw(resp, meta).await;
    let ids = text
        .lines()
        .filter(|l| l.starts_with("x-request-id: "))
        .count();
    assert_eq!(ids, 1, "one x-request-id in {text}");
    let text = text
        .split('\n')
        .filter(|l| !l.starts_with("x-request-id: "))
        .collect::<Vec<_>>()
        .join("\n");
    (text, kept)
}

/// What `respond` writes (the date line left out), with `x-request-id: rid-1` to add.
async fn written_raw(resp: Response<ResponseBody>, meta: Meta) -> (String, bool) {
    let (mut io, mut client) = socket_pair().await;
    let id = HeaderValue::from_static("rid-1");
    let kept = match respond(&mut io, &mut Vec::new(), resp, &id, &meta, true).await {
        Ok(k) => k,
        Err(e) => panic!("respond: {e}"),
    };
    drop(io);
    let mut got = Vec::new();
    let _ = tokio::io::AsyncReadExt::read_to_end(&mut client, &mut got).await;
    let text = String::from_utf8_lossy(&got)
        .split("\r\n")
        .filter(|l| !l.starts_with("date: "))
        .collect::<Vec<_>>()
        .join("\n");
    (text, kept)
}

fn meta(version: Version, head: bool) -> Meta {
    Meta {
        version,
        keep_alive: true,
        head,
        expect_continue: false,
        trailers: false,
        upgrade: None,
    }
}

#[tokio::test]
async fn a_known_length_is_sent_as_content_length() {
    let resp = Response::new(ResponseBody::full("hello"));
    let (text, kept) = written(resp, meta(Version::HTTP_11, false)).await;
    assert_eq!(text, "HTTP/1.1 200 OK\ncontent-length: 5\n\nhello");
    assert!(kept);
}

#[tokio::test]
async fn a_stream_of_unknown_length_is_chunked_for_http_1_1_and_closes_for_1_0() {
    let resp = Response::new(ResponseBody::frames(&["ab", "", "cde"]));
    let (text, kept) = written(resp, meta(Version::HTTP_11, false)).await;
    assert_eq!(
        text,
        "HTTP/1.1 200 OK\ntransfer-encoding: chunked\n\n2\nab\n3\ncde\n0\n\n"
    );
    assert!(kept);
    let resp = Response::new(ResponseBody::frames(&["ab", "cde"]));
    let (text, kept) = written(resp, meta(Version::HTTP_10, false)).await;
    assert_eq!(text, "HTTP/1.1 200 OK\nconnection: close\n\nabcde");
    assert!(!kept);
}

#[tokio::test]
async fn head_204_and_304_answers_carry_no_body() {
    let mut resp = Response::new(ResponseBody::full("hello"));
    resp.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from_static("5"));
    let (text, _) = written(resp, meta(Version::HTTP_11, true)).await;
    assert_eq!(text, "HTTP/1.1 200 OK\ncontent-length: 5\n\n");
    for (status, line) in [(204, "204 No Content"), (304, "304 Not Modified")] {
        let mut resp = Response::new(ResponseBody::full("x"));
        *resp.status_mut() = StatusCode::from_u16(status).unwrap_or_default();
        let (text, _) = written(resp, meta(Version::HTTP_11, false)).await;
        assert_eq!(text, format!("HTTP/1.1 {line}\n\n"));
    }
}

#[tokio::test]
async fn a_response_that_says_close_closes_and_1_0_keep_alive_is_confirmed() {
    let mut resp = Response::new(ResponseBody::empty());
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    let (text, kept) = written(resp, meta(Version::HTTP_11, false)).await;
    assert_eq!(
        text,
        "HTTP/1.1 200 OK\ncontent-length: 0\nconnection: close\n\n"
    );
    assert!(!kept);
    let resp = Response::new(ResponseBody::empty());
    let (text, kept) = written(resp, meta(Version::HTTP_10, false)).await;
    assert_eq!(
        text,
        "HTTP/1.1 200 OK\ncontent-length: 0\nconnection: keep-alive\n\n"
    );
    assert!(kept);
}

#[tokio::test]
async fn a_body_shorter_than_its_declared_length_is_an_error_not_a_complete_response() {
    let mut resp = Response::new(ResponseBody::frames(&["abc"]));
    resp.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from_static("10"));
    let (mut io, _client) = socket_pair().await;
    let r = respond(
        &mut io,
        &mut Vec::new(),
        resp,
        &HeaderValue::from_static("rid-1"),
        &meta(Version::HTTP_11, false),
        true,
    )
    .await;
    assert!(r.is_err());
}

#[tokio::test]
async fn the_request_id_is_written_unless_the_response_has_one() {
    let resp = Response::new(ResponseBody::full(Bytes::from_static(b"ok")));
    let (text, _) = written_raw(resp, meta(Version::HTTP_11, false)).await;
    assert!(text.contains("\nx-request-id: rid-1\n"), "{text}");
    let mut resp = Response::new(ResponseBody::full(Bytes::from_static(b"ok")));
    resp.headers_mut()
        .insert(X_REQUEST_ID, HeaderValue::from_static("upstream-7"));
    let (text, _) = written_raw(resp, meta(Version::HTTP_11, false)).await;
    assert_eq!(text.matches("x-request-id").count(), 1, "{text}");
    assert!(text.contains("\nx-request-id: upstream-7\n"), "{text}");
}
