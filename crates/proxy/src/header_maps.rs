//! Header maps kept for reuse by the thread that finished with them.
//!
//! A proxied HTTP/1.1 request builds two maps, its own and its response's, and a
//! `HeaderMap` is two allocations (its index table and its entries): eight trips
//! through the allocator per request, about a twentieth of its instructions. The two
//! HTTP/1 ends take their maps from here and give them back once written, so a map
//! goes round: a request's map, once its head is written upstream, holds the next
//! response's fields, and a response's, once written to the client, the next
//! request's.
//!
//! A map is kept cleared (its values dropped) and only while small: a rare request
//! with many fields does not pin a large one.

use http::HeaderMap;
use std::cell::RefCell;

/// Maps kept per thread, enough for the requests a worker has in flight at once.
const KEEP: usize = 32;
/// Maps with room for more fields than this are freed, not kept.
const MAX_CAPACITY: usize = 48;

thread_local! {
    static SPARE: RefCell<Vec<HeaderMap>> = const { RefCell::new(Vec::new()) };
}

/// An empty map with room for `fields` fields.
pub(crate) fn take(fields: usize) -> HeaderMap {
    let spare = SPARE
        .try_with(|s| s.try_borrow_mut().ok().and_then(|mut s| s.pop()))
        .ok()
        .flatten();
    match spare {
        // Room for a field count the server's limits allow cannot overflow a map.
        Some(mut map) => match map.try_reserve(fields) {
            Ok(()) => map,
            Err(_) => HeaderMap::with_capacity(fields),
        },
        None => HeaderMap::with_capacity(fields),
    }
}

/// Give back a map whose message has been written.
pub(crate) fn give(mut map: HeaderMap) {
    if map.capacity() == 0 || map.capacity() > MAX_CAPACITY {
        return;
    }
    map.clear();
    // A full list (or a thread being torn down) drops the map here, outside the cell.
    let _refused = SPARE.try_with(|s| match s.try_borrow_mut() {
        Ok(mut s) if s.len() < KEEP => {
            s.push(map);
            None
        }
        _ => Some(map),
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use http::header::{ACCEPT, HOST};

    #[test]
    fn a_given_map_comes_back_empty_with_its_room() {
        // Drain whatever an earlier test on this thread left.
        while SPARE.with_borrow(|s| !s.is_empty()) {
            drop(take(0));
        }
        let mut map = take(6);
        let room = map.capacity();
        assert!(room >= 6);
        map.insert(HOST, HeaderValue::from_static("a"));
        map.append(ACCEPT, HeaderValue::from_static("*/*"));
        give(map);
        let again = take(2);
        assert!(again.is_empty());
        assert_eq!(again.capacity(), room);
        assert!(again.get(HOST).is_none());
        // More room than it has: it grows, and is still empty.
        give(again);
        let larger = take(40);
        assert!(larger.is_empty() && larger.capacity() >= 40);
    }

    #[test]
    fn large_and_unallocated_maps_are_not_kept() {
        while SPARE.with_borrow(|s| !s.is_empty()) {
            drop(take(0));
        }
        give(HeaderMap::new());
        give(HeaderMap::with_capacity(200));
        assert_eq!(SPARE.with_borrow(Vec::len), 0);
        for _ in 0..KEEP + 5 {
            give(HeaderMap::with_capacity(4));
        }
        assert_eq!(SPARE.with_borrow(Vec::len), KEEP);
    }
}
