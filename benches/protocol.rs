//! Protocol benchmarks: RESP decoding, command encoding and key routing
//! (rb's routers and twemproxy's rings with each of their twelve hashes),
//! each with a plain baseline in the same group (a memcpy for decoding and
//! encoding, the bare hash and CRC-32 for routing) so results read as ratios.
//!
//! `cargo bench --bench protocol -- --noplot` (one group:
//! `cargo bench --bench protocol -- --noplot twemproxy`)
//!
//! Two benches measure internals and need the `fuzzing` feature (which
//! makes them reachable as `rb::fuzzing`): splitting an MGET reply with the
//! engine's reply stream, and the bare MD5 baseline of the ketama router.
//! `cargo bench --bench protocol --features fuzzing` runs them too; without
//! the feature they are left out and everything else runs.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};
#[cfg(feature = "fuzzing")]
use rb::fuzzing::{Frame, ReplyStream};
use rb::resp::{decode, Decoder};
use rb::{
    ConsistentHashingRouter, Distribution, HashTag, HashTagRouter, HostConfig, PartitionRouter,
    Router, TwemproxyHash, TwemproxyRing, TwemproxyRouter, Value,
};

fn quick<'a>(
    c: &'a mut Criterion,
    name: &str,
) -> BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut g = c.benchmark_group(name);
    g.measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500))
        .sample_size(20);
    g
}

fn encoded(v: &Value) -> Vec<u8> {
    let mut buf = Vec::new();
    v.encode(&mut buf);
    buf
}

/// A fresh copy of `bytes`: what decoding a bulk string must do at the least.
fn memcpy(bytes: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(bytes);
    v
}

fn decode_bulk(c: &mut Criterion) {
    let mut g = quick(c, "decode_bulk");
    for (label, size) in [("1MiB", 1 << 20), ("16MiB", 16 << 20)] {
        let payload: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
        let wire = encoded(&Value::BulkString(payload.clone()));
        g.throughput(Throughput::Bytes(wire.len() as u64));
        g.bench_function(format!("decode/{label}"), |b| {
            b.iter(|| decode(black_box(&wire)).unwrap().unwrap())
        });
        // The same reply arriving in 64 KiB reads into a growing buffer: the
        // decoder must not rescan what it has seen.
        g.bench_function(format!("decoder_64KiB_reads/{label}"), |b| {
            b.iter(|| {
                let mut d = Decoder::new();
                let mut end = 0;
                loop {
                    end = (end + (64 << 10)).min(wire.len());
                    if let Some(r) = d.decode(black_box(&wire[..end])).unwrap() {
                        break r;
                    }
                }
            })
        });
        g.bench_function(format!("baseline_memcpy/{label}"), |b| {
            b.iter(|| memcpy(black_box(&payload)))
        });
    }
    g.finish();
}

/// An MGET reply of 1000 values of 20 bytes, every tenth missing.
fn mget_reply() -> Vec<u8> {
    encoded(&Value::Array(
        (0..1000)
            .map(|i| {
                if i % 10 == 3 {
                    Value::Nil
                } else {
                    Value::BulkString(format!("value:{i:014}").into_bytes())
                }
            })
            .collect(),
    ))
}

fn decode_replies(c: &mut Criterion) {
    let mut g = quick(c, "decode_replies");
    g.throughput(Throughput::Elements(1000));

    let mget = mget_reply();
    g.bench_function("mget_1000", |b| {
        b.iter(|| decode(black_box(&mget)).unwrap().unwrap())
    });
    g.bench_function("baseline_memcpy_mget_1000", |b| {
        b.iter(|| memcpy(black_box(&mget)))
    });
    // The engine's way: the array split, each value copied once into the
    // Vec<u8> its promise holds (what `decode` builds, minus the array).
    #[cfg(feature = "fuzzing")]
    g.bench_function("mget_1000_split", |b| {
        b.iter(|| {
            let buf = black_box(&mget[..]);
            let mut stream = ReplyStream::new();
            let mut values: Vec<Option<Vec<u8>>> = Vec::with_capacity(1000);
            let mut at = 0;
            while let Some((frame, used)) = stream.next(&buf[at..], Some(1000)).unwrap() {
                match frame {
                    Frame::Bulk { bytes, .. } => values.push(bytes.map(<[u8]>::to_vec)),
                    Frame::Element {
                        value: Value::Nil, ..
                    } => values.push(None),
                    Frame::Split { .. } => {}
                    other => panic!("unexpected {other:?}"),
                }
                at += used;
            }
            assert_eq!(values.len(), 1000);
            values
        })
    });

    // 1000 small replies back to back, as a pipeline of SETs and INCRs gets.
    let mut small = Vec::new();
    for i in 0..1000 {
        small.extend_from_slice(if i % 2 == 0 { b"+OK\r\n" } else { b":1\r\n" });
    }
    g.bench_function("small_1000_back_to_back", |b| {
        b.iter(|| {
            let buf = black_box(&small[..]);
            let mut at = 0;
            let mut n = 0;
            while let Some((v, used)) = decode(&buf[at..]).unwrap() {
                black_box(v);
                at += used;
                n += 1;
            }
            assert_eq!(n, 1000);
        })
    });
    g.finish();
}

fn encode_commands(c: &mut Criterion) {
    let mut g = quick(c, "encode");
    let mut out = Vec::with_capacity(64 << 10);

    g.throughput(Throughput::Elements(1));
    g.bench_function("set_key_value", |b| {
        b.iter(|| {
            out.clear();
            rb::cmd("SET")
                .arg(black_box("user:1234:session"))
                .arg(black_box(&b"0123456789abcdef0123"[..]))
                .write_packed(&mut out);
            black_box(&out);
        })
    });

    let keys: Vec<String> = (0..1000).map(|i| format!("user:{i:08}:name")).collect();
    let packed = rb::cmd("MGET").args_from(&keys).to_packed();
    g.throughput(Throughput::Bytes(packed.len() as u64));
    g.bench_function("mget_1000_keys", |b| {
        b.iter(|| {
            out.clear();
            rb::cmd("MGET")
                .args_from(black_box(&keys))
                .write_packed(&mut out);
            black_box(&out);
        })
    });
    g.bench_function("baseline_memcpy_mget_1000_keys", |b| {
        b.iter(|| {
            out.clear();
            out.extend_from_slice(black_box(&packed));
            black_box(&out);
        })
    });
    g.finish();
}

fn routers(c: &mut Criterion) {
    let mut g = quick(c, "route_1000_keys_64_hosts");
    g.throughput(Throughput::Elements(1000));
    let hosts: Vec<Arc<rb::HostInfo>> = (0..64)
        .map(|i| {
            Arc::new(
                HostConfig::new()
                    .host("10.0.0.1")
                    .port(6379 + i as u16)
                    .resolve(i),
            )
        })
        .collect();
    let keys: Vec<Vec<u8>> = (0..1000)
        .map(|i| format!("user:{i}:profile").into_bytes())
        .collect();

    let partition = PartitionRouter::new(&hosts).unwrap();
    g.bench_function("partition", |b| {
        b.iter(|| {
            for k in &keys {
                black_box(partition.host_for_key(black_box(k)).unwrap());
            }
        })
    });
    g.bench_function("baseline_crc32", |b| {
        b.iter(|| {
            for k in &keys {
                black_box(rb::router::signed_crc32(black_box(k)));
            }
        })
    });

    let ketama = ConsistentHashingRouter::new(&hosts).unwrap();
    g.bench_function("consistent_hashing", |b| {
        b.iter(|| {
            for k in &keys {
                black_box(ketama.host_for_key(black_box(k)).unwrap());
            }
        })
    });
    #[cfg(feature = "fuzzing")]
    g.bench_function("baseline_md5", |b| {
        b.iter(|| {
            for k in &keys {
                black_box(rb::fuzzing::md5(black_box(k)));
            }
        })
    });
    g.finish();
}

/// Twemproxy rings, one per hash, routing 1000 typical 16-byte keys over 8
/// hosts, next to bare CRC-32 (crc32fast) and each bare hash in the same
/// group: ns/key = the time per iteration / 1000.
fn twemproxy_routers(c: &mut Criterion) {
    let mut g = quick(c, "twemproxy_route_1000_16B_keys_8_hosts");
    g.throughput(Throughput::Elements(1000));
    let keys: Vec<Vec<u8>> = (0..1000)
        .map(|i| format!("user:{i:06}:cart").into_bytes())
        .collect();
    assert!(keys.iter().all(|k| k.len() == 16));
    let ring_over = |ring: TwemproxyRing| {
        TwemproxyRouter::from_servers(
            ring,
            (0..8).map(|i| (i, format!("10.0.0.{}:6379", i + 1), 1 + i % 3)),
        )
        .unwrap()
    };
    g.bench_function("baseline_crc32fast", |b| {
        b.iter(|| {
            for k in &keys {
                black_box(crc32fast::hash(black_box(k)));
            }
        })
    });
    for hash in TwemproxyHash::ALL {
        let ketama = ring_over(TwemproxyRing::new(Distribution::Ketama, hash));
        g.bench_function(format!("ketama/{hash}"), |b| {
            b.iter(|| {
                for k in &keys {
                    black_box(ketama.host_for_key(black_box(k)).unwrap());
                }
            })
        });
        g.bench_function(format!("bare_hash/{hash}"), |b| {
            b.iter(|| {
                for k in &keys {
                    black_box(hash.hash(black_box(k)));
                }
            })
        });
    }
    let modula = ring_over(TwemproxyRing::new(
        Distribution::Modula,
        TwemproxyHash::Fnv1a64,
    ));
    g.bench_function("modula/fnv1a_64", |b| {
        b.iter(|| {
            for k in &keys {
                black_box(modula.host_for_key(black_box(k)).unwrap());
            }
        })
    });
    // The same ring behind the cluster's hash-tag wrapper (keys untagged,
    // so the cost is the scan for `{`), and with every key tagged.
    let tagged = HashTagRouter::new(
        Arc::new(ring_over(TwemproxyRing::default())),
        HashTag::from(b"{}"),
    );
    g.bench_function("ketama/fnv1a_64+hash_tag_untagged_keys", |b| {
        b.iter(|| {
            for k in &keys {
                black_box(tagged.host_for_key(black_box(k)).unwrap());
            }
        })
    });
    let tagged_keys: Vec<Vec<u8>> = (0..1000)
        .map(|i| format!("{{u{i:05}}}:cart").into_bytes())
        .collect();
    g.bench_function("ketama/fnv1a_64+hash_tag_tagged_keys", |b| {
        b.iter(|| {
            for k in &tagged_keys {
                black_box(tagged.host_for_key(black_box(k)).unwrap());
            }
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    decode_bulk,
    decode_replies,
    encode_commands,
    routers,
    twemproxy_routers
);
criterion_main!(benches);
