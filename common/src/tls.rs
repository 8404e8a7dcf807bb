//! TLS for the walship wire, with rustls (no OpenSSL).
//!
//! - The sender presents `--tls-cert`/`--tls-key`; with `--tls-client-ca` it also requires a
//!   client certificate signed by that CA.
//! - The receiver verifies the sender's certificate against `--tls-ca` and the host name it
//!   connects to, and may present its own certificate for mutual TLS.
//!
//! Both sides use rustls' safe defaults (TLS 1.2 and 1.3, ring's cipher suites). Errors are
//! translated into sentences an operator can act on by [`explain`].

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use tokio::io::{AsyncRead, AsyncWrite};

/// The first byte of every TLS connection (a handshake record). A walship frame starts with
/// `W`, so one peeked byte tells a TLS client from a plaintext one.
pub const TLS_HANDSHAKE_BYTE: u8 = 0x16;

/// A TLS file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{what} {path} holds no usable PEM {expected}: {why}")]
    Pem {
        what: &'static str,
        path: PathBuf,
        expected: &'static str,
        why: String,
    },
    #[error("TLS setup failed: {0}")]
    Setup(String),
}

/// A reading half of a connection, plain or TLS.
pub type Reader = Box<dyn AsyncRead + Send + Unpin>;
/// A writing half of a connection, plain or TLS.
pub type Writer = Box<dyn AsyncWrite + Send + Unpin>;

/// Splits any stream into boxed halves, so that the protocol code does not care whether it
/// runs over TLS.
pub fn split<S: AsyncRead + AsyncWrite + Send + Unpin + 'static>(s: S) -> (Reader, Writer) {
    let (r, w) = tokio::io::split(s);
    (Box::new(r), Box::new(w))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

/// Loads every certificate in a PEM file; there must be at least one.
pub fn load_certs(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(what, path)?;
    let pem_err = |why: String| TlsError::Pem {
        what,
        path: path.to_owned(),
        expected: "certificate",
        why,
    };
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(pem_err("no CERTIFICATE block found".into()));
    }
    Ok(certs)
}

/// Loads the first private key (PKCS#8, PKCS#1 or SEC1) in a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read("private key", path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| TlsError::Pem {
        what: "private key",
        path: path.to_owned(),
        expected: "private key",
        why: e.to_string(),
    })
}

fn roots(what: &'static str, path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(what, path)? {
        roots.add(cert).map_err(|e| TlsError::Pem {
            what,
            path: path.to_owned(),
            expected: "CA certificate",
            why: e.to_string(),
        })?;
    }
    Ok(roots)
}

/// The sender's TLS settings: its certificate and key, and the CA that signs receivers'
/// certificates when client certificates are required.
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = load_certs("certificate", cert)?;
    let key_path = key;
    let key = load_key(key)?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Setup(e.to_string()))?;
    let builder = match client_ca {
        Some(ca) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots("client CA", ca)?),
                provider(),
            )
            .build()
            .map_err(|e| TlsError::Setup(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let cfg = builder.with_single_cert(certs, key).map_err(|e| {
        TlsError::Setup(format!(
            "cannot use certificate {} with key {}: {e} (X.509 v3 certificates are required)",
            cert.display(),
            key_path.display()
        ))
    })?;
    Ok(Arc::new(cfg))
}

/// The receiver's TLS settings: the CA that signs the sender's certificate, and optionally
/// the receiver's own certificate and key for mutual TLS.
pub fn client_config(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Setup(e.to_string()))?
        .with_root_certificates(roots("CA", ca)?);
    let cfg = match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(load_certs("certificate", cert)?, load_key(key)?)
            .map_err(|e| {
                TlsError::Setup(format!(
                    "cannot use certificate {} with key {}: {e} (X.509 v3 certificates are required)",
                    cert.display(),
                    key.display()
                ))
            })?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(cfg))
}

/// The host part of `HOST:PORT` (brackets of an IPv6 literal removed).
pub fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

/// The rustls error `e` is or wraps, if any.
fn find_rustls<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(t) = err.downcast_ref::<rustls::Error>() {
            return Some(t);
        }
        // io::Error (and FrameError, which wraps it transparently) skips the error it
        // wraps when asked for its source, so look inside.
        let io = match err.downcast_ref::<crate::frame::FrameError>() {
            Some(crate::frame::FrameError::Io(io)) => Some(io),
            _ => err.downcast_ref::<io::Error>(),
        };
        if let Some(t) = io
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(t);
        }
        cur = err.source();
    }
    None
}

/// If `e` (or what it wraps) is a TLS error, says in words what went wrong and what to do.
/// `peer` names the other side ("the sender", "the receiver").
pub fn explain(e: &(dyn std::error::Error + 'static), peer: &str) -> Option<String> {
    find_rustls(e).map(|t| explain_rustls(t, peer))
}

/// Whether `e` is a TLS error that retrying cannot fix: a certificate refused by either
/// side, or a peer that does not speak TLS. Damaged records (a bad MAC) are not: they are
/// retried like any other broken connection.
pub fn is_configuration_error(e: &(dyn std::error::Error + 'static)) -> bool {
    use rustls::AlertDescription as A;
    match find_rustls(e) {
        Some(rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented) => true,
        Some(rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. }) => true,
        Some(rustls::Error::AlertReceived(a)) => matches!(
            a,
            A::BadCertificate
                | A::UnsupportedCertificate
                | A::CertificateRevoked
                | A::CertificateExpired
                | A::CertificateUnknown
                | A::UnknownCA
                | A::AccessDenied
                | A::CertificateRequired
                | A::HandshakeFailure
        ),
        _ => false,
    }
}

fn explain_rustls(e: &rustls::Error, peer: &str) -> String {
    use rustls::Error as E;
    match e {
        E::InvalidCertificate(c) => {
            let what = match c {
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    "has expired".to_owned()
                }
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                    "is not valid yet".to_owned()
                }
                CertificateError::UnknownIssuer => {
                    "is not signed by a trusted CA (check the CA file)".to_owned()
                }
                CertificateError::NotValidForNameContext { expected, presented } => format!(
                    "does not name the host that was connected to: it is for {}, not {} (connect by a name the certificate carries, or give --tls-server-name)",
                    presented.join(", "),
                    expected.to_str()
                ),
                CertificateError::NotValidForName => {
                    "does not name the host that was connected to (give --tls-server-name if it is known by another name)".to_owned()
                }
                CertificateError::BadSignature => "has a bad signature".to_owned(),
                CertificateError::Revoked => "is revoked".to_owned(),
                other => format!("was rejected ({other:?})"),
            };
            format!("TLS: {peer}'s certificate {what}")
        }
        E::NoCertificatesPresented => {
            format!("TLS: {peer} presented no certificate, but one is required")
        }
        E::AlertReceived(alert) => {
            use rustls::AlertDescription as A;
            let why = match alert {
                A::CertificateRequired => {
                    "it requires a client certificate (give --tls-cert and --tls-key)".to_owned()
                }
                A::UnknownCA => {
                    "it does not trust the CA that signed this side's certificate".to_owned()
                }
                A::CertificateExpired => "it says this side's certificate has expired".to_owned(),
                A::BadCertificate | A::CertificateUnknown | A::UnsupportedCertificate => {
                    "it rejected this side's certificate".to_owned()
                }
                other => format!("alert {other:?}"),
            };
            format!("TLS: {peer} refused the connection: {why}")
        }
        E::InvalidMessage(_) | E::InappropriateMessage { .. } => format!(
            "TLS: {peer} did not speak TLS ({e}); check that both sides are configured for TLS"
        ),
        other => format!("TLS: {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_of_strips_port_and_brackets() {
        assert_eq!(host_of("db1.example.com:7432"), "db1.example.com");
        assert_eq!(host_of("127.0.0.1:7432"), "127.0.0.1");
        assert_eq!(host_of("[::1]:7432"), "::1");
        assert_eq!(host_of("localhost"), "localhost");
    }

    #[test]
    fn missing_and_empty_files_are_named() {
        let dir = std::env::temp_dir().join(format!("walship-tls-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        fs::write(&empty, b"").unwrap();
        let e = load_certs("certificate", &dir.join("absent.pem")).unwrap_err();
        assert!(e.to_string().contains("absent.pem"), "{e}");
        let e = load_certs("certificate", &empty).unwrap_err();
        assert!(e.to_string().contains("no CERTIFICATE"), "{e}");
        let e = load_key(&empty).unwrap_err();
        assert!(e.to_string().contains("private key"), "{e}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
