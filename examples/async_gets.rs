//! The async client's cost per GET, alone, for comparing builds under an
//! instruction counter: on 4 local servers, `rounds` rounds of 2,000 GETs
//! in flight at once from one caller (all sent, then waited in order; no
//! spinning, so the count does not depend on timing).
//!
//! ```sh
//! cargo build --release --example async_gets
//! valgrind --tool=callgrind target/release/examples/async_gets 1
//! valgrind --tool=callgrind target/release/examples/async_gets 11
//! ```
//!
//! The difference of the two runs' instruction counts over 20,000 is the
//! cost of one GET (setup and the first round's warm-up cancel out).

use std::time::Duration;

use rb::testing::TestSetup;
use rb::{AsyncOptions, Cluster, Commands, HostConfig, RouterKind};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(11);
    let setup = TestSetup::new(4, 1)?;
    let mut b = Cluster::builder().router(RouterKind::Partition);
    for i in 0..4 {
        let path = setup.socket(i).to_string_lossy().into_owned();
        b = b.host(i as u32, HostConfig::new().unix_socket_path(path));
    }
    let cluster = b.build()?;
    let keys: Vec<String> = (0..2_000).map(|i| format!("g:{i}")).collect();
    cluster.map(|c| {
        for k in &keys {
            c.set(k, "v");
        }
    })?;
    let client = cluster.async_client_with(AsyncOptions::new().spin(Duration::ZERO));
    let mut found = 0usize;
    for _ in 0..rounds {
        let replies: Vec<_> = keys.iter().map(|k| client.get(k)).collect();
        for reply in replies {
            found += usize::from(reply.wait()?.is_some());
        }
    }
    println!("{found} of {} GETs found their key", rounds * keys.len());
    Ok(())
}
