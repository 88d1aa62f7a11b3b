use std::fmt;
use std::sync::Arc;

/// A path such as `/internal/users/{id}` whose `{name}` parts are filled from the
/// captures of the matched route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RewriteTemplate {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(Box<str>),
    Capture(Arc<str>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RewriteError {
    NotAbsolute,
    Unclosed,
    UnknownCapture(String),
}

impl fmt::Display for RewriteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotAbsolute => f.write_str("path must start with '/'"),
            Self::Unclosed => f.write_str("unclosed '{' in path"),
            Self::UnknownCapture(n) => {
                write!(f, "capture {{{n}}} is not defined by request.path")
            }
        }
    }
}

impl std::error::Error for RewriteError {}

impl RewriteTemplate {
    /// Parse against the capture names the request pattern defines.
    pub fn parse(template: &str, known: &[Arc<str>]) -> Result<Self, RewriteError> {
        if !template.starts_with('/') {
            return Err(RewriteError::NotAbsolute);
        }
        let mut parts = Vec::new();
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Text(rest[..open].into()));
            }
            let Some(close) = rest[open..].find('}') else {
                return Err(RewriteError::Unclosed);
            };
            let name = rest[open + 1..open + close].trim_start_matches('*');
            let Some(k) = known.iter().find(|k| &***k == name) else {
                return Err(RewriteError::UnknownCapture(name.to_string()));
            };
            parts.push(Part::Capture(k.clone()));
            rest = &rest[open + close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.into()));
        }
        Ok(Self { parts })
    }

    /// Fill the template. Captured values come from an already normalised path, so
    /// they cannot introduce dot segments or decoded separators.
    pub fn render<'a>(&self, capture: impl Fn(&str) -> Option<&'a str>) -> String {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Text(t) => out.push_str(t),
                Part::Capture(n) => out.push_str(capture(n).unwrap_or("")),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_captures() {
        let known: Vec<Arc<str>> = vec!["id".into(), "rest".into()];
        let t = RewriteTemplate::parse("/internal/{id}/x/{rest}", &known);
        let got = t.map(|t| {
            t.render(|n| match n {
                "id" => Some("42"),
                "rest" => Some("a/b"),
                _ => None,
            })
        });
        assert_eq!(got, Ok("/internal/42/x/a/b".to_string()));
        assert_eq!(
            RewriteTemplate::parse("/x/{nope}", &known),
            Err(RewriteError::UnknownCapture("nope".into()))
        );
        assert_eq!(
            RewriteTemplate::parse("/x/{id", &known),
            Err(RewriteError::Unclosed)
        );
    }
}
