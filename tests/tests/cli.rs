//! The `vmigrate` command line: boot images, exit status, bad input.

use std::path::Path;

use e2e::{kvm_available, one_at_a_time, vmigrate, Scratch};

const BIN: &str = env!("CARGO_BIN_EXE_vmigrate");

fn bin() -> &'static Path {
    Path::new(BIN)
}

/// Real mode: print "hi" on COM1 (polling the line status first), then
/// write 7 to the exit port.
const EXIT7_GUEST: &[u8] = &[
    0xFA, // cli
    0xBA, 0xFD, 0x03, // mov dx, 0x3fd
    0xEC, // in al, dx   (line status)
    0xA8, 0x20, // test al, 0x20
    0x74, 0xFB, // jz back to `in`
    0xBA, 0xF8, 0x03, // mov dx, 0x3f8
    0xB0, b'h', 0xEE, // mov al,'h'; out dx,al
    0xB0, b'i', 0xEE, // mov al,'i'; out dx,al
    0xBA, 0x01, 0x05, // mov dx, 0x501
    0xB0, 0x07, 0xEE, // mov al, 7; out dx, al
    0xF4, // hlt (not reached)
];

#[test]
fn boot_image_prints_and_exits_with_its_status() {
    if !kvm_available("boot_image_prints_and_exits_with_its_status") {
        return;
    }
    let _g = one_at_a_time();
    let dir = Scratch::new("exit7");
    let img = dir.path("exit7.img");
    std::fs::write(&img, EXIT7_GUEST).unwrap();
    let out = vmigrate(
        bin(),
        &[
            "run",
            "--boot",
            img.to_str().unwrap(),
            "--mem",
            "16M",
            "--serial",
            "-",
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(7),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, b"hi");
}

#[test]
fn exported_workload_boots_and_passes() {
    if !kvm_available("exported_workload_boots_and_passes") {
        return;
    }
    let _g = one_at_a_time();
    let dir = Scratch::new("export");
    let img = dir.path("verify.img");
    let out = vmigrate(
        bin(),
        &[
            "workload",
            "export",
            "verify:end=4M",
            "--mem",
            "16M",
            "--out",
            img.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let image = std::fs::read(&img).unwrap();
    assert_eq!(image.len(), 512);
    assert_eq!(&image[510..], &[0x55, 0xAA]);
    // Boot the exported image as a plain --boot image and watch two clean
    // passes, then stop the VM through its API socket.
    let mut p = e2e::VmProcess::boot(bin(), &dir, "vm", &img, "16M");
    p.wait_api();
    p.wait_marks(harness::PASS_MARK, 2, std::time::Duration::from_secs(60));
    assert_eq!(p.count(harness::MISMATCH_MARK), 0);
    let out = vmigrate(
        bin(),
        &["shutdown", "--api-socket", p.api.to_str().unwrap()],
    );
    assert!(out.status.success());
    assert!(p.wait_exit(std::time::Duration::from_secs(10)).success());
}

/// Bad input is refused with a message naming the problem, never a panic.
#[test]
fn bad_arguments_get_clear_errors() {
    let dir = Scratch::new("badargs");
    let serial = dir.path("s");
    let serial = serial.to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (
            &[
                "run",
                "--workload",
                "idle",
                "--mem",
                "1M",
                "--serial",
                serial,
            ],
            "2 MiB",
        ),
        (
            &[
                "run",
                "--workload",
                "idle",
                "--mem",
                "12Q",
                "--serial",
                serial,
            ],
            "12Q",
        ),
        (
            &[
                "run",
                "--workload",
                "nope",
                "--mem",
                "16M",
                "--serial",
                serial,
            ],
            "unknown workload",
        ),
        (
            &[
                "run",
                "--incoming",
                "udp:1.2.3.4:5",
                "--insecure",
                "--serial",
                serial,
            ],
            "tcp:HOST:PORT",
        ),
        (
            &["run", "--workload", "idle", "--serial", serial],
            "--mem is required",
        ),
        (
            &[
                "run",
                "--incoming",
                "tcp:127.0.0.1:0",
                "--insecure",
                "--prefault",
                "--serial",
                serial,
            ],
            "--prefault needs --mem",
        ),
        (
            &[
                "run",
                "--workload",
                "idle:fill=zeros",
                "--mem",
                "16M",
                "--serial",
                serial,
            ],
            "fill",
        ),
        (
            &[
                "send",
                "--api-socket",
                "/nonexistent/x.sock",
                "--to",
                "tcp:127.0.0.1:1",
                "--insecure",
            ],
            "cannot connect to API socket",
        ),
        (
            &["workload", "export", "sweep:start=0", "--out", serial],
            "1 MiB",
        ),
        (
            &[
                "run",
                "--incoming",
                "tcp:127.0.0.1:0",
                "--psk-file",
                "/nonexistent/key",
                "--serial",
                serial,
            ],
            "cannot read the pre-shared key file",
        ),
    ];
    for (args, want) in cases {
        let out = vmigrate(bin(), args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: expected {want:?} in {err:?}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    // An API socket path that exists is refused, not taken over.
    let taken = dir.path("taken.sock");
    std::fs::write(&taken, b"").unwrap();
    let out = vmigrate(
        bin(),
        &[
            "run",
            "--workload",
            "idle",
            "--mem",
            "16M",
            "--serial",
            serial,
            "--api-socket",
            taken.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
    // A clap usage error exits 2.
    assert_eq!(vmigrate(bin(), &["send", "--bogus"]).status.code(), Some(2));
    let out = vmigrate(
        bin(),
        &[
            "run",
            "--workload",
            "idle",
            "--mem",
            "16M",
            "--serial",
            serial,
            "--dirty-track",
            "sometimes",
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("bitmap, ring or auto"));
    // Plaintext only when asked for: a destination or a send without a
    // credential and without --insecure is a usage error, as are both.
    for args in [
        &["run", "--incoming", "tcp:127.0.0.1:0", "--serial", serial][..],
        &["send", "--api-socket", "/x.sock", "--to", "tcp:127.0.0.1:1"][..],
        &[
            "send",
            "--api-socket",
            "/x.sock",
            "--to",
            "tcp:127.0.0.1:1",
            "--insecure",
            "--psk-file",
            "/k",
        ][..],
        &[
            "run",
            "--incoming",
            "tcp:127.0.0.1:0",
            "--tls-cert",
            "/c.pem",
            "--serial",
            serial,
        ][..],
    ] {
        let out = vmigrate(bin(), args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains("--psk-file") || err.contains("--insecure"),
            "{err}"
        );
    }
}
