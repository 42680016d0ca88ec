//! Process start: users, streaming, stdin, signals, timeouts, PTY, concurrency, reattach.

mod common;

use std::time::Duration;

use common::*;
use envd_protocol::pb::{self, process_event::Event};
use envd_protocol::{Client, Process};
use futures::future::join_all;

/// Waits until envd has noticed that no client is attached to `pid` (polled, with a deadline).
async fn wait_detached(c: &Client, pid: u32) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let list = c.list().await.unwrap();
        let p = list.iter().find(|p| p.pid == pid).expect("process listed");
        if !p.attached {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "envd never noticed the detach"
        );
        tokio::task::yield_now().await;
    }
}

/// Reads events until the accumulated stdout/pty output contains `needle`; returns the output.
async fn read_until(process: &mut Process, needle: &str) -> String {
    let mut seen = Vec::new();
    let wait = async {
        while let Some(event) = process.next_event().await {
            if let Some(Event::Data(d)) = event.expect("event").event {
                match d.output {
                    Some(pb::data::Output::Stdout(b)) | Some(pb::data::Output::Pty(b)) => {
                        seen.extend_from_slice(&b)
                    }
                    _ => {}
                }
                if String::from_utf8_lossy(&seen).contains(needle) {
                    return;
                }
            }
        }
        panic!(
            "stream ended before {needle:?}; got {:?}",
            String::from_utf8_lossy(&seen)
        );
    };
    tokio::time::timeout(Duration::from_secs(20), wait)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "no {needle:?} within 20 s; got {:?}",
                String::from_utf8_lossy(&seen)
            )
        });
    String::from_utf8_lossy(&seen).into_owned()
}

#[tokio::test]
async fn runs_as_nobody_with_its_ids_and_no_capabilities() {
    if !is_root() {
        eprintln!("skipped: switching users needs root");
        return;
    }
    let envd = Envd::start(&[]).await;
    let c = envd.client().await;
    let mut req = sh(
        "id -u; id -g; id -G; grep -E '^Cap(Inh|Prm|Eff|Amb)' /proc/self/status; echo $HOME $USER",
    );
    req.user = "nobody".into();
    let out = run_ok(&c, req).await;
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    let nobody: Vec<&str> = passwd
        .lines()
        .find(|l| l.starts_with("nobody:"))
        .unwrap()
        .split(':')
        .collect();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], nobody[2], "uid");
    assert_eq!(lines[1], nobody[3], "gid");
    assert_eq!(
        lines[2], nobody[3],
        "groups: only the primary one (nobody is in no group list)"
    );
    for cap in &lines[3..7] {
        assert!(
            cap.ends_with("0000000000000000"),
            "capability set not empty: {cap}"
        );
    }
    assert_eq!(lines[7], format!("{} nobody", nobody[5]));
}

#[tokio::test]
async fn supplementary_groups_come_from_etc_group() {
    if !is_root() {
        eprintln!("skipped: switching users needs root");
        return;
    }
    // A private /etc: a user who is a member of two extra groups.
    let etc = tempfile::tempdir().unwrap();
    std::fs::write(
        etc.path().join("passwd"),
        "root:x:0:0:root:/root:/bin/sh\nworker:x:4242:4242:w:/:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(
        etc.path().join("group"),
        "root:x:0:\nworker:x:4242:\nbuilders:x:4300:someone,worker\nother:x:4301:someone\ndeploy:x:4302:worker\n",
    )
    .unwrap();
    let envd = Envd::start_with(&[], &["--etc-dir", etc.path().to_str().unwrap()]).await;
    let c = envd.client().await;
    let mut req = cmd(&["id", "-G"]);
    req.user = "worker".into();
    let mut groups: Vec<u32> = run_ok(&c, req)
        .await
        .split_whitespace()
        .map(|g| g.parse().unwrap())
        .collect();
    groups.sort();
    assert_eq!(groups, vec![4242, 4300, 4302]);
}

/// Deterministic pseudo-random bytes (xorshift), so a mismatch is reproducible.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_mib_of_interleaved_output_arrives_complete_in_order_with_end_last() {
    let envd = Envd::start(&[]).await;
    let c = envd.client().await;
    const HALF: usize = 32 << 20;
    let out_file = envd.dir.path().join("out.bin");
    let err_file = envd.dir.path().join("err.bin");
    let out_expected = pattern(HALF, 0x9e3779b97f4a7c15);
    let err_expected = pattern(HALF, 0xdeadbeefcafef00d);
    std::fs::write(&out_file, &out_expected).unwrap();
    std::fs::write(&err_file, &err_expected).unwrap();

    // Both streams written at once, so their chunks interleave on the connection.
    let script = format!(
        "cat {} & cat {} >&2; wait",
        out_file.display(),
        err_file.display()
    );
    let mut process = c.start(sh(&script)).await.unwrap();
    let (mut out, mut err) = (Vec::with_capacity(HALF), Vec::with_capacity(HALF));
    let mut switches = 0;
    let mut last_was_out = None;
    let mut end = None;
    while let Some(event) = process.next_event().await {
        let event = event.unwrap().event.unwrap();
        assert!(
            end.is_none(),
            "an event arrived after the end event: {event:?}"
        );
        match event {
            Event::Data(d) => match d.output.unwrap() {
                pb::data::Output::Stdout(b) => {
                    out.extend_from_slice(&b);
                    switches += usize::from(last_was_out == Some(false));
                    last_was_out = Some(true);
                }
                pb::data::Output::Stderr(b) => {
                    err.extend_from_slice(&b);
                    switches += usize::from(last_was_out == Some(true));
                    last_was_out = Some(false);
                }
                pb::data::Output::Pty(_) => panic!("no pty here"),
            },
            Event::End(e) => end = Some(e),
            Event::Started(_) => panic!("second started event"),
        }
    }
    let end = end.expect("end event");
    assert_eq!(end.status, Some(pb::end::Status::ExitCode(0)));
    assert_eq!(out.len(), HALF);
    assert_eq!(err.len(), HALF);
    assert!(out == out_expected, "stdout differs");
    assert!(err == err_expected, "stderr differs");
    assert!(switches > 0, "streams did not interleave");
}

#[tokio::test]
async fn stdin_streams_and_closes() {
    let envd = Envd::start(&[]).await;
    let c = envd.client().await;
    let mut req = cmd(&["sha256sum"]);
    req.stdin = true;
    let process = c.start(req).await.unwrap();
    let input = pattern(3 << 20, 7);
    // Several writes, then close: the child sees EOF and finishes.
    for chunk in input.chunks(700_000) {
        c.stdin(pb::ProcessSelector::pid(process.pid), chunk, false)
            .await
            .unwrap();
    }
    c.stdin(pb::ProcessSelector::pid(process.pid), b"", true)
        .await
        .unwrap();
    let out = process.collect().await.unwrap();
    assert_eq!(out.exit_status(), Some(0));
    let expected = {
        let path = envd.dir.path().join("in.bin");
        std::fs::write(&path, &input).unwrap();
        std::process::Command::new("sha256sum")
            .arg(&path)
            .output()
            .unwrap()
            .stdout
    };
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next(),
        String::from_utf8_lossy(&expected).split_whitespace().next()
    );

    // Writing to a process started without stdin is a clear error.
    let p = c.start(sh("sleep 5")).await.unwrap();
    let err = c
        .stdin(pb::ProcessSelector::pid(p.pid), b"x", false)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("without stdin"), "{err}");
    c.signal(pb::ProcessSelector::pid(p.pid), 9, false)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_signal_kills_and_a_timeout_kills() {
    let envd = Envd::start(&[]).await;
    let c = envd.client().await;
    let mut p = c.start(sh("echo ready; exec sleep 60")).await.unwrap();
    read_until(&mut p, "ready").await;
    c.signal(pb::ProcessSelector::pid(p.pid), libc::SIGTERM, false)
        .await
        .unwrap();
    let end = p.collect().await.unwrap().end.unwrap();
    assert_eq!(end.status, Some(pb::end::Status::Signal(libc::SIGTERM)));
    assert!(!end.timed_out);

    // A group signal reaches the children too: the shell waits on a child that must die.
    let mut tagged = sh("sleep 60 & echo ready; wait");
    tagged.tag = "grouped".into();
    let mut p = c.start(tagged).await.unwrap();
    read_until(&mut p, "ready").await;
    c.signal(pb::ProcessSelector::tag("grouped"), libc::SIGKILL, true)
        .await
        .unwrap();
    let end = p.collect().await.unwrap().end.unwrap();
    assert_eq!(end.status, Some(pb::end::Status::Signal(libc::SIGKILL)));

    let mut timed = sh("sleep 60");
    timed.timeout_ms = 150;
    let started = std::time::Instant::now();
    let end = c
        .start(timed)
        .await
        .unwrap()
        .collect()
        .await
        .unwrap()
        .end
        .unwrap();
    assert_eq!(end.status, Some(pb::end::Status::Signal(libc::SIGKILL)));
    assert!(end.timed_out);
    assert!(started.elapsed() < Duration::from_secs(30));

    // Signalling an unknown process is a clear error.
    let err = c
        .signal(pb::ProcessSelector::pid(999_999), 9, false)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(pb::ErrorCode::NotFound));
}

#[tokio::test]
async fn a_pty_echoes_and_resizes() {
    let envd = Envd::start(&[]).await;
    let c = envd.client().await;
    let mut req = sh("stty size; echo ready; read line; stty size; echo got:$line; tty");
    req.pty = Some(pb::PtySize { rows: 24, cols: 80 });
    let mut p = c.start(req).await.unwrap();
    let first = read_until(&mut p, "ready").await;
    assert!(first.contains("24 80"), "{first:?}");
    let sel = pb::ProcessSelector::pid(p.pid);
    c.resize(sel.clone(), 40, 100).await.unwrap();
    c.stdin(sel, b"hello\n", false).await.unwrap();
    let rest = read_until(&mut p, "/dev/pts/").await;
    // The terminal echoes the input line, and the shell sees the new size.
    assert!(rest.contains("hello\r\n"), "no echo in {rest:?}");
    assert!(rest.contains("40 100"), "no resize in {rest:?}");
    assert!(rest.contains("got:hello"), "{rest:?}");
    let out = p.collect().await.unwrap();
    assert_eq!(out.exit_status(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_processes_all_finish() {
    let envd = Envd::start(&[]).await;
    // Spread over a few connections, many processes in flight on each.
    let clients: Vec<Client> = join_all((0..4).map(|_| envd.client())).await;
    let mut tasks = Vec::new();
    for i in 0..200 {
        let client = &clients[i % clients.len()];
        let mut req = sh("sleep 0.2; echo $N");
        req.envs = env(&[("N", &i.to_string())]);
        tasks.push(async move { (i, run_ok(client, req).await) });
    }
    let results = join_all(tasks).await;
    assert_eq!(results.len(), 200);
    for (i, out) in results {
        assert_eq!(out.trim(), i.to_string());
    }
    assert!(
        clients[0].list().await.unwrap().is_empty(),
        "finished processes are forgotten"
    );
}

#[tokio::test]
async fn a_client_that_disconnects_leaves_the_process_running_and_reattach_works() {
    let envd = Envd::start(&[]).await;
    let pid = {
        let first = envd.client().await;
        let mut req = sh("echo first; read x; echo second:$x; read y; echo third:$y");
        req.stdin = true;
        req.tag = "job".into();
        let mut p = first.start(req).await.unwrap();
        read_until(&mut p, "first").await;
        p.pid
        // The client and its connection drop here, mid-stream.
    };
    let second = envd.client().await;
    let listed = second.list().await.unwrap();
    let job = listed.iter().find(|p| p.pid == pid).expect("still listed");
    assert_eq!(job.tag, "job");
    assert!(!job.exited);
    wait_detached(&second, pid).await;

    // Output produced while nobody is attached is kept for the next client.
    second
        .stdin(pb::ProcessSelector::tag("job"), b"one\n", false)
        .await
        .unwrap();
    let mut p = second
        .reattach(pb::ProcessSelector::tag("job"))
        .await
        .unwrap();
    assert_eq!(p.pid, pid);
    read_until(&mut p, "second:one").await;
    drop(p);

    // Reattach by pid too, from yet another connection.
    let third = envd.client().await;
    let mut p = third.reattach(pb::ProcessSelector::pid(pid)).await.unwrap();
    third
        .stdin(pb::ProcessSelector::pid(pid), b"two\n", true)
        .await
        .unwrap();
    read_until(&mut p, "third:two").await;
    let out = p.collect().await.unwrap();
    assert_eq!(out.exit_status(), Some(0));

    let err = third
        .reattach(pb::ProcessSelector::tag("nope"))
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Some(pb::ErrorCode::NotFound));
}

#[tokio::test]
async fn an_ended_process_nobody_collected_can_still_be_reattached() {
    let envd = Envd::start(&[]).await;
    let pid = {
        let c = envd.client().await;
        let mut req = sh("read x; echo late:$x; exit 7");
        req.stdin = true;
        let p = c.start(req).await.unwrap();
        p.pid
    };
    let c = envd.client().await;
    wait_detached(&c, pid).await;
    c.stdin(pb::ProcessSelector::pid(pid), b"z\n", true)
        .await
        .unwrap();
    let out = c
        .reattach(pb::ProcessSelector::pid(pid))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "late:z\n");
    assert_eq!(out.exit_status(), Some(7));
    assert!(c.list().await.unwrap().is_empty(), "collected: forgotten");
}
