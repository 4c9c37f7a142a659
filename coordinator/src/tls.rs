//! The coordinator's TLS identity: a certificate and key it is given (a Kubernetes Secret,
//! cert-manager), or, by default, a throwaway CA and a server certificate it makes once under
//! `<state_dir>/tls/` and keeps, so a local cluster is encrypted and authenticated too.
//! Clients verify the server against `ca.pem` (the CLI reads `.gantry/tls/ca.pem` by default).

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use std::path::{Path, PathBuf};

/// PEM files of a server identity.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The names a generated certificate is valid for: loopback, this host, and `extra`.
pub fn default_names(extra: &[String]) -> Vec<String> {
    let mut names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    if let Ok(host) = std::fs::read_to_string("/etc/hostname") {
        let host = host.trim();
        if !host.is_empty() {
            names.push(host.to_string());
        }
    }
    for name in extra {
        if !names.contains(name) {
            names.push(name.clone());
        }
    }
    names
}

/// The certificate and key under `dir` (`ca.pem`, `server.pem`, `server.key`), made first if
/// they are not there: a fresh CA (its key is not kept: nothing else is ever signed with it)
/// and a server certificate for `names`, signed by it. Keys are readable by their owner only.
pub fn self_signed(dir: &Path, names: &[String]) -> anyhow::Result<TlsFiles> {
    let files = TlsFiles {
        cert: dir.join("server.pem"),
        key: dir.join("server.key"),
    };
    let ca = dir.join("ca.pem");
    if files.cert.exists() && files.key.exists() && ca.exists() {
        return Ok(files);
    }
    std::fs::create_dir_all(dir)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Gantry coordinator CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let issuer = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
    let mut params = CertificateParams::new(names.to_vec())?;
    params
        .distinguished_name
        .push(DnType::CommonName, "gantry-coordinator");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    gantry_ops::write_private(&files.key, key.serialize_pem().as_bytes())?;
    gantry_ops::write_private(&files.cert, cert.pem().as_bytes())?;
    // The CA certificate is what clients need: not secret, written last (its presence means
    // the set is complete).
    gantry_ops::write_private(&ca, issuer.pem().as_bytes())?;
    tracing::info!(dir = %dir.display(), ?names, "made a CA and a server certificate");
    Ok(files)
}

/// The server's TLS configuration from its PEM files; refused, naming the file, when one cannot
/// be read.
pub fn server_config(files: &TlsFiles) -> anyhow::Result<tonic::transport::ServerTlsConfig> {
    let read = |path: &Path, what: &str| {
        std::fs::read(path).map_err(|e| anyhow::anyhow!("{what} {}: {e}", path.display()))
    };
    let identity = tonic::transport::Identity::from_pem(
        read(&files.cert, "tls_cert")?,
        read(&files.key, "tls_key")?,
    );
    Ok(tonic::transport::ServerTlsConfig::new().identity(identity))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_identity_is_kept_and_its_key_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let names = default_names(&["coordinator.example".into()]);
        let files = self_signed(dir.path(), &names).unwrap();
        let cert = std::fs::read_to_string(&files.cert).unwrap();
        assert!(cert.starts_with("-----BEGIN CERTIFICATE-----"));
        let mode = std::fs::metadata(&files.key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(self_signed(dir.path(), &names).unwrap(), files);
        assert_eq!(
            std::fs::read_to_string(&files.cert).unwrap(),
            cert,
            "made twice"
        );
        server_config(&files).unwrap();
    }
}
