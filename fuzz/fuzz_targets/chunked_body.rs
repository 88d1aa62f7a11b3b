//! The HTTP/1.1 upstream client's chunked body decoder on arbitrary bytes, read in
//! parts.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| meshgate_proxy::fuzzing::chunked_body(data));
