//! Path normalisation: never panics, and normalising twice changes nothing.
#![no_main]
use meshgate_route::normalize_path;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(Some(normal)) = normalize_path(path) {
        assert!(normal.starts_with('/'), "{path:?} became {normal:?}");
        // `None` (known normal at a glance) or the same path again (an escape kept).
        let again = normalize_path(&normal);
        assert!(
            again == Ok(None) || again.as_ref() == Ok(&Some(normal.clone())),
            "{path:?} became {normal:?}, then {again:?}"
        );
    }
});
