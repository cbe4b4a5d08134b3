//! rustls configurations for the cluster channel: TLS 1.3 only (RFC 8446),
//! the *ring* provider only, trust rooted in the cluster CA and nothing else
//! (no system roots: a public CA must never be able to vouch for a node).
//!
//! Three configurations:
//!
//! * [`server_config`]: every node's listener. Presents [node cert, CA
//!   cert]. Client certificates are *optional* (RFC 8446 §4.3.2 lets the
//!   server request one and the client send none), because a joining
//!   process has none yet; a client certificate that *is* sent must chain
//!   to the cluster CA, or the handshake fails. Whether an unauthenticated
//!   peer may do anything but join is decided in `tcp.rs`.
//! * [`member_client_config`]: a member dialling node N presents its own
//!   certificate and checks the server's against the CA and the name
//!   `node-N.hamail.cluster` (server name chosen per call), so it talks to
//!   exactly node N and not to any member that happens to answer at the
//!   address.
//! * [`joiner_client_config`]: no client certificate; the server's chain is
//!   checked against the CA whose fingerprint is in the join token (pinned,
//!   like an SSH host key), with the name `member.hamail.cluster`.
//!
//! Session resumption and tickets are off: connections are long-lived and
//! few, and it keeps the byte stream after the handshake free of unsolicited
//! messages. ALPN `hamail-cluster/1` keeps another TLS protocol from being
//! confused with this one.
//!
//! What it does not do: revocation (no CRL/OCSP), hot reload of
//! certificates.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{Resumption, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use sha2::{Digest, Sha256};

use crate::pki::{node_dns_name, NodeCredentials, PkiError, MEMBER_SERVER_NAME};
use crate::types::NodeId;

/// The ALPN protocol id of the cluster channel (RFC 7301).
pub const ALPN_CLUSTER: &[u8] = b"hamail-cluster/1";

/// Why a TLS configuration (or a transport built on one) could not be set
/// up. Always our side: bad credentials on disk, a bad token.
#[derive(Debug, thiserror::Error)]
pub enum TransportSetupError {
    #[error(transparent)]
    Pki(#[from] PkiError),
    /// The PEM given to us does not contain what it should.
    #[error("invalid credentials: {0}")]
    Credentials(String),
    /// rustls refused our configuration (e.g. key does not match cert).
    #[error("TLS configuration rejected: {0}")]
    Tls(#[from] rustls::Error),
    #[error("cannot build certificate verifier: {0}")]
    Verifier(String),
    /// The join token's CA fingerprint is not a SHA-256 hex digest.
    #[error("invalid CA fingerprint {0:?} (expected 64 hex digits)")]
    BadFingerprint(String),
}

/// The one crypto provider of the cluster channel: *ring* (the build must
/// not depend on aws-lc).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, TransportSetupError> {
    let mut reader = pem.as_bytes();
    let certs = rustls_pemfile::certs(&mut reader)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TransportSetupError::Credentials(format!("{what}: unreadable PEM: {e}")))?;
    if certs.is_empty() {
        return Err(TransportSetupError::Credentials(format!("{what}: no certificate in PEM")));
    }
    Ok(certs)
}

fn private_key(pem: &str) -> Result<PrivateKeyDer<'static>, TransportSetupError> {
    let mut reader = pem.as_bytes();
    rustls_pemfile::private_key(&mut reader)
        .map_err(|e| TransportSetupError::Credentials(format!("node key: unreadable PEM: {e}")))?
        .ok_or_else(|| TransportSetupError::Credentials("node key: no private key in PEM".into()))
}

fn ca_roots(creds: &NodeCredentials) -> Result<RootCertStore, TransportSetupError> {
    let mut roots = RootCertStore::empty();
    for cert in certs(&creds.ca_pem, "CA certificate")? {
        roots.add(cert).map_err(|e| TransportSetupError::Credentials(format!("CA certificate: {e}")))?;
    }
    Ok(roots)
}

/// The node's chain: its certificate, then the CA certificate (so a joiner
/// can find the CA it pinned by fingerprint among what the server sends).
fn node_chain(creds: &NodeCredentials) -> Result<Vec<CertificateDer<'static>>, TransportSetupError> {
    let mut chain = certs(&creds.cert_pem, "node certificate")?;
    chain.truncate(1);
    chain.extend(certs(&creds.ca_pem, "CA certificate")?);
    Ok(chain)
}

/// The listener's configuration (see the module docs).
pub fn server_config(creds: &NodeCredentials) -> Result<Arc<ServerConfig>, TransportSetupError> {
    // Fail now, not at the first handshake, if our certificate names no node.
    creds.node_id()?;
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(ca_roots(creds)?), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| TransportSetupError::Verifier(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(node_chain(creds)?, private_key(&creds.key_pem)?)?;
    config.alpn_protocols = vec![ALPN_CLUSTER.to_vec()];
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(Arc::new(config))
}

/// A member's client configuration: verifies the server against the cluster
/// CA (dial with [`member_server_name`]) and presents our certificate.
pub fn member_client_config(creds: &NodeCredentials) -> Result<Arc<ClientConfig>, TransportSetupError> {
    creds.node_id()?;
    let mut chain = certs(&creds.cert_pem, "node certificate")?;
    chain.truncate(1);
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(ca_roots(creds)?)
        .with_client_auth_cert(chain, private_key(&creds.key_pem)?)?;
    config.alpn_protocols = vec![ALPN_CLUSTER.to_vec()];
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

/// The server name a member checks when dialling node `id`. Never
/// loosened to a shared name: this check is what makes "node 3" mean the
/// holder of node 3's certificate.
pub fn member_server_name(id: NodeId) -> Result<ServerName<'static>, TransportSetupError> {
    ServerName::try_from(node_dns_name(id))
        .map_err(|e| TransportSetupError::Verifier(format!("server name for node {id}: {e}")))
}

/// The server name a joiner checks (in every node certificate).
pub fn joiner_server_name() -> Result<ServerName<'static>, TransportSetupError> {
    ServerName::try_from(MEMBER_SERVER_NAME)
        .map_err(|e| TransportSetupError::Verifier(format!("joiner server name: {e}")))
}

/// A joiner's client configuration: no client certificate, the server
/// verified against the CA pinned by `ca_fingerprint` (dial with
/// [`joiner_server_name`]).
pub fn joiner_client_config(ca_fingerprint: &str) -> Result<Arc<ClientConfig>, TransportSetupError> {
    let mut fingerprint = [0u8; 32];
    hex::decode_to_slice(ca_fingerprint.trim(), &mut fingerprint)
        .map_err(|_| TransportSetupError::BadFingerprint(ca_fingerprint.to_string()))?;
    let provider = provider();
    let verifier = Arc::new(PinnedCaVerifier { fingerprint, provider: provider.clone() });
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_CLUSTER.to_vec()];
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

/// The node id of a verified peer, from the end-entity certificate of the
/// chain rustls verified (`None` if the peer sent no certificate).
pub fn peer_node_id(peer_certificates: Option<&[CertificateDer<'_>]>) -> Result<Option<NodeId>, PkiError> {
    match peer_certificates.and_then(|c| c.first()) {
        None => Ok(None),
        Some(cert) => crate::pki::node_id_from_cert_der(cert.as_ref()).map(Some),
    }
}

/// Verifies a server for a joiner: trust only the certificate, among those
/// the server presented, whose SHA-256 is the pinned fingerprint, and
/// verify the end-entity certificate against it as the *only* root, with
/// the ordinary WebPKI checks (signature chain, validity dates, serverAuth
/// EKU, name) delegated to rustls' own verifier. If no presented
/// certificate matches, the server is not a member of the token's cluster.
#[derive(Debug)]
struct PinnedCaVerifier {
    fingerprint: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let pinned = intermediates
            .iter()
            .find(|c| Sha256::digest(c.as_ref()).as_slice() == self.fingerprint)
            .ok_or(rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer))?;
        let mut roots = RootCertStore::empty();
        roots
            .add(pinned.clone().into_owned())
            .map_err(|_| rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding))?;
        let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(format!("pinned CA verifier: {e}")))?;
        inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}
