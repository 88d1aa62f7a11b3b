use std::fmt;

/// Why a request path was refused before routing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NormalizeError {
    NotOriginForm,
    BadPercentEncoding,
    ControlCharacter,
}

impl fmt::Display for NormalizeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NotOriginForm => "path must start with '/'",
            Self::BadPercentEncoding => "path has an invalid percent-encoding",
            Self::ControlCharacter => "path has a control character",
        })
    }
}

impl std::error::Error for NormalizeError {}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Normalise a request path once, before matching; the result is also what the
/// upstream sees, so the gateway and the upstream agree on what was asked for.
///
/// - percent-encoded unreserved characters are decoded (`%41` → `A`, `%2e` → `.`),
///   other escapes are kept with upper-case hex (`%2f` → `%2F`: an encoded `/` never
///   becomes a separator);
/// - empty segments (`//`) are merged;
/// - `.` and `..` segments are resolved as RFC 3986 §5.2.4 does; `..` never climbs
///   above the root.
///
/// Returns `None` when the path is already normal, so the common case allocates nothing.
pub fn normalize_path(path: &str) -> Result<Option<String>, NormalizeError> {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(NormalizeError::NotOriginForm);
    }
    if is_normal(bytes)? {
        return Ok(None);
    }
    let decoded = decode_unreserved(bytes)?;
    let mut out: Vec<&str> = Vec::new();
    let trailing = decoded.ends_with('/') && decoded.len() > 1;
    let mut last_dir = false;
    for seg in decoded.split('/') {
        match seg {
            "" => {}
            "." => last_dir = true,
            ".." => {
                out.pop();
                last_dir = true;
            }
            s => {
                out.push(s);
                last_dir = false;
            }
        }
    }
    let mut result = String::with_capacity(decoded.len());
    for s in &out {
        result.push('/');
        result.push_str(s);
    }
    if result.is_empty() || trailing || last_dir {
        result.push('/');
    }
    Ok(Some(result))
}

/// A fast check for the common case: no `%`, no empty, `.` or `..` segment.
fn is_normal(bytes: &[u8]) -> Result<bool, NormalizeError> {
    let mut seg_start = 0usize;
    let mut normal = true;
    for (i, &b) in bytes.iter().enumerate() {
        if b < 0x20 || b == 0x7f {
            return Err(NormalizeError::ControlCharacter);
        }
        if b == b'%' {
            normal = false;
        }
        if b == b'/' && i > 0 {
            let seg = &bytes[seg_start + 1..i];
            if seg.is_empty() || seg == b"." || seg == b".." {
                normal = false;
            }
            seg_start = i;
        }
    }
    let last = &bytes[seg_start + 1..];
    if last == b"." || last == b".." {
        normal = false;
    }
    Ok(normal)
}

fn decode_unreserved(bytes: &[u8]) -> Result<String, NormalizeError> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let (Some(h), Some(l)) = (
                bytes.get(i + 1).copied().and_then(hex_val),
                bytes.get(i + 2).copied().and_then(hex_val),
            ) else {
                return Err(NormalizeError::BadPercentEncoding);
            };
            let v = (h << 4) | l;
            if is_unreserved(v) {
                out.push(v);
            } else {
                out.push(b'%');
                out.push(bytes[i + 1].to_ascii_uppercase());
                out.push(bytes[i + 2].to_ascii_uppercase());
            }
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    // Only ASCII went in (the input is a URI path), so this cannot fail in practice.
    String::from_utf8(out).map_err(|_| NormalizeError::BadPercentEncoding)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(p: &str) -> String {
        match normalize_path(p) {
            Ok(Some(s)) => s,
            Ok(None) => p.to_string(),
            Err(e) => format!("ERR {e}"),
        }
    }

    #[test]
    fn table() {
        let cases = [
            ("/", "/"),
            ("/a/b", "/a/b"),
            ("/a/b/", "/a/b/"),
            ("//admin/x", "/admin/x"),
            ("/a//b///c", "/a/b/c"),
            ("/public/../admin/x", "/admin/x"),
            ("/public/%2e%2e/admin/x", "/admin/x"),
            ("/public/%2E%2E/admin/x", "/admin/x"),
            ("/admin/./x", "/admin/x"),
            ("/admin/x/.", "/admin/x/"),
            ("/admin/x/..", "/admin/"),
            ("/..", "/"),
            ("/../../etc/passwd", "/etc/passwd"),
            ("/admin%2fx", "/admin%2Fx"),
            ("/admin%2Fx", "/admin%2Fx"),
            ("/%41%42c", "/ABc"),
            ("/a%20b", "/a%20b"),
            ("/a%7e", "/a~"),
            ("/admin/x;param", "/admin/x;param"),
            ("/a/%zz", "ERR path has an invalid percent-encoding"),
            ("/a/%4", "ERR path has an invalid percent-encoding"),
            ("a/b", "ERR path must start with '/'"),
            ("/a\u{1}", "ERR path has a control character"),
        ];
        for (input, want) in cases {
            assert_eq!(norm(input), want, "normalising {input:?}");
        }
    }

    #[test]
    fn normal_paths_do_not_allocate() {
        assert_eq!(normalize_path("/users/42/orders"), Ok(None));
        assert_eq!(normalize_path("/a.b/c..d/.e"), Ok(None));
    }
}
