//! Stage 3: resolve references, build routers and filter chains, freeze a Snapshot.

use crate::diag::Diagnostic;
use crate::load::{Doc, Resource};
use crate::model::*;
use crate::validate::{ApiDraft, Check, Checked, ConsumerDraft, captures_of};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use meshgate_api::{ApiSpec, FilterRef, InvokeSpec};
use meshgate_core::parse_duration;
use meshgate_filter::{
    BuildCtx, Chain, Conflict, ConsumerSet, Filter, HeaderOps, RequestValidator, Transform,
};
use meshgate_route::{RewriteTemplate, Route, Router};
use meshgate_upstream::{RetryOn, RetryPolicy, Selector};
use std::collections::BTreeMap;
use std::sync::Arc;

/// When the request path failed its own checks its captures are unknown; filters
/// are then checked against none (a template naming one says it is undefined).
const ANY_CAPTURES: &[Arc<str>] = &[];

pub fn link(
    docs: &[Doc],
    checked: Checked,
    placement: Placement<'_>,
    diags: &mut Vec<Diagnostic>,
) -> Option<Snapshot> {
    let Checked {
        gateways,
        mut services,
        apis,
        policies,
        consumers,
        mesh_mtls,
    } = checked;
    let had_errors = !diags.is_empty();
    let declared = |kind: meshgate_api::Kind, name: &str| {
        docs.iter().any(|d| d.kind == kind && d.name == name)
    };
    let gateway_names: Vec<&str> = gateways
        .iter()
        .map(|(i, _)| docs[*i].name.as_str())
        .collect();
    // Listener addresses must be unique across gateways.
    let mut bound: BTreeMap<std::net::SocketAddr, &str> = BTreeMap::new();
    for (i, g) in &gateways {
        let mut c = Check {
            doc: &docs[*i],
            diags,
        };
        for (j, l) in g.listeners.iter().enumerate() {
            if let Some(other) = bound.insert(l.address, &docs[*i].name) {
                c.err(
                    format!("spec.listeners.{j}.address"),
                    format!("{} is already used by Gateway {other:?}", l.address),
                );
            }
        }
        if let Some(a) = g.admin
            && let Some(other) = bound.insert(a, &docs[*i].name)
        {
            c.err(
                "spec.admin.address",
                format!("{a} is already used by Gateway {other:?}"),
            );
        }
    }

    let consumers = Arc::new(consumer_set(docs, consumers, diags));
    let service_names: std::collections::BTreeSet<String> = docs
        .iter()
        .filter(|d| matches!(d.resource, Resource::Service(_)))
        .map(|d| d.name.to_string())
        .collect();
    let refs = Refs {
        docs,
        services: &service_names,
        policies: &policies,
        consumers: &consumers,
    };
    let mut built_apis: Vec<Api> = Vec::new();
    let mut api_drafts: Vec<(usize, ApiDraft)> = Vec::new();
    let mut chain_marks: Vec<Vec<usize>> = Vec::new();
    let mut drafts: BTreeMap<usize, ApiDraft> = apis.into_iter().collect();
    for (i, doc) in docs.iter().enumerate() {
        let Resource::Api(env) = &doc.resource else {
            continue;
        };
        let draft = drafts.remove(&i);
        let mut c = Check { doc, diags };
        for (j, g) in env.spec.gateways.iter().enumerate() {
            if !gateway_names.contains(&g.as_str()) && !declared(meshgate_api::Kind::Gateway, g) {
                c.err(
                    format!("spec.gateways.{j}"),
                    format!("unknown Gateway {g:?}"),
                );
            }
        }
        // Without a valid request path the captures are unknown: skip capture checks.
        let captures = draft.as_ref().map(captures_of);
        let chain = api_chain(&mut c, &refs, &env.spec, captures.as_deref());
        let invoke = invoke(
            &mut c,
            &env.spec.invoke,
            &mut services,
            captures.as_deref(),
            &declared,
        );
        if let (Some((chain, marks)), Some(invoke), Some(draft)) = (chain, invoke, draft) {
            chain_marks.push(marks);
            built_apis.push(Api {
                name: doc.name.as_str().into(),
                chain,
                invoke,
                max_body_bytes: draft.max_body_bytes,
                lifecycle: draft.lifecycle.clone(),
                grey: None,
                release_of: draft.release.as_ref().map(|r| r.spec.of.as_str().into()),
            });
            api_drafts.push((i, draft));
        }
    }

    let Released {
        routed,
        unidentified,
    } = releases(
        docs,
        &api_drafts,
        (&mut built_apis, &chain_marks),
        placement,
        diags,
    );

    // A Service's inbound policies run in its sidecars: check them here, where
    // the config is whole, whether or not a sidecar compiles it.
    for doc in docs.iter() {
        let Resource::Service(env) = &doc.resource else {
            continue;
        };
        let mut c = Check { doc, diags };
        for (j, p) in env
            .spec
            .inbound
            .iter()
            .flat_map(|i| i.policies.iter())
            .enumerate()
        {
            policy_filters(
                &mut c,
                &refs,
                p,
                &format!("spec.inbound.policies.{j}"),
                Some(&[]),
            );
        }
    }

    let mut built_gateways = Vec::new();
    for (gi, mut g) in gateways {
        let gdoc = &docs[gi];
        let side = crate::sidecar::side_of(gdoc);
        let mut c = Check { doc: gdoc, diags };
        let mut filters = Vec::new();
        for (j, p) in g.policies.iter().enumerate() {
            filters.extend(policy_filters(
                &mut c,
                &refs,
                p,
                &format!("spec.policies.{j}"),
                Some(&[]),
            ));
        }
        if side == crate::MeshSide::Inbound
            && let Some((sdoc, own)) = crate::sidecar::own_service(docs)
        {
            // The Mesh, or else the own Service, says how its sidecars take
            // requests (over mesh mTLS when it is called so; both while the
            // Mesh is permissive), through its inbound policies.
            let own_mesh = services
                .get(&sdoc.name)
                .is_some_and(|(_, s)| s.tls == crate::UpstreamTls::Mesh);
            let plaintext_too = match mesh_mtls {
                crate::MeshMtls::Strict => Some(false),
                crate::MeshMtls::Permissive => Some(true),
                crate::MeshMtls::PerService => own_mesh.then_some(false),
            };
            if let Some(plaintext_too) = plaintext_too {
                for l in &mut g.listeners {
                    l.protocol = meshgate_api::ListenerProtocol::Mesh;
                    l.plaintext_too = plaintext_too;
                }
            }
            // Reported above already: these diagnostics are dropped.
            let mut again = Vec::new();
            let mut sc = Check {
                doc: sdoc,
                diags: &mut again,
            };
            for p in own.inbound.iter().flat_map(|i| i.policies.iter()) {
                filters.extend(policy_filters(&mut sc, &refs, p, "", Some(&[])));
            }
        }
        let identifies = filters.iter().any(|f| f.identifies());
        for &(rel, base) in &unidentified {
            let served = &api_drafts[base].1.gateways;
            if identifies || !(served.is_empty() || served.contains(&gdoc.name)) {
                continue;
            }
            let doc = &docs[api_drafts[rel].0];
            Check { doc, diags: c.diags }.err(
                "spec.release.consumers",
                format!(
                    "a release keyed on the Consumer is chosen once the caller is identified: start its filters with the same authentication filter (key-auth, jwt, hmac-auth or oauth2-introspection) as Api {:?}, or authenticate in Gateway {:?}'s policies",
                    docs[api_drafts[base].0].name, gdoc.name
                ),
            );
        }
        let mut builder = Router::builder();
        let mut owners: Vec<usize> = Vec::new();
        for (api_idx, (di, d)) in api_drafts.iter().enumerate() {
            let named = d.gateways.contains(&gdoc.name);
            if !named && (g.only_named_apis || !d.gateways.is_empty()) {
                continue;
            }
            if !routed[api_idx]
                || (d.lifecycle.stage == meshgate_api::Stage::Draft && !g.serve_drafts)
            {
                continue;
            }
            let route = Route {
                hosts: d.hosts.clone(),
                pattern: d.pattern.clone(),
                methods: d.methods.clone(),
                headers: d.headers.clone(),
                value: api_idx,
            };
            match builder.insert(route) {
                Ok(_) => owners.push(*di),
                Err(e) => {
                    let other = &docs[owners[e.existing]];
                    let mut ac = Check {
                        doc: &docs[*di],
                        diags: c.diags,
                    };
                    ac.err(
                        "spec.request.path",
                        format!(
                            "route tie with Api {:?} ({}:{}) on Gateway {:?}: same host ({}), path, methods and headers; make one more specific",
                            other.name,
                            other.file,
                            other.span.line_of("spec.request.path"),
                            gdoc.name,
                            e.host
                        ),
                    );
                }
            }
        }
        built_gateways.push(Arc::new(Gateway {
            name: gdoc.name.clone(),
            listeners: g.listeners,
            admin: g.admin,
            limits: g.limits,
            access_log: g.access_log,
            global: Chain::new(filters),
            router: builder.build(),
            drain_timeout: g.drain_timeout,
            serve_drafts: g.serve_drafts,
            side,
        }));
    }
    if had_errors || !diags.is_empty() {
        return None;
    }
    Some(Snapshot {
        revision: String::new(),
        gateways: built_gateways,
        services: services
            .into_iter()
            .map(|(n, (_, s))| (n, Arc::new(s)))
            .collect(),
        apis: built_apis.into_iter().map(Arc::new).collect(),
        consumers,
        resources: docs.iter().map(|d| d.resource.to_json()).collect(),
    })
}

/// Link each grey release (`spec.release`) to the Api it releases, and say which
/// Apis the routers hold: a release placed on this proxy takes its Api's route
/// when it takes all of the traffic, and is reached through its Api's route when
/// it splits the traffic; a release placed elsewhere is not served here.
///
/// A release keyed on the Consumer runs the filters it shares with its Api at the
/// start of both chains (the same instances), then chooses.
fn releases(
    docs: &[Doc],
    drafts: &[(usize, ApiDraft)],
    (apis, marks): (&mut [Api], &[Vec<usize>]),
    placement: Placement<'_>,
    diags: &mut Vec<Diagnostic>,
) -> Released {
    let mut routed = vec![true; drafts.len()];
    let mut unidentified = Vec::new();
    let index: BTreeMap<&str, usize> = drafts
        .iter()
        .enumerate()
        .map(|(i, (di, _))| (docs[*di].name.as_str(), i))
        .collect();
    let mut released: BTreeMap<usize, usize> = BTreeMap::new();
    for (i, (di, d)) in drafts.iter().enumerate() {
        let Some(r) = &d.release else { continue };
        // Not routed unless it takes its Api's place, below.
        routed[i] = false;
        let doc = &docs[*di];
        let mut c = Check { doc, diags };
        let of = r.spec.of.as_str();
        let Some(&base) = index.get(of) else {
            // An Api that failed its own checks has already been reported.
            if !docs
                .iter()
                .any(|x| x.kind == meshgate_api::Kind::Api && x.name == of)
            {
                c.err("spec.release.of", format!("unknown Api {of:?}"));
            }
            continue;
        };
        if base == i {
            c.err("spec.release.of", "an Api cannot be a release of itself");
            continue;
        }
        if drafts[base].1.release.is_some() {
            c.err(
                "spec.release.of",
                format!("Api {of:?} is itself a release: release the Api it releases"),
            );
            continue;
        }
        if let Some(other) = released.insert(base, i) {
            c.err(
                "spec.release.of",
                format!(
                    "Api {of:?} already has a release, {:?}: promote or roll it back first",
                    docs[drafts[other].0].name
                ),
            );
            continue;
        }
        let (Resource::Api(mine), Resource::Api(theirs)) =
            (&doc.resource, &docs[drafts[base].0].resource)
        else {
            continue;
        };
        let splits = r.spec.splits_traffic();
        if splits {
            let (a, b) = (&mine.spec, &theirs.spec);
            let same_route = a.gateways == b.gateways
                && a.request.hosts == b.request.hosts
                && a.request.path == b.request.path
                && a.request.methods == b.request.methods
                && a.request.headers == b.request.headers;
            if !same_route {
                c.err(
                    "spec.request",
                    format!("a release that splits traffic is reached through the route of Api {of:?}: give it the same gateways, hosts, path, methods and headers (or release it to whole proxies with nodes alone)"),
                );
                continue;
            }
        }
        let mut identified_at = (0, 0);
        if r.spec.keys_on_consumer() {
            let (mine, theirs) = (&mine.spec.filters, &theirs.spec.filters);
            let n = mine.iter().zip(theirs).take_while(|(a, b)| a == b).count();
            let (bm, rm) = (&marks[base], &marks[i]);
            identified_at = (bm[n], rm[n]);
            if !apis[base].chain.identifies(bm[0]..bm[n]) {
                unidentified.push((i, base));
            }
            let shared = &apis[base].chain.filters()[bm[0]..bm[n]];
            let own = apis[i].chain.filters();
            let spliced = own[..rm[0]]
                .iter()
                .chain(shared)
                .chain(&own[rm[n]..])
                .cloned()
                .collect();
            apis[i].chain = Chain::new(spliced);
        }
        if !placement.admits(&r.spec) {
            continue;
        }
        if splits {
            apis[base].grey = Some(Grey {
                to: i,
                permyriad: r.permyriad,
                by: r.by.clone(),
                headers: r.headers.clone(),
                consumers: r.spec.consumers.clone(),
                salt: of.into(),
                identified_at,
            });
        } else {
            routed[i] = true;
            routed[base] = false;
        }
    }
    Released {
        routed,
        unidentified,
    }
}

/// What [`releases`] decided.
struct Released {
    /// Which Apis the routers hold.
    routed: Vec<bool>,
    /// Releases keyed on the Consumer whose shared filters do not identify the
    /// caller (release, Api): each gateway serving them must, in its policies.
    unidentified: Vec<(usize, usize)>,
}

/// What filter entries may refer to.
struct Refs<'a> {
    docs: &'a [Doc],
    services: &'a std::collections::BTreeSet<String>,
    policies: &'a BTreeMap<String, usize>,
    consumers: &'a Arc<ConsumerSet>,
}

/// An Api's chain, with where each entry of its `filters:` ends in it: `marks[0]`
/// is where the first entry starts, `marks[j + 1]` where entry `j` ends.
fn api_chain(
    c: &mut Check<'_>,
    refs: &Refs<'_>,
    spec: &ApiSpec,
    captures: Option<&[Arc<str>]>,
) -> Option<(Chain, Vec<usize>)> {
    let before = c.diags.len();
    let mut filters: Vec<Arc<dyn Filter>> = Vec::new();
    // response.headers runs last on the way out, so it goes first in the chain.
    if let Some(h) = spec.response.as_ref().and_then(|r| r.headers.as_ref()) {
        let cfg = meshgate_filter_header_cfg(h);
        match HeaderOps::compile(&cfg, "spec.response.headers") {
            Ok(ops) => filters.push(Arc::new(Transform::response_headers(ops))),
            Err(e) => c.err(&e.path, e.message),
        }
    }
    let mut marks = vec![filters.len()];
    let mut cache_at: Option<String> = None;
    for (i, f) in spec.filters.iter().enumerate() {
        let path = format!("spec.filters.{i}");
        for filter in filter_entry(c, refs, f, &path, captures, true) {
            match (filter.name(), &cache_at) {
                ("cache", None) => cache_at = Some(path.clone()),
                ("compress", Some(cache)) => c.err(
                    &path,
                    format!("put compress before cache ({cache}): the cache keeps the uncompressed response and compress then encodes it for each client"),
                ),
                _ => {}
            }
            filters.push(filter);
        }
        marks.push(filters.len());
    }
    // Validation runs after the Api's filters: unauthenticated callers learn nothing
    // about the API's parameters.
    let r = &spec.request;
    let schema = r.body.as_ref().and_then(|b| b.schema.as_ref());
    match RequestValidator::from_spec(r.params.as_ref(), schema, captures.unwrap_or(ANY_CAPTURES)) {
        Ok(Some(v)) => filters.push(Arc::new(v)),
        Ok(None) => {}
        Err(e) => c.err(format!("spec.request.{}", e.path), e.message),
    }
    (c.diags.len() == before).then(|| (Chain::new(filters), marks))
}

fn meshgate_filter_header_cfg(h: &meshgate_api::HeaderOpsSpec) -> meshgate_filter::HeaderOpsConfig {
    meshgate_filter::HeaderOpsConfig {
        set: h.set.clone(),
        add: h.add.clone(),
        remove: h.remove.clone(),
    }
}

fn filter_entry(
    c: &mut Check<'_>,
    refs: &Refs<'_>,
    f: &FilterRef,
    path: &str,
    captures: Option<&[Arc<str>]>,
    allow_policy: bool,
) -> Vec<Arc<dyn Filter>> {
    match (&f.name, &f.policy) {
        (Some(name), None) => {
            let site = format!("{:?}/{} {path}", c.doc.kind, c.doc.name);
            let ctx = BuildCtx {
                captures: captures.unwrap_or(ANY_CAPTURES),
                consumers: refs.consumers,
                base: std::path::Path::new(&*c.doc.file).parent(),
                site: &site,
                services: refs.services,
            };
            match meshgate_filter::build(name, f.config.as_ref(), ctx) {
                Ok(filter) => vec![filter],
                Err(e) => {
                    c.err(format!("{path}.{}", e.path), e.message);
                    Vec::new()
                }
            }
        }
        (None, Some(p)) if allow_policy => {
            policy_filters(c, refs, p, &format!("{path}.policy"), captures)
        }
        (None, Some(_)) => {
            c.err(
                format!("{path}.policy"),
                "a Policy cannot reference another Policy",
            );
            Vec::new()
        }
        (Some(_), Some(_)) => {
            c.err(path, "use either name (a filter) or policy, not both");
            Vec::new()
        }
        (None, None) => {
            c.err(path, "a filter entry needs name (a filter) or policy");
            Vec::new()
        }
    }
}

fn policy_filters(
    c: &mut Check<'_>,
    refs: &Refs<'_>,
    name: &str,
    path: &str,
    captures: Option<&[Arc<str>]>,
) -> Vec<Arc<dyn Filter>> {
    let Some(&pi) = refs.policies.get(name) else {
        if !refs
            .docs
            .iter()
            .any(|d| d.kind == meshgate_api::Kind::Policy && d.name == name)
        {
            c.err(path, format!("unknown Policy {name:?}"));
        }
        return Vec::new();
    };
    let pdoc = &refs.docs[pi];
    let Resource::Policy(env) = &pdoc.resource else {
        return Vec::new();
    };
    let mut pc = Check {
        doc: pdoc,
        diags: c.diags,
    };
    let mut out = Vec::new();
    for (i, f) in env.spec.filters.iter().enumerate() {
        out.extend(filter_entry(
            &mut pc,
            refs,
            f,
            &format!("spec.filters.{i}"),
            captures,
            false,
        ));
    }
    out
}

/// A fixed answer from config (`invoke.mock`, a breaker's `fallback`).
pub(crate) fn mock(c: &mut Check<'_>, m: &meshgate_api::MockSpec, at: &str) -> Option<Mock> {
    let before = c.diags.len();
    let mut headers = HeaderMap::new();
    for (n, v) in &m.headers {
        match (
            HeaderName::from_bytes(n.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            (Ok(n), Ok(v)) => {
                headers.insert(n, v);
            }
            _ => c.err(format!("{at}.headers.{n}"), "not a valid header"),
        }
    }
    let body = match &m.body {
        None => Bytes::new(),
        Some(serde_json::Value::String(s)) => Bytes::from(s.clone()),
        Some(v) => {
            headers
                .entry(http::header::CONTENT_TYPE)
                .or_insert(HeaderValue::from_static("application/json"));
            Bytes::from(v.to_string())
        }
    };
    (c.diags.len() == before).then(|| Mock {
        status: StatusCode::from_u16(m.status).unwrap_or(StatusCode::OK),
        headers,
        body,
    })
}

fn invoke(
    c: &mut Check<'_>,
    inv: &InvokeSpec,
    services: &mut BTreeMap<String, (usize, Service)>,
    captures: Option<&[Arc<str>]>,
    declared: &dyn Fn(meshgate_api::Kind, &str) -> bool,
) -> Option<Invoke> {
    let before = c.diags.len();
    if let Some(m) = &inv.mock {
        return mock(c, m, "spec.invoke.mock").map(Invoke::Mock);
    }
    let name = inv.service.as_ref()?;
    let svc_timeout = match services.get(name) {
        Some((_, svc)) => svc.timeout,
        None => {
            if !declared(meshgate_api::Kind::Service, name) {
                c.err("spec.invoke.service", format!("unknown Service {name:?}"));
            }
            None
        }
    };
    let rewrite = match (&inv.path, captures) {
        (Some(p), Some(caps)) => RewriteTemplate::parse(p, caps)
            .map_err(|e| c.err("spec.invoke.path", e.to_string()))
            .ok(),
        _ => None,
    };
    let timeout = match &inv.timeout {
        Some(t) => parse_duration(t)
            .map_err(|e| c.err("spec.invoke.timeout", e))
            .ok(),
        None => Some(svc_timeout.unwrap_or(DEFAULT_TIMEOUT)),
    };
    let mut retry = RetryPolicy::default();
    if let Some(r) = &inv.retry {
        if r.attempts > 10 {
            c.err("spec.invoke.retry.attempts", "at most 10 retries");
        }
        retry.attempts = r.attempts;
        retry.non_idempotent = r.non_idempotent;
        let mut on = RetryOn::default();
        if r.on.is_empty() {
            for d in ["connect-failure", "reset", "gateway-error"] {
                let _ = on.add(d);
            }
        }
        for (i, s) in r.on.iter().enumerate() {
            if let Err(e) = on.add(s) {
                c.err(format!("spec.invoke.retry.on.{i}"), e);
            }
        }
        retry.on = on;
        if let Some(t) = &r.per_try_timeout {
            retry.per_try_timeout = parse_duration(t)
                .map_err(|e| c.err("spec.invoke.retry.perTryTimeout", e))
                .ok();
        }
        if let Some(b) = &r.backoff {
            retry.backoff = backoff(c, b);
        }
    }
    let split = split(c, inv, name, services, declared);
    (c.diags.len() == before && services.contains_key(name)).then(|| {
        Invoke::Upstream(Upstream {
            service: name.clone(),
            rewrite,
            timeout: timeout.unwrap_or(DEFAULT_TIMEOUT),
            retry,
            split,
        })
    })
}

/// Register a selector on a Service (deduplicated) and return its index.
fn selector(svc: &mut Service, sel: Selector) -> usize {
    match svc.selectors.iter().position(|s| *s == sel) {
        Some(i) => i,
        None => {
            svc.selectors.push(sel);
            svc.selectors.len() - 1
        }
    }
}

fn split(
    c: &mut Check<'_>,
    inv: &InvokeSpec,
    own: &str,
    services: &mut BTreeMap<String, (usize, Service)>,
    declared: &dyn Fn(meshgate_api::Kind, &str) -> bool,
) -> Split {
    let mut out = Split::default();
    let mut total = 0u32;
    let mut own_subsets = Vec::new();
    for (i, s) in inv.split.iter().enumerate() {
        let p = format!("spec.invoke.split.{i}");
        let svc_name = s.service.clone().unwrap_or_else(|| own.to_string());
        let Some((_, svc)) = services.get_mut(&svc_name) else {
            if !declared(meshgate_api::Kind::Service, &svc_name) {
                c.err(
                    format!("{p}.service"),
                    format!("unknown Service {svc_name:?}"),
                );
            }
            continue;
        };
        let subset =
            (!s.subset.is_empty()).then(|| selector(svc, Selector::Labels(s.subset.clone())));
        if svc_name == own && !s.subset.is_empty() {
            own_subsets.push(s.subset.clone());
        }
        let target = Target {
            service: (svc_name != own).then_some(svc_name),
            subset,
        };
        match (&s.r#match, s.weight) {
            (Some(m), None) => {
                let mut hs = Vec::new();
                for (n, v) in &m.header {
                    match HeaderName::from_bytes(n.as_bytes()) {
                        Ok(h) => hs.push((h, v.clone())),
                        Err(_) => c.err(format!("{p}.match.header.{n}"), "not a header name"),
                    }
                }
                if hs.is_empty() {
                    c.err(format!("{p}.match"), "match needs at least one header");
                }
                out.matched.push((hs, target));
            }
            (None, Some(w)) => {
                total += w;
                if total > 100 {
                    c.err(
                        format!("{p}.weight"),
                        "split weights are percentages and add up to more than 100",
                    );
                }
                out.weighted.push((total, target));
            }
            (Some(_), Some(_)) => c.err(&p, "a split entry has either weight or match, not both"),
            (None, None) => c.err(&p, "a split entry needs weight (percent) or match"),
        }
    }
    if !own_subsets.is_empty()
        && let Some((_, svc)) = services.get_mut(own)
    {
        out.baseline.subset = Some(selector(svc, Selector::NoneOf(own_subsets)));
    }
    out
}

/// Index the Consumers; a key held by two Consumers is an error on both.
fn consumer_set(
    docs: &[Doc],
    drafts: Vec<(usize, ConsumerDraft)>,
    diags: &mut Vec<Diagnostic>,
) -> ConsumerSet {
    let mut set = ConsumerSet::default();
    for (i, d) in drafts {
        let consumer = set.add(
            meshgate_core::Consumer::new(&docs[i].name, &d.groups, d.labels).with_quota(d.quota),
        );
        let mut clash = |j: usize, field: &str, what: &str, other: String| {
            Check {
                doc: &docs[i],
                diags: &mut *diags,
            }
            .err(
                format!("spec.credentials.{j}.{field}"),
                format!("the same {what} is already a credential of Consumer {other:?}"),
            );
        };
        for (j, key) in d.keys {
            if let Err(Conflict(other)) = set.add_key(&consumer, &key) {
                clash(j, "key", "key", other);
            }
        }
        for (j, key_id, secret) in d.hmac {
            if let Err(Conflict(other)) = set.add_hmac(&consumer, &key_id, &secret) {
                clash(j, "keyId", "HMAC key id", other);
            }
        }
        for (j, issuer, subject) in d.jwts {
            if let Err(Conflict(other)) = set.add_jwt(&consumer, &issuer, &subject) {
                clash(j, "subject", "JWT issuer and subject", other);
            }
        }
    }
    set
}

/// `invoke.retry.backoff`: Envoy's defaults, 25 ms base and ten times that at most.
fn backoff(c: &mut Check<'_>, b: &meshgate_api::BackoffSpec) -> meshgate_upstream::Backoff {
    const AT: &str = "spec.invoke.retry.backoff";
    let mut out = meshgate_upstream::Backoff::default();
    let base = c.duration(&format!("{AT}.base"), b.base.as_ref());
    let max = c.duration(&format!("{AT}.max"), b.max.as_ref());
    if let Some(base) = base {
        out.base = base;
        out.max = base.saturating_mul(10);
    }
    if let Some(max) = max {
        out.max = max;
    }
    if out.max < out.base {
        c.err(format!("{AT}.max"), "must be at least base");
    }
    out
}
