//! TLS to the fleet's database, as the connection string asks, with libpq's meaning of
//! `sslmode` (tokio-postgres knows only disable/prefer/require, so `sslmode` and
//! `sslrootcert` are taken out of the string here and the rest handed to it):
//!
//! - `disable`: plaintext. `prefer` (the default): TLS if the server offers it, else
//!   plaintext; the certificate is not checked. `require`: TLS or no connection, the
//!   certificate not checked, unless `sslrootcert` is given: then as `verify-ca` (as libpq).
//! - `verify-ca`: TLS, the certificate chain checked against `sslrootcert` (else the
//!   system's roots). `verify-full`: that and the host name (`host=`) against the
//!   certificate. A failed check is an error; these modes never fall back to plaintext.

use std::{path::PathBuf, sync::Arc};

use anyhow::{Context as _, Result};
use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::CryptoProvider,
    pki_types::{pem::PemObject as _, CertificateDer, ServerName, UnixTime},
    CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tls {
    pub mode: Mode,
    pub rootcert: Option<PathBuf>,
}

/// Parses a libpq-style connection string (key=value, or a `postgres://` URL): the rest for
/// tokio-postgres, its `sslmode` set to what it can do of ours, and the TLS settings.
pub fn parse(conn: &str) -> Result<(tokio_postgres::Config, Tls), String> {
    let (rest, mode, rootcert) =
        if conn.starts_with("postgres://") || conn.starts_with("postgresql://") {
            split_url(conn)
        } else {
            split_pairs(conn)?
        };
    let mode = match mode.as_deref() {
        None | Some("prefer") => Mode::Prefer,
        Some("disable") => Mode::Disable,
        Some("allow") => Mode::Prefer,
        Some("require") if rootcert.is_some() => Mode::VerifyCa,
        Some("require") => Mode::Require,
        Some("verify-ca") => Mode::VerifyCa,
        Some("verify-full") => Mode::VerifyFull,
        Some(m) => {
            return Err(format!(
                "sslmode={m}: one of disable, allow, prefer, require, verify-ca, verify-full"
            ))
        }
    };
    let mut cfg: tokio_postgres::Config = rest.parse().map_err(|e| format!("{e}"))?;
    // PostgreSQL has no TLS on unix sockets (libpq ignores sslmode there; the connector
    // would refuse their empty host name).
    // A `hostaddr=` is TCP whatever `host=` says (tokio-postgres connects to it), and with
    // no `host=` at all it is all there is: only unix sockets and no hostaddr are unix only.
    let unix_only = cfg.get_hostaddrs().is_empty()
        && cfg
            .get_hosts()
            .iter()
            .all(|h| matches!(h, tokio_postgres::config::Host::Unix(_)));
    // verify-full checks the certificate against `host=`: a hostaddr without a host name
    // would be checked against none (the connector's stand-in name), so it is refused.
    if mode == Mode::VerifyFull && !cfg.get_hostaddrs().is_empty() {
        let named = cfg.get_hosts().len() == cfg.get_hostaddrs().len()
            && cfg
                .get_hosts()
                .iter()
                .all(|h| matches!(h, tokio_postgres::config::Host::Tcp(_)));
        if !named {
            return Err(
                "sslmode=verify-full checks the server's name: give host=NAME for \
                        each hostaddr="
                    .into(),
            );
        }
    }
    cfg.ssl_mode(match mode {
        _ if unix_only => SslMode::Disable,
        Mode::Disable => SslMode::Disable,
        Mode::Prefer => SslMode::Prefer,
        // Never plaintext once TLS is asked for.
        Mode::Require | Mode::VerifyCa | Mode::VerifyFull => SslMode::Require,
    });
    Ok((
        cfg,
        Tls {
            mode,
            rootcert: rootcert.map(PathBuf::from),
        },
    ))
}

/// `key=value` pairs as libpq reads them (a value may be 'quoted', with \' and \\).
fn split_pairs(conn: &str) -> Result<(String, Option<String>, Option<String>), String> {
    let mut rest = Vec::new();
    let (mut mode, mut rootcert) = (None, None);
    let mut it = conn.chars().peekable();
    loop {
        while it.peek().is_some_and(|c| c.is_whitespace()) {
            it.next();
        }
        if it.peek().is_none() {
            break;
        }
        let mut key = String::new();
        while let Some(&c) = it.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            it.next();
        }
        while it.peek().is_some_and(|c| c.is_whitespace()) {
            it.next();
        }
        if it.next() != Some('=') {
            return Err(format!("`{key}` has no value (key=value)"));
        }
        while it.peek().is_some_and(|c| c.is_whitespace()) {
            it.next();
        }
        let mut value = String::new();
        if it.peek() == Some(&'\'') {
            it.next();
            loop {
                match it.next() {
                    Some('\'') => break,
                    Some('\\') => value.extend(it.next()),
                    Some(c) => value.push(c),
                    None => return Err(format!("`{key}`: unterminated quoted value")),
                }
            }
        } else {
            while let Some(&c) = it.peek() {
                if c.is_whitespace() {
                    break;
                }
                if c == '\\' {
                    it.next();
                    value.extend(it.next());
                } else {
                    value.push(c);
                    it.next();
                }
            }
        }
        match key.as_str() {
            "sslmode" => mode = Some(value),
            "sslrootcert" => rootcert = Some(value),
            _ => rest.push(format!(
                "{key}='{}'",
                value.replace('\\', "\\\\").replace('\'', "\\'")
            )),
        }
    }
    Ok((rest.join(" "), mode, rootcert))
}

/// A URL's `sslmode` and `sslrootcert` query parameters (not percent-decoded: a path with
/// special characters belongs in the key=value form).
fn split_url(conn: &str) -> (String, Option<String>, Option<String>) {
    let Some((base, query)) = conn.split_once('?') else {
        return (conn.to_string(), None, None);
    };
    let (mut mode, mut rootcert) = (None, None);
    let mut rest = Vec::new();
    for p in query.split('&') {
        match p.split_once('=') {
            Some(("sslmode", v)) => mode = Some(v.to_string()),
            Some(("sslrootcert", v)) => rootcert = Some(v.to_string()),
            _ => rest.push(p),
        }
    }
    let s = if rest.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", rest.join("&"))
    };
    (s, mode, rootcert)
}

impl Tls {
    /// The connector for tokio-postgres (with `disable` it is never used).
    pub fn connector(&self) -> Result<Connector> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier: Arc<dyn ServerCertVerifier> = match self.mode {
            Mode::Disable | Mode::Prefer | Mode::Require => Arc::new(Unchecked(provider.clone())),
            Mode::VerifyCa | Mode::VerifyFull => {
                let roots = Arc::new(self.roots()?);
                let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
                    roots,
                    provider.clone(),
                )
                .build()
                .context("the TLS verifier")?;
                if self.mode == Mode::VerifyFull {
                    webpki
                } else {
                    Arc::new(AnyName(webpki))
                }
            }
        };
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Ok(Connector(MakeRustlsConnect::new(config)))
    }

    /// `sslrootcert`'s certificates, else the system's.
    fn roots(&self) -> Result<RootCertStore> {
        let mut roots = RootCertStore::empty();
        match &self.rootcert {
            Some(p) => {
                let certs = CertificateDer::pem_file_iter(p)
                    .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| anyhow::anyhow!("sslrootcert {}: {e}", p.display()))?;
                anyhow::ensure!(
                    !certs.is_empty(),
                    "sslrootcert {}: no certificate in it",
                    p.display()
                );
                for c in certs {
                    roots
                        .add(c)
                        .with_context(|| format!("sslrootcert {}", p.display()))?;
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                roots.add_parsable_certificates(found.certs);
                anyhow::ensure!(
                    !roots.is_empty(),
                    "sslmode verify-ca/verify-full: no system root certificates found; give \
                     sslrootcert=PATH"
                );
            }
        }
        Ok(roots)
    }
}

/// The rustls connector, for any host: a unix socket's (empty) name, which rustls would
/// refuse, is replaced; such a connection never uses TLS (see [`parse`]).
#[derive(Clone)]
pub struct Connector(MakeRustlsConnect);

impl<S> tokio_postgres::tls::MakeTlsConnect<S> for Connector
where
    MakeRustlsConnect: tokio_postgres::tls::MakeTlsConnect<S>,
{
    type Stream = <MakeRustlsConnect as tokio_postgres::tls::MakeTlsConnect<S>>::Stream;
    type TlsConnect = <MakeRustlsConnect as tokio_postgres::tls::MakeTlsConnect<S>>::TlsConnect;
    type Error = <MakeRustlsConnect as tokio_postgres::tls::MakeTlsConnect<S>>::Error;

    fn make_tls_connect(&mut self, domain: &str) -> Result<Self::TlsConnect, Self::Error> {
        let domain = if domain.is_empty() {
            "localhost"
        } else {
            domain
        };
        self.0.make_tls_connect(domain)
    }
}

/// `prefer` and `require`: encryption without authentication, as libpq (the handshake's
/// signatures are still checked).
#[derive(Debug)]
struct Unchecked(Arc<CryptoProvider>);

impl ServerCertVerifier for Unchecked {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain is checked, the host name is not.
#[derive(Debug)]
struct AnyName(Arc<rustls::client::WebPkiServerVerifier>);

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            r => r,
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tls_keys_are_taken_out_and_the_rest_kept() {
        let (cfg, tls) = parse(
            "host=db.example.net dbname=port25 user=port25 sslmode=verify-full \
             sslrootcert='/etc/port25/ca it.pem' application_name = 'a b\\'c'",
        )
        .unwrap();
        assert_eq!(tls.mode, Mode::VerifyFull);
        assert_eq!(
            tls.rootcert.as_deref(),
            Some(std::path::Path::new("/etc/port25/ca it.pem"))
        );
        assert_eq!(cfg.get_dbname(), Some("port25"));
        assert_eq!(cfg.get_application_name(), Some("a b'c"));
        assert_eq!(cfg.get_ssl_mode(), SslMode::Require, "never plaintext");
        let (cfg, tls) = parse("host=h dbname=d").unwrap();
        assert_eq!(
            (tls.mode, cfg.get_ssl_mode()),
            (Mode::Prefer, SslMode::Prefer)
        );
        let (_, tls) = parse("host=h dbname=d sslmode=require sslrootcert=/ca.pem").unwrap();
        assert_eq!(tls.mode, Mode::VerifyCa, "libpq: require with a root cert");
        let (cfg, tls) =
            parse("postgresql://u@h/d?sslmode=verify-ca&sslrootcert=/ca.pem&connect_timeout=3")
                .unwrap();
        assert_eq!(tls.mode, Mode::VerifyCa);
        assert_eq!(cfg.get_dbname(), Some("d"));
        assert_eq!(cfg.get_ssl_mode(), SslMode::Require);
        assert!(parse("host=h sslmode=verify-everything").is_err());
        assert!(parse("host=h sslrootcert").is_err());
        assert!(parse("host=h password='x").is_err());
    }

    /// `hostaddr=` alone is TCP (tokio-postgres connects to it): the TLS asked for must
    /// hold there, not be dropped as for a unix socket.
    #[test]
    fn a_hostaddr_is_tcp_and_keeps_tls() {
        for conn in [
            "hostaddr=192.0.2.7 dbname=d sslmode=require",
            "host=/run/postgresql hostaddr=192.0.2.7 dbname=d sslmode=verify-ca sslrootcert=/ca.pem",
        ] {
            let (cfg, _) = parse(conn).unwrap();
            assert_eq!(cfg.get_ssl_mode(), SslMode::Require, "{conn}: never plaintext");
        }
        // verify-full checks the name of host=: without one there is no name to check.
        let e = parse("hostaddr=192.0.2.7 dbname=d sslmode=verify-full").unwrap_err();
        assert!(e.contains("host="), "{e}");
        let (cfg, tls) =
            parse("host=db.example.net hostaddr=192.0.2.7 sslmode=verify-full").unwrap();
        assert_eq!(
            (tls.mode, cfg.get_ssl_mode()),
            (Mode::VerifyFull, SslMode::Require)
        );
        let (cfg, _) = parse("host=/run/postgresql dbname=d sslmode=verify-full").unwrap();
        assert_eq!(
            cfg.get_ssl_mode(),
            SslMode::Disable,
            "a unix socket has no TLS"
        );
    }
}
