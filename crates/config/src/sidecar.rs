//! A sidecar's view of the config. A sidecar runs the same data plane as an edge
//! gateway; what makes it a sidecar is a few resources it adds to the config it
//! receives, compiled with it by the same compiler:
//!
//! - Gateway `meshgate.inbound`: the inbound listener (what other proxies reach
//!   this instance on) and the admin listener, with one Api, `meshgate.inbound`,
//!   passing every request to the sidecar's own Service;
//! - Gateway `meshgate.outbound`: the listener the app calls other services on,
//!   with one Api per Service, `meshgate.outbound.NAME`, matching `Host: NAME`;
//!   and `meshgate.outbound.passthrough`, any other host, invoking Service
//!   `meshgate.passthrough`: a connection iptables redirected goes on to where the
//!   app sent it (its original destination); one the app sent here is `404`;
//! - the sidecar's own Service, when the config does not declare it.
//!
//! Both gateways serve only the Apis that name them (`onlyNamedApis`), so the
//! config's own Apis never reach them. Once compiled, [`Sidecar::place`] points
//! the own Service at the local app: whoever invokes it through this sidecar (the
//! inbound Api, an Api of a Gateway the sidecar also serves in the fused "BFF"
//! mode, or the app calling itself) reaches the app with no further hop.

use crate::{EndpointConfig, Snapshot, Source};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

/// The file name the added resources' diagnostics carry.
pub const FILE: &str = "<sidecar>";
/// The inbound Gateway's (and Api's) name.
pub const INBOUND: &str = "meshgate.inbound";
/// The outbound Gateway's name; its Apis are `meshgate.outbound.SERVICE`.
pub const OUTBOUND: &str = "meshgate.outbound";
/// The Service of the outbound side's any-host Api: the original destination.
pub const PASSTHROUGH: &str = "meshgate.passthrough";
/// Names with this prefix are the sidecar's own: the config may not use them.
pub const RESERVED_PREFIX: &str = "meshgate.";

/// Which side of a sidecar a Gateway resource is: only those this module adds are.
pub(crate) fn side_of(doc: &crate::load::Doc) -> crate::MeshSide {
    match (&*doc.file, doc.name.as_str()) {
        (FILE, INBOUND) => crate::MeshSide::Inbound,
        (FILE, OUTBOUND) => crate::MeshSide::Outbound,
        _ => crate::MeshSide::Edge,
    }
}

/// The sidecar's own Service, as written: the one its inbound Api invokes.
pub(crate) fn own_service(
    docs: &[crate::load::Doc],
) -> Option<(&crate::load::Doc, &meshgate_api::ServiceSpec)> {
    let own = docs.iter().find_map(|d| match &d.resource {
        crate::load::Resource::Api(env) if &*d.file == FILE && d.name == INBOUND => {
            env.spec.invoke.service.as_deref()
        }
        _ => None,
    })?;
    docs.iter().find_map(|d| match &d.resource {
        crate::load::Resource::Service(env) if d.name == own => Some((d, &env.spec)),
        _ => None,
    })
}

/// Where a sidecar listens and what it stands beside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sidecar {
    /// The service this instance belongs to.
    pub service: String,
    /// The local app.
    pub app: SocketAddr,
    /// The inbound listener's addresses (one per address family, say).
    pub inbound: Vec<SocketAddr>,
    /// The outbound listener's addresses: `127.0.0.1:15001`, and `[::1]:15001`
    /// where IPv6 traffic is intercepted.
    pub outbound: Vec<SocketAddr>,
    pub admin: Option<SocketAddr>,
    /// `stdout`, `off` or a file path.
    pub access_log: String,
    /// The outbound Gateway's `limits.tcpIdleTimeout`, as given.
    pub tcp_idle_timeout: String,
}

/// Listeners named `name`, `name-2`, ... on `addresses`, as YAML flow mappings.
fn listeners(name: &str, addresses: &[SocketAddr]) -> String {
    let listener = |(i, a): (usize, &SocketAddr)| match i {
        0 => format!("{{name: {name}, address: \"{a}\"}}"),
        _ => format!("{{name: {name}-{}, address: \"{a}\"}}", i + 1),
    };
    let all: Vec<String> = addresses.iter().enumerate().map(listener).collect();
    all.join(", ")
}

/// Retries on the outbound side when an Api does not say: a try that never
/// reached the peer, or was refused by a peer going away, goes to another
/// endpoint (idempotent requests only for resets and 503s, as everywhere).
const OUTBOUND_RETRY: &str = r#"{attempts: 2, on: [connect-failure, reset, "503"]}"#;

impl Sidecar {
    /// The resources this sidecar adds to a config whose Services are `services`.
    pub fn source(&self, services: &[&str]) -> Source {
        let mut y = String::new();
        let log = serde_json::Value::from(self.access_log.as_str());
        let admin = self
            .admin
            .map(|a| format!("\n  admin: {{address: \"{a}\"}}"))
            .unwrap_or_default();
        let _ = write!(
            y,
            "apiVersion: meshgate.io/v1\nkind: Gateway\nmetadata: {{name: {INBOUND}}}\nspec:\n  onlyNamedApis: true\n  accessLog: {{path: {log}}}\n  listeners: [{}]{admin}\n",
            listeners("inbound", &self.inbound)
        );
        let _ = write!(
            y,
            "---\napiVersion: meshgate.io/v1\nkind: Api\nmetadata: {{name: {INBOUND}}}\nspec:\n  gateways: [{INBOUND}]\n  request: {{path: \"/{{*rest}}\"}}\n  invoke: {{service: {}}}\n",
            self.service
        );
        let tcp_idle = serde_json::Value::from(self.tcp_idle_timeout.as_str());
        let _ = write!(
            y,
            "---\napiVersion: meshgate.io/v1\nkind: Gateway\nmetadata: {{name: {OUTBOUND}}}\nspec:\n  onlyNamedApis: true\n  accessLog: {{path: {log}}}\n  limits: {{tcpIdleTimeout: {tcp_idle}}}\n  listeners: [{}]\n",
            listeners("outbound", &self.outbound)
        );
        let own_declared = services.contains(&self.service.as_str());
        let own = (!own_declared).then_some(self.service.as_str());
        for s in services.iter().copied().chain(own) {
            let _ = write!(
                y,
                "---\napiVersion: meshgate.io/v1\nkind: Api\nmetadata: {{name: {OUTBOUND}.{s}}}\nspec:\n  gateways: [{OUTBOUND}]\n  request: {{hosts: [\"{s}\"], path: \"/{{*rest}}\"}}\n  invoke: {{service: {s}, retry: {OUTBOUND_RETRY}}}\n"
            );
        }
        let _ = write!(
            y,
            "---\napiVersion: meshgate.io/v1\nkind: Api\nmetadata: {{name: {OUTBOUND}.passthrough}}\nspec:\n  gateways: [{OUTBOUND}]\n  request: {{path: \"/{{*rest}}\"}}\n  invoke: {{service: {PASSTHROUGH}}}\n---\napiVersion: meshgate.io/v1\nkind: Service\nmetadata: {{name: {PASSTHROUGH}}}\nspec:\n  discovery: {{originalDestination: true}}\n"
        );
        if !own_declared {
            let _ = write!(
                y,
                "---\napiVersion: meshgate.io/v1\nkind: Service\nmetadata: {{name: {}}}\nspec:\n  endpoints: [{{address: \"{}\"}}]\n",
                self.service, self.app
            );
        }
        Source {
            file: Arc::from(FILE),
            text: y,
        }
    }

    /// Point the own Service at the local app: one endpoint, no discovery. The
    /// rest of the Service (protocol, timeouts, breaker) still applies.
    pub fn place(&self, snapshot: &mut Snapshot) {
        if let Some(s) = snapshot.services.get_mut(&self.service) {
            let mut own = (**s).clone();
            own.endpoints = vec![EndpointConfig {
                address: self.app,
                weight: 1,
                labels: Default::default(),
            }];
            own.dns = None;
            own.registry = None;
            // The app is next door: the hop to it is plain.
            own.tls = crate::UpstreamTls::Disable;
            *s = Arc::new(own);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sidecar() -> Sidecar {
        Sidecar {
            service: "orders".into(),
            app: "127.0.0.1:9000".parse().unwrap_or_else(|e| panic!("{e}")),
            inbound: vec!["127.0.0.1:15006".parse().unwrap_or_else(|e| panic!("{e}"))],
            outbound: ["127.0.0.1:15001", "[::1]:15001"]
                .iter()
                .map(|a| a.parse().unwrap_or_else(|e| panic!("{e}")))
                .collect(),
            admin: "127.0.0.1:15000".parse().ok(),
            access_log: "off".into(),
            tcp_idle_timeout: "1h".into(),
        }
    }

    const CONFIG: &str = r#"
apiVersion: meshgate.io/v1
kind: Gateway
metadata: {name: public}
spec: {listeners: [{name: web, address: "127.0.0.1:8080"}]}
---
apiVersion: meshgate.io/v1
kind: Service
metadata: {name: users}
spec: {discovery: {registry: users}}
---
apiVersion: meshgate.io/v1
kind: Api
metadata: {name: everything}
spec:
  request: {path: "/{*rest}"}
  invoke: {service: users}
"#;

    fn compiled(extra: &str, services: &[&str]) -> Snapshot {
        let sources = vec![
            Source {
                file: Arc::from("config.yaml"),
                text: format!("{CONFIG}{extra}"),
            },
            sidecar().source(services),
        ];
        let (snapshot, diags) = crate::compile(&sources);
        assert!(diags.is_empty(), "{diags:?}");
        let mut snapshot = snapshot.unwrap_or_else(|| panic!("no snapshot"));
        sidecar().place(&mut snapshot);
        snapshot
    }

    #[test]
    fn the_added_gateways_serve_only_their_own_apis() {
        let snapshot = compiled("", &["users"]);
        let routes = |gateway: &str, host: &str, path: &str| {
            let g = snapshot
                .gateways
                .iter()
                .find(|g| g.name == gateway)
                .unwrap_or_else(|| panic!("no gateway {gateway}"));
            match g
                .router
                .route(host, &http::Method::GET, path, &http::HeaderMap::new())
            {
                meshgate_route::Outcome::Matched(m) => {
                    Some(snapshot.apis[*m.value].name.to_string())
                }
                _ => None,
            }
        };
        assert_eq!(
            routes(OUTBOUND, "users", "/").as_deref(),
            Some("meshgate.outbound.users")
        );
        assert_eq!(
            routes(OUTBOUND, "orders", "/a/b").as_deref(),
            Some("meshgate.outbound.orders")
        );
        assert_eq!(
            routes(OUTBOUND, "elsewhere", "/").as_deref(),
            Some("meshgate.outbound.passthrough"),
            "the config's catch-all Api is not served outbound: any other host passes through"
        );
        assert!(snapshot.services[PASSTHROUGH].original_destination);
        let outbound = snapshot.gateways.iter().find(|g| g.name == OUTBOUND);
        let listening: Vec<String> = outbound
            .iter()
            .flat_map(|g| g.listeners.iter())
            .map(|l| format!("{} {}", l.name, l.address))
            .collect();
        assert_eq!(
            listening,
            ["outbound 127.0.0.1:15001", "outbound-2 [::1]:15001"],
            "one listener per address"
        );
        assert_eq!(routes(INBOUND, "any", "/x").as_deref(), Some(INBOUND));
        assert_eq!(routes("public", "any", "/x").as_deref(), Some("everything"));
    }

    fn addresses(snapshot: &Snapshot, service: &str) -> Vec<String> {
        let s = &snapshot.services[service];
        s.endpoints.iter().map(|e| e.address.to_string()).collect()
    }

    #[test]
    fn an_undeclared_own_service_is_added_as_the_app() {
        let snapshot = compiled("", &["users"]);
        assert_eq!(addresses(&snapshot, "orders"), ["127.0.0.1:9000"]);
        assert_eq!(
            snapshot.services["users"].registry.as_deref(),
            Some("users")
        );
    }

    #[test]
    fn a_declared_own_service_keeps_its_settings_and_points_at_the_app() {
        let orders = "---\napiVersion: meshgate.io/v1\nkind: Service\nmetadata: {name: orders}\nspec: {discovery: {registry: orders}, timeout: 2s}\n";
        let text = sidecar().source(&["orders"]).text;
        assert!(!text.contains("metadata: {name: orders}"), "{text}");
        let snapshot = compiled(orders, &["users", "orders"]);
        let own = &snapshot.services["orders"];
        assert_eq!(addresses(&snapshot, "orders"), ["127.0.0.1:9000"]);
        assert_eq!(
            (own.registry.as_deref(), own.timeout),
            (None, Some(std::time::Duration::from_secs(2)))
        );
    }

    /// How the inbound listener takes connections: (protocol, plaintext too).
    fn inbound(snapshot: &Snapshot) -> Vec<(meshgate_api::ListenerProtocol, bool)> {
        let inbound = snapshot.gateways.iter().find(|g| g.name == INBOUND);
        inbound
            .iter()
            .flat_map(|g| g.listeners.iter().map(|l| (l.protocol, l.plaintext_too)))
            .collect()
    }

    fn with_mesh(mode: &str) -> String {
        format!(
            "---\napiVersion: meshgate.io/v1\nkind: Service\nmetadata: {{name: maps}}\nspec: {{endpoints: [{{address: \"127.0.0.1:9001\"}}]}}\n---\napiVersion: meshgate.io/v1\nkind: Service\nmetadata: {{name: legacy}}\nspec: {{discovery: {{registry: legacy}}, tls: {{mode: disable}}}}\n---\napiVersion: meshgate.io/v1\nkind: Mesh\nmetadata: {{name: default}}\nspec: {{mtls: {{mode: {mode}}}}}\n"
        )
    }

    #[test]
    fn the_mesh_mtls_mode_decides_registry_services_and_the_inbound() {
        use crate::UpstreamTls::{Disable, Mesh};
        use meshgate_api::ListenerProtocol::{Http, Mesh as MeshListener};
        let tls = |s: &Snapshot, name: &str| s.services[name].tls.clone();

        let per_service = compiled(&with_mesh("perService"), &["users"]);
        assert_eq!(tls(&per_service, "users"), Disable);
        assert_eq!(inbound(&per_service), [(Http, false)]);

        // The step between: the inbound takes both, callers go on as before, and
        // a Service's own mode no longer narrows its inbound.
        let own_mesh = "---\napiVersion: meshgate.io/v1\nkind: Service\nmetadata: {name: orders}\nspec: {discovery: {registry: orders}, tls: {mode: mesh}}\n";
        let permissive = format!("{}{own_mesh}", with_mesh("permissive"));
        let permissive = compiled(&permissive, &["users", "orders"]);
        assert_eq!(tls(&permissive, "users"), Disable);
        assert_eq!(inbound(&permissive), [(MeshListener, true)]);
        let per_service = compiled(
            &format!("{}{own_mesh}", with_mesh("perService")),
            &["users", "orders"],
        );
        assert_eq!(inbound(&per_service), [(MeshListener, false)]);

        let strict = with_mesh("strict").replace(", tls: {mode: disable}", "");
        let strict = compiled(&strict, &["users"]);
        assert_eq!(tls(&strict, "users"), Mesh);
        assert_eq!(tls(&strict, "legacy"), Mesh);
        // A Service found otherwise is outside the mesh, and the hop to the own
        // app stays plain.
        assert_eq!(tls(&strict, "maps"), Disable);
        assert_eq!(tls(&strict, "orders"), Disable);
        assert_eq!(inbound(&strict), [(MeshListener, false)]);
    }
}
