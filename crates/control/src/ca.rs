//! The mesh CA: a root that signs short-lived workload certificates whose only
//! name is a SPIFFE ID (`spiffe://TRUST_DOMAIN/svc/NAME`).
//!
//! The root is made once and kept in the store (so every control plane on one
//! store signs with the same root and a restart keeps it), or loaded from files.
//! Proxies send certificate signing requests: the private keys stay with them. The
//! CA takes only the public key from a request; the identity it certifies is the
//! one the control plane knows the proxy by (its registered service), never a name
//! the request asks for.

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::CertificateSigningRequestDer;
use rustls_pki_types::pem::PemObject as _;
use std::time::{Duration, SystemTime};

/// How long a workload certificate lives unless the control plane is told.
pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);
/// The shortest and longest lifetimes `--mesh-cert-ttl` takes.
pub const MIN_TTL: Duration = Duration::from_secs(2);
pub const MAX_TTL: Duration = Duration::from_secs(30 * 86400);
/// A certificate is valid from this long before it is signed: clocks of the
/// proxies may run a little behind the control plane's.
const BACKDATE: Duration = Duration::from_secs(60);
/// How long a generated root lives.
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 86400);
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// The root certificate and key, as PEM: what the store keeps.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RootPem {
    pub cert: String,
    pub key: String,
}

impl RootPem {
    /// A new self-signed root for `trust_domain`.
    pub fn generate(trust_domain: &str) -> Result<Self, String> {
        let key = KeyPair::generate().map_err(|e| e.to_string())?;
        let mut p = CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name
            .push(DnType::OrganizationName, "meshgate");
        p.distinguished_name.push(
            DnType::CommonName,
            format!("meshgate mesh CA {trust_domain}"),
        );
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = SystemTime::now();
        p.not_before = at(now - BACKDATE)?;
        p.not_after = at(now + ROOT_LIFETIME)?;
        let cert = p.self_signed(&key).map_err(|e| e.to_string())?;
        Ok(Self {
            cert: cert.pem(),
            key: key.serialize_pem(),
        })
    }
}

/// How `meshgate control` runs its CA.
#[derive(Debug, Clone)]
pub struct CaOptions {
    pub trust_domain: String,
    /// Workload certificates' lifetime.
    pub ttl: Duration,
    /// A root from files (`--mesh-ca-cert`, `--mesh-ca-key`); none: the one kept
    /// in the store, made on first use.
    pub root: Option<RootPem>,
}

impl Default for CaOptions {
    fn default() -> Self {
        Self {
            trust_domain: DEFAULT_TRUST_DOMAIN.into(),
            ttl: DEFAULT_TTL,
            root: None,
        }
    }
}

/// The key under which the store keeps the root.
const KEPT: &str = "mesh-ca";

/// The CA `o` describes, its root from files or from `store`.
pub async fn open<S: crate::Store>(store: &S, o: &CaOptions) -> Result<MeshCa, String> {
    let root = match &o.root {
        Some(r) => r.clone(),
        None => {
            let fresh = RootPem::generate(&o.trust_domain)?;
            let fresh = serde_json::to_string(&fresh).map_err(|e| e.to_string())?;
            let kept = store
                .keep(KEPT, fresh)
                .await
                .map_err(|e| format!("cannot keep the mesh CA in the store: {e}"))?;
            serde_json::from_str(&kept).map_err(|e| format!("the stored mesh CA: {e}"))?
        }
    };
    MeshCa::new(&root, &o.trust_domain, o.ttl)
}

/// A signed workload certificate.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The leaf, DER and PEM.
    pub cert: Vec<u8>,
    pub pem: String,
    pub spiffe_id: String,
    pub not_after: SystemTime,
}

pub struct MeshCa {
    issuer: Issuer<'static, KeyPair>,
    /// The root, DER and PEM.
    pub root: Vec<u8>,
    pub root_pem: String,
    pub trust_domain: String,
    pub ttl: Duration,
}

impl std::fmt::Debug for MeshCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshCa")
            .field("trust_domain", &self.trust_domain)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl MeshCa {
    pub fn new(root: &RootPem, trust_domain: &str, ttl: Duration) -> Result<Self, String> {
        check_trust_domain(trust_domain)?;
        let key = KeyPair::from_pem(&root.key).map_err(|e| format!("the CA key: {e}"))?;
        let issuer = Issuer::from_ca_cert_pem(&root.cert, key)
            .map_err(|e| format!("the CA certificate: {e}"))?;
        let der = rustls_pki_types::CertificateDer::from_pem_slice(root.cert.as_bytes())
            .map_err(|e| format!("the CA certificate: {e}"))?;
        Ok(Self {
            issuer,
            root: der.to_vec(),
            root_pem: root.cert.clone(),
            trust_domain: trust_domain.to_string(),
            ttl,
        })
    }

    /// The SPIFFE ID of a service's workloads.
    pub fn service_id(&self, service: &str) -> String {
        format!("spiffe://{}/svc/{service}", self.trust_domain)
    }

    /// The SPIFFE ID of an edge proxy serving `gateway`.
    pub fn gateway_id(&self, gateway: &str) -> String {
        format!("spiffe://{}/gateway/{gateway}", self.trust_domain)
    }

    /// Sign the public key of `csr` (DER) for `spiffe_id`.
    pub fn sign(&self, csr: &[u8], spiffe_id: &str) -> Result<Issued, String> {
        let request = CertificateSigningRequestParams::from_der(
            &CertificateSigningRequestDer::from(csr.to_vec()),
        )
        .map_err(|e| format!("bad certificate signing request: {e}"))?;
        let mut p = CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.subject_alt_names =
            vec![SanType::URI(spiffe_id.try_into().map_err(|_| {
                format!("{spiffe_id:?} is not an IA5 string")
            })?)];
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.use_authority_key_identifier_extension = true;
        let now = SystemTime::now();
        let not_after = now + self.ttl;
        p.not_before = at(now - BACKDATE)?;
        p.not_after = at(not_after)?;
        let mut serial = [0u8; 16];
        serial.iter_mut().for_each(|b| *b = fastrand::u8(..));
        serial[0] &= 0x7f;
        p.serial_number = Some(serial.to_vec().into());
        let signed = CertificateSigningRequestParams {
            params: p,
            public_key: request.public_key,
        }
        .signed_by(&self.issuer)
        .map_err(|e| format!("cannot sign: {e}"))?;
        Ok(Issued {
            cert: signed.der().to_vec(),
            pem: signed.pem(),
            spiffe_id: spiffe_id.to_string(),
            not_after,
        })
    }
}

/// A trust domain is a DNS-like name: lower-case letters, digits, `.`, `-`, `_`.
pub fn check_trust_domain(td: &str) -> Result<(), String> {
    let ok = !td.is_empty()
        && td.len() <= 255
        && td
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "trust domain {td:?}: use lower-case letters, digits, '.', '-' and '_'"
        ))
    }
}

fn at(t: SystemTime) -> Result<time::OffsetDateTime, String> {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_err(|_| "the clock is before 1970".to_string())?
        .as_secs();
    time::OffsetDateTime::from_unix_timestamp(secs as i64).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

    fn ca(ttl: Duration) -> MeshCa {
        let root = RootPem::generate("example.org").unwrap_or_else(|e| panic!("{e}"));
        MeshCa::new(&root, "example.org", ttl).unwrap_or_else(|e| panic!("{e}"))
    }

    fn csr() -> Vec<u8> {
        let key = KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
        let mut p = CertificateParams::default();
        // Whatever the request asks for, the CA names only the identity it chose.
        p.subject_alt_names = vec![SanType::DnsName(
            "evil.example"
                .try_into()
                .unwrap_or_else(|e| panic!("{e:?}")),
        )];
        p.serialize_request(&key)
            .unwrap_or_else(|e| panic!("{e}"))
            .der()
            .to_vec()
    }

    #[test]
    fn signs_only_the_chosen_spiffe_id_for_the_ttl() {
        let ca = ca(Duration::from_secs(60));
        let id = ca.service_id("orders");
        assert_eq!(id, "spiffe://example.org/svc/orders");
        let issued = ca.sign(&csr(), &id).unwrap_or_else(|e| panic!("{e}"));
        let (_, cert) = X509Certificate::from_der(&issued.cert).unwrap_or_else(|e| panic!("{e}"));
        let san = cert
            .subject_alternative_name()
            .ok()
            .flatten()
            .unwrap_or_else(|| panic!("no SAN"));
        let names: Vec<_> = san.value.general_names.iter().collect();
        assert_eq!(
            names,
            vec![&GeneralName::URI("spiffe://example.org/svc/orders")]
        );
        let life = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
        assert_eq!(life, 60 + BACKDATE.as_secs() as i64);
        let (_, root) = X509Certificate::from_der(&ca.root).unwrap_or_else(|e| panic!("{e}"));
        assert!(cert.verify_signature(Some(root.public_key())).is_ok());
    }

    #[test]
    fn refuses_garbage_and_bad_trust_domains() {
        let ca = ca(Duration::from_secs(60));
        assert!(ca.sign(b"not a csr", "spiffe://example.org/svc/x").is_err());
        assert!(check_trust_domain("Example.org").is_err());
        assert!(check_trust_domain("").is_err());
        assert!(check_trust_domain("prod.example-1.org").is_ok());
    }
}
