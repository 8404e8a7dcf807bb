//! Connecting to PostgreSQL as libpq does: sockets, TLS by `sslmode`, passwords, and what a
//! failure means.
//!
//! - [`open`] connects to one [`Target`]: a Unix socket (never TLS, as libpq), or TCP with
//!   PostgreSQL's SSLRequest and then rustls, checking the server's certificate as
//!   `sslmode` says. The replication client and the SQL session share it.
//! - [`connect_sql`] opens an SQL session with tokio-postgres over such a stream.
//! - [`setup_problem`] tells an error that retrying cannot fix (a password, a grant, a
//!   setting) from one that may pass (a server starting, a network cut), and what to do
//!   about it.
//!
//! `sslmode` as libpq has it: `disable` never uses TLS; `prefer` uses it when the server
//! offers it; `require` insists on it; `verify-ca` also checks that the server's
//! certificate chains to `sslrootcert`, and `verify-full` that it names the host as well.
//! When a root certificate file is there (`sslrootcert`, or `~/.postgresql/root.crt`),
//! `prefer` and `require` check the chain too, as libpq does.

use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use crate::conninfo::{Host, Settings, SslMode, Target};
use crate::tls;

/// A stream to PostgreSQL, plain or TLS.
pub trait PgIo: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> PgIo for T {}
pub type PgStream = Box<dyn PgIo>;

/// PostgreSQL's SSLRequest code.
const SSL_REQUEST: i32 = 80877103;

/// An error PostgreSQL reported (ErrorResponse), with its SQLSTATE.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{severity}: {message} (SQLSTATE {code})")]
pub struct PgError {
    pub severity: String,
    pub code: String,
    pub message: String,
}

/// A problem on this side that retrying cannot fix. The message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("PostgreSQL at {target} asks for the password of user \"{user}\" and none was found: {sources}")]
    NoPassword {
        target: String,
        user: String,
        sources: String,
    },
    #[error("PostgreSQL at {target} does not accept TLS, and sslmode={mode} requires it: turn ssl on in the server's postgresql.conf, or choose another sslmode")]
    TlsRefused { target: String, mode: &'static str },
    #[error("{0}")]
    Tls(String),
}

/// A connection to PostgreSQL that failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    Setup(#[from] SetupError),
    /// The server refused (an ErrorResponse during start-up).
    #[error("PostgreSQL at {target}")]
    Server {
        target: String,
        #[source]
        error: PgError,
    },
    /// The TLS handshake failed; `permanent` when a certificate or the configuration is
    /// at fault rather than the network.
    #[error("TLS with PostgreSQL at {target}: {text}")]
    Tls {
        target: String,
        text: String,
        permanent: bool,
    },
    #[error("connect to PostgreSQL at {target}")]
    Io {
        target: String,
        #[source]
        source: std::io::Error,
    },
    #[error("connecting to PostgreSQL at {target} timed out after {after:?}")]
    Timeout {
        target: String,
        after: std::time::Duration,
    },
    #[error("PostgreSQL at {target}: {text}")]
    Other { target: String, text: String },
}

/// Connects to `target`: a Unix socket as it is, TCP with TLS as `sslmode` says.
pub async fn open(settings: &Settings, target: &Target) -> Result<PgStream, ConnectError> {
    let io = |source| ConnectError::Io {
        target: target.to_string(),
        source,
    };
    let host = match &target.host {
        Host::Unix(dir) => {
            let path = dir.join(format!(".s.PGSQL.{}", target.port));
            return Ok(Box::new(UnixStream::connect(&path).await.map_err(io)?));
        }
        Host::Tcp(h) => h,
    };
    let tcp = || async {
        let sock = match target.hostaddr {
            Some(a) => TcpStream::connect((a, target.port)).await,
            None => TcpStream::connect((host.as_str(), target.port)).await,
        }?;
        sock.set_nodelay(true)?;
        Ok::<_, std::io::Error>(sock)
    };
    let mut sock = tcp().await.map_err(io)?;
    if settings.sslmode == SslMode::Disable {
        return Ok(Box::new(sock));
    }
    let config = tls_config(settings)?;
    let mut request = [0u8; 8];
    request[..4].copy_from_slice(&8i32.to_be_bytes());
    request[4..].copy_from_slice(&SSL_REQUEST.to_be_bytes());
    sock.write_all(&request).await.map_err(io)?;
    let mut answer = [0u8; 1];
    sock.read_exact(&mut answer).await.map_err(io)?;
    match answer[0] {
        b'S' => {}
        b'N' if settings.sslmode.requires_tls() => {
            return Err(SetupError::TlsRefused {
                target: target.to_string(),
                mode: settings.sslmode.as_str(),
            }
            .into())
        }
        b'N' => return Ok(Box::new(sock)),
        other => {
            return Err(ConnectError::Other {
                target: target.to_string(),
                text: format!("unexpected answer {other:#04x} to the TLS request"),
            })
        }
    }
    let name = server_name(host, settings.sslmode)?;
    match tokio_rustls::TlsConnector::from(config)
        .connect(name, sock)
        .await
    {
        Ok(s) => Ok(Box::new(s)),
        // As libpq: with prefer, a connection whose TLS handshake fails is made again
        // without TLS (the server's pg_hba.conf then decides whether that is allowed).
        Err(e) if settings.sslmode == SslMode::Prefer => {
            let why = tls_failure(e, settings, target, host);
            tracing::warn!(
                target = %target,
                "TLS with PostgreSQL failed ({why}); sslmode=prefer: connecting without TLS"
            );
            Ok(Box::new(tcp().await.map_err(io)?))
        }
        Err(e) => Err(tls_failure(e, settings, target, host)),
    }
}

/// The name the certificate must carry. Only `verify-full` checks it; for the other modes
/// a host that is no valid name is given as an address (which sends no SNI).
fn server_name(host: &str, mode: SslMode) -> Result<ServerName<'static>, SetupError> {
    match ServerName::try_from(host.to_owned()) {
        Ok(n) => Ok(n),
        Err(_) if mode != SslMode::VerifyFull => {
            Ok(ServerName::from(IpAddr::V4(Ipv4Addr::UNSPECIFIED)))
        }
        Err(e) => Err(SetupError::Tls(format!(
            "sslmode=verify-full: the host {host:?} cannot be checked against a certificate ({e})"
        ))),
    }
}

fn tls_failure(
    e: std::io::Error,
    settings: &Settings,
    target: &Target,
    host: &str,
) -> ConnectError {
    let permanent = tls::is_configuration_error(&e);
    let inner = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>());
    let root = settings
        .sslrootcert
        .as_ref()
        .map_or_else(|| "sslrootcert".to_owned(), |p| p.display().to_string());
    let text = match inner {
        Some(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)) => format!(
            "the server's certificate is not signed by a CA in {root}: give the CA that signs it as sslrootcert"
        ),
        Some(rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        )) => format!(
            "the server's certificate does not name the host {host} (sslmode=verify-full checks it): connect by a name the certificate carries, or use sslmode=verify-ca"
        ),
        _ => tls::explain(&e, "PostgreSQL").unwrap_or_else(|| e.to_string()),
    };
    if inner.is_none() && !permanent {
        return ConnectError::Io {
            target: target.to_string(),
            source: e,
        };
    }
    ConnectError::Tls {
        target: target.to_string(),
        text,
        permanent,
    }
}

/// The rustls settings for `settings`' sslmode, root certificate and client certificate.
fn tls_config(settings: &Settings) -> Result<Arc<ClientConfig>, SetupError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = match &settings.sslrootcert {
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in tls::load_certs("root certificate (sslrootcert)", path)
                .map_err(|e| SetupError::Tls(e.to_string()))?
            {
                roots.add(cert).map_err(|e| {
                    SetupError::Tls(format!(
                        "sslrootcert {}: not a usable CA certificate: {e}",
                        path.display()
                    ))
                })?;
            }
            Some(Arc::new(roots))
        }
        None if matches!(settings.sslmode, SslMode::VerifyCa | SslMode::VerifyFull) => {
            return Err(SetupError::Tls(format!(
                "sslmode={} checks the server's certificate, but there is no root certificate: give the CA that signs it as sslrootcert=FILE (or put it in ~/.postgresql/root.crt), or use sslmode=require to encrypt without checking",
                settings.sslmode.as_str()
            )))
        }
        None => None,
    };
    let verifier = Verifier {
        roots,
        check_name: settings.sslmode == SslMode::VerifyFull,
        algorithms: provider.signature_verification_algorithms,
    };
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| SetupError::Tls(format!("TLS setup failed: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    let config = match (&settings.sslcert, &settings.sslkey) {
        (Some(cert), Some(key)) => {
            check_key_file(key)?;
            let certs = tls::load_certs("client certificate (sslcert)", cert)
                .map_err(|e| SetupError::Tls(e.to_string()))?;
            let key_der = tls::load_key(key).map_err(|e| SetupError::Tls(e.to_string()))?;
            builder.with_client_auth_cert(certs, key_der).map_err(|e| {
                SetupError::Tls(format!(
                    "cannot use sslcert {} with sslkey {}: {e}",
                    cert.display(),
                    key.display()
                ))
            })?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// libpq's check of a private key file: no access for the group or others when it is the
/// user's own, read access at most for the group when root owns it.
fn check_key_file(key: &Path) -> Result<(), SetupError> {
    let meta = std::fs::metadata(key)
        .map_err(|e| SetupError::Tls(format!("cannot read sslkey {}: {e}", key.display())))?;
    let mode = meta.mode();
    let own = meta.uid() == nix::unistd::geteuid().as_raw();
    if (own && mode & 0o077 != 0) || (meta.uid() == 0 && mode & 0o037 != 0) {
        return Err(SetupError::Tls(format!(
            "private key file {} has group or world access; permissions should be u=rw (0600) or less if it is yours, or u=rw,g=r (0640) or less if root owns it",
            key.display()
        )));
    }
    Ok(())
}

/// Checks the server's certificate as the sslmode says: against `roots` when there are
/// any (else not at all, for `prefer` and `require` without a root certificate), and its
/// name only for `verify-full`. The handshake's signatures are always checked.
#[derive(Debug)]
struct Verifier {
    roots: Option<Arc<RootCertStore>>,
    check_name: bool,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(roots) = &self.roots else {
            return Ok(ServerCertVerified::assertion());
        };
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        if self.check_name {
            rustls::client::verify_server_name(&cert, server_name)?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// An SQL session: the client, and the task that drives its connection (abort it, or
/// drop the client and await it, to close the session).
pub type SqlSession = (tokio_postgres::Client, tokio::task::JoinHandle<()>);

/// Opens an SQL session to the first of `settings`' hosts that accepts one, on the
/// string's `dbname`, else `PGDATABASE`, else `default_dbname`.
pub async fn connect_sql(
    settings: &Settings,
    default_dbname: &str,
    application_name: Option<&str>,
) -> Result<SqlSession, ConnectError> {
    let dbname = settings.dbname.as_deref().unwrap_or(default_dbname);
    let mut last = None;
    for target in &settings.targets {
        let attempt = async {
            let stream = open(settings, target).await?;
            let password = settings.password(target, dbname);
            let mut cfg = tokio_postgres::Config::new();
            cfg.user(&settings.user)
                .dbname(dbname)
                .ssl_mode(tokio_postgres::config::SslMode::Disable);
            if let Some(p) = &password {
                cfg.password(p.as_bytes());
            }
            if let Some(a) = application_name.or(settings.application_name.as_deref()) {
                cfg.application_name(a);
            }
            if let Some(o) = &settings.options {
                cfg.options(o);
            }
            let (client, conn) = cfg
                .connect_raw(stream, tokio_postgres::NoTls)
                .await
                .map_err(|e| sql_error(e, settings, target, password.is_none()))?;
            let task = tokio::spawn(async move {
                let _ = conn.await;
            });
            Ok::<_, ConnectError>((client, task))
        };
        match tokio::time::timeout(settings.connect_timeout, attempt).await {
            Ok(Ok(session)) => return Ok(session),
            Ok(Err(e)) => last = Some(e),
            Err(_) => {
                last = Some(ConnectError::Timeout {
                    target: target.to_string(),
                    after: settings.connect_timeout,
                })
            }
        }
    }
    Err(last.unwrap_or_else(|| ConnectError::Other {
        target: settings.to_string(),
        text: "no host to connect to".into(),
    }))
}

fn sql_error(
    e: tokio_postgres::Error,
    settings: &Settings,
    target: &Target,
    no_password: bool,
) -> ConnectError {
    if let Some(db) = e.as_db_error() {
        return ConnectError::Server {
            target: target.to_string(),
            error: PgError {
                severity: db.severity().to_owned(),
                code: db.code().code().to_owned(),
                message: db.message().to_owned(),
            },
        };
    }
    // tokio-postgres says "password missing" (a configuration error) when the server asks
    // for a password it was not given; it was given none exactly when none was found.
    if no_password
        && std::error::Error::source(&e).is_some_and(|s| s.to_string() == "password missing")
    {
        return SetupError::NoPassword {
            target: target.to_string(),
            user: settings.user.clone(),
            sources: settings.password_sources(),
        }
        .into();
    }
    ConnectError::Other {
        target: target.to_string(),
        text: e.to_string(),
    }
}

/// What to do about an SQLSTATE that retrying cannot fix; `None` for the others.
/// `55000` (object not in prerequisite state) is not among them: it means a setting only
/// where a slot is created (`wal_level`, `max_replication_slots`), which the caller knows.
pub fn sqlstate_fix(code: &str) -> Option<&'static str> {
    Some(match code {
        "28P01" => "check the role's password: walship takes it from the connection string's password, from PGPASSWORD, or from the password file (passfile, PGPASSFILE or ~/.pgpass), as libpq does",
        "28000" => "check pg_hba.conf (it needs a line for this role, from this host, for the replication connection and for the SQL session's database) and that the role exists and may log in",
        "3D000" => "give an existing database as dbname in the connection string (without one walship uses postgres)",
        "42501" => "grant the role what the README lists: the REPLICATION attribute, and for snapshots EXECUTE on pg_backup_start and pg_backup_stop and the pg_read_all_settings role (or give wal-sender --pgdata)",
        "53300" => "raise max_wal_senders on the primary (above 0 it needs wal_level = replica or logical), or max_connections if that is the limit, and restart it: each receiver needs a replication connection",
        "53400" => "raise max_replication_slots on the primary, or drop slots no longer used: each receiver needs its slot walship_NAME",
        "42883" => "walship needs PostgreSQL 15 or later",
        _ => return None,
    })
}

/// If `e`, or an error it wraps, is one that retrying cannot fix, what to do about it
/// (empty when the message already says).
pub fn setup_problem(e: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(c) = err.downcast_ref::<ConnectError>() {
            match c {
                ConnectError::Setup(_) => return Some(""),
                // The message says what is wrong with which certificate.
                ConnectError::Tls {
                    permanent: true, ..
                } => return Some(""),
                _ => {}
            }
        }
        if err.is::<SetupError>() {
            return Some("");
        }
        if let Some(fix) = err
            .downcast_ref::<PgError>()
            .and_then(|p| sqlstate_fix(&p.code))
        {
            return Some(fix);
        }
        if let Some(fix) = err
            .downcast_ref::<tokio_postgres::Error>()
            .and_then(|t| t.as_db_error())
            .and_then(|d| sqlstate_fix(d.code().code()))
        {
            return Some(fix);
        }
        cur = err.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pg(code: &str) -> PgError {
        PgError {
            severity: "FATAL".into(),
            code: code.into(),
            message: "m".into(),
        }
    }

    #[test]
    fn permanent_errors_are_told_from_transient_ones() {
        for code in ["28P01", "28000", "3D000", "42501", "53300", "53400"] {
            let e = ConnectError::Server {
                target: "t".into(),
                error: pg(code),
            };
            assert!(setup_problem(&e).is_some_and(|f| !f.is_empty()), "{code}");
        }
        for code in ["57P03", "57P01", "08006", "XX000", "55006", "55000"] {
            let e = ConnectError::Server {
                target: "t".into(),
                error: pg(code),
            };
            assert_eq!(setup_problem(&e), None, "{code}");
        }
        let io = ConnectError::Io {
            target: "t".into(),
            source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        };
        assert_eq!(setup_problem(&io), None);
        let no_pw = ConnectError::from(SetupError::NoPassword {
            target: "t".into(),
            user: "u".into(),
            sources: "s".into(),
        });
        assert_eq!(setup_problem(&no_pw), Some(""));
        // Through anyhow-like wrapping, by the source chain.
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] PgError);
        assert!(setup_problem(&Outer(pg("42501"))).is_some());
    }

    #[test]
    fn verify_modes_need_a_root_certificate() {
        let s = Settings::with_env(
            "host=db sslmode=verify-full user=u",
            &|_| None,
            Some("/nonexistent-home".into()),
        )
        .unwrap();
        let e = tls_config(&s).unwrap_err().to_string();
        assert!(e.contains("sslrootcert"), "{e}");
        let s = Settings::with_env("host=db sslmode=require user=u", &|_| None, None).unwrap();
        assert!(tls_config(&s).is_ok());
    }
}
