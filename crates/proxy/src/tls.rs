//! TLS termination: rustls with SNI certificate choice and ALPN h2/http1.1.

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

fn load(cert: &Certificate) -> Result<Arc<CertifiedKey>, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert.cert_file)
        .map_err(|e| format!("{}: {e}", cert.cert_file.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", cert.cert_file.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "{}: no certificate found",
            cert.cert_file.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&cert.key_file)
        .map_err(|e| format!("{}: {e}", cert.key_file.display()))?;
    let signing = rustls::crypto::aws_lc_rs::sign::any_supported_type(&key)
        .map_err(|e| format!("{}: {e}", cert.key_file.display()))?;
    Ok(Arc::new(CertifiedKey::new(chain, signing)))
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
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
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
