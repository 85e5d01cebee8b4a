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
//!
//! `--memory SIZE` makes it a memory-to-memory stream: the sender walks a
//! SIZE buffer (touched before the clock starts) chunk by chunk instead of
//! re-sending one cached chunk, and the receiver reads into successive
//! chunks of its own SIZE buffer (also touched before), wrapping around.
//! That is what moving guest RAM costs at the least: each byte is read
//! from memory on one side and lands in memory on the other, where the
//! default stream stays in the caches.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::time::{Duration, Instant};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

const USAGE: &str = "usage: tcp-baseline [--bytes SIZE | --seconds S] [--memory SIZE] [--listen ADDR | --connect ADDR]";

const CHUNK: usize = 1 << 20;

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
    let mut memory = CHUNK;
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
            "--memory" => {
                let size = harness::parse_size(&value()?)?;
                memory = usize::try_from(size)?.max(CHUNK) / CHUNK * CHUNK;
            }
            other => return Err(format!("unknown argument {other:?} ({USAGE})").into()),
        }
    }
    match (listen, connect) {
        (Some(addr), None) => listen_mode(&addr, memory),
        (None, Some(addr)) => connect_mode(&addr, amount, memory),
        (None, None) => loopback_mode(amount, memory),
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

/// A buffer of `size` bytes, every page written (so no fault is timed).
fn touched(size: usize) -> Vec<u8> {
    let mut buf = vec![0u8; size];
    for b in buf.iter_mut().step_by(4096) {
        *b = 1;
    }
    buf
}

/// The sender's buffer: `memory` bytes of pseudo-random content.
fn source(memory: usize) -> Vec<u8> {
    let mut buf = touched(memory);
    harness::workload::fill_pseudo_random(1, 0, &mut buf);
    buf
}

/// Reads until EOF into successive chunks of `buf`; returns the byte
/// count and the time from the first byte.
fn drain(s: &mut TcpStream, buf: &mut [u8]) -> std::io::Result<(u64, f64)> {
    let mut at = 0;
    let mut got = 0u64;
    let mut first: Option<Instant> = None;
    loop {
        if at == buf.len() {
            at = 0;
        }
        let end = (at + CHUNK).min(buf.len());
        let n = s.read(&mut buf[at..end])?;
        at += n;
        if n == 0 {
            let secs = first.map_or(0.0, |t| t.elapsed().as_secs_f64());
            return Ok((got, secs));
        }
        first.get_or_insert_with(Instant::now);
        got += n as u64;
    }
}

/// Sends `amount` from successive chunks of `buf`; returns the bytes sent.
fn pump(s: &mut TcpStream, amount: Amount, buf: &[u8]) -> std::io::Result<u64> {
    s.set_nodelay(true)?;
    let start = Instant::now();
    let mut sent = 0u64;
    let mut at = 0;
    loop {
        let more = match amount {
            Amount::Bytes(total) => sent < total,
            Amount::Seconds(secs) => start.elapsed().as_secs_f64() < secs,
        };
        if !more {
            return Ok(sent);
        }
        if at == buf.len() {
            at = 0;
        }
        s.write_all(&buf[at..at + CHUNK])?;
        at += CHUNK;
        sent += CHUNK as u64;
    }
}

fn loopback_mode(amount: Amount, memory: usize) -> Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let (ready_tx, ready) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || -> std::io::Result<u64> {
        let mut buf = touched(memory);
        let _ = ready_tx.send(());
        let (mut s, _) = listener.accept()?;
        drain(&mut s, &mut buf).map(|(got, _)| got)
    });
    let buf = source(memory);
    // Both buffers are touched before the clock starts.
    ready.recv().map_err(|_| "reader thread failed")?;
    let mut s = TcpStream::connect(addr)?;
    let start = Instant::now();
    pump(&mut s, amount, &buf)?;
    drop(s);
    let got = reader.join().map_err(|_| "reader thread panicked")??;
    print(got, start.elapsed().as_secs_f64());
    Ok(())
}

fn listen_mode(addr: &str, memory: usize) -> Result<()> {
    let mut buf = touched(memory);
    let listener = TcpListener::bind(addr)?;
    println!("tcp-baseline: listening on {}", listener.local_addr()?);
    std::io::stdout().flush()?;
    let (mut s, _) = listener.accept()?;
    let (got, secs) = drain(&mut s, &mut buf)?;
    s.write_all(&got.to_le_bytes())?;
    s.shutdown(Shutdown::Write)?;
    print(got, secs);
    Ok(())
}

fn connect_mode(addr: &str, amount: Amount, memory: usize) -> Result<()> {
    let buf = source(memory);
    let mut s = TcpStream::connect(addr)?;
    let start = Instant::now();
    let sent = pump(&mut s, amount, &buf)?;
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
