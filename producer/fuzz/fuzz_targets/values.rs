//! Value text to JSON, including the array-literal parser: any text under
//! any mapping gives a value or an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidemark_postgres::values::{Mapping, to_json};

const OIDS: [u32; 16] = [16, 20, 700, 1700, 17, 3802, 1114, 1184, 25, 1007, 1009, 1185, 3807, 1001, 1231, 1000];

fuzz_target!(|data: &[u8]| {
    let Some((&selector, text)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(text) else {
        return;
    };
    if let Some(mapping) = Mapping::builtin(OIDS[usize::from(selector) % OIDS.len()]) {
        let _ = to_json(&mapping, text);
    }
});
