//! An upstream's response head in the common shape, checked and laid out in one pass.
//!
//! `HTTP/1.x DDD reason CRLF`, fields `name: value CRLF` made only of the bytes a
//! well-formed head has, and the closing `CRLF`. Anything else — bare LF, a blank
//! before a field name, obs-fold, a control character, more fields than fit, a head
//! not all here yet — gives `None`, and httparse decides. What this accepts,
//! httparse accepts with the same version, status, fields and length (a randomised
//! test compares them); it costs a fraction of httparse's byte-at-a-time parse on
//! the small heads most responses have.

use crate::guard::{BLANK, FIELD_VCHAR, TCHAR, all_field_vchar, run, scan, value_end};

/// A field's name and value as (offset, length) pairs into the head; the value
/// without the blanks around it.
pub(super) type Span = (usize, usize, usize, usize);

/// What the status line said, where the head ends, and how many fields it has.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Quick {
    /// The head's length, its closing CRLF included.
    pub len: usize,
    pub code: u16,
    pub http10: bool,
    /// How many fields `spans` holds.
    pub fields: usize,
}

/// The head at the start of `buf`, its fields laid out in `spans`.
pub(super) fn quick_head(buf: &[u8], spans: &mut [Span]) -> Option<Quick> {
    let http10 = match buf.get(..9)? {
        b"HTTP/1.1 " => false,
        b"HTTP/1.0 " => true,
        _ => return None,
    };
    let mut code = 0u16;
    for &d in buf.get(9..12)? {
        if !d.is_ascii_digit() {
            return None;
        }
        code = code * 10 + u16::from(d - b'0');
    }
    // The reason phrase is optional, and made of what a field value is.
    let mut cr = match buf.get(12)? {
        b' ' => run(buf, 13, &FIELD_VCHAR, all_field_vchar),
        b'\r' => 12,
        _ => return None,
    };
    let mut fields = 0;
    // At the CR of each line: the head ends, or another field follows.
    loop {
        if buf.get(cr)? != &b'\r' || buf.get(cr + 1)? != &b'\n' {
            return None;
        }
        let start = cr + 2;
        if buf.get(start..start + 2)? == b"\r\n" {
            return Some(Quick {
                len: start + 2,
                code,
                http10,
                fields,
            });
        }
        let name_end = scan(buf, start, &TCHAR);
        if name_end == start || buf.get(name_end)? != &b':' {
            return None;
        }
        let value_start = scan(buf, name_end + 1, &BLANK);
        cr = run(buf, value_start, &FIELD_VCHAR, all_field_vchar);
        let value_end = value_end(buf, value_start, cr);
        *spans.get_mut(fields)? = (
            start,
            name_end - start,
            value_start,
            value_end - value_start,
        );
        fields += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guard::tests::one_pass::{byte, pick};
    use crate::h1::{INLINE_SPANS, httparse_head};
    use proptest::prelude::*;

    // Each list starts with the fragments a well-formed head may have.
    const STATUS: [&str; 10] = [
        "HTTP/1.1 200 OK",
        "HTTP/1.0 404 Not Found",
        "HTTP/1.1 204",
        "HTTP/1.1 500 caf\u{e9}\tau lait ",
        "HTTP/1.1 20 OK",
        "HTTP/2.0 200 OK",
        "HTTP/1.1 200 O\x7fK",
        "HTTP/1.1  200 OK",
        "\r\nHTTP/1.1 200 OK",
        "HTTP/1.1 2x0 OK",
    ];
    const ENDS: [&str; 4] = ["\r\n", "\n", "\r", "\r\r\n"];
    const NAMES: [&str; 8] = [
        "content-length",
        "Content-Type",
        "x-a",
        "Set-Cookie",
        "",
        "bad name",
        " x",
        "a\x00",
    ];
    const SEPS: [&str; 4] = [":", ": ", ":\t ", " :"];
    const VALUES: [&str; 12] = [
        "12",
        "text/plain; charset=utf-8",
        "",
        " 7 \t",
        "\u{e9}t\u{e9}",
        "a=b; Path=/; HttpOnly",
        "\t",
        "b\x7f",
        "a long value that ends in\x01 a control",
        "x\x01y",
        "a\rb",
        "a\nb",
    ];

    /// A head from the fragments: (status line, its end) and, per field, (name,
    /// separator, value, line end), then the head's end and a body.
    fn head((s, e): (usize, usize), fields: &[(usize, usize, usize, usize)]) -> Vec<u8> {
        let mut h = format!("{}{}", STATUS[s], ENDS[e]);
        for &(n, sep, v, e) in fields {
            h.push_str(NAMES[n]);
            h.push_str(SEPS[sep]);
            h.push_str(VALUES[v]);
            h.push_str(ENDS[e]);
        }
        h.push_str("\r\nbody");
        h.into_bytes()
    }

    /// What the one-pass parse accepts, httparse accepts with the same length,
    /// status, version and fields. Whether the one-pass parse accepted.
    fn agree(data: &[u8]) -> bool {
        let text = String::from_utf8_lossy(data);
        let mut spans = [(0, 0, 0, 0); INLINE_SPANS];
        let Some(q) = quick_head(data, &mut spans) else {
            return false;
        };
        let (mut inline, mut spilled) = ([(0, 0, 0, 0); INLINE_SPANS], Vec::new());
        let Ok(Some(slow)) = httparse_head(data, &mut inline, &mut spilled) else {
            panic!("httparse refuses what the one-pass parse took: {text:?}");
        };
        assert_eq!(q, slow, "{text:?}");
        let bytes = |(no, nl, vo, vl): Span| (&data[no..no + nl], &data[vo..vo + vl]);
        for (a, b) in spans.iter().zip(&inline).take(q.fields) {
            assert_eq!(bytes(*a), bytes(*b), "{text:?}");
        }
        true
    }

    #[test]
    fn common_heads_take_the_one_pass_parse() {
        let heads: [&[u8]; 4] = [
            b"HTTP/1.1 200 OK\r\ncontent-length: 13\r\n\r\nHello, world!",
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/1.0 204\r\nX-Empty:\r\nX-Blank: \t \r\n\r\n",
            b"HTTP/1.1 404 Not Found\r\n\r\n",
        ];
        for head in heads {
            assert!(agree(head), "{:?}", String::from_utf8_lossy(head));
        }
    }

    #[test]
    fn a_head_not_all_here_is_left_to_httparse() {
        let head = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-a: b\r\n\r\nok";
        let mut spans = [(0, 0, 0, 0); INLINE_SPANS];
        for cut in 0..head.len() - 2 {
            assert_eq!(quick_head(&head[..cut], &mut spans), None, "{cut}");
        }
        assert!(agree(head));
    }

    #[test]
    fn more_fields_than_fit_are_left_to_httparse() {
        let mut head = b"HTTP/1.1 200 OK\r\n".to_vec();
        for i in 0..=INLINE_SPANS {
            head.extend_from_slice(format!("x-{i}: {i}\r\n").as_bytes());
        }
        head.extend_from_slice(b"\r\n");
        let mut spans = [(0, 0, 0, 0); INLINE_SPANS];
        assert_eq!(quick_head(&head, &mut spans), None);
        head.truncate(head.len() - format!("x-{INLINE_SPANS}: {INLINE_SPANS}\r\n\r\n").len());
        head.extend_from_slice(b"\r\n");
        assert!(agree(&head));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        #[test]
        fn the_one_pass_parse_agrees_with_httparse(
            status in (pick(10, 4), pick(4, 1)),
            fields in prop::collection::vec((pick(8, 4), pick(4, 3), pick(12, 6), pick(4, 1)), 0..6),
            muts in prop::collection::vec((0usize..160, byte()), 0..3),
        ) {
            let mut data = head(status, &fields);
            for (pos, b) in muts {
                let i = pos % data.len();
                data[i] = b;
            }
            agree(&data);
        }
    }
}
