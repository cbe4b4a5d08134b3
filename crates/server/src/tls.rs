//! TLS for STARTTLS/STLS and the implicit-TLS ports (rustls, ring provider).
//!
//! With no certificate configured, a self-signed one is generated once
//! under `<data_dir>/tls/` and reused, so STARTTLS always works out of the
//! box (clients that verify will of course refuse it: the log says where it
//! is and how to configure a real one).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::config::Config;
use crate::ServerError;

/// Builds the acceptor from the configured files, or from a generated
/// self-signed certificate.
pub fn acceptor(config: &Config) -> Result<TlsAcceptor, ServerError> {
    let (cert_path, key_path) = match (&config.tls.cert, &config.tls.key) {
        (Some(c), Some(k)) => (c.clone(), k.clone()),
        _ => self_signed(&config.server.data_dir.join("tls"), &config.server.hostname)?,
    };
    let certs = load_certs(&cert_path)?;
    let key = load_key(&key_path)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ServerError::Tls(format!("protocol versions: {e}")))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| ServerError::Tls(format!("{} / {}: {e}", cert_path.display(), key_path.display())))?;
    Ok(TlsAcceptor::from(Arc::new(server)))
}

fn self_signed(dir: &Path, hostname: &str) -> Result<(PathBuf, PathBuf), ServerError> {
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    if cert.exists() && key.exists() {
        return Ok((cert, key));
    }
    std::fs::create_dir_all(dir).map_err(|e| ServerError::io(format!("creating {}", dir.display()), e))?;
    let generated =
        generate(hostname).map_err(|e| ServerError::Tls(format!("generating a self-signed certificate: {e}")))?;
    write_private(&key, generated.key_pair.serialize_pem().as_bytes())?;
    std::fs::write(&cert, generated.cert.pem())
        .map_err(|e| ServerError::io(format!("writing {}", cert.display()), e))?;
    tracing::warn!(
        cert = %cert.display(),
        key = %key.display(),
        "no TLS certificate configured: generated a self-signed one for {hostname}; set [tls] cert and key for a real one"
    );
    Ok((cert, key))
}

/// A self-signed certificate for `hostname`: its CN, and its first subject
/// alternative name (RFC 6125 6.4.4: clients match the SAN, older ones the
/// CN), then `localhost`.
fn generate(hostname: &str) -> Result<rcgen::CertifiedKey, rcgen::Error> {
    let mut params = rcgen::CertificateParams::new(vec![hostname.to_string(), "localhost".to_string()])?;
    let mut name = rcgen::DistinguishedName::new();
    name.push(rcgen::DnType::CommonName, hostname);
    params.distinguished_name = name;
    let key_pair = rcgen::KeyPair::generate()?;
    let cert = params.self_signed(&key_pair)?;
    Ok(rcgen::CertifiedKey { cert, key_pair })
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), ServerError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| ServerError::io(format!("writing {}", path.display()), e))?;
    f.write_all(bytes).map_err(|e| ServerError::io(format!("writing {}", path.display()), e))
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, ServerError> {
    let data =
        std::fs::read(path).map_err(|e| ServerError::io(format!("reading certificate {}", path.display()), e))?;
    let certs: Result<Vec<_>, _> = rustls_pemfile::certs(&mut data.as_slice()).collect();
    let certs = certs.map_err(|e| ServerError::Tls(format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(ServerError::Tls(format!("{}: no PEM certificate found", path.display())));
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, ServerError> {
    let data = std::fs::read(path).map_err(|e| ServerError::io(format!("reading key {}", path.display()), e))?;
    rustls_pemfile::private_key(&mut data.as_slice())
        .map_err(|e| ServerError::Tls(format!("{}: {e}", path.display())))?
        .ok_or_else(|| ServerError::Tls(format!("{}: no PEM private key found", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_once_and_reuses() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::default();
        config.server.data_dir = dir.path().to_path_buf();
        acceptor(&config).unwrap();
        let first = std::fs::read(dir.path().join("tls/cert.pem")).unwrap();
        acceptor(&config).unwrap();
        let second = std::fs::read(dir.path().join("tls/cert.pem")).unwrap();
        assert_eq!(first, second);
    }

    #[test]
    fn missing_file_is_a_clear_error() {
        let mut config = Config::default();
        config.tls.cert = Some("/nonexistent/c.pem".into());
        config.tls.key = Some("/nonexistent/k.pem".into());
        let err = acceptor(&config).err().unwrap().to_string();
        assert!(err.contains("/nonexistent/c.pem"), "{err}");
    }
}
