use std::fmt;
use std::sync::Arc;

/// One segment of a path template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    Literal(Box<str>),
    /// `{name}`: exactly one non-empty segment.
    Capture(Arc<str>),
    /// `{*name}`: the rest of the path (possibly empty), always last.
    Rest(Arc<str>),
}

/// A parsed path template such as `/users/{id}/files/{*rest}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathPattern {
    pub segments: Vec<Segment>,
    /// True when the template ends with `/` (it then matches only paths that do).
    pub trailing_slash: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PatternError {
    NotAbsolute,
    PartialCapture(String),
    BadCaptureName(String),
    RestNotLast,
    DuplicateCapture(String),
    NotNormal(String),
}

impl fmt::Display for PatternError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotAbsolute => f.write_str("path must start with '/'"),
            Self::PartialCapture(s) => {
                write!(
                    f,
                    "segment {s:?}: a capture must be a whole segment like {{name}}"
                )
            }
            Self::BadCaptureName(s) => write!(
                f,
                "capture name {s:?} must be letters, digits and '_' (starting with a letter)"
            ),
            Self::RestNotLast => f.write_str("{*rest} must be the last segment"),
            Self::DuplicateCapture(s) => write!(f, "capture {s:?} is used twice"),
            Self::NotNormal(s) => write!(
                f,
                "segment {s:?} can never match: request paths are normalised (no '.', '..', empty segments or escaped unreserved characters)"
            ),
        }
    }
}

impl std::error::Error for PatternError {}

fn valid_name(n: &str) -> bool {
    let mut chars = n.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

impl PathPattern {
    pub fn parse(template: &str) -> Result<Self, PatternError> {
        let Some(body) = template.strip_prefix('/') else {
            return Err(PatternError::NotAbsolute);
        };
        let mut segments = Vec::new();
        let mut names: Vec<&str> = Vec::new();
        let trailing_slash = body.ends_with('/') && !body.is_empty();
        let body = body.strip_suffix('/').unwrap_or(body);
        if body.is_empty() {
            return Ok(Self {
                segments,
                trailing_slash: false,
            });
        }
        let parts: Vec<&str> = body.split('/').collect();
        for (i, part) in parts.iter().enumerate() {
            let seg = if let Some(inner) = part.strip_prefix('{').and_then(|p| p.strip_suffix('}'))
            {
                let (rest, name) = match inner.strip_prefix('*') {
                    Some(n) => (true, n),
                    None => (false, inner),
                };
                if !valid_name(name) {
                    return Err(PatternError::BadCaptureName(name.to_string()));
                }
                if names.contains(&name) {
                    return Err(PatternError::DuplicateCapture(name.to_string()));
                }
                names.push(name);
                if rest {
                    if i + 1 != parts.len() || trailing_slash {
                        return Err(PatternError::RestNotLast);
                    }
                    Segment::Rest(name.into())
                } else {
                    Segment::Capture(name.into())
                }
            } else if part.contains('{') || part.contains('}') {
                return Err(PatternError::PartialCapture((*part).to_string()));
            } else {
                let normal = crate::normalize_path(&format!("/{part}"));
                if part.is_empty() || *part == "." || *part == ".." || !matches!(normal, Ok(None)) {
                    return Err(PatternError::NotNormal((*part).to_string()));
                }
                Segment::Literal((*part).into())
            };
            segments.push(seg);
        }
        Ok(Self {
            segments,
            trailing_slash,
        })
    }

    /// The capture names, in template order.
    pub fn capture_names(&self) -> Vec<Arc<str>> {
        self.segments
            .iter()
            .filter_map(|s| match s {
                Segment::Capture(n) | Segment::Rest(n) => Some(n.clone()),
                Segment::Literal(_) => None,
            })
            .collect()
    }

    /// The template with capture names erased, so `/u/{id}` and `/u/{uid}` compare equal.
    pub fn shape(&self) -> String {
        let mut s = String::new();
        for seg in &self.segments {
            s.push('/');
            match seg {
                Segment::Literal(l) => s.push_str(l),
                Segment::Capture(_) => s.push_str("{}"),
                Segment::Rest(_) => s.push_str("{*}"),
            }
        }
        if self.trailing_slash || s.is_empty() {
            s.push('/');
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        let p = PathPattern::parse("/users/{id}/files/{*rest}").ok();
        assert_eq!(
            p.map(|p| p.capture_names()),
            Some(vec![Arc::from("id"), Arc::from("rest")])
        );
        let bad = [
            ("users", PatternError::NotAbsolute),
            ("/users/x{id}", PatternError::PartialCapture("x{id}".into())),
            ("/users/{*rest}/x", PatternError::RestNotLast),
            ("/users/{1d}", PatternError::BadCaptureName("1d".into())),
            ("/a/{id}/{id}", PatternError::DuplicateCapture("id".into())),
            ("/a//b", PatternError::NotNormal("".into())),
            ("/a/../b", PatternError::NotNormal("..".into())),
            ("/a/%41", PatternError::NotNormal("%41".into())),
        ];
        for (t, e) in bad {
            assert_eq!(PathPattern::parse(t), Err(e), "template {t}");
        }
    }

    #[test]
    fn shape_ignores_capture_names() {
        let a = PathPattern::parse("/u/{id}").map(|p| p.shape());
        let b = PathPattern::parse("/u/{uid}").map(|p| p.shape());
        assert_eq!(a, b);
        assert_eq!(
            PathPattern::parse("/").map(|p| p.shape()),
            Ok("/".to_string())
        );
    }
}
