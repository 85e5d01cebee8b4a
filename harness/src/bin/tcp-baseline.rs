//! `tcp-baseline`: the throughput of one plain TCP stream between two
//! threads over loopback, the yardstick for the migration stream's page
//! rate (`ram.mbps`). Sends `--bytes` (default 4 GiB) in 1 MiB writes and
//! prints one JSON object: `{"bytes":..,"seconds":..,"gbps":..}`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut total: u64 = 4 << 30;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--bytes" => total = harness::parse_size(&args.next().ok_or("--bytes needs a size")?)?,
            other => {
                return Err(format!(
                    "unknown argument {other:?} (usage: tcp-baseline [--bytes SIZE])"
                )
                .into())
            }
        }
    }
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let reader = std::thread::spawn(move || -> std::io::Result<u64> {
        let (mut s, _) = listener.accept()?;
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0u64;
        loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                return Ok(got);
            }
            got += n as u64;
        }
    });
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    // Pseudo-random content, like incompressible guest pages.
    let mut chunk = vec![0u8; 1 << 20];
    harness::workload::fill_pseudo_random(1, 0, &mut chunk);
    let start = Instant::now();
    let mut sent = 0u64;
    while sent < total {
        s.write_all(&chunk)?;
        sent += chunk.len() as u64;
    }
    drop(s);
    let got = reader.join().map_err(|_| "reader thread panicked")??;
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{{\"bytes\":{got},\"seconds\":{secs:.4},\"gbps\":{:.3}}}",
        got as f64 * 8.0 / secs / 1e9
    );
    Ok(())
}
