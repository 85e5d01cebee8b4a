//! Fuzz the destination: the bytes are what a source (or a stranger) sends;
//! a real receiver with a memory-only VM must refuse or accept them without
//! panicking, hanging or allocating beyond what the handshake may announce.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vmigrate_fuzz::feed_receiver(data);
});
