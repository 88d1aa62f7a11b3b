//! The downstream request guard (smuggling and malformed-HTTP defence) on
//! arbitrary bytes, whole and cut into reads.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| meshgate_proxy::fuzzing::request_stream(data));
