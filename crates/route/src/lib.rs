//! Request routing for meshgate: path normalisation, path templates (`{name}`,
//! `{*rest}`), host, method and header matching, and the specificity order of SPEC §3
//! with tie detection. Pure data structures, no I/O: the proxy builds a `Router` once
//! per config snapshot and matches every request against it.
//!
//! Match cost grows with the depth of the path and the number of routes sharing one
//! template, never with the total number of routes: each host class holds a segment
//! trie searched literal-first, then capture, then `{*rest}`, with backtracking so
//! a less specific template still serves a method the more specific one lacks.

mod normalize;
mod pattern;
mod router;

pub use normalize::{NormalizeError, normalize_path};
pub use pattern::{PathPattern, PatternError, Segment};
pub use router::{HeaderMatch, Match, Outcome, Route, RouteError, Router, RouterBuilder, Spans};

mod rewrite;
pub use rewrite::{RewriteError, RewriteTemplate};
