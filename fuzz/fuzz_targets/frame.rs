//! Fuzz the frame decoder: any byte string, read as a stream of frames,
//! gives messages or a typed error, never a panic or an allocation beyond
//! the per-kind caps; every message that decodes re-encodes to a frame that
//! decodes to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use migrate_core::wire::{read_message, write_message, Limits};

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();
    let mut r = data;
    while let Ok(msg) = read_message(&mut r, &limits) {
        let mut buf = Vec::new();
        write_message(&mut buf, &msg).expect("a decoded message re-encodes");
        let again = read_message(&mut buf.as_slice(), &limits).expect("and decodes again");
        assert_eq!(again, msg);
    }
});
