//! What a thread keeps after a migrating map: the map's buffers stay for
//! the thread's next map, up to about 4 MiB, whatever the map's size (a
//! review found 7.1 MB kept after 70,000 misses, when the cap was 65,536
//! entries per buffer). One test in its own binary: it reads a
//! process-wide count of live bytes.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

/// Bytes allocated and not yet freed, process-wide.
static LIVE: AtomicI64 = AtomicI64::new(0);

struct Counting;

// SAFETY: every call is forwarded unchanged to the system allocator.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as i64, Ordering::Relaxed);
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as i64, Ordering::Relaxed);
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
        System.realloc(ptr, layout, new_size)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

mod common;
use common::{host_of, over_unix as over};
use rb::testing::TestSetup;
use rb::{Cluster, Commands};

/// Bytes a thread still holds after one map over `cluster` of GETs of
/// `keys`, and after the thread's exit.
fn kept_by_a_thread(cluster: &Cluster, keys: &Arc<Vec<String>>) -> (i64, i64) {
    let (cluster, keys) = (cluster.clone(), keys.clone());
    let before = LIVE.load(Ordering::SeqCst);
    let in_thread = std::thread::spawn(move || {
        let start = LIVE.load(Ordering::SeqCst);
        cluster
            .map(|m| {
                for k in keys.iter() {
                    let _ = m.get(k.as_str());
                }
            })
            .expect("map");
        LIVE.load(Ordering::SeqCst) - start
    })
    .join()
    .expect("thread");
    (in_thread, LIVE.load(Ordering::SeqCst) - before)
}

#[test]
fn a_thread_keeps_a_few_mib_after_a_big_migrating_map() {
    let setup = TestSetup::new(3, 1).expect("servers");
    let old = over(&setup, 2, None);
    let new = over(&setup, 3, Some(&old));
    let plain = over(&setup, 3, None);
    // 70,000 keys that move and are nowhere: every GET misses twice.
    let keys: Arc<Vec<String>> = Arc::new(
        (0..)
            .map(|i| format!("big{i}"))
            .filter(|k| host_of(&old, k) != host_of(&new, k))
            .take(70_000)
            .collect(),
    );
    // Connections and pools warmed first, on threads of their own.
    kept_by_a_thread(&plain, &keys);
    kept_by_a_thread(&new, &keys);
    let (plain_kept, plain_after) = kept_by_a_thread(&plain, &keys);
    let (kept, after) = kept_by_a_thread(&new, &keys);
    println!(
        "plain: {plain_kept} B kept, {plain_after} B after exit; migrating: {kept} B, {after} B"
    );
    assert!(
        kept - plain_kept <= (4 << 20) + (256 << 10),
        "a thread keeps {kept} B after a migrating map ({plain_kept} B after a plain one)"
    );
    assert!(
        after - plain_after < (64 << 10),
        "{after} B still held after the thread's exit ({plain_after} B for a plain map)"
    );
}
