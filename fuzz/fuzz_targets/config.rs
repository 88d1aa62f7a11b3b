//! The config compiler (parse, validate, link) on arbitrary text: diagnostics,
//! never a panic.
#![no_main]
use meshgate_config::{Source, compile};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data).into_owned();
    let sources = [Source {
        file: std::sync::Arc::from("fuzz.yaml"),
        text,
    }];
    let _ = compile(&sources);
});
