//! Migration addresses (`tcp:HOST:PORT`, `unix:PATH`) and the byte streams
//! behind them.
//!
//! The same URI forms as QEMU's `migrate`/`-incoming` and Cloud Hypervisor's
//! `send-migration`/`receive-migration`. Streams are blocking sockets with
//! timeouts: a migration is one sequential exchange, so a thread per side is
//! simpler than an event loop and costs nothing in throughput.
//!
//! A stream may be wrapped in a secure channel ([`ChannelSecurity`]): the
//! pre-shared-key mode ([`psk`]) authenticates both ends and then encrypts
//! and authenticates every
//! record ([`secure`]), and is used by the engine exactly as a plain socket
//! ([`Stream::Psk`]). The TLS mode ([`tls`], rustls) authenticates both
//! ends by certificates signed by one CA ([`Stream::Tls`]).

pub mod psk;
mod rate;
pub mod secure;
pub mod tls;

pub use psk::{ChannelError, Psk};
pub use rate::{RateLimited, SharedRate};
pub use secure::{RecordError, SecureStream};
pub use tls::{TlsCredentials, TlsError, TlsFiles, TlsStream};

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Errors from parsing an address or opening a stream.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The URI is not `tcp:HOST:PORT` or `unix:PATH`.
    #[error("bad migration address {uri:?}: {reason} (expected tcp:HOST:PORT or unix:PATH)")]
    BadUri {
        /// The text given.
        uri: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// Connecting failed.
    #[error("cannot connect to {uri}")]
    Connect {
        /// The address.
        uri: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Listening failed.
    #[error("cannot listen on {uri}")]
    Listen {
        /// The address.
        uri: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Accepting a connection failed.
    #[error("accepting a connection on {uri} failed")]
    Accept {
        /// The address.
        uri: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// A migration address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationUri {
    /// `tcp:HOST:PORT`; HOST may be a name, an IPv4 address or `[v6]`.
    Tcp {
        /// Host part.
        host: String,
        /// Port.
        port: u16,
    },
    /// `unix:PATH`.
    Unix(PathBuf),
}

impl FromStr for MigrationUri {
    type Err = TransportError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason| TransportError::BadUri {
            uri: s.to_string(),
            reason,
        };
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(bad("empty socket path"));
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        let rest = s
            .strip_prefix("tcp:")
            .ok_or_else(|| bad("unknown scheme"))?;
        let (host, port) = rest.rsplit_once(':').ok_or_else(|| bad("missing port"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(bad("empty host"));
        }
        let port = port
            .parse()
            .map_err(|_| bad("port is not a number 0-65535"))?;
        Ok(Self::Tcp {
            host: host.to_string(),
            port,
        })
    }
}

impl std::fmt::Display for MigrationUri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp { host, port } if host.contains(':') => write!(f, "tcp:[{host}]:{port}"),
            Self::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
            Self::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A connected migration stream.
#[derive(Debug)]
pub enum Stream {
    /// TCP.
    Tcp(TcpStream),
    /// Unix domain socket.
    Unix(UnixStream),
    /// A socket inside an authenticated pre-shared-key channel.
    Psk(SecureStream),
    /// A socket inside a mutually authenticated TLS 1.3 connection.
    Tls(TlsStream),
}

/// How a migration stream is protected. There is no default: plaintext
/// must be asked for (`--insecure`).
#[derive(Debug, Clone)]
pub enum ChannelSecurity {
    /// Plaintext: anyone who reaches the port can write guest memory.
    Insecure,
    /// Mutual authentication with this key, then every record encrypted and authenticated (AES-256-GCM).
    Psk(Arc<Psk>),
    /// Mutual TLS: certificates signed by one CA on both ends.
    Tls(Arc<TlsCredentials>),
}

impl ChannelSecurity {
    /// A short name for messages and reports: `plaintext` or `psk`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Insecure => "plaintext",
            Self::Psk(_) => "psk",
            Self::Tls(_) => "tls",
        }
    }
}

impl Stream {
    /// The source's side of the channel handshake with the destination at
    /// `to` (nothing for [`ChannelSecurity::Insecure`]). Set the timeouts
    /// first: the handshake reads from the peer.
    pub fn secure_connect(
        self,
        security: &ChannelSecurity,
        to: &MigrationUri,
    ) -> Result<Self, ChannelError> {
        match security {
            ChannelSecurity::Insecure => Ok(self),
            ChannelSecurity::Psk(key) => psk::connect(self, key).map(Self::Psk),
            ChannelSecurity::Tls(creds) => {
                let host = match to {
                    MigrationUri::Tcp { host, .. } => host.as_str(),
                    MigrationUri::Unix(_) => "localhost",
                };
                Ok(Self::Tls(tls::connect(self, creds, host)?))
            }
        }
    }

    /// The destination's side of the channel handshake; a peer that fails
    /// it is refused before any migration message is read.
    pub fn secure_accept(self, security: &ChannelSecurity) -> Result<Self, ChannelError> {
        match security {
            ChannelSecurity::Insecure => Ok(self),
            ChannelSecurity::Psk(key) => psk::accept(self, key).map(Self::Psk),
            ChannelSecurity::Tls(creds) => Ok(Self::Tls(tls::accept(self, creds)?)),
        }
    }

    /// Connect to `uri`, giving up after `timeout`.
    pub fn connect(uri: &MigrationUri, timeout: Duration) -> Result<Self, TransportError> {
        let err = |source| TransportError::Connect {
            uri: uri.to_string(),
            source,
        };
        match uri {
            MigrationUri::Tcp { host, port } => {
                let addrs = (host.as_str(), *port).to_socket_addrs().map_err(err)?;
                let mut last = io::Error::new(io::ErrorKind::NotFound, "host has no address");
                for addr in addrs {
                    match TcpStream::connect_timeout(&addr, timeout) {
                        Ok(s) => {
                            s.set_nodelay(true).map_err(err)?;
                            return Ok(Self::Tcp(s));
                        }
                        Err(e) => last = e,
                    }
                }
                Err(err(last))
            }
            MigrationUri::Unix(path) => {
                // Unix connects do not block on a listening peer; retry
                // briefly in case the destination is still starting.
                let deadline = Instant::now() + timeout;
                loop {
                    match UnixStream::connect(path) {
                        Ok(s) => return Ok(Self::Unix(s)),
                        Err(e) if Instant::now() >= deadline => return Err(err(e)),
                        Err(_) => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
            }
        }
    }

    /// Set the read and write timeouts (`None`: block forever).
    pub fn set_timeouts(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Self::Tcp(s) => {
                s.set_read_timeout(timeout)?;
                s.set_write_timeout(timeout)
            }
            Self::Unix(s) => {
                s.set_read_timeout(timeout)?;
                s.set_write_timeout(timeout)
            }
            Self::Psk(s) => s.socket().set_timeouts(timeout),
            Self::Tls(s) => s.socket().set_timeouts(timeout),
        }
    }

    /// A second handle on the same connection.
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(match self {
            Self::Tcp(s) => Self::Tcp(s.try_clone()?),
            Self::Unix(s) => Self::Unix(s.try_clone()?),
            Self::Psk(s) => Self::Psk(s.try_clone()?),
            Self::Tls(s) => Self::Tls(s.try_clone()?),
        })
    }

    /// Close both directions.
    pub fn shutdown(&self) {
        let _ = match self {
            Self::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            Self::Unix(s) => s.shutdown(std::net::Shutdown::Both),
            Self::Psk(s) => {
                s.socket().shutdown();
                Ok(())
            }
            Self::Tls(s) => {
                s.socket().shutdown();
                Ok(())
            }
        };
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.read(buf),
            Self::Unix(s) => s.read(buf),
            Self::Psk(s) => s.read(buf),
            Self::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.write(buf),
            Self::Unix(s) => s.write(buf),
            Self::Psk(s) => s.write(buf),
            Self::Tls(s) => s.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.write_vectored(bufs),
            Self::Unix(s) => s.write_vectored(bufs),
            Self::Psk(s) => s.write_vectored(bufs),
            Self::Tls(s) => s.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.flush(),
            Self::Unix(s) => s.flush(),
            Self::Psk(s) => s.flush(),
            Self::Tls(s) => s.flush(),
        }
    }
}

/// A listening migration endpoint.
#[derive(Debug)]
pub enum Listener {
    /// TCP.
    Tcp(TcpListener, MigrationUri),
    /// Unix domain socket (the path is removed on drop).
    Unix(UnixListener, MigrationUri, PathBuf),
}

impl Listener {
    /// Listen on `uri`. A Unix socket path that exists is refused, not
    /// replaced: it may belong to another running process.
    pub fn bind(uri: &MigrationUri) -> Result<Self, TransportError> {
        let err = |source| TransportError::Listen {
            uri: uri.to_string(),
            source,
        };
        match uri {
            MigrationUri::Tcp { host, port } => {
                let l = TcpListener::bind((host.as_str(), *port)).map_err(err)?;
                let port = l.local_addr().map_err(err)?.port();
                let bound = MigrationUri::Tcp {
                    host: host.clone(),
                    port,
                };
                Ok(Self::Tcp(l, bound))
            }
            MigrationUri::Unix(path) => {
                let l = UnixListener::bind(path).map_err(err)?;
                Ok(Self::Unix(l, uri.clone(), path.clone()))
            }
        }
    }

    /// The address actually bound (a `tcp:` port 0 becomes the real port).
    pub fn uri(&self) -> &MigrationUri {
        match self {
            Self::Tcp(_, u) | Self::Unix(_, u, _) => u,
        }
    }

    /// Wait for one connection.
    pub fn accept(&self) -> Result<Stream, TransportError> {
        let err = |source| TransportError::Accept {
            uri: self.uri().to_string(),
            source,
        };
        match self {
            Self::Tcp(l, _) => {
                let (s, _) = l.accept().map_err(err)?;
                s.set_nodelay(true).map_err(err)?;
                Ok(Stream::Tcp(s))
            }
            Self::Unix(l, _, _) => Ok(Stream::Unix(l.accept().map_err(err)?.0)),
        }
    }

    /// Wait up to `timeout` for one connection (the further channels of a
    /// migration: a source that never opens them must not hang us).
    pub fn accept_timeout(&self, timeout: Duration) -> Result<Stream, TransportError> {
        let err = |source| TransportError::Accept {
            uri: self.uri().to_string(),
            source,
        };
        let nonblocking = |on: bool| match self {
            Self::Tcp(l, _) => l.set_nonblocking(on),
            Self::Unix(l, _, _) => l.set_nonblocking(on),
        };
        nonblocking(true).map_err(err)?;
        let deadline = Instant::now() + timeout;
        let got = loop {
            let attempt = match self {
                Self::Tcp(l, _) => l.accept().map(|(s, _)| Stream::Tcp(s)),
                Self::Unix(l, _, _) => l.accept().map(|(s, _)| Stream::Unix(s)),
            };
            match attempt {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    break Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no connection within {timeout:?}"),
                    ));
                }
                other => break other,
            }
        };
        nonblocking(false).map_err(err)?;
        let stream = got.map_err(err)?;
        match &stream {
            Stream::Tcp(s) => {
                s.set_nonblocking(false).map_err(err)?;
                s.set_nodelay(true).map_err(err)?;
            }
            Stream::Unix(s) => s.set_nonblocking(false).map_err(err)?,
            Stream::Psk(_) | Stream::Tls(_) => {}
        }
        Ok(stream)
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Self::Unix(_, _, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_uris() {
        assert_eq!(
            "tcp:127.0.0.1:4444".parse::<MigrationUri>().unwrap(),
            MigrationUri::Tcp {
                host: "127.0.0.1".into(),
                port: 4444
            }
        );
        assert_eq!(
            "tcp:[::1]:5".parse::<MigrationUri>().unwrap().to_string(),
            "tcp:[::1]:5"
        );
        assert_eq!(
            "unix:/tmp/x.sock".parse::<MigrationUri>().unwrap(),
            MigrationUri::Unix("/tmp/x.sock".into())
        );
        for bad in [
            "",
            "tcp:",
            "tcp:host",
            "tcp:host:99999",
            "udp:x:1",
            "unix:",
            "tcp::80",
        ] {
            assert!(
                matches!(
                    bad.parse::<MigrationUri>(),
                    Err(TransportError::BadUri { .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn tcp_and_unix_round_trip() {
        let dir = std::env::temp_dir().join(format!("vmigrate-t-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for uri in [
            "tcp:127.0.0.1:0".parse().unwrap(),
            MigrationUri::Unix(dir.join("s.sock")),
        ] {
            let l = Listener::bind(&uri).unwrap();
            let bound = l.uri().clone();
            let t = std::thread::spawn(move || {
                let mut s = l.accept().unwrap();
                let mut b = [0u8; 5];
                s.read_exact(&mut b).unwrap();
                b
            });
            let mut c = Stream::connect(&bound, Duration::from_secs(5)).unwrap();
            c.write_all(b"hello").unwrap();
            assert_eq!(&t.join().unwrap(), b"hello");
        }
        let _ = std::fs::remove_dir_all(dir);
    }
}
