//! The HTTP/1.1 upstream client's response head parser on arbitrary bytes.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| meshgate_proxy::fuzzing::response_head(data));
