//! The pgoutput decoder takes bytes from the network: any input must give a
//! message or an error, never a panic, hang or outsized allocation.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = tidemark_producer::pgoutput::decode(&bytes::Bytes::copy_from_slice(data));
});
