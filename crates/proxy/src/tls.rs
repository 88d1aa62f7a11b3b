//! TLS termination (rustls with SNI certificate choice and ALPN h2/http1.1), and TLS
//! to upstreams outside the mesh (`tls: {mode: simple}`).

use meshgate_config::Certificate;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::collections::HashMap;
use std::sync::Arc;

/// Picks a certificate by SNI: exact name, then the longest `*.suffix`, then the
/// default (the first certificate without hosts, or the first one).
#[derive(Debug)]
struct SniResolver {
    exact: HashMap<String, Arc<CertifiedKey>>,
    wildcard: Vec<(String, Arc<CertifiedKey>)>,
    default: Arc<CertifiedKey>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let Some(name) = hello.server_name() else {
            return Some(self.default.clone());
        };
        let name = name.to_ascii_lowercase();
        if let Some(k) = self.exact.get(&name) {
            return Some(k.clone());
        }
        self.wildcard
            .iter()
            .find(|(suffix, _)| name.len() > suffix.len() && name.ends_with(suffix.as_str()))
            .map(|(_, k)| k.clone())
            .or_else(|| Some(self.default.clone()))
    }
}

/// The certificate chain in a PEM file; at least one certificate.
fn chain(file: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(file)
        .map_err(|e| format!("{}: {e}", file.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", file.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: no certificate found", file.display()));
    }
    Ok(chain)
}

fn load(cert: &Certificate) -> Result<Arc<CertifiedKey>, String> {
    let key = load_key(&cert.key_file)?;
    let signing = rustls::crypto::aws_lc_rs::sign::any_supported_type(&key)
        .map_err(|e| format!("{}: {e}", cert.key_file.display()))?;
    Ok(Arc::new(CertifiedKey::new(
        chain(&cert.cert_file)?,
        signing,
    )))
}

/// Build the server config for an https listener.
pub fn server_config(certs: &[Certificate]) -> Result<Arc<rustls::ServerConfig>, String> {
    let mut exact = HashMap::new();
    let mut wildcard = Vec::new();
    let mut default = None;
    for c in certs {
        let key = load(c)?;
        if c.hosts.is_empty() && default.is_none() {
            default = Some(key.clone());
        }
        for h in &c.hosts {
            match h.strip_prefix('*') {
                Some(suffix) => wildcard.push((suffix.to_string(), key.clone())),
                None => {
                    exact.insert(h.clone(), key.clone());
                }
            }
        }
        if default.is_none() {
            default = Some(key);
        }
    }
    wildcard.sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
    let default = default.ok_or("no certificate")?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(crate::mesh::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SniResolver {
            exact,
            wildcard,
            default,
        }));
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// The system's trust store, read once (it is a few hundred files).
fn system_roots() -> Result<Arc<rustls::RootCertStore>, String> {
    static ROOTS: std::sync::OnceLock<Result<Arc<rustls::RootCertStore>, String>> =
        std::sync::OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            for e in &found.errors {
                tracing::warn!(error = %e, "skipped part of the system trust store");
            }
            let mut roots = rustls::RootCertStore::empty();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err("the system trust store has no certificates: give tls.caFile".into());
            }
            Ok(Arc::new(roots))
        })
        .clone()
}

fn roots_from(file: &std::path::Path) -> Result<Arc<rustls::RootCertStore>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in chain(file)? {
        roots
            .add(cert)
            .map_err(|e| format!("{}: {e}", file.display()))?;
    }
    Ok(Arc::new(roots))
}

/// The client config for a Service with `tls: {mode: simple}`, offering `alpn`.
pub fn upstream_config(
    t: &meshgate_config::SimpleTls,
    alpn: &[u8],
) -> Result<Arc<rustls::ClientConfig>, String> {
    let builder = rustls::ClientConfig::builder_with_provider(crate::mesh::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = if t.insecure_skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate))
    } else {
        let roots = match &t.ca_file {
            Some(f) => roots_from(f)?,
            None => system_roots()?,
        };
        builder.with_root_certificates(roots)
    };
    let mut cfg = match &t.client_cert {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(chain(cert)?, load_key(key)?)
            .map_err(|e| format!("{}: {e}", cert.display()))?,
    };
    cfg.alpn_protocols = vec![alpn.to_vec()];
    Ok(Arc::new(cfg))
}

fn load_key(file: &std::path::Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(file).map_err(|e| format!("{}: {e}", file.display()))
}

/// `insecureSkipVerify`: any certificate is taken, but the handshake signatures
/// are still checked (the peer holds the key of the certificate it sent).
#[derive(Debug)]
struct AnyCertificate;

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    crate::mesh::handshake_signatures!();
}
