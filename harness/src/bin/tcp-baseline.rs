//! `tcp-baseline`: the throughput of one plain TCP stream, the yardstick for
//! the migration stream's page rate (`ram.page-mbps`).
//!
//! Three modes, each printing one JSON object
//! `{"bytes":..,"seconds":..,"gbps":..}`:
//! - default: sender and receiver threads over loopback in this process;
//! - `--listen ADDR`: receive one stream (prints `tcp-baseline: listening on
//!   IP:PORT` first, so port 0 works), acknowledge the byte count, exit;
//! - `--connect ADDR`: send to a `--listen` peer, which may be in another
//!   network namespace (how the study measures its emulated links).
//!
//! The sender writes 1 MiB chunks of pseudo-random bytes (like
//! incompressible guest pages) for `--bytes` (default 4 GiB) or
//! `--seconds`; with `--connect` its clock stops only when the receiver has
//! acknowledged every byte, so data still queued in socket buffers or on a
//! shaped link is not counted as sent.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::time::{Duration, Instant};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

const USAGE: &str =
    "usage: tcp-baseline [--bytes SIZE | --seconds S] [--listen ADDR | --connect ADDR]";

/// How much to send.
#[derive(Clone, Copy)]
enum Amount {
    Bytes(u64),
    Seconds(f64),
}

fn main() -> Result<()> {
    let mut amount = Amount::Bytes(4 << 30);
    let mut listen = None;
    let mut connect = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || {
            args.next()
                .ok_or_else(|| format!("{a} needs a value ({USAGE})"))
        };
        match a.as_str() {
            "--bytes" => amount = Amount::Bytes(harness::parse_size(&value()?)?),
            "--seconds" => amount = Amount::Seconds(value()?.parse()?),
            "--listen" => listen = Some(value()?),
            "--connect" => connect = Some(value()?),
            other => return Err(format!("unknown argument {other:?} ({USAGE})").into()),
        }
    }
    match (listen, connect) {
        (Some(addr), None) => listen_mode(&addr),
        (None, Some(addr)) => connect_mode(&addr, amount),
        (None, None) => loopback_mode(amount),
        (Some(_), Some(_)) => {
            Err(format!("--listen and --connect exclude each other ({USAGE})").into())
        }
    }
}

fn print(bytes: u64, secs: f64) {
    println!(
        "{{\"bytes\":{bytes},\"seconds\":{secs:.4},\"gbps\":{:.3}}}",
        bytes as f64 * 8.0 / secs / 1e9
    );
}

/// Reads until EOF; returns the byte count and the time from the first byte.
fn drain(s: &mut TcpStream) -> std::io::Result<(u64, f64)> {
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0u64;
    let mut first: Option<Instant> = None;
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            let secs = first.map_or(0.0, |t| t.elapsed().as_secs_f64());
            return Ok((got, secs));
        }
        first.get_or_insert_with(Instant::now);
        got += n as u64;
    }
}

/// Sends `amount`; returns the bytes sent.
fn pump(s: &mut TcpStream, amount: Amount) -> std::io::Result<u64> {
    s.set_nodelay(true)?;
    let mut chunk = vec![0u8; 1 << 20];
    harness::workload::fill_pseudo_random(1, 0, &mut chunk);
    let start = Instant::now();
    let mut sent = 0u64;
    loop {
        let more = match amount {
            Amount::Bytes(total) => sent < total,
            Amount::Seconds(secs) => start.elapsed().as_secs_f64() < secs,
        };
        if !more {
            return Ok(sent);
        }
        s.write_all(&chunk)?;
        sent += chunk.len() as u64;
    }
}

fn loopback_mode(amount: Amount) -> Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let reader = std::thread::spawn(move || -> std::io::Result<u64> {
        let (mut s, _) = listener.accept()?;
        drain(&mut s).map(|(got, _)| got)
    });
    let mut s = TcpStream::connect(addr)?;
    let start = Instant::now();
    pump(&mut s, amount)?;
    drop(s);
    let got = reader.join().map_err(|_| "reader thread panicked")??;
    print(got, start.elapsed().as_secs_f64());
    Ok(())
}

fn listen_mode(addr: &str) -> Result<()> {
    let listener = TcpListener::bind(addr)?;
    println!("tcp-baseline: listening on {}", listener.local_addr()?);
    std::io::stdout().flush()?;
    let (mut s, _) = listener.accept()?;
    let (got, secs) = drain(&mut s)?;
    s.write_all(&got.to_le_bytes())?;
    s.shutdown(Shutdown::Write)?;
    print(got, secs);
    Ok(())
}

fn connect_mode(addr: &str, amount: Amount) -> Result<()> {
    let mut s = TcpStream::connect(addr)?;
    let start = Instant::now();
    let sent = pump(&mut s, amount)?;
    s.shutdown(Shutdown::Write)?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut ack = [0u8; 8];
    s.read_exact(&mut ack)?;
    let secs = start.elapsed().as_secs_f64();
    let got = u64::from_le_bytes(ack);
    if got != sent {
        return Err(format!("receiver got {got} bytes of {sent}").into());
    }
    print(got, secs);
    Ok(())
}
