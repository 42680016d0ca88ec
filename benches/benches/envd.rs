//! guest-envd as a local process over a Unix socket, each figure beside its baseline in the same run:
//! - exec_roundtrip: start `/bin/true` through envd and receive its end event, vs. spawning and
//!   waiting for `/bin/true` directly from this process (with and without output pipes);
//! - init_roundtrip: one `/init` with an env var and a fresh timestamp.

use std::process::{Command, Stdio};
use std::time::SystemTime;

use criterion::{criterion_group, criterion_main, Criterion};
use envd_benches::LocalEnvd;
use envd_protocol::{pb, Client};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn exec_roundtrip(c: &mut Criterion) {
    let rt = runtime();
    let envd = rt.block_on(LocalEnvd::start());
    let client = rt.block_on(Client::connect(&envd.addr)).expect("connect");
    let true_req = pb::StartRequest {
        cmd: "/bin/true".into(),
        ..Default::default()
    };

    let mut group = c.benchmark_group("exec_roundtrip");
    group.bench_function("envd_unix", |b| {
        b.to_async(&rt).iter(|| async {
            let out = client
                .start(true_req.clone())
                .await
                .expect("start")
                .collect()
                .await
                .expect("end");
            assert_eq!(out.exit_status(), Some(0));
        })
    });
    group.bench_function("direct_spawn_piped", |b| {
        b.iter(|| {
            let out = Command::new("/bin/true")
                .stdin(Stdio::null())
                .output()
                .expect("spawn");
            assert!(out.status.success());
        })
    });
    group.bench_function("direct_spawn", |b| {
        b.iter(|| {
            let status = Command::new("/bin/true")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .expect("spawn");
            assert!(status.success());
        })
    });
    group.finish();
}

fn init_roundtrip(c: &mut Criterion) {
    let rt = runtime();
    let envd = rt.block_on(LocalEnvd::start());
    let client = rt.block_on(Client::connect(&envd.addr)).expect("connect");
    let mut group = c.benchmark_group("init_roundtrip");
    group.bench_function("envd_unix", |b| {
        b.to_async(&rt).iter(|| async {
            let r = client
                .init(pb::InitRequest {
                    env: [("SANDBOX_ID".to_string(), "sbx-123".to_string())].into(),
                    timestamp: Some(prost_types::Timestamp::from(SystemTime::now())),
                    ..Default::default()
                })
                .await
                .expect("init");
            assert!(r.applied);
        })
    });
    group.bench_function("health_unix", |b| {
        b.to_async(&rt)
            .iter(|| async { client.health().await.expect("health") })
    });
    group.finish();
}

criterion_group!(benches, exec_roundtrip, init_roundtrip);
criterion_main!(benches);
