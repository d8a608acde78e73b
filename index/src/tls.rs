//! How the client proves the cluster is the one configured, and who we
//! are: `opensearch.tls_ca_file` becomes the only root the cluster's
//! certificate is checked against (name included: a DNS name or an IP
//! address), and `tls_certificate_file` with `tls_key_file` a client
//! identity. The client crate takes a client certificate as PKCS#12 only
//! (with its native-tls, i.e. OpenSSL, backend), so the PEM pair is
//! packed into one in memory, with OpenSSL itself; nothing is written to
//! disk.

use std::path::Path;

use opensearch::auth::{ClientCertificate, Credentials};
use opensearch::cert::{Certificate, CertificateValidation};
use opensearch::http::transport::TransportBuilder;
use tidemark_schemas::config;

use crate::error::{IndexError, failed};

/// `transport` with the CA and the client certificate of `config`.
pub(crate) fn secure(
    mut transport: TransportBuilder,
    config: &config::OpenSearch,
) -> Result<TransportBuilder, IndexError> {
    if let Some(ca) = &config.tls_ca_file {
        let pem = read(ca, "opensearch.tls_ca_file")?;
        let cert = Certificate::from_pem(&pem).map_err(failed(|| {
            format!(
                "opensearch.tls_ca_file: {} is not a PEM certificate",
                ca.display()
            )
        }))?;
        transport = transport.cert_validation(CertificateValidation::Full(cert));
    }
    if let (Some(cert), Some(key)) = (&config.tls_certificate_file, &config.tls_key_file) {
        let der = pkcs12(cert, key)?;
        transport = transport.auth(Credentials::Certificate(ClientCertificate::Pkcs12(
            der,
            Some(String::new()),
        )));
    }
    Ok(transport)
}

fn read(path: &Path, field: &str) -> Result<Vec<u8>, IndexError> {
    std::fs::read(path).map_err(failed(|| {
        format!("{field}: cannot read {}", path.display())
    }))
}

/// The certificate (and any chain after it) and the key, as PKCS#12 DER.
fn pkcs12(cert: &Path, key: &Path) -> Result<Vec<u8>, IndexError> {
    use openssl::pkcs12::Pkcs12;
    use openssl::pkey::PKey;
    use openssl::stack::Stack;
    use openssl::x509::X509;
    let field = "opensearch.tls_certificate_file";
    let mut chain = X509::stack_from_pem(&read(cert, field)?)
        .map_err(failed(|| format!("{field}: {} is not PEM", cert.display())))?
        .into_iter();
    let Some(leaf) = chain.next() else {
        return Err(IndexError::Refused(format!(
            "{field}: {} holds no certificate",
            cert.display()
        )));
    };
    let key = PKey::private_key_from_pem(&read(key, "opensearch.tls_key_file")?).map_err(
        failed(|| {
            format!(
                "opensearch.tls_key_file: {} is not an unencrypted PEM private key",
                key.display()
            )
        }),
    )?;
    let mut builder = Pkcs12::builder();
    builder.name("tidemark").pkey(&key).cert(&leaf);
    let mut rest = Stack::new().map_err(failed(|| "OpenSSL".to_owned()))?;
    for cert in chain {
        rest.push(cert).map_err(failed(|| "OpenSSL".to_owned()))?;
    }
    builder.ca(rest);
    builder
        .build2("")
        .and_then(|p12| p12.to_der())
        .map_err(failed(|| {
            format!(
                "{field}: the certificate and opensearch.tls_key_file do not make a client identity"
            )
        }))
}
