//! Arbitrary guest memory, descriptor table included: parsing a request out
//! of it must never panic or reach outside guest memory.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = vublk::virtio::fuzz::parse_arbitrary(data);
});
