//! Mesh mTLS: the proxy's workload certificate and the TLS configs built on it.
//!
//! The control plane signs a certificate for the proxy's identity (a SPIFFE ID,
//! `spiffe://TRUST_DOMAIN/svc/NAME`) and sends it with the mesh's roots; it is
//! replaced half-way through its life. [`MeshTls`] holds the current one. The TLS
//! configs do not copy it: they read it at each handshake, so a rotation reaches
//! new connections at once and leaves open ones alone.
//!
//! - A `mesh` listener (a sidecar's inbound side) presents the certificate and
//!   requires one from the client, verified against the roots; the client's SPIFFE
//!   ID becomes the request's identity (what `authz` checks).
//! - A Service with `tls.mode: mesh` is called over TLS with the certificate as
//!   the client's, and the server must prove the Service's SPIFFE ID. webpki checks
//!   the chain; the ID is a URI name, which webpki does not match, so it is checked
//!   here after the chain.

use arc_swap::ArcSwapOption;
use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DistinguishedName, Error, SignatureScheme};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, TrustAnchor, UnixTime};
use std::sync::Arc;

/// A certificate as the control plane sends it.
#[derive(Debug, Clone)]
pub struct Material {
    /// PKCS#8 DER.
    pub key: Vec<u8>,
    /// Leaf first (DER).
    pub chain: Vec<Vec<u8>>,
    pub roots: Vec<Vec<u8>>,
    pub spiffe_id: String,
}

/// What a handshake reads: the signing key and chain, the roots, the identity.
#[derive(Debug)]
struct Current {
    key: Arc<CertifiedKey>,
    anchors: Vec<TrustAnchor<'static>>,
    spiffe_id: Arc<str>,
    trust_domain: Arc<str>,
}

/// The proxy's mesh certificate, replaced as the control plane rotates it.
#[derive(Debug, Default)]
pub struct MeshTls {
    current: ArcSwapOption<Current>,
}

/// The signature algorithms certificates and handshakes are checked with.
static ALGORITHMS: std::sync::LazyLock<WebPkiSupportedAlgorithms> =
    std::sync::LazyLock::new(|| {
        rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms
    });

pub(crate) fn algorithms() -> WebPkiSupportedAlgorithms {
    *ALGORITHMS
}

pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

impl MeshTls {
    /// Take a new certificate; new handshakes use it from now on.
    pub fn set(&self, m: Material) -> Result<(), String> {
        let key = PrivateKeyDer::try_from(m.key).map_err(|e| format!("mesh key: {e}"))?;
        let signing = rustls::crypto::aws_lc_rs::sign::any_supported_type(&key)
            .map_err(|e| format!("mesh key: {e}"))?;
        let chain: Vec<CertificateDer<'static>> =
            m.chain.into_iter().map(CertificateDer::from).collect();
        let leaf = chain.first().ok_or("the mesh certificate chain is empty")?;
        let named = spiffe_id(leaf).ok_or("the mesh certificate names no SPIFFE ID")?;
        if named != m.spiffe_id {
            return Err(format!(
                "the mesh certificate names {named}, not {}",
                m.spiffe_id
            ));
        }
        let certified = CertifiedKey::new(chain, signing);
        certified
            .keys_match()
            .map_err(|e| format!("the mesh certificate is not for the key asked with: {e}"))?;
        let mut anchors = Vec::with_capacity(m.roots.len());
        for r in &m.roots {
            let der = CertificateDer::from(r.as_slice());
            let anchor = webpki::anchor_from_trusted_cert(&der)
                .map_err(|e| format!("mesh root: {e}"))?
                .to_owned();
            anchors.push(anchor);
        }
        let trust_domain = trust_domain(&named)
            .ok_or("the mesh certificate's SPIFFE ID has no trust domain")?
            .into();
        self.current.store(Some(Arc::new(Current {
            key: Arc::new(certified),
            anchors,
            spiffe_id: named.into(),
            trust_domain,
        })));
        Ok(())
    }

    /// This proxy's SPIFFE ID, once it has a certificate.
    pub fn spiffe_id(&self) -> Option<Arc<str>> {
        self.current.load().as_ref().map(|c| c.spiffe_id.clone())
    }

    fn now(&self) -> Result<Arc<Current>, Error> {
        self.current
            .load_full()
            .ok_or_else(|| Error::General("this proxy has no mesh certificate yet".into()))
    }

    /// The server config of a `mesh` listener: mTLS with mesh certificates only,
    /// ALPN h2 and http/1.1.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<rustls::ServerConfig>, String> {
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .with_client_cert_verifier(Arc::new(MeshClients(self.clone())))
            .with_cert_resolver(Arc::new(Presented(self.clone())));
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        // Peers are proxies that keep their connections open: no resumption.
        cfg.send_tls13_tickets = 0;
        Ok(Arc::new(cfg))
    }

    /// The client config for calling `service` over mesh mTLS, offering `alpn`.
    pub fn client_config(
        self: &Arc<Self>,
        service: &str,
        alpn: &[u8],
    ) -> Result<Arc<rustls::ClientConfig>, String> {
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(MeshServer {
                mesh: self.clone(),
                service: service.into(),
            }))
            .with_client_cert_resolver(Arc::new(Presented(self.clone())));
        cfg.alpn_protocols = vec![alpn.to_vec()];
        cfg.resumption = rustls::client::Resumption::disabled();
        Ok(Arc::new(cfg))
    }
}

/// The SPIFFE ID a certificate names: its one `spiffe://` URI name.
pub fn spiffe_id(cert: &[u8]) -> Option<String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, cert) = X509Certificate::from_der(cert).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let mut ids = san.value.general_names.iter().filter_map(|n| match n {
        GeneralName::URI(u) if u.starts_with("spiffe://") => Some(*u),
        _ => None,
    });
    let id = ids.next()?;
    // The SPIFFE X.509 profile allows exactly one.
    ids.next().is_none().then(|| id.to_string())
}

/// `spiffe://DOMAIN/...` → `DOMAIN`.
fn trust_domain(id: &str) -> Option<&str> {
    let rest = id.strip_prefix("spiffe://")?;
    let td = rest.split('/').next()?;
    (!td.is_empty()).then_some(td)
}

/// Verify `end_entity` against the mesh roots for `usage`.
fn verify_chain(
    current: &Current,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    usage: webpki::KeyUsage,
) -> Result<(), Error> {
    let cert = webpki::EndEntityCert::try_from(end_entity).map_err(|e| {
        Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
            Arc::new(e),
        )))
    })?;
    cert.verify_for_usage(
        algorithms().all,
        &current.anchors,
        intermediates,
        now,
        usage,
        None,
        None,
    )
    .map(|_| ())
    .map_err(|e| {
        let e = match e {
            webpki::Error::CertExpired { .. } => rustls::CertificateError::Expired,
            webpki::Error::UnknownIssuer => rustls::CertificateError::UnknownIssuer,
            webpki::Error::CertNotValidYet { .. } => rustls::CertificateError::NotValidYet,
            other => rustls::CertificateError::Other(rustls::OtherError(Arc::new(other))),
        };
        Error::InvalidCertificate(e)
    })
}

/// The handshake-signature checks every verifier of ours shares (the mesh ones here,
/// `insecureSkipVerify` upstream TLS): webpki's, with the provider's algorithms.
macro_rules! handshake_signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &rustls_pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(message, cert, dss, &$crate::mesh::algorithms())
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &rustls_pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &$crate::mesh::algorithms())
        }

        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            $crate::mesh::algorithms().supported_schemes()
        }
    };
}
pub(crate) use handshake_signatures;

/// Presents the current certificate, as a server and as a client.
#[derive(Debug)]
struct Presented(Arc<MeshTls>);

impl rustls::server::ResolvesServerCert for Presented {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.current.load().as_ref().map(|c| c.key.clone())
    }
}

impl rustls::client::ResolvesClientCert for Presented {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.0.current.load().as_ref().map(|c| c.key.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// A mesh listener's check of its clients: a chain to the mesh roots.
#[derive(Debug)]
struct MeshClients(Arc<MeshTls>);

impl ClientCertVerifier for MeshClients {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let current = self.0.now()?;
        verify_chain(
            &current,
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
        )?;
        // A mesh certificate always names a SPIFFE ID in this trust domain.
        match spiffe_id(end_entity) {
            Some(id) if trust_domain(&id) == Some(&current.trust_domain) => {
                Ok(ClientCertVerified::assertion())
            }
            _ => Err(Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            )),
        }
    }

    handshake_signatures!();
}

/// A mesh client's check of the server: a chain to the mesh roots naming the
/// called Service's SPIFFE ID.
#[derive(Debug)]
struct MeshServer {
    mesh: Arc<MeshTls>,
    service: Arc<str>,
}

impl ServerCertVerifier for MeshServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let current = self.mesh.now()?;
        verify_chain(
            &current,
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
        )?;
        let want = format!("spiffe://{}/svc/{}", current.trust_domain, self.service);
        match spiffe_id(end_entity) {
            Some(id) if id == want => Ok(ServerCertVerified::assertion()),
            got => Err(Error::General(format!(
                "the peer is {}, not {want}",
                got.as_deref().unwrap_or("no SPIFFE ID")
            ))),
        }
    }

    handshake_signatures!();
}

/// The server name sent in a mesh handshake (nothing checks it: the SPIFFE ID
/// is what is verified).
pub fn server_name(service: &str) -> ServerName<'static> {
    ServerName::try_from(service.to_string())
        .unwrap_or(ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()))
}
