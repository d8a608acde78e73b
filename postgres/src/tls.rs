//! TLS to PostgreSQL, for the SQL and the replication sessions alike, from
//! one setting parsed once: libpq's URL parameters `sslmode`, `sslrootcert`,
//! `sslcert` and `sslkey`, with libpq's meaning.
//!
//! | `sslmode` | encrypted | server certificate checked |
//! | --- | --- | --- |
//! | `disable` | never | - |
//! | `prefer` (absent) | if the server offers it | no |
//! | `require` | always | no; with `sslrootcert`, as `verify-ca` (as libpq does) |
//! | `verify-ca` | always | signed by `sslrootcert` |
//! | `verify-full` | always | signed by `sslrootcert` and issued for the host |
//!
//! `sslrootcert` is a PEM file of CA certificates, or `system` for the
//! Mozilla root set (`webpki-roots`; what a managed service's public CA
//! chains to). `verify-ca` and `verify-full` without it are refused at
//! start-up (libpq would read `~/.postgresql/root.crt`; a service should
//! not depend on a home directory). `sslcert` and `sslkey` (PEM) give a
//! client certificate, both or neither. What the URL asks for is what
//! happens: a server that cannot do it is refused, never silently
//! downgraded (except `prefer`, whose meaning that is).

use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

use crate::error::SourceError;

/// How a session is protected, as `sslmode` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(text: &str) -> Option<SslMode> {
        Some(match text {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// The CA certificates a server certificate must chain to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootCert {
    File(PathBuf),
    /// `sslrootcert=system`: the Mozilla root set.
    System,
}

/// The TLS setting of a connection URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tls {
    pub mode: SslMode,
    pub root_cert: Option<RootCert>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

/// The URL parameters this module owns.
const PARAMETERS: [&str; 4] = ["sslmode", "sslrootcert", "sslcert", "sslkey"];

impl Tls {
    /// Takes the TLS parameters out of `url`'s query string: the URL
    /// without them (for `tokio_postgres`, which knows only some of them)
    /// and the setting. Errors name the parameter and say what is allowed.
    pub fn split_url(url: &str) -> Result<(String, Tls), SourceError> {
        let (base, query) = match url.split_once('?') {
            Some((base, query)) => (base, query),
            None => (url, ""),
        };
        let mut kept = Vec::new();
        let mut found: [Option<String>; 4] = Default::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (name, text) = pair.split_once('=').unwrap_or((pair, ""));
            match PARAMETERS.iter().position(|p| *p == name) {
                Some(i) => found[i] = Some(percent_decode(text)),
                None => kept.push(pair),
            }
        }
        let [mode, root_cert, client_cert, client_key] = found;
        let mut mode = match mode.as_deref() {
            None => SslMode::Prefer,
            Some(text) => SslMode::parse(text).ok_or_else(|| {
                tls_error(format!(
                    "sslmode={text} is not one of disable, prefer, require, verify-ca, verify-full"
                ))
            })?,
        };
        let root_cert = root_cert.map(|text| match text.as_str() {
            "system" => RootCert::System,
            _ => RootCert::File(PathBuf::from(text)),
        });
        // libpq: "require" with a root certificate verifies the chain.
        if mode == SslMode::Require && root_cert.is_some() {
            mode = SslMode::VerifyCa;
        }
        if matches!(mode, SslMode::VerifyCa | SslMode::VerifyFull) && root_cert.is_none() {
            return Err(tls_error(format!(
                "sslmode={} needs sslrootcert=<PEM file of the CA> (or sslrootcert=system for public CAs)",
                mode.as_str()
            )));
        }
        if client_cert.is_some() != client_key.is_some() {
            return Err(tls_error(
                "sslcert and sslkey go together: give both (PEM files) or neither".into(),
            ));
        }
        let rest = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        Ok((
            rest,
            Tls {
                mode,
                root_cert,
                client_cert: client_cert.map(PathBuf::from),
                client_key: client_key.map(PathBuf::from),
            },
        ))
    }

    /// The rustls client configuration of this setting (`None` for
    /// `disable`). Reading a certificate or key file that is missing or not
    /// PEM fails here, at start-up, naming the file.
    pub fn client_config(&self) -> Result<Option<Arc<ClientConfig>>, SourceError> {
        if self.mode == SslMode::Disable {
            return Ok(None);
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| tls_error(format!("TLS set-up: {e}")))?;
        let verifier: Arc<dyn ServerCertVerifier> = match self.mode {
            SslMode::Disable | SslMode::Prefer | SslMode::Require => {
                Arc::new(Unverified(provider.clone()))
            }
            SslMode::VerifyCa | SslMode::VerifyFull => {
                let roots = Arc::new(self.roots()?);
                let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                    .build()
                    .map_err(|e| tls_error(format!("sslrootcert: {e}")))?;
                if self.mode == SslMode::VerifyCa {
                    Arc::new(ChainOnly(webpki))
                } else {
                    webpki
                }
            }
        };
        let builder = builder
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let config = match (&self.client_cert, &self.client_key) {
            (Some(cert), Some(key)) => {
                let chain = CertificateDer::pem_file_iter(cert)
                    .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| tls_error(format!("sslcert {}: {e}", cert.display())))?;
                let key = PrivateKeyDer::from_pem_file(key)
                    .map_err(|e| tls_error(format!("sslkey {}: {e}", key.display())))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| tls_error(format!("sslcert/sslkey: {e}")))?
            }
            _ => builder.with_no_client_auth(),
        };
        Ok(Some(Arc::new(config)))
    }

    fn roots(&self) -> Result<RootCertStore, SourceError> {
        let mut roots = RootCertStore::empty();
        match &self.root_cert {
            None => {}
            Some(RootCert::System) => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
            Some(RootCert::File(path)) => {
                let certs = CertificateDer::pem_file_iter(path)
                    .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| tls_error(format!("sslrootcert {}: {e}", path.display())))?;
                let (added, _) = roots.add_parsable_certificates(certs);
                if added == 0 {
                    return Err(tls_error(format!(
                        "sslrootcert {}: no CA certificate in it",
                        path.display()
                    )));
                }
            }
        }
        Ok(roots)
    }

    /// `tokio_postgres`'s own mode for this setting: whether TLS is tried
    /// and whether it must succeed (the checks are the verifier's).
    pub fn tokio_mode(&self) -> tokio_postgres::config::SslMode {
        match self.mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        }
    }

    /// The same setting for the replication session to `host`.
    pub fn replication(&self, host: &str) -> pgwire_replication::TlsConfig {
        use pgwire_replication::TlsConfig;
        let ca = match &self.root_cert {
            Some(RootCert::File(path)) => Some(path.clone()),
            // The crate's own default is the same Mozilla set.
            Some(RootCert::System) | None => None,
        };
        let mut config = match self.mode {
            SslMode::Disable => TlsConfig::disabled(),
            SslMode::Prefer => TlsConfig {
                mode: pgwire_replication::SslMode::Prefer,
                ..TlsConfig::disabled()
            },
            SslMode::Require => TlsConfig::require(),
            SslMode::VerifyCa => TlsConfig::verify_ca(ca),
            SslMode::VerifyFull => TlsConfig::verify_full(ca),
        };
        if let (Some(cert), Some(key)) = (&self.client_cert, &self.client_key) {
            config = config.with_client_cert(cert.clone(), key.clone());
        }
        // The crate refuses verify-full to an IP address unless it is given
        // as the name to check; libpq checks an IP against the
        // certificate's IP addresses, and so does rustls with that name.
        if self.mode == SslMode::VerifyFull && host.parse::<std::net::IpAddr>().is_ok() {
            config.sni_hostname = Some(host.to_owned());
        }
        config
    }
}

fn tls_error(text: String) -> SourceError {
    SourceError::Tls(text)
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Some(byte) = std::str::from_utf8(&bytes[i + 1..i + 3])
                .ok()
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
        {
            out.push(byte);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `prefer` and `require`: encrypted, the certificate not checked (libpq's
/// meaning); the handshake's signatures still are.
#[derive(Debug)]
struct Unverified(Arc<CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
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
        verify_tls13_signature(
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

/// `verify-ca`: the chain must lead to `sslrootcert`; the name on the
/// certificate is not checked.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // webpki checks the chain first; a name mismatch is only reported
        // once the chain is good.
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
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

    fn split(url: &str) -> Result<(String, Tls), String> {
        Tls::split_url(url).map_err(|e| e.to_string())
    }

    #[test]
    fn absent_sslmode_is_prefer_and_other_parameters_stay() {
        let (rest, tls) = split("postgres://u@h:5432/db?application_name=x").expect("ok");
        assert_eq!(rest, "postgres://u@h:5432/db?application_name=x");
        assert_eq!(tls.mode, SslMode::Prefer);
        let (rest, tls) = split("postgres://u@h/db").expect("ok");
        assert_eq!(
            (rest.as_str(), tls.mode),
            ("postgres://u@h/db", SslMode::Prefer)
        );
    }

    #[test]
    fn libpq_parameters_are_taken_out() {
        let (rest, tls) = split(
            "postgres://u@h/db?sslmode=verify-full&connect_timeout=5&sslrootcert=%2Fetc%2Fca.pem",
        )
        .expect("ok");
        assert_eq!(rest, "postgres://u@h/db?connect_timeout=5");
        assert_eq!(tls.mode, SslMode::VerifyFull);
        assert_eq!(tls.root_cert, Some(RootCert::File("/etc/ca.pem".into())));
        let (_, tls) = split("postgres://u@h/db?sslmode=verify-ca&sslrootcert=system").expect("ok");
        assert_eq!(tls.root_cert, Some(RootCert::System));
    }

    #[test]
    fn require_with_a_root_certificate_verifies_the_chain() {
        let (_, tls) = split("postgres://u@h/db?sslmode=require&sslrootcert=ca.pem").expect("ok");
        assert_eq!(tls.mode, SslMode::VerifyCa);
        let (_, tls) = split("postgres://u@h/db?sslmode=require").expect("ok");
        assert_eq!(tls.mode, SslMode::Require);
    }

    #[test]
    fn what_cannot_be_done_is_refused_naming_the_parameter() {
        let e = split("postgres://u@h/db?sslmode=verify-full").expect_err("no CA");
        assert!(e.contains("sslrootcert"), "{e}");
        let e = split("postgres://u@h/db?sslmode=allow-ish").expect_err("unknown mode");
        assert!(e.contains("sslmode=allow-ish"), "{e}");
        let e = split("postgres://u@h/db?sslmode=require&sslcert=c.pem").expect_err("no key");
        assert!(e.contains("sslkey"), "{e}");
        let e = Tls::split_url("postgres://u@h/db?sslmode=verify-ca&sslrootcert=/nonexistent.pem")
            .and_then(|(_, tls)| tls.client_config())
            .expect_err("missing file");
        assert!(e.to_string().contains("/nonexistent.pem"), "{e}");
    }
}
