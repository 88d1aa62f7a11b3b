//! Entry points for the fuzz targets in `fuzz/` (feature `fuzzing`; not an API).
//! Each takes arbitrary bytes and panics only when a property of the parser it
//! drives does not hold.

use crate::guard::{GuardLimits, Scanner, Step};
use bytes::BytesMut;
use http::Method;

const LIMITS: GuardLimits = GuardLimits {
    max_request_line: 64,
    max_header_bytes: 256,
    max_headers: 8,
    header_read_timeout: std::time::Duration::from_secs(1),
};

/// What feeding `input` to the request guard in reads ending at `ends` came to:
/// the bytes passed on, and whether it refused the stream.
fn guard(input: &[u8], ends: &[usize]) -> (usize, bool) {
    let mut s = Scanner::new(LIMITS);
    let mut passed = 0;
    for &end in ends.iter().chain([&input.len()]) {
        let end = end.clamp(passed, input.len());
        loop {
            let at_head = s.at_boundary() && !input[passed..end].starts_with(b"\r\n");
            match s.step(&input[passed..end]) {
                Step::Pass(0) | Step::NeedMore => break,
                Step::Pass(n) => {
                    if at_head && !s.is_passthrough() {
                        layout_within(s.layout(), n);
                    }
                    passed += n;
                    assert!(passed <= end, "passed bytes not yet read");
                }
                Step::Reject(_) => return (passed, true),
            }
        }
        // What the guard holds back while it waits is bounded by the limits.
        let held = end - passed;
        if s.at_boundary() {
            let most = LIMITS.max_request_line + LIMITS.max_header_bytes + 4;
            assert!(held <= most, "{held} bytes held for a head");
        }
    }
    (passed, false)
}

/// The server builds a request by slicing the head at the layout's ranges: they
/// must lie within the head, and name something.
fn layout_within(layout: &crate::guard::Layout, head_len: usize) {
    let parts = [&layout.method, &layout.target]
        .into_iter()
        .chain(layout.fields.iter().map(|(name, _)| name));
    for r in parts {
        assert!(
            r.start < r.end && r.end <= head_len,
            "{r:?} in a {head_len}-byte head"
        );
    }
    for (_, value) in &layout.fields {
        assert!(
            value.start <= value.end && value.end <= head_len,
            "value {value:?}"
        );
    }
}

/// The request guard: never panics, lays out every head it passes within it, and
/// the network's cuts never change whether
/// it refuses a stream, nor what it passes of one it does not refuse. (Of a body
/// refused part-way, the bytes before the fault may pass when they arrive apart.)
/// The first two bytes choose the cuts.
pub fn request_stream(data: &[u8]) {
    let (input, plans) = cut_plans(data);
    let whole = guard(input, &[]);
    let same = |cut: (usize, bool)| cut.1 == whole.1 && (whole.1 || cut.0 == whole.0);
    for ends in plans {
        let cut = guard(input, &ends);
        assert!(same(cut), "cut at {ends:?}: {cut:?}, whole: {whole:?}");
    }
}

/// The input after the first two bytes, and two ways for the network to cut it
/// (read ends, in order): where those two bytes say, and byte by byte.
fn cut_plans(data: &[u8]) -> (&[u8], [Vec<usize>; 2]) {
    let (cuts, input) = data.split_at(data.len().min(2));
    let mut ends: Vec<usize> = cuts.iter().map(|&c| usize::from(c) * 3).collect();
    ends.sort_unstable();
    (input, [ends, (1..input.len()).collect()])
}

/// The upstream response head parser: never panics, and a head is judged on its
/// bytes, whatever arrived of the rest.
pub fn response_head(data: &[u8]) {
    let Some((&cut, input)) = data.split_first() else {
        return;
    };
    let parse = |bytes: &[u8]| {
        let mut buf = BytesMut::from(bytes);
        crate::h1::parse_head(&mut buf, &Method::GET, false)
            .map(|p| p.map(|p| (p.status, p.headers.len(), buf.len())))
            .map_err(|e| e.to_string())
    };
    let whole = parse(input);
    let prefix = parse(&input[..usize::from(cut).min(input.len())]);
    match (&prefix, &whole) {
        (Ok(None), _) => {}
        (Ok(Some((status, headers, _))), Ok(Some((s, h, _)))) => {
            assert_eq!(
                (status, headers),
                (s, h),
                "a complete prefix parsed otherwise"
            );
        }
        (Err(_), Err(_)) => {}
        _ => panic!("prefix {prefix:?} but whole {whole:?}"),
    }
}

/// What decoding a chunked body from `input`, read in parts ending at `ends`, came
/// to: the data, the trailers, and how it ended (the bytes left after the body,
/// more needed, or the error).
fn chunked(
    input: &[u8],
    ends: &[usize],
) -> (
    Vec<u8>,
    Option<http::HeaderMap>,
    Result<Option<usize>, String>,
) {
    use crate::h1::{Chunked, State, decode};
    let (mut state, mut trailers) = (State::Chunked(Chunked::Size), None);
    let (mut buf, mut data, mut fed) = (BytesMut::new(), Vec::new(), 0);
    let mut last = None;
    for &end in ends.iter().chain([&input.len()]) {
        let end = end.clamp(fed, input.len());
        buf.extend_from_slice(&input[fed..end]);
        fed = end;
        loop {
            match decode(&mut state, &mut trailers, &mut buf) {
                Ok(Some(frame)) => match frame.into_data() {
                    Ok(d) => data.extend_from_slice(&d),
                    Err(frame) => last = frame.into_trailers().ok(),
                },
                Ok(None) => break,
                Err(e) => return (data, last, Err(e.to_string())),
            }
        }
        if matches!(state, State::Done) {
            // What follows the body is left for the next response, untouched.
            assert_eq!(&buf[..], &input[fed - buf.len()..fed]);
            return (data, last, Ok(Some(buf.len() + input.len() - fed)));
        }
    }
    assert!(data.len() <= input.len(), "more data than bytes");
    (data, last, Ok(None))
}

/// The upstream client's chunked body decoder: never panics, and the network's
/// cuts never change the data, the trailers, where the body ends, nor whether
/// (and why) it is refused. The first two bytes choose the cuts.
pub fn chunked_body(data: &[u8]) {
    let (input, plans) = cut_plans(data);
    let whole = chunked(input, &[]);
    for ends in plans {
        assert_eq!(chunked(input, &ends), whole, "cut at {ends:?}");
    }
}

#[cfg(test)]
mod tests {
    /// Every input in `fuzz/corpus/TARGET` (what the fuzzer kept, and the inputs
    /// of bugs it found), through `target` again.
    pub fn replay(target: &str, run: fn(&[u8])) {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fuzz/corpus")
            .join(target);
        let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let mut count = 0;
        for entry in entries.flatten() {
            let data = std::fs::read(entry.path()).unwrap_or_else(|e| panic!("{e}"));
            run(&data);
            count += 1;
        }
        assert!(count > 0, "{} is empty", dir.display());
    }

    #[test]
    fn the_fuzz_corpus_of_the_request_guard_holds() {
        replay("request_stream", super::request_stream);
    }

    #[test]
    fn the_fuzz_corpus_of_the_response_head_parser_holds() {
        replay("response_head", super::response_head);
    }

    #[test]
    fn the_fuzz_corpus_of_the_chunked_body_decoder_holds() {
        replay("chunked_body", super::chunked_body);
    }

    #[test]
    fn a_chunk_line_is_judged_by_its_length_however_it_arrives() {
        // Lines (chunk extensions, trailers) at the 8 KiB limit and one byte past,
        // arriving whole and byte by byte.
        for len in [8 * 1024 - 1, 8 * 1024, 8 * 1024 + 1] {
            let ext = format!("5;{}\r\nhello\r\n0\r\n\r\n", "x".repeat(len - 2));
            let trailer = format!("1\r\na\r\n0\r\nx:{}\r\n\r\n", "y".repeat(len - 2));
            for body in [ext, trailer] {
                super::chunked_body(&[&[0, 0][..], body.as_bytes()].concat());
            }
        }
    }
}
