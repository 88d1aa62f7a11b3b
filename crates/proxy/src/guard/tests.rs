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
