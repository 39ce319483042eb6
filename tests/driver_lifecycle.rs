//! The driver thread's life: started by the first async client, stopped
//! (thread joined, sockets and poll closed) when the last client and reply
//! are gone. Alone in its own test binary: it counts the process' threads
//! and open file descriptors, which other tests would disturb.

use std::time::Duration;

use rb::testing::TestSetup;
use rb::Commands;

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, |d| d.count())
}

fn fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

fn driver_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| {
            d.filter_map(|t| t.ok())
                .filter(|t| {
                    std::fs::read_to_string(t.path().join("comm"))
                        .is_ok_and(|c| c.trim() == "rb-driver")
                })
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn the_driver_stops_with_its_last_handle() {
    let setup = TestSetup::new(4, 1).expect("start redis-server");
    for round in 0..3 {
        let (threads0, fds0) = (threads(), fds());
        let cluster = setup.make_cluster().expect("cluster");
        let client = cluster.async_client();
        let second = cluster.async_client();
        assert_eq!(driver_threads(), 1, "one driver per cluster");
        for i in 0..100 {
            client.set(format!("k{i}"), i).wait().expect("SET");
        }
        // A reply outstanding keeps the driver alive after the clients go.
        let pending = second.get("k1");
        drop((client, second));
        assert_eq!(driver_threads(), 1);
        assert_eq!(pending.wait().expect("GET"), Some(b"1".to_vec()));
        assert_eq!(driver_threads(), 0, "round {round}: the driver stopped");
        drop(cluster);
        let (threads1, fds1) = (threads(), fds());
        println!("round {round}: threads {threads0} -> {threads1}, fds {fds0} -> {fds1}");
        assert_eq!(threads1, threads0, "a thread leaked");
        assert_eq!(fds1, fds0, "a file descriptor leaked");
    }
    // A cluster dropped while its client's requests wait on a paused node:
    // the client's drop stops the driver, which closes the connections.
    let (threads0, fds0) = (threads(), fds());
    let cluster = setup.make_cluster().expect("cluster");
    setup.pause(0).expect("SIGSTOP");
    let client =
        cluster.async_client_with(rb::AsyncOptions::new().timeout(Duration::from_secs(60)));
    let waiting: Vec<_> = (0..50).map(|i| client.get(format!("p{i}"))).collect();
    drop(waiting);
    drop((client, cluster));
    setup.resume(0).expect("SIGCONT");
    assert_eq!((threads(), fds()), (threads0, fds0), "nothing leaked");
}
