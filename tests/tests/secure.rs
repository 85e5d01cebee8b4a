//! Tier 3: the pre-shared-key channel between real `vmigrate` processes on
//! real KVM. The right key migrates a running `verify` guest; strangers (no
//! credential, a wrong key, a man in the middle flipping one bit after the
//! handshake) are refused: the destination exits non-zero saying why
//! without running the guest, `send` exits non-zero, and the source guest
//! keeps running and checking its memory.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use e2e::{kvm_available, one_at_a_time, send_json, Scratch, VmProcess};
use harness::{MISMATCH_MARK, PASS_MARK};

const BIN: &str = env!("CARGO_BIN_EXE_vmigrate");
const T: Duration = Duration::from_secs(60);
/// What the source sends in the handshake: magic + nonce, then its proof.
const HANDSHAKE_FROM_SOURCE: u64 = 8 + 32 + 32;

fn bin() -> &'static Path {
    Path::new(BIN)
}

fn key_file(dir: &Scratch, name: &str, byte: u8) -> PathBuf {
    let p = dir.path(name);
    let text = format!("{byte:02x}").repeat(32);
    std::fs::write(&p, format!("{text}\n")).unwrap();
    p
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A TCP proxy to `target` (`tcp:HOST:PORT`) that flips bit 0 of byte
/// `flip_at` of the source-to-destination direction. Returns its address
/// and a handle that yields whether it flipped.
fn flipping_proxy(target: &str, flip_at: u64) -> (String, JoinHandle<bool>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("tcp:{}", l.local_addr().unwrap());
    let target = target.strip_prefix("tcp:").unwrap().to_string();
    let h = thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        let mut d = TcpStream::connect(target).unwrap();
        let (mut c2, mut d2) = (c.try_clone().unwrap(), d.try_clone().unwrap());
        let back = thread::spawn(move || {
            let _ = std::io::copy(&mut d2, &mut c2);
            let _ = c2.shutdown(Shutdown::Both);
        });
        let mut buf = vec![0u8; 64 * 1024];
        let (mut pos, mut flipped) = (0u64, false);
        loop {
            let n = match c.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if !flipped && pos + n as u64 > flip_at {
                buf[usize::try_from(flip_at - pos).unwrap()] ^= 0x01;
                flipped = true;
            }
            if d.write_all(&buf[..n]).is_err() {
                break;
            }
            pos += n as u64;
        }
        let _ = d.shutdown(Shutdown::Both);
        let _ = c.shutdown(Shutdown::Both);
        let _ = back.join();
        flipped
    });
    (addr, h)
}

#[test]
fn the_right_key_migrates_a_running_guest() {
    if !kvm_available("the_right_key_migrates_a_running_guest") {
        return;
    }
    let _serial = one_at_a_time();
    let dir = Scratch::new("psk-ok");
    let key = key_file(&dir, "k", 0x5a);
    let mut src = VmProcess::source(bin(), &dir, "src", "verify:end=32M", "64M");
    src.wait_api();
    src.wait_marks(PASS_MARK, 2, T);
    let (mut dst, uri) = VmProcess::destination_with(
        bin(),
        &dir,
        "dst",
        "tcp:127.0.0.1:0",
        &["--psk-file", s(&key)],
        &[],
    );
    let (ok, report, stderr) = send_json(bin(), &src.api, &uri, &["--psk-file", s(&key)]);
    let report = report.unwrap_or_else(|| panic!("no report: {stderr}"));
    assert!(ok, "{report:#}\n{stderr}\n{}", dst.stderr_text());
    assert_eq!(report["status"], "completed");
    assert_eq!(report["digest"]["equal"], true, "{report:#}");
    assert!(src.wait_exit(T).success(), "{}", src.stderr_text());
    assert_eq!(src.count(MISMATCH_MARK), 0);
    dst.wait_marks(PASS_MARK, 2, T);
    assert_eq!(dst.count(MISMATCH_MARK), 0, "destination found a bad page");
    assert!(dst.is_running(), "{}", dst.stderr_text());
    assert!(
        dst.stderr_text().contains("source authenticated"),
        "{}",
        dst.stderr_text()
    );
}

/// One refused attempt: the destination exits non-zero saying `dst_says`
/// and never runs the guest; `send` fails saying `send_says`; the source
/// guest goes on passing its self-check.
#[allow(clippy::too_many_arguments)] // one line per case reads best
fn refused(
    dir: &Scratch,
    src: &VmProcess,
    case: &str,
    dst_channel: &[&str],
    send_extra: &[&str],
    proxy_flip: Option<u64>,
    dst_says: &str,
    send_says: &str,
) {
    let (mut dst, uri) =
        VmProcess::destination_with(bin(), dir, case, "tcp:127.0.0.1:0", dst_channel, &[]);
    let (to, proxy) = match proxy_flip {
        Some(at) => {
            let (a, h) = flipping_proxy(&uri, at);
            (a, Some(h))
        }
        None => (uri, None),
    };
    let before = src.count(PASS_MARK);
    let (ok, report, stderr) = send_json(bin(), &src.api, &to, send_extra);
    let said = format!(
        "{stderr} {}",
        report.map(|r| r.to_string()).unwrap_or_default()
    );
    assert!(!ok, "{case}: send succeeded: {said}");
    assert!(said.contains(send_says), "{case}: send said {said}");
    let st = dst.wait_exit(T);
    let err = dst.stderr_text();
    assert!(!st.success(), "{case}: destination exited {st}: {err}");
    assert!(err.contains(dst_says), "{case}: destination said {err}");
    assert!(
        err.contains("the guest was not started here"),
        "{case}: {err}"
    );
    assert_eq!(
        dst.count(PASS_MARK),
        0,
        "{case}: the guest ran on the destination"
    );
    eprintln!("{case}: destination exited {st}: {}", err.trim());
    eprintln!("{case}: send: {}", said.trim());
    if let Some(h) = proxy {
        assert!(h.join().unwrap(), "{case}: the proxy never flipped a bit");
    }
    // The source guest runs on and its memory is intact.
    src.wait_marks(PASS_MARK, before + 2, T);
    assert_eq!(src.count(MISMATCH_MARK), 0, "{case}: source mismatch");
}

#[test]
fn strangers_are_refused_and_the_source_runs_on() {
    if !kvm_available("strangers_are_refused_and_the_source_runs_on") {
        return;
    }
    let _serial = one_at_a_time();
    let dir = Scratch::new("psk-strangers");
    let key = key_file(&dir, "k", 0x11);
    let other = key_file(&dir, "other", 0x22);
    let psk = ["--psk-file", s(&key)];
    let mut src = VmProcess::source(bin(), &dir, "src", "verify:end=32M", "64M");
    src.wait_api();
    src.wait_marks(PASS_MARK, 2, T);

    // A plaintext source at a PSK destination.
    refused(
        &dir,
        &src,
        "plaintext",
        &psk,
        &["--insecure"],
        None,
        "did not open a pre-shared-key channel (it sent a plaintext migration Hello)",
        "requires an authenticated channel",
    );
    // A source with another key.
    refused(
        &dir,
        &src,
        "wrong-key",
        &psk,
        &["--psk-file", s(&other)],
        None,
        "failed to prove it holds the pre-shared key",
        "refused our proof",
    );
    // The right key, but one bit of the memory stream flipped on the way.
    refused(
        &dir,
        &src,
        "mitm",
        &psk,
        &psk,
        Some(HANDSHAKE_FROM_SOURCE + (2 << 20)),
        "failed its integrity check",
        // The source, busy writing, hears the destination's reason.
        "integrity check",
    );
    // A PSK source at a plaintext destination sends it nothing it accepts.
    refused(
        &dir,
        &src,
        "plaintext-dest",
        &["--insecure"],
        &psk,
        None,
        "incoming migration failed",
        "secure channel with",
    );
    // A stranger that connects and hangs up half-way through.
    let (mut dst, uri) =
        VmProcess::destination_with(bin(), &dir, "hang-up", "tcp:127.0.0.1:0", &psk, &[]);
    let mut c = TcpStream::connect(uri.strip_prefix("tcp:").unwrap()).unwrap();
    c.write_all(b"VMIGPSK1 half a nonce").unwrap();
    drop(c);
    assert!(!dst.wait_exit(T).success());
    assert!(
        dst.stderr_text()
            .contains("the source closed the connection"),
        "{}",
        dst.stderr_text()
    );

    // After all that, the source still migrates with the right key.
    let (dst, uri) = VmProcess::destination_with(bin(), &dir, "dst", "tcp:127.0.0.1:0", &psk, &[]);
    let (ok, report, stderr) = send_json(bin(), &src.api, &uri, &psk);
    assert!(ok, "{report:?} {stderr} {}", dst.stderr_text());
    assert!(src.wait_exit(T).success());
    dst.wait_marks(PASS_MARK, 2, T);
    assert_eq!(dst.count(MISMATCH_MARK), 0);
}

/// A CA and certificates it signs, as PEM files in a scratch folder.
struct Ca {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl Ca {
    fn new(name: &str) -> Self {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        let cert = p.self_signed(&key).unwrap();
        Self { cert, key }
    }

    /// `--tls-cert C --tls-key K --tls-ca A` for an end with a certificate
    /// for 127.0.0.1 signed by this CA, trusting `trust`.
    fn issue(&self, dir: &Scratch, prefix: &str, trust: &Ca) -> Vec<String> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, prefix);
        p.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = p.signed_by(&key, &self.cert, &self.key).unwrap();
        let f = |n: &str| dir.path(&format!("{prefix}.{n}.pem"));
        std::fs::write(f("cert"), cert.pem()).unwrap();
        std::fs::write(f("key"), key.serialize_pem()).unwrap();
        std::fs::write(f("ca"), trust.cert.pem()).unwrap();
        let s = |p: PathBuf| p.to_str().unwrap().to_string();
        vec![
            "--tls-cert".into(),
            s(f("cert")),
            "--tls-key".into(),
            s(f("key")),
            "--tls-ca".into(),
            s(f("ca")),
        ]
    }
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn mutual_tls_migrates_and_refuses_strangers() {
    if !kvm_available("mutual_tls_migrates_and_refuses_strangers") {
        return;
    }
    let _serial = one_at_a_time();
    let dir = Scratch::new("tls");
    let ca = Ca::new("vmigrate test CA");
    let other = Ca::new("stranger CA");
    let dst_tls = ca.issue(&dir, "dst", &ca);
    let src_tls = ca.issue(&dir, "src", &ca);
    let stranger_tls = other.issue(&dir, "stranger", &ca);
    let (dst_args, src_args) = (strs(&dst_tls), strs(&src_tls));
    let mut src = VmProcess::source(bin(), &dir, "src", "verify:end=32M", "64M");
    src.wait_api();
    src.wait_marks(PASS_MARK, 2, T);

    refused(
        &dir,
        &src,
        "tls-plaintext",
        &dst_args,
        &["--insecure"],
        None,
        "TLS handshake failed",
        "failed",
    );
    refused(
        &dir,
        &src,
        "tls-other-ca",
        &dst_args,
        &strs(&stranger_tls),
        None,
        "TLS handshake failed",
        "accept our certificate",
    );
    refused(
        &dir,
        &src,
        "tls-mitm",
        &dst_args,
        &src_args,
        Some(2 << 20),
        "decrypt",
        "failed",
    );

    let (dst, uri) =
        VmProcess::destination_with(bin(), &dir, "dst", "tcp:127.0.0.1:0", &dst_args, &[]);
    let (ok, report, stderr) = send_json(bin(), &src.api, &uri, &src_args);
    let report = report.unwrap_or_else(|| panic!("no report: {stderr}"));
    assert!(ok, "{report:#} {stderr} {}", dst.stderr_text());
    assert_eq!(report["digest"]["equal"], true);
    assert!(src.wait_exit(T).success());
    assert_eq!(src.count(MISMATCH_MARK), 0);
    dst.wait_marks(PASS_MARK, 2, T);
    assert_eq!(dst.count(MISMATCH_MARK), 0);
    assert!(dst.stderr_text().contains("client certificate"));
}
