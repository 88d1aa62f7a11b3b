use crate::pattern::{PathPattern, Segment};
use http::{HeaderMap, HeaderName, Method};
use regex::Regex;
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

/// A header that must be present and match a regex.
#[derive(Debug, Clone)]
pub struct HeaderMatch {
    pub name: HeaderName,
    pub regex: Regex,
}

/// One route to insert: where it applies and the value routing returns.
#[derive(Debug, Clone)]
pub struct Route<T> {
    /// Empty means any host. `*.example.org` is a wildcard (one or more labels).
    pub hosts: Vec<String>,
    pub pattern: PathPattern,
    /// Empty means any method.
    pub methods: Vec<Method>,
    pub headers: Vec<HeaderMatch>,
    pub value: T,
}

/// Two routes that could both match the same request with neither more specific.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteError {
    /// Index (insertion order) of the route already holding the place.
    pub existing: usize,
    pub host: String,
    pub shape: String,
}

impl fmt::Display for RouteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "route tie on host {:?} path {:?}: same methods and headers as another route",
            self.host, self.shape
        )
    }
}

impl std::error::Error for RouteError {}

#[derive(Debug)]
struct Entry {
    route: usize,
    methods: Vec<Method>,
    headers: Vec<HeaderMatch>,
}

impl Entry {
    /// Higher sorts first: more header matchers, then an explicit method list.
    fn specificity(&self) -> (usize, bool) {
        (self.headers.len(), !self.methods.is_empty())
    }

    fn same_headers(&self, other: &[HeaderMatch]) -> bool {
        self.headers.len() == other.len()
            && self.headers.iter().all(|h| {
                other
                    .iter()
                    .any(|o| o.name == h.name && o.regex.as_str() == h.regex.as_str())
            })
    }

    fn methods_overlap(&self, other: &[Method]) -> bool {
        self.methods.is_empty()
            || other.is_empty()
            || self.methods.iter().any(|m| other.contains(m))
    }

    fn headers_match(&self, headers: &HeaderMap) -> bool {
        self.headers.iter().all(|h| {
            headers
                .get_all(&h.name)
                .iter()
                .any(|v| v.to_str().is_ok_and(|s| h.regex.is_match(s)))
        })
    }
}

/// Literal children are looked up on every request: a fast, seeded hash beats SipHash.
type Literals = HashMap<Box<str>, Node, foldhash::fast::RandomState>;

#[derive(Debug, Default)]
struct Node {
    literals: Literals,
    capture: Option<Box<Node>>,
    /// Entries whose template ends here.
    end: Vec<Entry>,
    /// Entries whose template ends with `{*rest}` here.
    rest: Vec<Entry>,
}

impl Node {
    fn leaf(&mut self, pattern: &PathPattern) -> &mut Vec<Entry> {
        let mut node = self;
        let mut segments: Vec<&Segment> = pattern.segments.iter().collect();
        let empty = Segment::Literal("".into());
        if pattern.trailing_slash || pattern.segments.is_empty() {
            segments.push(&empty);
        }
        for seg in segments {
            match seg {
                Segment::Literal(l) => node = node.literals.entry(l.clone()).or_default(),
                Segment::Capture(_) => node = node.capture.get_or_insert_with(Default::default),
                Segment::Rest(_) => return &mut node.rest,
            }
        }
        &mut node.end
    }
}

/// The result of routing one request.
#[derive(Debug)]
pub enum Outcome<'a, T> {
    Matched(Match<'a, T>),
    /// Some route matched host, path and headers, but not the method.
    MethodNotAllowed(Vec<Method>),
    NotFound,
}

/// Where a route's captures matched: inline for up to four, so routing a request
/// allocates nothing.
pub type Spans = smallvec::SmallVec<[std::ops::Range<usize>; 4]>;

/// A matched route and its captures (byte ranges into the routed path).
#[derive(Debug)]
pub struct Match<'a, T> {
    pub value: &'a T,
    /// Capture names in template order; `spans[i]` is where `names[i]` matched.
    pub names: &'a [Arc<str>],
    pub spans: Spans,
}

impl<T> Match<'_, T> {
    /// Each capture's name and byte range in the routed path.
    pub fn captures(&self) -> impl ExactSizeIterator<Item = (&Arc<str>, std::ops::Range<usize>)> {
        self.names.iter().zip(self.spans.iter().cloned())
    }
}

#[derive(Debug)]
struct Table {
    root: Node,
}

/// Routes requests to values of `T`. Immutable once built; share it behind an `Arc`.
#[derive(Debug)]
pub struct Router<T> {
    values: Vec<T>,
    names: Vec<Vec<Arc<str>>>,
    exact: HashMap<String, Table>,
    /// `(".example.org", table)`, longest suffix first.
    wildcard: Vec<(String, Table)>,
    any: Option<Table>,
}

/// Collects routes, detects ties, then freezes into a [`Router`].
#[derive(Debug)]
pub struct RouterBuilder<T> {
    router: Router<T>,
}

impl<T> Default for RouterBuilder<T> {
    fn default() -> Self {
        Self {
            router: Router {
                values: Vec::new(),
                names: Vec::new(),
                exact: HashMap::new(),
                wildcard: Vec::new(),
                any: None,
            },
        }
    }
}

impl<T> RouterBuilder<T> {
    /// Insert a route. On a tie the route is not inserted and the error names the
    /// route already there.
    pub fn insert(&mut self, route: Route<T>) -> Result<usize, RouteError> {
        let r = &mut self.router;
        let idx = r.values.len();
        let hosts: Vec<Option<String>> = if route.hosts.is_empty() {
            vec![None]
        } else {
            route
                .hosts
                .iter()
                .map(|h| Some(h.to_ascii_lowercase()))
                .collect()
        };
        // Check every host first so a tie leaves nothing half-inserted.
        for host in &hosts {
            if let Some(table) = r.table(host.as_deref()) {
                // leaf() may create empty nodes; they match nothing, so a rejected
                // route leaves the table behaving as before.
                let clash = table
                    .root
                    .leaf(&route.pattern)
                    .iter()
                    .find(|e| e.same_headers(&route.headers) && e.methods_overlap(&route.methods))
                    .map(|e| e.route);
                if let Some(existing) = clash {
                    return Err(RouteError {
                        existing,
                        host: host.clone().unwrap_or_else(|| "*".into()),
                        shape: route.pattern.shape(),
                    });
                }
            }
        }
        for host in &hosts {
            let table = r.table_or_insert(host.as_deref());
            let leaf = table.root.leaf(&route.pattern);
            leaf.push(Entry {
                route: idx,
                methods: route.methods.clone(),
                headers: route.headers.clone(),
            });
            leaf.sort_by_key(|e| std::cmp::Reverse(e.specificity()));
        }
        r.values.push(route.value);
        r.names.push(route.pattern.capture_names());
        Ok(idx)
    }

    pub fn build(mut self) -> Router<T> {
        self.router
            .wildcard
            .sort_by_key(|(suffix, _)| std::cmp::Reverse(suffix.len()));
        self.router
    }
}

impl<T> Router<T> {
    pub fn builder() -> RouterBuilder<T> {
        RouterBuilder::default()
    }

    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    fn table(&mut self, host: Option<&str>) -> Option<&mut Table> {
        match host {
            None => self.any.as_mut(),
            Some(h) => match h.strip_prefix('*') {
                Some(suffix) => self
                    .wildcard
                    .iter_mut()
                    .find(|(s, _)| s == suffix)
                    .map(|(_, t)| t),
                None => self.exact.get_mut(h),
            },
        }
    }

    fn table_or_insert(&mut self, host: Option<&str>) -> &mut Table {
        let fresh = || Table {
            root: Node::default(),
        };
        match host {
            None => self.any.get_or_insert_with(fresh),
            Some(h) => match h.strip_prefix('*') {
                Some(suffix) => {
                    let pos = match self.wildcard.iter().position(|(s, _)| s == suffix) {
                        Some(p) => p,
                        None => {
                            self.wildcard.push((suffix.to_string(), fresh()));
                            self.wildcard.len() - 1
                        }
                    };
                    &mut self.wildcard[pos].1
                }
                None => self.exact.entry(h.to_string()).or_insert_with(fresh),
            },
        }
    }

    /// Route a request. `host` is the authority without port, any case; `path` must
    /// already be normalised (see [`crate::normalize_path`]) and carry no query.
    pub fn route<'a>(
        &'a self,
        host: &str,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
    ) -> Outcome<'a, T> {
        let mut search = Search {
            method,
            headers,
            allow: Vec::new(),
            spans: Spans::new(),
        };
        let body = path.strip_prefix('/').unwrap_or(path);
        let lower;
        let host = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            lower = host.to_ascii_lowercase();
            lower.as_str()
        } else {
            host
        };
        let found = self
            .exact
            .get(host)
            .and_then(|t| search.walk(&t.root, body, 1))
            .or_else(|| {
                self.wildcard
                    .iter()
                    .filter(|(suffix, _)| {
                        host.len() > suffix.len() && host.ends_with(suffix.as_str())
                    })
                    .find_map(|(_, t)| search.walk(&t.root, body, 1))
            })
            .or_else(|| {
                self.any
                    .as_ref()
                    .and_then(|t| search.walk(&t.root, body, 1))
            });
        match found {
            Some(idx) => Outcome::Matched(Match {
                value: &self.values[idx],
                names: &self.names[idx],
                spans: search.spans,
            }),
            None if !search.allow.is_empty() => Outcome::MethodNotAllowed(search.allow),
            None => Outcome::NotFound,
        }
    }
}

struct Search<'r> {
    method: &'r Method,
    headers: &'r HeaderMap,
    allow: Vec<Method>,
    spans: Spans,
}

impl Search<'_> {
    fn pick(&mut self, entries: &[Entry]) -> Option<usize> {
        for e in entries {
            if !e.headers_match(self.headers) {
                continue;
            }
            if e.methods.is_empty() || e.methods.contains(self.method) {
                return Some(e.route);
            }
            for m in &e.methods {
                if !self.allow.contains(m) {
                    self.allow.push(m.clone());
                }
            }
        }
        None
    }

    /// Depth-first in specificity order: literal, capture, rest. `rest` is the path
    /// after the previous `/`; `offset` its byte offset in the full path.
    fn walk(&mut self, node: &Node, rest: &str, offset: usize) -> Option<usize> {
        let (seg, tail) = match rest.find('/') {
            Some(i) => (&rest[..i], Some(&rest[i + 1..])),
            None => (rest, None),
        };
        if let Some(child) = node.literals.get(seg) {
            let hit = match tail {
                None => self.pick(&child.end),
                Some(t) => self.walk(child, t, offset + seg.len() + 1),
            };
            if hit.is_some() {
                return hit;
            }
        }
        if !seg.is_empty()
            && let Some(child) = node.capture.as_deref()
        {
            self.spans.push(offset..offset + seg.len());
            let hit = match tail {
                None => self.pick(&child.end),
                Some(t) => self.walk(child, t, offset + seg.len() + 1),
            };
            if hit.is_some() {
                return hit;
            }
            self.spans.pop();
        }
        if !node.rest.is_empty() {
            self.spans.push(offset..offset + rest.len());
            if let Some(hit) = self.pick(&node.rest) {
                return Some(hit);
            }
            self.spans.pop();
        }
        None
    }
}

#[cfg(test)]
mod tests;
