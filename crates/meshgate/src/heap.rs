//! How glibc's malloc gives memory back to the kernel.
//!
//! By default glibc returns the top of its heap to the kernel as soon as more than
//! 128 KiB lie free there. Under load a proxy frees and allocates its per-connection
//! buffers all the time, so the heap shrinks after one burst of requests and grows
//! again on the next, and every page that comes back is a fresh page fault: about 700
//! a second at 60,000 requests a second (`bench/README.md`). Keeping up to 1 MiB free
//! at the top ends that churn; an idle process is unchanged, as the threshold is about
//! memory freed after use, not memory taken at start.
//!
//! Setting the trim threshold turns off glibc's moving thresholds, so the size from
//! which an allocation gets its own mapping is set too, to where glibc would have
//! moved it after the first large buffer freed. Why, and what was measured:
//! `docs/adr/0006-keep-the-top-of-the-heap.md`.

/// The most memory kept free at the top of the heap.
const TRIM_THRESHOLD: libc::c_int = 1 << 20;
/// Allocations of this size and more get their own mapping.
const MMAP_THRESHOLD: libc::c_int = 512 << 10;

/// Sets malloc's trim and mapping thresholds. Call before starting any thread.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn keep_top_of_heap() {
    // The workspace's only unsafe code: `mallopt` is the one way to set these.
    #[allow(unsafe_code)]
    // SAFETY: mallopt only changes malloc's parameters, checks its arguments itself,
    // and is called before any other thread exists.
    let ok = unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
            && libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    };
    if !ok {
        eprintln!("meshgate: malloc refused its trim thresholds; the defaults stay");
    }
}

/// Other C libraries keep their own defaults.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn keep_top_of_heap() {}
