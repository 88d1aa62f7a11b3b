//! meshgate's config compiler. Three stages, one entry point:
//!
//! 1. **parse** — files and directories of YAML documents into typed `*Spec`
//!    envelopes, keeping for every field path the line it was written on;
//! 2. **validate** — every document is checked and *every* problem collected as a
//!    [`Diagnostic`] (`FILE:LINE: Kind/name: field.path: message`);
//! 3. **link** — references resolved (Services, Policies, Gateways), routes inserted
//!    and ties detected, filter chains built, all into one immutable [`Snapshot`].
//!
//! The same [`compile`] serves `meshgate validate`, reloads and (later) control-plane
//! writes, so a config that validates is exactly a config that loads. The only I/O is
//! reading the files named on the command line ([`load_paths`]).

mod diag;
mod index;
mod link;
mod load;
mod model;
pub mod sidecar;
mod validate;

pub use diag::Diagnostic;
pub use load::{ParseCache, Source, load_paths};
pub use meshgate_core::parse_duration;
pub use model::*;
pub use validate::valid_name;

/// Compile sources into a snapshot, as served by a proxy without labels. Grey
/// releases placed by node labels are checked too, as if placed here. Returns the
/// snapshot only when there are no diagnostics; the diagnostics are sorted by file
/// and line.
pub fn compile(sources: &[Source]) -> (Option<Snapshot>, Vec<Diagnostic>) {
    compile_cached(sources, None)
}

/// [`compile`], parsing again only the sources that changed since the last
/// compile with `cache`.
pub fn compile_cached(
    sources: &[Source],
    cache: Option<&ParseCache>,
) -> (Option<Snapshot>, Vec<Diagnostic>) {
    let mut diags = Vec::new();
    let docs = parse(sources, cache, &mut diags);
    let no_labels = std::collections::BTreeMap::new();
    let (snapshot, diags) = build(sources, &docs, Placement::Node(&no_labels), diags);
    let placed = |d: &load::Doc| match &d.resource {
        load::Resource::Api(e) => e.spec.release.as_ref().is_some_and(|r| !r.nodes.is_empty()),
        _ => false,
    };
    if diags.is_empty() && docs.iter().any(placed) {
        let everywhere = build(sources, &docs, Placement::Everywhere, Vec::new()).1;
        if !everywhere.is_empty() {
            return (None, everywhere);
        }
    }
    (snapshot, diags)
}

/// Compile sources into the snapshot a proxy at `placement` serves.
pub fn compile_for(
    sources: &[Source],
    placement: Placement<'_>,
) -> (Option<Snapshot>, Vec<Diagnostic>) {
    let mut diags = Vec::new();
    let docs = parse(sources, None, &mut diags);
    build(sources, &docs, placement, diags)
}

/// Stage 1, from `cache` where the sources did not change.
fn parse(
    sources: &[Source],
    cache: Option<&ParseCache>,
    diags: &mut Vec<Diagnostic>,
) -> Vec<load::Doc> {
    match cache {
        Some(c) => load::parse_sources_cached(sources, diags, c),
        None => load::parse_sources(sources, diags),
    }
}

/// Stages 2 and 3 over parsed documents, for a proxy at `placement`; `diags`
/// holds stage 1's.
fn build(
    sources: &[Source],
    docs: &[load::Doc],
    placement: Placement<'_>,
    mut diags: Vec<Diagnostic>,
) -> (Option<Snapshot>, Vec<Diagnostic>) {
    let checked = validate::validate(docs, &mut diags);
    // Link even when stage 2 found problems: every error is reported in one run.
    // References to resources that exist but failed their own checks are not
    // reported again.
    let snapshot = link::link(docs, checked, placement, &mut diags).map(|mut s| {
        s.revision = revision(sources);
        s
    });
    diags.sort_by(|a, b| (&a.file, a.line).cmp(&(&b.file, b.line)));
    diags.dedup();
    if diags.is_empty() {
        (snapshot, diags)
    } else {
        (None, diags)
    }
}

/// One document of a source, cut out with its own text: how the control plane keeps
/// resources one by one.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    pub kind: meshgate_api::Kind,
    pub name: String,
    pub text: String,
    /// The resource as JSON, secrets redacted (as `GET /config` shows it).
    pub json: serde_json::Value,
}

/// The documents of `source`, or why they cannot be read (stage 1 only; the
/// documents' own checks come with [`compile`]).
pub fn documents(source: &Source) -> Result<Vec<Document>, Vec<Diagnostic>> {
    let mut diags = Vec::new();
    let docs = load::parse_sources(std::slice::from_ref(source), &mut diags);
    if !diags.is_empty() {
        return Err(diags);
    }
    Ok(docs
        .into_iter()
        .map(|d| Document {
            kind: d.kind,
            json: d.resource.to_json(),
            name: d.name,
            text: source.text[d.span.start..d.span.end].to_string(),
        })
        .collect())
}

/// Load paths from disk and compile them.
pub fn compile_paths(paths: &[std::path::PathBuf]) -> (Option<Snapshot>, Vec<Diagnostic>) {
    match load_paths(paths) {
        Ok(sources) => compile(&sources),
        Err(d) => (None, d),
    }
}

/// A content hash of the sources, so equal configs report equal revisions.
fn revision(sources: &[Source]) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    for s in sources {
        s.file.hash(&mut h);
        s.text.hash(&mut h);
    }
    format!("{:016x}", h.finish())
}
