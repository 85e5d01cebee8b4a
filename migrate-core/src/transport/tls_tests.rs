//! Mutual TLS over real Unix socket pairs with certificates made by rcgen.

use std::os::unix::net::UnixStream;
use std::thread;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};

use super::*;

/// A CA, and a certificate it signed for `names`; written as PEM files
/// into `dir` with `prefix`. Returns the files of an end using that
/// certificate and trusting that CA.
pub(super) struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    fn new(name: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        let cert = p.self_signed(&key).unwrap();
        Self { cert, key }
    }

    fn issue(&self, dir: &Path, prefix: &str, names: &[&str]) -> TlsFiles {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
        p.distinguished_name.push(DnType::CommonName, prefix);
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = p.signed_by(&key, &self.cert, &self.key).unwrap();
        let f = |n: &str| dir.join(format!("{prefix}.{n}.pem"));
        std::fs::write(f("cert"), cert.pem()).unwrap();
        std::fs::write(f("key"), key.serialize_pem()).unwrap();
        std::fs::write(f("ca"), self.cert.pem()).unwrap();
        TlsFiles {
            cert: f("cert"),
            key: f("key"),
            ca: f("ca"),
        }
    }
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vmigrate-tls-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn pair() -> (Stream, Stream) {
    let (a, b) = UnixStream::pair().unwrap();
    for s in [&a, &b] {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    }
    (Stream::Unix(a), Stream::Unix(b))
}

/// Handshake `client` with `server` (host `host`); both results.
fn shake(
    client: &TlsFiles,
    server: &TlsFiles,
    host: &str,
) -> (Result<TlsStream, TlsError>, Result<TlsStream, TlsError>) {
    let (a, b) = pair();
    let sc = TlsCredentials::load(server).unwrap();
    let cc = TlsCredentials::load(client).unwrap();
    let t = thread::spawn(move || accept(b, &sc));
    let c = connect(a, &cc, host);
    let s = t.join().unwrap();
    (c, s)
}

#[test]
fn certificates_of_one_ca_authenticate_both_ends_and_carry_data() {
    let dir = scratch("ok");
    let ca = Ca::new("test CA");
    let server = ca.issue(&dir, "dst", &["127.0.0.1", "localhost"]);
    let client = ca.issue(&dir, "src", &["source"]);
    let (c, s) = shake(&client, &server, "127.0.0.1");
    let (mut c, s) = (c.unwrap(), s.unwrap());
    let mut s_reader = s.try_clone().unwrap();
    let mut s_writer = s;
    let t = thread::spawn(move || {
        let mut buf = vec![0u8; 3 << 20];
        s_reader.read_exact(&mut buf).unwrap();
        s_writer.write_all(b"ok").unwrap();
        s_writer.flush().unwrap();
        buf
    });
    let data: Vec<u8> = (0..3u32 << 20)
        .map(|i| u8::try_from(i % 253).unwrap())
        .collect();
    c.write_all(&data).unwrap();
    c.flush().unwrap();
    let mut ok = [0u8; 2];
    c.read_exact(&mut ok).unwrap();
    assert_eq!(&ok, b"ok");
    assert!(t.join().unwrap() == data);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_client_of_another_ca_is_refused_on_both_ends() {
    let dir = scratch("other-ca");
    let ca = Ca::new("test CA");
    let other = Ca::new("other CA");
    let server = ca.issue(&dir, "dst", &["127.0.0.1"]);
    // Trusts the right CA for the destination, but its own certificate is
    // from another.
    let mut client = other.issue(&dir, "src", &["source"]);
    client.ca = server.ca.clone();
    let (c, s) = shake(&client, &server, "127.0.0.1");
    let s = s.unwrap_err();
    assert!(s.to_string().contains("TLS handshake failed"), "{s}");
    let c = c.unwrap_err();
    assert!(
        matches!(&c, TlsError::Handshake { step, .. } if step.contains("accept our certificate")),
        "{c}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_destination_of_another_ca_or_name_is_refused() {
    let dir = scratch("other-dst");
    let ca = Ca::new("test CA");
    let other = Ca::new("other CA");
    let client = ca.issue(&dir, "src", &["source"]);
    let mut impostor = other.issue(&dir, "dst", &["127.0.0.1"]);
    impostor.ca = client.ca.clone();
    let (c, _) = shake(&client, &impostor, "127.0.0.1");
    assert!(c.is_err());
    // The right CA, but a certificate for another host.
    let elsewhere = ca.issue(&dir, "dst2", &["10.9.9.9"]);
    let (c, _) = shake(&client, &elsewhere, "127.0.0.1");
    let e = c.unwrap_err();
    let chain = format!("{e}: {}", std::error::Error::source(&e).unwrap());
    assert!(chain.contains("certificate"), "{chain}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn bad_files_are_reported_by_name() {
    let dir = scratch("files");
    let ca = Ca::new("test CA");
    let mut f = ca.issue(&dir, "x", &["localhost"]);
    f.key = dir.join("missing.pem");
    let e = TlsCredentials::load(&f).unwrap_err();
    assert!(matches!(&e, TlsError::File { what: "key", .. }), "{e}");
    std::fs::write(dir.join("empty.pem"), b"").unwrap();
    let mut f = ca.issue(&dir, "y", &["localhost"]);
    f.ca = dir.join("empty.pem");
    let e = TlsCredentials::load(&f).unwrap_err();
    assert!(matches!(&e, TlsError::File { what: "CA", .. }), "{e}");
    let _ = std::fs::remove_dir_all(dir);
}
