//! Peak memory of one legal big reply. Alone in its own test binary:
//! peak RSS (`VmHWM`) is per process, and other tests would disturb it.

use std::time::{Duration, Instant};

mod common;
use common::proxy::{Fault, Proxy};
use common::watch::{rss_kib, within};
use rb::{Cluster, Commands};

const BULK: usize = 512 << 20;

/// A GET answered with one 512 MiB bulk string (a fake server streaming it
/// at full speed, no timeout) raises the process' peak resident memory by
/// at most 1.1 times the bulk plus 16 MiB: the reply is read into a buffer
/// sized for it, not grown by doubling past it, and not copied again.
#[test]
fn one_512_mib_bulk_reply_peaks_at_about_its_own_size() {
    let proxy = Proxy::fake(Fault::HugeBulk(BULK));
    let cluster = Cluster::builder()
        .host(0, proxy.host_config())
        .build()
        .expect("cluster");
    // Start the peak from here (Linux: writing 5 resets VmHWM to VmRSS).
    std::fs::write("/proc/self/clear_refs", "5").expect("reset the peak RSS");
    let (rss0, hwm0) = rss_kib();
    let start = Instant::now();
    let got = within(
        Duration::from_secs(300),
        "GET of a 512 MiB bulk",
        move || {
            let v = cluster.routing_client().get("k");
            let (_, hwm) = rss_kib();
            (v.map(|v| v.map(|v| v.len())), hwm)
        },
    )
    .expect("bounded");
    let took = start.elapsed();
    let (len, hwm1) = got;
    let growth_kib = hwm1.saturating_sub(rss0);
    assert!(
        hwm0 <= rss0 + 1024,
        "the peak was reset ({hwm0} KiB vs {rss0} KiB)"
    );
    let limit_kib = (BULK as u64 / 1024) * 11 / 10 + 16 * 1024;
    println!(
        "512 MiB bulk in {took:?}: peak RSS {} MiB -> {} MiB, growth {} MiB = {:.2}x the bulk (limit {} MiB)",
        rss0 / 1024,
        hwm1 / 1024,
        growth_kib / 1024,
        growth_kib as f64 / (BULK as f64 / 1024.0),
        limit_kib / 1024
    );
    assert_eq!(len.expect("the GET"), Some(BULK));
    assert!(
        growth_kib <= limit_kib,
        "one {} MiB reply raised the peak RSS by {} MiB ({:.2}x), limit {} MiB",
        BULK >> 20,
        growth_kib / 1024,
        growth_kib as f64 / (BULK as f64 / 1024.0),
        limit_kib / 1024
    );
}
