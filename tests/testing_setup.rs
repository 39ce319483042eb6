//! `rb::testing` itself: servers are reaped when a test panics, a server
//! that cannot start is an error showing its log, and a missing binary says
//! how to install it. One test: it sets `RB_REDIS_SERVER` for this process.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use rb::testing::TestSetup;
use rb::Commands;

fn alive(pid: u32) -> bool {
    // A reaped process has no /proc entry; a zombie would still show one.
    Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn setup_lifecycle_and_errors() {
    // Reaped and cleaned on drop, also while a test panics.
    let mut pids = Vec::new();
    let mut dir = None;
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let setup = TestSetup::new(2, 1).unwrap();
        pids = (0..2).map(|i| setup.pid(i).unwrap()).collect();
        dir = Some(setup.dir().to_path_buf());
        let cluster = setup.make_cluster().unwrap();
        cluster.routing_client().set("k", 1).unwrap();
        assert!(pids.iter().all(|&p| alive(p)));
        panic!("test failure inside a setup");
    }));
    assert!(outcome.is_err());
    assert_eq!(pids.len(), 2);
    for pid in &pids {
        assert!(!alive(*pid), "server {pid} was not reaped");
    }
    assert!(!dir.unwrap().exists(), "the private dir was removed");

    // A server that exits before it is ready: the error carries its log.
    let tmp = std::env::temp_dir().join(format!("rb-fake-redis-{}", std::process::id()));
    std::fs::write(
        &tmp,
        "#!/bin/sh\necho 'FATAL CONFIG FILE ERROR: fake failure for the test'\nexit 1\n",
    )
    .unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::env::set_var("RB_REDIS_SERVER", &tmp);
    let err: rb::testing::SetupError =
        TestSetup::new(1, 1).expect_err("a failing server is an error");
    let text = err.to_string();
    assert!(text.contains("exited before it was ready"), "{text}");
    assert!(
        text.contains("FATAL CONFIG FILE ERROR: fake failure"),
        "{text}"
    );
    std::fs::remove_file(&tmp).unwrap();

    // A missing binary says how to install it.
    std::env::set_var("RB_REDIS_SERVER", "/nonexistent/redis-server");
    let err = TestSetup::new(1, 1).expect_err("a missing binary is an error");
    assert!(
        err.to_string().contains("apt-get install -y redis-server"),
        "{err}"
    );
    std::env::remove_var("RB_REDIS_SERVER");

    // And the normal path works again.
    let setup = TestSetup::new(1, 2).unwrap();
    let cluster = setup.make_cluster().unwrap();
    assert_eq!(cluster.hosts().len(), 2);
    assert_eq!(cluster.local_client(1).unwrap().ping().unwrap(), "PONG");
    let shown = format!("{setup:?}");
    assert!(
        shown.contains("TestSetup") && shown.contains(".sock"),
        "{shown}"
    );

    // A SetupError and an rb::Error both go through `?` as Box<dyn Error>.
    fn ping_one() -> Result<String, Box<dyn std::error::Error>> {
        Ok(rb::testing::make_test_cluster_with(1, 1, |c| {
            c.local_client(0)?.ping()
        })??)
    }
    assert_eq!(ping_one().unwrap(), "PONG");
}
