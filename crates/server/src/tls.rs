//! TLS for the gRPC port: the server's certificate and key (files the admin names, or the pair `fal-serverless
//! server init --tls-self-signed` makes in the data dir, with a CA for clients to trust), as a rustls config.
//!
//! The CA's private key is never written: it signs the server's certificate once and is dropped, so a copied data
//! dir cannot mint certificates for other names that clients trusting this CA would accept.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Where `server init --tls-self-signed` puts its files, below the data dir.
const TLS_DIR: &str = "tls";
const CA_FILE: &str = "ca.pem";
const CERT_FILE: &str = "server.pem";
const KEY_FILE: &str = "server.key";
/// How long a self-signed certificate is valid.
const VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// The server's certificate chain and private key, PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    /// The pair `server init --tls-self-signed` made in `data_dir`, if it did.
    pub fn in_data_dir(data_dir: &Path) -> Option<Self> {
        let dir = data_dir.join(TLS_DIR);
        let files = Self { cert: dir.join(CERT_FILE), key: dir.join(KEY_FILE) };
        (files.cert.is_file() && files.key.is_file()).then_some(files)
    }
}

/// What `server init --tls-self-signed` made.
#[derive(Debug, Clone)]
pub struct SelfSigned {
    /// The CA certificate clients trust (`FAL_SERVERLESS_CA_FILE`, `GRPC_DEFAULT_SSL_ROOTS_FILE_PATH`).
    pub ca: PathBuf,
    pub files: TlsFiles,
    pub names: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the TLS {what} {path}: {error}")]
    Read {
        what: &'static str,
        path: PathBuf,
        // Not `source`: the message carries it (the Python SDK shows messages alone), and a source would repeat it.
        error: std::io::Error,
    },
    #[error("the TLS {what} {path} is not usable: {message}")]
    Pem { what: &'static str, path: PathBuf, message: String },
    #[error(
        "the TLS certificate {cert} and key {key} cannot serve: {message}. Check that the key is the certificate's \
         own and that both are PEM"
    )]
    Config { cert: PathBuf, key: PathBuf, message: String },
    #[error(
        "{0:?} is not a name a certificate can hold: give DNS names (server.example.com, *.example.com) or IP \
         addresses"
    )]
    BadName(String),
    #[error("name at least one DNS name or IP address the clients will connect to")]
    NoNames,
    #[error(
        "{} already holds a certificate; remove that directory to make new ones (clients must then trust the new \
         CA)",
        .0.display()
    )]
    Exists(PathBuf),
    #[error("cannot make the certificates: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("cannot write {path}: {error}")]
    Write {
        path: PathBuf,
        // Not `source`: the message carries it (the Python SDK shows messages alone), and a source would repeat it.
        error: std::io::Error,
    },
}

/// Makes a CA and a certificate signed by it for `names` (DNS names or IP addresses), in `<data_dir>/tls/`.
pub fn self_signed(data_dir: &Path, names: &[String]) -> Result<SelfSigned, TlsError> {
    if names.is_empty() {
        return Err(TlsError::NoNames);
    }
    for name in names {
        let dns = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '*' | '_');
        if name.parse::<std::net::IpAddr>().is_err() && (name.is_empty() || !name.chars().all(dns)) {
            return Err(TlsError::BadName(name.clone()));
        }
    }
    let dir = data_dir.join(TLS_DIR);
    if dir.exists() {
        return Err(TlsError::Exists(dir));
    }

    let now = time::OffsetDateTime::now_utc();
    let validity = |params: &mut CertificateParams| {
        // A day's slack for clocks a little behind.
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + VALIDITY;
    };
    let mut ca = CertificateParams::default();
    let mut id = [0u8; 4];
    rand::rng().fill_bytes(&mut id);
    let mut ca_name = DistinguishedName::new();
    // Unique per CA, so clients trusting the CAs of two servers can tell them apart.
    ca_name.push(DnType::CommonName, format!("fal-serverless CA {}", hex::encode(id)));
    ca.distinguished_name = ca_name;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    validity(&mut ca);
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);

    let mut server = CertificateParams::new(names.to_vec())?;
    let mut server_name = DistinguishedName::new();
    server_name.push(DnType::CommonName, names[0].clone());
    server.distinguished_name = server_name;
    server.is_ca = IsCa::ExplicitNoCa;
    server.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    server.use_authority_key_identifier_extension = true;
    validity(&mut server);
    let server_key = KeyPair::generate()?;
    let server_cert = server.signed_by(&server_key, &issuer)?;

    let write_error = |path: &Path| {
        let path = path.to_path_buf();
        move |error| TlsError::Write { path, error }
    };
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir).map_err(write_error(&dir))?;
    let write = |name: &str, mode: u32, text: &str| -> Result<PathBuf, TlsError> {
        let path = dir.join(name);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&path)
            .map_err(write_error(&path))?;
        file.write_all(text.as_bytes()).and_then(|()| file.sync_all()).map_err(write_error(&path))?;
        Ok(path)
    };
    let ca = write(CA_FILE, 0o644, &ca_cert.pem())?;
    let key = write(KEY_FILE, 0o600, &server_key.serialize_pem())?;
    let cert = write(CERT_FILE, 0o644, &server_cert.pem())?;
    Ok(SelfSigned { ca, files: TlsFiles { cert, key }, names: names.to_vec() })
}

/// The rustls config the gRPC port serves with: `files`' certificate chain and key, HTTP/2 by ALPN (gRPC clients,
/// grpcio among them, insist on it).
pub(crate) fn server_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let read = |what: &'static str, path: &Path| {
        std::fs::read(path).map_err(|error| TlsError::Read { what, path: path.to_path_buf(), error })
    };
    let pem_error = |what: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |e: rustls::pki_types::pem::Error| TlsError::Pem { what, path, message: e.to_string() }
    };
    let cert_pem = read("certificate", &files.cert)?;
    let certs = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_error("certificate", &files.cert))?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            what: "certificate",
            path: files.cert.clone(),
            message: "it holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into(),
        });
    }
    let key_pem = read("key", &files.key)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(pem_error("key", &files.key))?;
    if let Ok(metadata) = std::fs::metadata(&files.key) {
        if metadata.permissions().mode() & 0o077 != 0 {
            tracing::warn!(key = %files.key.display(), "the TLS key is readable by other users: chmod 600 it");
        }
    }
    let config_error = |e: rustls::Error| TlsError::Config {
        cert: files.cert.clone(),
        key: files.key.clone(),
        message: e.to_string(),
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(config_error)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(config_error)?;
    // gRPC speaks HTTP/2; the gateway's clients (fal-client, curl, browsers) often HTTP/1.1.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_makes_a_pair_the_server_can_serve_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        assert!(TlsFiles::in_data_dir(dir.path()).is_none());
        let made = self_signed(dir.path(), &["localhost".into(), "127.0.0.1".into()]).unwrap();
        assert_eq!(TlsFiles::in_data_dir(dir.path()), Some(made.files.clone()));
        let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&made.files.key), 0o600);
        assert_eq!(mode(&dir.path().join(TLS_DIR)), 0o700);
        assert!(std::fs::read_to_string(&made.ca).unwrap().contains("BEGIN CERTIFICATE"));
        server_config(&made.files).unwrap();
        // The CA's key is not kept.
        assert_eq!(std::fs::read_dir(dir.path().join(TLS_DIR)).unwrap().count(), 3);
        assert!(matches!(self_signed(dir.path(), &["localhost".into()]), Err(TlsError::Exists(_))));
    }

    #[test]
    fn bad_names_and_files_are_refused_with_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(self_signed(dir.path(), &[]), Err(TlsError::NoNames)));
        assert!(matches!(self_signed(dir.path(), &["a b".into()]), Err(TlsError::BadName(_))));
        let cert = dir.path().join("cert.pem");
        std::fs::write(&cert, "not a certificate").unwrap();
        let files = TlsFiles { cert: cert.clone(), key: dir.path().join("missing.key") };
        let error = server_config(&files).unwrap_err().to_string();
        assert!(error.contains("holds no PEM certificate"), "{error}");
        let made = self_signed(&dir.path().join("other"), &["localhost".into()]).unwrap();
        let files = TlsFiles { cert: made.files.cert, key: dir.path().join("missing.key") };
        let error = server_config(&files).unwrap_err().to_string();
        assert!(error.contains("cannot read the TLS key"), "{error}");
    }
}
