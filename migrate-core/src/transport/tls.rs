//! TLS mode (rustls, TLS 1.3 only, ring): mutual authentication with
//! certificates, as QEMU's `tls-creds-x509` with `verify-peer=on`.
//!
//! Both ends have a certificate and key (PEM) and one CA file (PEM, one or
//! more certificates). The destination presents its certificate and
//! requires a client certificate signed by the CA; the source checks the
//! destination's certificate against the CA and the host of the address it
//! connects to (`tcp:HOST:PORT`: HOST must be in the certificate's subject
//! alternative names; `unix:` paths: `localhost`). After the handshake the
//! destination sends one byte (`0x01`) inside TLS, so that a source whose
//! certificate was refused learns it at connect time, not at its first read.
//!
//! The engine splits a stream into a reader and a writer; here both share
//! one rustls connection behind a mutex. The engine's reads and writes on
//! one migration never overlap in time (one thread per side, strictly
//! alternating request and answer), so the lock is never contended.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};

use super::Stream;

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("cannot use {what} {path}: {detail}")]
    File {
        /// `certificate`, `key` or `CA`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What went wrong.
        detail: String,
    },
    /// rustls refused the configuration (e.g. a key that does not match
    /// the certificate).
    #[error("bad TLS configuration: {0}")]
    Config(String),
    /// The host to verify is not a DNS name or an IP address.
    #[error(
        "{0:?} is not a DNS name or an IP address to check the destination's certificate against"
    )]
    ServerName(String),
    /// The handshake failed (a certificate refused, a peer that does not
    /// speak TLS, a connection closed).
    #[error("TLS handshake failed while {step}")]
    Handshake {
        /// What the handshake was doing.
        step: &'static str,
        /// rustls' or the socket's error (an alert names the reason).
        #[source]
        source: io::Error,
    },
}

/// Certificate, key and CA files of one end.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// This end's certificate chain (PEM).
    pub cert: PathBuf,
    /// This end's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// The CA the peer's certificate must be signed by (PEM).
    pub ca: PathBuf,
}

/// Loaded credentials, checked by building the configurations once.
pub struct TlsCredentials {
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
}

impl std::fmt::Debug for TlsCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsCredentials(<redacted>)")
    }
}

fn file_err<'p>(what: &'static str, path: &'p Path) -> impl Fn(String) -> TlsError + 'p {
    move |detail| TlsError::File {
        what,
        path: path.to_path_buf(),
        detail,
    }
}

fn certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let err = file_err(what, path);
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no PEM certificate in it".into()));
    }
    Ok(certs)
}

impl TlsCredentials {
    /// Read and check the three files.
    pub fn load(files: &TlsFiles) -> Result<Self, TlsError> {
        let chain = certs("certificate", &files.cert)?;
        let key = PrivateKeyDer::from_pem_file(&files.key)
            .map_err(|e| file_err("key", &files.key)(e.to_string()))?;
        let mut roots = RootCertStore::empty();
        for ca in certs("CA", &files.ca)? {
            roots
                .add(ca)
                .map_err(|e| file_err("CA", &files.ca)(e.to_string()))?;
        }
        let roots = Arc::new(roots);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = |e: rustls::Error| TlsError::Config(e.to_string());
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(cfg)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(cfg)?;
        let client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(cfg)?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(cfg)?;
        Ok(Self {
            client: Arc::new(client),
            server: Arc::new(server),
        })
    }
}

enum Conn {
    Client(rustls::StreamOwned<ClientConnection, Stream>),
    Server(rustls::StreamOwned<ServerConnection, Stream>),
}

/// A TLS connection usable as a [`Stream`] (clones share it).
pub struct TlsStream {
    sock: Box<Stream>,
    conn: Arc<Mutex<Conn>>,
}

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream")
            .field("sock", &self.sock)
            .finish_non_exhaustive()
    }
}

const READY: u8 = 1;

fn hs(step: &'static str) -> impl FnOnce(io::Error) -> TlsError {
    move |source| TlsError::Handshake { step, source }
}

/// Source side: handshake with `host` (checked against the destination's
/// certificate) and wait for the destination's ready byte.
pub fn connect(sock: Stream, creds: &TlsCredentials, host: &str) -> Result<TlsStream, TlsError> {
    let name = ServerName::try_from(host.to_string())
        .map_err(|_| TlsError::ServerName(host.to_string()))?;
    let conn = ClientConnection::new(creds.client.clone(), name)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let raw = sock.try_clone().map_err(hs("splitting the stream"))?;
    let mut tls = rustls::StreamOwned::new(conn, sock);
    while tls.conn.is_handshaking() {
        tls.conn
            .complete_io(&mut tls.sock)
            .map_err(hs("exchanging certificates"))?;
    }
    let mut ready = [0u8; 1];
    tls.read_exact(&mut ready)
        .map_err(hs("waiting for the destination to accept our certificate"))?;
    if ready[0] != READY {
        return Err(TlsError::Handshake {
            step: "waiting for the destination to accept our certificate",
            source: io::Error::new(io::ErrorKind::InvalidData, "unexpected ready byte"),
        });
    }
    Ok(TlsStream {
        sock: Box::new(raw),
        conn: Arc::new(Mutex::new(Conn::Client(tls))),
    })
}

/// Destination side: handshake (the source's certificate must be signed by
/// the CA), then send the ready byte.
pub fn accept(sock: Stream, creds: &TlsCredentials) -> Result<TlsStream, TlsError> {
    let conn =
        ServerConnection::new(creds.server.clone()).map_err(|e| TlsError::Config(e.to_string()))?;
    let raw = sock.try_clone().map_err(hs("splitting the stream"))?;
    let mut tls = rustls::StreamOwned::new(conn, sock);
    while tls.conn.is_handshaking() {
        tls.conn
            .complete_io(&mut tls.sock)
            .map_err(hs("exchanging certificates"))?;
    }
    tls.write_all(&[READY])
        .and_then(|()| tls.flush())
        .map_err(hs("telling the source it was accepted"))?;
    Ok(TlsStream {
        sock: Box::new(raw),
        conn: Arc::new(Mutex::new(Conn::Server(tls))),
    })
}

impl TlsStream {
    /// The socket underneath (timeouts, shutdown).
    pub fn socket(&self) -> &Stream {
        &self.sock
    }

    /// A second handle on the same connection.
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self {
            sock: Box::new(self.sock.try_clone()?),
            conn: self.conn.clone(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Conn> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &mut *self.lock() {
            Conn::Client(c) => c.read(buf),
            Conn::Server(c) => c.read(buf),
        }
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut *self.lock() {
            Conn::Client(c) => c.write(buf),
            Conn::Server(c) => c.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut *self.lock() {
            Conn::Client(c) => c.flush(),
            Conn::Server(c) => c.flush(),
        }
    }
}

#[cfg(test)]
#[path = "tls_tests.rs"]
mod tests;
