//! The per-command record paths of stats and health allocate nothing: a
//! counting global allocator around `rb::fuzzing::RecordPaths` (the
//! counters, the latency histogram, admission and success on a healthy
//! host, a refusal by a Down host).
//!
//! Needs the `fuzzing` feature (which makes the internals reachable):
//! `cargo test --features fuzzing --test stats_alloc`.
#![cfg(feature = "fuzzing")]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

thread_local! {
    /// Allocations made by this thread (other test threads do not count).
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

struct Counting;

fn count() {
    // `try_with`: the thread-local may be gone while a thread exits.
    let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
}

// SAFETY: every call is forwarded unchanged to the system allocator.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        System.alloc_zeroed(layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        System.realloc(ptr, layout, new_size)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

#[test]
fn record_paths_do_not_allocate() {
    let paths = rb::fuzzing::RecordPaths::new();
    assert_eq!(paths.run(10), (10, 10));
    let before = allocations();
    let (admitted, refused) = paths.run(100_000);
    let after = allocations();
    assert_eq!((admitted, refused), (100_000, 100_000));
    assert_eq!(after - before, 0, "allocations on the record path");
    // The counter works: a formatted string allocates.
    let _ = format!("{admitted}");
    assert!(allocations() > after);
}
