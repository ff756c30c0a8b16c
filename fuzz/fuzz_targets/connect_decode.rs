//! Fuzzes everything the Connect layer does with untrusted bytes before a handler runs:
//! envelope framing, gzip, headers, and protobuf/JSON decoding of the CLI's messages.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    kiln::api::connect::fuzz_decode(data);
});
