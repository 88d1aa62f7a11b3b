use super::*;

const LIMITS: GuardLimits = GuardLimits {
    max_request_line: 64,
    max_header_bytes: 256,
    max_headers: 5,
    header_read_timeout: std::time::Duration::from_secs(1),
};

/// Feed the whole input and describe the outcome: how many bytes passed, and the
/// rejection if any.
fn run(input: &[u8]) -> (usize, Option<&'static str>) {
    run_in_reads(input, &[])
}

/// `run`, with the input arriving in reads that end at `ends` (in order).
fn run_in_reads(input: &[u8], ends: &[usize]) -> (usize, Option<&'static str>) {
    let mut s = Scanner::new(LIMITS);
    let mut passed = 0;
    for &end in ends.iter().chain([&input.len()]) {
        loop {
            match s.step(&input[passed..end]) {
                Step::Pass(0) | Step::NeedMore => break,
                Step::Pass(n) => passed += n,
                Step::Reject(r) => return (passed, Some(r.message)),
            }
        }
    }
    (passed, None)
}

#[test]
fn accepts_well_formed_messages() {
    let ok: &[&[u8]] = &[
        b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: Chunked\r\n\r\n3;ext=1\r\nabc\r\n0\r\nX-T: 1\r\n\r\n",
        b"\r\nGET / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12",
    ];
    for m in ok {
        assert_eq!(run(m), (m.len(), None), "{}", String::from_utf8_lossy(m));
    }
}

#[test]
fn holds_incomplete_heads() {
    assert_eq!(run(b"GET / HTTP/1.1\r\nHost: a\r\n"), (0, None));
    assert_eq!(run(b"PRI * HTTP/2"), (0, None));
    // a body may arrive in pieces
    assert_eq!(
        run(b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc").0,
        42
    );
}

#[test]
fn rejects_smuggling_and_malformed_heads() {
    let bad: &[(&[u8], &str)] = &[
        (
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            "both Content-Length and Transfer-Encoding",
        ),
        (
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
            "both Content-Length and Transfer-Encoding",
        ),
        (
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n",
            "duplicate Content-Length",
        ),
        (
            b"POST / HTTP/1.1\r\nContent-Length: 3, 3\r\n\r\n",
            "invalid Content-Length",
        ),
        (
            b"POST / HTTP/1.1\r\nContent-Length: +3\r\n\r\n",
            "invalid Content-Length",
        ),
        (
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "unsupported Transfer-Encoding (only chunked is accepted)",
        ),
        (
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            "duplicate Transfer-Encoding",
        ),
        (
            b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            "Transfer-Encoding in an HTTP/1.0 request",
        ),
        (
            b"GET / HTTP/1.1\r\nX-A: 1\r\n folded\r\n\r\n",
            "obsolete line folding in a header",
        ),
        (
            b"GET / HTTP/1.1\r\nX-A: 1\rX-B: 2\r\n\r\n",
            "bare CR in a header",
        ),
        (
            b"GET / HTTP/1.1\r\nX-A: 1\nX-B: 2\r\n\r\n",
            "bare LF in header section",
        ),
        (b"GET / HTTP/1.1\r\nX A: 1\r\n\r\n", "invalid header name"),
        (b"GET / HTTP/1.1\r\nX-A : 1\r\n\r\n", "invalid header name"),
        (b"GET / HTTP/1.1\r\nNoColon\r\n\r\n", "header without ':'"),
        (b"GET  / HTTP/1.1\r\n\r\n", "malformed request line"),
        (b"GET / HTTP/2.0\r\n\r\n", "unsupported HTTP version"),
        (
            b"GET / HTTP/1.1\r\nA: 1\r\nB: 1\r\nC: 1\r\nD: 1\r\nE: 1\r\nF: 1\r\n\r\n",
            "too many request headers",
        ),
    ];
    for (m, want) in bad {
        assert_eq!(run(m), (0, Some(*want)), "{}", String::from_utf8_lossy(m));
    }
}

#[test]
fn enforces_size_limits_before_the_head_completes() {
    let long_line = format!("GET /{} HTTP/1.1\r\n", "a".repeat(100));
    assert_eq!(
        run(long_line.as_bytes()),
        (0, Some("request line is too long"))
    );
    let big = format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(300));
    assert_eq!(
        run(big.as_bytes()),
        (0, Some("request headers are too large"))
    );
}

/// A head that is `line` bytes of request line (without its CRLF) and `fields`
/// bytes of header section (each field with its CRLF), then the empty line.
fn sized_head(line: usize, fields: usize) -> Vec<u8> {
    let fixed = "GET / HTTP/1.1".len();
    let mut m = format!("GET /{} HTTP/1.1\r\n", "a".repeat(line - fixed)).into_bytes();
    let field = |n: usize| format!("X: {}\r\n", "b".repeat(n - 5));
    let mut left = fields;
    while left > 0 {
        let n = if left > 100 { 50 } else { left };
        m.extend_from_slice(field(n).as_bytes());
        left -= n;
    }
    m.extend_from_slice(b"\r\n");
    m
}

#[test]
fn every_split_point_gives_the_verdict_of_the_whole_at_the_size_limits() {
    // At, and one past, each limit: a head is judged by what it is, never by where
    // the network happened to cut it.
    let cases = [
        (64, 256, None),
        (64, 257, Some("request headers are too large")),
        (65, 10, Some("request line is too long")),
        (64, 200, None),
        (20, 256, None),
    ];
    for (line, fields, want) in cases {
        let m = sized_head(line, fields);
        assert_eq!(run(&m).1, want, "whole, line {line}, fields {fields}");
        for cut in 1..m.len() {
            let verdict = run_in_reads(&m, &[cut]).1;
            assert_eq!(verdict, want, "line {line}, fields {fields}, cut at {cut}");
        }
    }
}

#[test]
fn rejects_bad_chunked_framing_after_the_head() {
    let head = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
    let bad: &[(&[u8], &str)] = &[
        (b"zz\r\n", "invalid chunk size"),
        (b"\r\n", "missing chunk size"),
        (b"3\nabc", "invalid chunk size"),
        (b"3\r\rabc", "chunk size line must end with CRLF"),
        (b"3\r\nabcd\r\n", "chunk data must end with CRLF"),
        (b"ffffffffffffffff\r\n", "chunk size too large"),
        (b"-1\r\n", "invalid chunk size"),
    ];
    for (body, want) in bad {
        let mut m = head.to_vec();
        m.extend_from_slice(body);
        let (passed, why) = run(&m);
        assert!(passed >= head.len(), "head passes first");
        assert_eq!(why, Some(*want), "{}", String::from_utf8_lossy(body));
    }
}

#[test]
fn an_upgrade_request_does_not_end_checking() {
    let m = b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\nPOST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
    let (passed, why) = run(m);
    assert_eq!(passed, 59);
    assert_eq!(why, Some("both Content-Length and Transfer-Encoding"));
}

#[test]
fn a_chunked_body_reads_as_its_payload_whatever_the_reads() {
    let body = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-T: 1\r\n\r\nGET";
    for split in 1..body.len() {
        let mut s = Scanner::new(LIMITS);
        assert_eq!(
            s.step(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Step::Pass(47)
        );
        let (mut payload, mut at, mut read_to) = (Vec::new(), 0, split);
        while s.in_body() {
            match s.body_step(&body[at..read_to]) {
                BodyStep::Data(n) => {
                    payload.extend_from_slice(&body[at..at + n]);
                    at += n;
                }
                BodyStep::Framing(n) => at += n,
                BodyStep::NeedMore => read_to = body.len(),
                BodyStep::Reject(r) => panic!("split {split}: {r:?}"),
            }
        }
        assert_eq!(payload, b"hello world", "split {split}");
        assert_eq!(&body[at..], b"GET", "split {split}");
    }
}

#[test]
fn pipelined_message_after_a_body_is_checked_too() {
    let m = b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcGET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n";
    let (passed, why) = run(m);
    assert_eq!(passed, 41);
    assert_eq!(why, Some("duplicate Content-Length"));
}

#[test]
fn a_head_in_pieces_passes_and_the_next_takes_the_one_pass_check_again() {
    let head = b"GET / HTTP/1.1\r\nHost: a\r\nAccept: */*\r\n\r\n";
    let mut s = Scanner::new(LIMITS);
    assert_eq!(s.step(&head[..20]), Step::NeedMore);
    assert!(s.head_pending);
    assert_eq!(s.step(head), Step::Pass(head.len()));
    assert!(!s.head_pending);
    assert_eq!(s.layout().fields.len(), 2);
    let mut two = head.to_vec();
    two.extend_from_slice(head);
    assert_eq!(s.step(&two), Step::Pass(head.len()));
    assert!(!s.head_pending);
    assert_eq!(s.layout().fields.len(), 2);
}

mod random {
    //! Fuzz-style property tests (cargo-fuzz needs nightly, which this toolchain
    //! lacks): random and mutated byte streams never panic the scanner, and nothing
    //! after a rejection is ever passed on.
    use super::*;
    use proptest::prelude::*;

    const SEED: &[&[u8]] = &[
        b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    ];

    fn feed(input: &[u8], split: usize) -> (usize, bool) {
        let mut s = Scanner::new(LIMITS);
        let mut passed = 0;
        let mut rejected = false;
        // Deliver in two reads, as a socket might.
        let cut = split.min(input.len());
        for end in [cut, input.len()] {
            loop {
                match s.step(&input[passed..end]) {
                    Step::Pass(0) | Step::NeedMore => break,
                    Step::Pass(n) => {
                        assert!(!rejected, "bytes passed after a rejection");
                        passed += n;
                        assert!(passed <= end);
                    }
                    Step::Reject(_) => {
                        rejected = true;
                        break;
                    }
                }
            }
            if rejected {
                break;
            }
        }
        (passed, rejected)
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600), split in 0usize..600) {
            let _ = feed(&bytes, split);
        }

        #[test]
        fn mutated_messages_never_panic(seed in 0usize..4, muts in prop::collection::vec((0usize..80, any::<u8>()), 1..6), split in 0usize..100) {
            let mut m = SEED[seed].to_vec();
            m.extend_from_slice(SEED[0]);
            for (pos, b) in muts {
                let i = pos % m.len();
                m[i] = b;
            }
            let _ = feed(&m, split);
        }

        #[test]
        fn split_points_do_not_change_the_verdict(seed in 0usize..3, split in 0usize..120) {
            let whole = feed(SEED[seed], usize::MAX);
            let parts = feed(SEED[seed], split);
            prop_assert_eq!(whole, parts);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]

        /// The word-at-a-time runs end where a byte-by-byte scan of the table does.
        #[test]
        fn runs_end_where_the_byte_scan_ends(
            bytes in prop::collection::vec(one_pass::byte(), 0..40),
            filler in 0usize..24,
            from in 0usize..8,
        ) {
            // Long runs of plain bytes before the random ones, so the word test decides.
            let mut head = b"abcdefghijklmnopqrstuvwxyz0123"[..filler].to_vec();
            head.extend_from_slice(&bytes);
            let from = from.min(head.len());
            for (class, whole) in [
                (&TARGET, all_target as fn(u64) -> bool),
                (&FIELD_VCHAR, all_field_vchar),
            ] {
                let mut end = from;
                while end < head.len() && class[usize::from(head[end])] {
                    end += 1;
                }
                prop_assert_eq!(crate::guard::run(&head, from, class, whole), end, "{:?}", head);
            }
        }
    }

    proptest! {
        // Heads the one-pass check accepts and that carry one wrong byte are rare
        // among random ones: many cases, so that a wrong byte class shows.
        #![proptest_config(ProptestConfig::with_cases(4096))]

        #[test]
        fn the_one_pass_check_accepts_only_what_the_full_check_accepts(
            line in one_pass::line(),
            fields in prop::collection::vec(one_pass::field(), 0..7),
            muts in prop::collection::vec((0usize..120, one_pass::byte()), 0..3),
        ) {
            let mut head = one_pass::head(line, &fields);
            for (pos, b) in muts {
                let i = pos % head.len();
                head[i] = b;
            }
            one_pass::agree(&head);
        }
    }
}

pub(crate) mod one_pass {
    //! `Scanner::fast_head` against `Scanner::check_head`.
    use super::*;
    use proptest::prelude::*;

    // Each list starts with the fragments a well-formed head may have.
    const METHODS: [&str; 5] = ["GET", "POST", "G T", "", "GE\x01T"];
    const TARGETS: [&str; 8] = [
        "/",
        "/a?b=c",
        "*",
        "/api/v1/users/12345?fields=name,email",
        "/\x7f",
        "/a b",
        "",
        "/api/v1/users/12345\x7f?fields",
    ];
    const VERSIONS: [&str; 4] = ["HTTP/1.1", "HTTP/1.0", "HTTP/1.2", "http/1.1"];
    const ENDS: [&str; 4] = ["\r\n", "\n", "\r", "\r\r\n"];
    const NAMES: [&str; 9] = [
        "Host",
        "content-length",
        "Content-Length",
        "transfer-encoding",
        "x-a",
        "",
        "bad name",
        " x",
        "a\x00",
    ];
    const SEPS: [&str; 4] = [":", ": ", ":\t ", " :"];
    const VALUES: [&str; 17] = [
        "a",
        "0",
        "12",
        " 7 ",
        "chunked",
        "gzip, chunked",
        "",
        "\t",
        "99999999999999999999",
        "\u{e9}",
        "Mozilla/5.0 (X11; Linux x86_64) Gecko/20100101",
        "text/html,\tapplication/xhtml+xml;q=0.9 caf\u{e9} ",
        "b\x7f",
        "a long value that ends in\x01 a control",
        "a long value with a DEL\x7f",
        "x\x01y",
        "a\rb",
    ];

    /// An index into a list whose first `good` entries are well-formed: mostly one
    /// of those, so that heads the one-pass check accepts are common.
    pub fn pick(len: usize, good: usize) -> impl Strategy<Value = usize> {
        prop_oneof![4 => 0..good, 1 => 0..len]
    }

    /// (method, target, version, line end) of a request line.
    pub fn line() -> impl Strategy<Value = (usize, usize, usize, usize)> {
        (pick(5, 2), pick(8, 4), pick(4, 2), pick(4, 1))
    }

    /// (line end before it, name, separator, value) of a field.
    pub fn field() -> impl Strategy<Value = (usize, usize, usize, usize)> {
        (pick(4, 1), pick(9, 5), pick(4, 3), pick(17, 12))
    }

    /// A byte to put somewhere in a head: often one that means something there.
    pub fn byte() -> impl Strategy<Value = u8> {
        prop_oneof![
            any::<u8>(),
            prop::sample::select(&[0, b'\t', b'\r', b'\n', b' ', b':', 0x7f, 0x80, 0xff][..]),
        ]
    }

    /// A head as `check_head` gets it (up to the CR that starts its end), built
    /// from the fragments above: (method, target, version, line end) and, per
    /// field, (line end before it, name, separator, value).
    pub fn head(
        (m, t, v, e): (usize, usize, usize, usize),
        fields: &[(usize, usize, usize, usize)],
    ) -> Vec<u8> {
        let mut h = format!("{} {} {}", METHODS[m], TARGETS[t], VERSIONS[v]);
        let mut end = ENDS[e];
        for &(e, n, sep, v) in fields {
            h.push_str(ENDS[e]);
            h.push_str(NAMES[n]);
            h.push_str(SEPS[sep]);
            h.push_str(VALUES[v]);
            end = ENDS[e];
        }
        // Most heads end as a real one does.
        if end != "\r" {
            h.push('\r');
        }
        h.into_bytes()
    }

    /// Both checks on `head` (as `check_head` gets it) followed by the rest of its
    /// end and a body: what the one-pass check accepts, the search for the end and
    /// the full check accept with the same length, state and layout. Whether the
    /// one-pass check accepted.
    pub fn agree(head: &[u8]) -> bool {
        let (mut fast, mut full) = (Scanner::new(LIMITS), Scanner::new(LIMITS));
        let mut data = head.to_vec();
        data.extend_from_slice(b"\n\r\nbody\r\n\r\n");
        let Some((next, len)) = fast.fast_head(&data) else {
            return false;
        };
        let text = String::from_utf8_lossy(head);
        let end = HEAD_END.find(&data).unwrap_or_else(|| panic!("{text:?}"));
        assert_eq!(len, end + 4, "{text:?}");
        assert_eq!(full.check_head(&data[..end + 1]), Ok(next), "{text:?}");
        let (a, b) = (fast.layout(), full.layout());
        assert_eq!(
            (&a.method, &a.target, a.http10, &a.fields),
            (&b.method, &b.target, b.http10, &b.fields),
            "{text:?}"
        );
        true
    }

    #[test]
    fn common_heads_take_the_one_pass_check() {
        let heads: [&[u8]; 5] = [
            b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r",
            b"GET / HTTP/1.1\r\nHost: a\r\nuser-agent: h2load nghttp2/1.52.0\r",
            b"GET /x?y HTTP/1.0\r",
            b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 12 \r\nAccept:*/*\r",
            b"POST /p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nX-Empty:\r",
        ];
        for head in heads {
            assert!(agree(head), "{:?}", String::from_utf8_lossy(head));
        }
    }

    #[test]
    fn anything_unusual_goes_to_the_full_check() {
        let heads: [&[u8]; 12] = [
            b"GET  / HTTP/1.1\r",
            b"GET / HTTP/1.1\r\nHost: a\n",
            b"GET / HTTP/1.1\r\nHost: a\nX: b\r",
            b"GET / HTTP/1.1\r\n Host: a\r",
            b"GET / HTTP/1.1\r\nHost : a\r",
            b"GET / HTTP/1.1\r\nHost: a\rb\r",
            b"GET / HTTP/1.1\r\nHost: a\x7f\r",
            b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r",
            b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r",
            b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r",
            b"GET / HTTP/1.1\r\na: 1\r\nb: 2\r\nc: 3\r\nd: 4\r\ne: 5\r\nf: 6\r",
            b"GET /aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa HTTP/1.1\r",
        ];
        for head in heads {
            let mut s = Scanner::new(LIMITS);
            let mut data = head.to_vec();
            data.extend_from_slice(b"\n\r\n");
            assert_eq!(
                s.fast_head(&data),
                None,
                "{:?}",
                String::from_utf8_lossy(head)
            );
        }
    }
}

#[test]
fn lines_split_like_slice_split() {
    let cases: [&[u8]; 7] = [
        b"",
        b"\n",
        b"\n\n",
        b"GET / HTTP/1.1\r",
        b"GET / HTTP/1.1\r\nHost: a\r",
        b"a\nb\n",
        b"\nx\r\n\r\ny",
    ];
    for head in cases {
        let ours: Vec<&[u8]> = lines(head).collect();
        let std: Vec<&[u8]> = head.split(|b| *b == b'\n').collect();
        assert_eq!(ours, std, "{:?}", String::from_utf8_lossy(head));
    }
}
