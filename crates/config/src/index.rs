//! Where each field path of a YAML document was written, so validation errors found
//! after deserialisation can still name a line.

use serde_saphyr::granit_parser::{Event, Parser};
use std::collections::HashMap;

/// One YAML document of a file: its text and the line index of its fields.
#[derive(Debug, Clone)]
pub struct DocSpan {
    /// Byte range of the document in the file.
    pub start: usize,
    pub end: usize,
    /// 1-based line of `start`.
    pub first_line: u32,
    /// `spec.invoke.service` → line; sequence items as `spec.filters.0`.
    pub lines: HashMap<String, u32>,
}

impl DocSpan {
    /// The line of `path`, or of its nearest ancestor that was written down.
    pub fn line_of(&self, path: &str) -> u32 {
        let mut p = path;
        loop {
            if let Some(l) = self.lines.get(p) {
                return *l;
            }
            match p.rfind('.') {
                Some(i) => p = &p[..i],
                None => return self.first_line,
            }
        }
    }

    /// The deepest path written on `line` (to name the field of a serde error).
    pub fn path_at(&self, line: u32) -> Option<&str> {
        self.lines
            .iter()
            .filter(|(_, l)| **l == line)
            .map(|(p, _)| p.as_str())
            .max_by_key(|p| (p.matches('.').count(), p.len()))
    }
}

enum Frame {
    Map { path: String, key: Option<String> },
    Seq { path: String, index: usize },
}

/// The path of the node an event starts, advancing the parent's bookkeeping;
/// `None` when the node is a mapping key.
fn node_path(stack: &mut [Frame]) -> Option<String> {
    match stack.last_mut() {
        Some(Frame::Map { path, key }) => key.take().map(|k| child(path, &k)),
        Some(Frame::Seq { path, index }) => {
            let p = child(path, &index.to_string());
            *index += 1;
            Some(p)
        }
        None => Some(String::new()),
    }
}

fn child(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

/// Split a file into documents and index each. A scan error ends the scan; the
/// deserialiser reports it with its own location.
pub fn scan(text: &str) -> Vec<DocSpan> {
    let mut docs = Vec::new();
    let mut stack: Vec<Frame> = Vec::new();
    let mut cur: Option<DocSpan> = None;
    for ev in Parser::new_from_str(text) {
        let Ok((event, span)) = ev else { break };
        let line = span.start.line() as u32;
        let offset = span.start.byte_offset().unwrap_or(0);
        match event {
            Event::DocumentStart(..) => {
                // Start documents at the beginning of their line so slices keep columns.
                let start = text[..offset.min(text.len())]
                    .rfind('\n')
                    .map_or(0, |i| i + 1);
                cur = Some(DocSpan {
                    start,
                    end: text.len(),
                    first_line: line,
                    lines: HashMap::new(),
                });
                stack.clear();
            }
            Event::DocumentEnd => {
                if let Some(mut d) = cur.take() {
                    d.end = offset.clamp(d.start, text.len());
                    docs.push(d);
                }
            }
            Event::Scalar(value, ..) => {
                let is_key = matches!(stack.last(), Some(Frame::Map { key: None, .. }));
                if is_key {
                    if let Some(Frame::Map { path, key }) = stack.last_mut() {
                        let p = child(path, &value);
                        if let Some(d) = cur.as_mut() {
                            d.lines.entry(p).or_insert(line);
                        }
                        *key = Some(value.into_owned());
                    }
                } else if let Some(p) = node_path(&mut stack)
                    && let Some(d) = cur.as_mut()
                {
                    d.lines.entry(p).or_insert(line);
                }
            }
            Event::MappingStart(..) | Event::SequenceStart(..) => {
                let p = node_path(&mut stack).unwrap_or_default();
                if let Some(d) = cur.as_mut() {
                    d.lines.entry(p.clone()).or_insert(line);
                }
                stack.push(if matches!(event, Event::MappingStart(..)) {
                    Frame::Map { path: p, key: None }
                } else {
                    Frame::Seq { path: p, index: 0 }
                });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                stack.pop();
            }
            Event::Alias(..) => {
                let _ = node_path(&mut stack);
            }
            _ => {}
        }
    }
    if let Some(d) = cur.take() {
        docs.push(d);
    }
    docs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indexes_paths_and_documents() {
        let text = "a: 1\nb:\n  c: [x, {d: 2}]\n  e:\n    - f: 3\n---\nkind: Api\nspec: {x: 1}\n";
        let docs = scan(text);
        assert_eq!(docs.len(), 2);
        let d = &docs[0];
        assert_eq!(d.line_of("a"), 1);
        assert_eq!(d.line_of("b.c.1.d"), 3);
        assert_eq!(d.line_of("b.e.0.f"), 5);
        assert_eq!(d.line_of("b.e.0.nothing"), 5);
        assert_eq!(d.path_at(5), Some("b.e.0.f"));
        let d2 = &docs[1];
        assert_eq!(d2.first_line, 6);
        assert_eq!(d2.line_of("spec.x"), 8);
        assert!(text[d2.start..d2.end].starts_with("---\nkind: Api"));
    }
}
