//! The async client against real servers: under tokio and under a minimal
//! executor written here, many concurrent tasks, cross-caller batching as
//! the servers count it, a paused and a killed node.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{mpsc, Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

mod common;
use common::{cluster, command_calls, host_of};
use rb::{AsyncOptions, Commands, Error, Execute, Hosts};

/// A minimal executor: tasks in a channel, a waker that sends its task
/// back. No runtime crate involved.
mod mini {
    use super::*;

    type Task = Arc<TaskCell>;

    pub struct TaskCell {
        future: Mutex<Option<Pin<Box<dyn Future<Output = ()> + Send>>>>,
        queue: mpsc::Sender<Task>,
    }

    impl Wake for TaskCell {
        fn wake(self: Arc<Self>) {
            let q = self.queue.clone();
            let _ = q.send(self);
        }
    }

    /// Runs every future to completion on this thread.
    pub fn run_all(futures: Vec<Pin<Box<dyn Future<Output = ()> + Send>>>) {
        let (tx, rx) = mpsc::channel::<Task>();
        let mut left = futures.len();
        for f in futures {
            let _ = tx.send(Arc::new(TaskCell {
                future: Mutex::new(Some(f)),
                queue: tx.clone(),
            }));
        }
        while left > 0 {
            let task = rx.recv().expect("a task to run");
            let waker = Waker::from(task.clone());
            let mut cx = Context::from_waker(&waker);
            let mut slot = task.future.lock().expect("task lock");
            if let Some(mut f) = slot.take() {
                match f.as_mut().poll(&mut cx) {
                    Poll::Ready(()) => left -= 1,
                    Poll::Pending => *slot = Some(f),
                }
            }
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .expect("tokio runtime")
}

#[test]
fn basic_commands_under_tokio() {
    let (_setup, cluster) = cluster(2, 2);
    let client = cluster.async_client();
    runtime().block_on(async {
        client.set("a", 1).await.expect("SET");
        let v: Option<Vec<u8>> = client.get("a").await.expect("GET");
        assert_eq!(v.as_deref(), Some(&b"1"[..]));
        assert_eq!(client.incr("n").await.expect("INCR"), 1);
        client
            .mset(&[("x", "1"), ("y", "2"), ("z", "3")])
            .await
            .expect("MSET");
        let all = client.mget(&["x", "nope", "y", "z"]).await.expect("MGET");
        assert_eq!(
            all,
            vec![
                Some(b"1".to_vec()),
                None,
                Some(b"2".to_vec()),
                Some(b"3".to_vec())
            ]
        );
        let sizes = client
            .fanout(Hosts::All)
            .cmd::<i64>(rb::cmd("DBSIZE"))
            .await
            .expect("DBSIZE");
        assert_eq!(sizes.len(), 4);
        assert_eq!(sizes.values().sum::<i64>(), 5);
        let err = client
            .cmd::<()>(rb::cmd("SELECT").arg(1))
            .await
            .expect_err("SELECT");
        assert!(matches!(err, Error::Unsupported { .. }), "{err}");
        let err = client
            .cmd::<()>(rb::cmd("BLPOP").arg("q").arg(0))
            .await
            .expect_err("BLPOP");
        assert!(matches!(err, Error::Unsupported { .. }), "{err}");
        let replies = rb::join_all((0..10).map(|i| client.incr(format!("j{i}")))).await;
        assert!(replies.iter().all(|r| r.as_ref().ok() == Some(&1)));
    });
    // Without a runtime.
    assert_eq!(client.incr("n").wait().expect("INCR"), 2);
}

#[test]
fn scripts_and_execute_commands() {
    let (_setup, cluster) = cluster(2, 1);
    let client = cluster.async_client();
    let script = rb::Script::new("return redis.call('INCRBY', KEYS[1], ARGV[1])");
    let rt = runtime();
    rt.block_on(async {
        let n: i64 = client
            .execute_script(script.call(&["s"], &[5]))
            .await
            .expect("script");
        assert_eq!(n, 5);
        // Known now: EVALSHA alone; flushed: retried after a load.
        cluster
            .all(|c| {
                c.cmd::<()>(rb::cmd("SCRIPT").arg("FLUSH"));
            })
            .expect("flush");
        let n: i64 = client
            .execute_script(script.call(&["s"], &[5]))
            .await
            .expect("script");
        assert_eq!(n, 10);
        let out = client
            .execute_commands([(
                "k",
                vec![
                    rb::cmd("SET").arg("k").arg(10).into(),
                    script.call(&["k"], &["1"]).into(),
                    rb::cmd("GET").arg("k").into(),
                ],
            )])
            .await
            .expect("execute_commands");
        let got: Vec<&rb::Value> = out["k"]
            .iter()
            .map(|r| r.as_ref().expect("each call"))
            .collect();
        assert_eq!(got.len(), 3);
        assert_eq!(got[1], &rb::Value::Int(11));
        assert_eq!(
            got[2],
            &rb::Value::BulkString(b"11".to_vec()),
            "the GET sees the script's INCRBY"
        );
    });
}

/// 1,000 tasks doing mixed GET/SET/INCR/HGET at once, every answer right,
/// on tokio and on the minimal executor.
#[test]
fn a_thousand_concurrent_tasks_get_their_own_answers() {
    let (_setup, cluster) = cluster(4, 1);
    let client = cluster.async_client();
    let task = |client: rb::AsyncClient, t: usize| async move {
        for i in 0..20 {
            let key = format!("t{t}:{i}");
            client.set(&key, format!("v{t}:{i}")).await.expect("SET");
            let v: Option<Vec<u8>> = client.get(&key).await.expect("GET");
            assert_eq!(v, Some(format!("v{t}:{i}").into_bytes()));
            let n = client.incr(format!("c{t}")).await.expect("INCR");
            assert_eq!(n, i as i64 + 1);
            client.hset(format!("h{t}"), "f", i).await.expect("HSET");
            let h: Option<Vec<u8>> = client.hget(format!("h{t}"), "f").await.expect("HGET");
            assert_eq!(h, Some(i.to_string().into_bytes()));
        }
    };
    let rt = runtime();
    rt.block_on(async {
        let handles: Vec<_> = (0..1000)
            .map(|t| tokio::spawn(task(client.clone(), t)))
            .collect();
        for h in handles {
            h.await.expect("task");
        }
    });
    let futures: Vec<Pin<Box<dyn Future<Output = ()> + Send>>> = (1000..2000)
        .map(|t| Box::pin(task(client.clone(), t)) as Pin<Box<dyn Future<Output = ()> + Send>>)
        .collect();
    mini::run_all(futures);
}

/// Many tasks GETting one host at once: the driver merges their GETs into
/// MGETs (counted by the server).
#[test]
fn gets_from_many_tasks_are_merged() {
    let (_setup, cluster) = cluster(1, 1);
    let client = cluster.async_client();
    let keys: Vec<String> = (0..2000).map(|i| format!("m{i}")).collect();
    cluster
        .map(|c| {
            for k in &keys {
                c.set(k, "x");
            }
        })
        .expect("seed");
    let gets_before = command_calls(&cluster, 0, "get");
    let mgets_before = command_calls(&cluster, 0, "mget");
    let rt = runtime();
    rt.block_on(async {
        let handles: Vec<_> = keys
            .iter()
            .map(|k| {
                let (client, k) = (client.clone(), k.clone());
                tokio::spawn(async move { client.get(&k).await })
            })
            .collect();
        for h in handles {
            assert_eq!(h.await.expect("task").expect("GET"), Some(b"x".to_vec()));
        }
    });
    let gets = command_calls(&cluster, 0, "get") - gets_before;
    let mgets = command_calls(&cluster, 0, "mget") - mgets_before;
    println!("2000 GETs from 2000 tasks reached the server as {gets} GET + {mgets} MGET");
    assert!(mgets > 0, "no MGET: {gets} GETs");
    assert!(
        gets + mgets < 1000,
        "{gets} GET + {mgets} MGET for 2000 keys"
    );
}

/// A paused node (SIGSTOP) makes only its requests time out, on time; the
/// other node's tasks are unaffected, no runtime worker is blocked, and the
/// node's connection serves again once it resumes.
#[test]
fn a_paused_node_times_out_only_its_own_requests() {
    let (setup, cluster) = cluster(2, 1);
    let key_on = |host: u32, prefix: &str| {
        (0..)
            .map(|i| format!("{prefix}{i}"))
            .find(|k| host_of(&cluster, k) == host)
            .expect("a key")
    };
    let (stuck_key, live_key) = (key_on(0, "s"), key_on(1, "l"));
    let budget = Duration::from_millis(200);
    let client = cluster.async_client_with(AsyncOptions::new().timeout(budget));
    let rt = runtime();
    // Connect to both first, so the pause hits an established connection.
    rt.block_on(async {
        client
            .set(&stuck_key, 1)
            .await
            .expect("SET before the pause");
        client
            .set(&live_key, 1)
            .await
            .expect("SET before the pause");
    });
    setup.pause(0).expect("SIGSTOP");
    let (stuck_times, live_times, max_gap) = rt.block_on(async {
        let ticker = tokio::spawn(async {
            let mut max_gap = Duration::ZERO;
            let mut last = Instant::now();
            for _ in 0..40 {
                tokio::time::sleep(Duration::from_millis(10)).await;
                max_gap = max_gap.max(last.elapsed());
                last = Instant::now();
            }
            max_gap
        });
        let stuck: Vec<_> = (0..50)
            .map(|_| {
                let (client, k) = (client.clone(), stuck_key.clone());
                tokio::spawn(async move {
                    let t = Instant::now();
                    let r = client.get(&k).await;
                    (r, t.elapsed())
                })
            })
            .collect();
        let live: Vec<_> = (0..50)
            .map(|_| {
                let (client, k) = (client.clone(), live_key.clone());
                tokio::spawn(async move {
                    let t = Instant::now();
                    let r = client.incr(&k).await;
                    (r.map(|_| ()), t.elapsed())
                })
            })
            .collect();
        let mut stuck_times = Vec::new();
        for h in stuck {
            let (r, took) = h.await.expect("task");
            let e = r.expect_err("host 0 is paused");
            assert!(e.is_timeout(), "{e}");
            stuck_times.push(took);
        }
        let mut live_times = Vec::new();
        for h in live {
            let (r, took) = h.await.expect("task");
            r.expect("host 1 is fine");
            live_times.push(took);
        }
        (stuck_times, live_times, ticker.await.expect("ticker"))
    });
    let slowest_stuck = stuck_times.iter().max().copied().unwrap_or_default();
    let slowest_live = live_times.iter().max().copied().unwrap_or_default();
    println!(
        "paused host: 50 timeouts after {:?}..{slowest_stuck:?} (budget {budget:?}); live host: slowest {slowest_live:?}; longest worker gap {max_gap:?}",
        stuck_times.iter().min().copied().unwrap_or_default()
    );
    assert!(stuck_times.iter().all(|t| *t >= budget), "early timeout");
    assert!(
        slowest_stuck < budget + Duration::from_millis(100),
        "late: {slowest_stuck:?}"
    );
    assert!(
        slowest_live < Duration::from_millis(150),
        "live host slowed: {slowest_live:?}"
    );
    assert!(
        max_gap < Duration::from_millis(100),
        "a worker was blocked: {max_gap:?}"
    );
    setup.resume(0).expect("SIGCONT");
    rt.block_on(async {
        // The late replies are read and dropped; the next requests get theirs.
        for i in 0..5 {
            let n = client.incr(&stuck_key).await.expect("host 0 is back");
            assert_eq!(n, 2 + i);
        }
    });
}

/// A killed node fails its requests (promptly, not at a deadline); once it
/// is back, the driver connects again.
#[test]
fn a_killed_node_fails_its_requests_and_is_reconnected() {
    let (mut setup, cluster) = cluster(2, 1);
    let key = (0..)
        .map(|i| format!("k{i}"))
        .find(|k| host_of(&cluster, k) == 0)
        .expect("a key of host 0");
    let client = cluster.async_client();
    let rt = runtime();
    rt.block_on(async { client.set(&key, 1).await.expect("SET") });
    setup.kill(0).expect("kill host 0");
    let t = Instant::now();
    let err = rt
        .block_on(async { client.get(&key).await })
        .expect_err("host 0 is dead");
    assert!(err.is_connection_error(), "{err}");
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "took {:?}",
        t.elapsed()
    );
    let other: HashMap<rb::HostId, i64> = rt
        .block_on(async { client.fanout(Hosts::Ids(vec![1])).dbsize().await })
        .expect("host 1 unaffected");
    assert_eq!(other.len(), 1);
    setup.restart(0).expect("restart host 0");
    let v: Option<Vec<u8>> = rt
        .block_on(async { client.get(&key).await })
        .expect("reconnected");
    assert_eq!(v, None, "a fresh server");
}

/// Dropping a `Reply` leaves the pipeline in step: later requests on the
/// same connection get their own replies.
#[test]
fn dropped_replies_leave_the_pipeline_intact() {
    let (_setup, cluster) = cluster(1, 1);
    let client = cluster.async_client();
    for i in 0..200 {
        drop(client.set(format!("d{i}"), i));
        drop(client.get(format!("d{i}")));
    }
    for i in 0..200 {
        let v: Option<Vec<u8>> = client.get(format!("d{i}")).wait().expect("GET");
        assert_eq!(v, Some(i.to_string().into_bytes()));
    }
}
