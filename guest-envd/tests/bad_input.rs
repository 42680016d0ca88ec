//! Bad input gets a clear error, and envd keeps serving everyone else.

mod common;

use common::*;
use envd_protocol::frame::{encode_frame, read_message, MAX_FRAME_LEN};
use envd_protocol::pb::{self, ErrorCode};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Sends raw bytes, optionally half-closes, and returns the first response and whether the
/// connection was closed afterwards.
async fn raw_exchange(envd: &Envd, bytes: &[u8], half_close: bool) -> (pb::Response, bool) {
    let mut s = UnixStream::connect(envd.socket_path()).await.unwrap();
    s.write_all(bytes).await.unwrap();
    if half_close {
        s.shutdown().await.unwrap();
    }
    let response: pb::Response = read_message(&mut s).await.unwrap().expect("a response");
    let mut rest = Vec::new();
    // Closed: end of stream, or a reset when envd closed with our bytes still unread.
    let closed =
        match tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut rest))
            .await
        {
            Ok(Ok(0)) => true,
            Ok(Err(e)) => e.kind() == std::io::ErrorKind::ConnectionReset,
            _ => false,
        };
    (response, closed)
}

fn error_of(r: &pb::Response) -> (ErrorCode, String) {
    match &r.kind {
        Some(pb::response::Kind::Error(e)) => {
            (ErrorCode::try_from(e.code).unwrap(), e.message.clone())
        }
        other => panic!("expected an error, got {other:?}"),
    }
}

async fn still_serving(envd: &Envd) {
    let c = envd.client().await;
    assert_eq!(run_ok(&c, cmd(&["echo", "alive"])).await, "alive\n");
}

#[tokio::test]
async fn garbage_bytes_get_an_error_and_the_connection_closes() {
    let envd = Envd::start(&[]).await;
    // Read as a length prefix, "GET " is about 1.2 GB: refused before anything is allocated.
    let (r, closed) = raw_exchange(&envd, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", false).await;
    let (code, msg) = error_of(&r);
    assert_eq!(code, ErrorCode::FrameTooLarge);
    assert!(msg.contains("larger than the limit"), "{msg}");
    assert!(closed);
    still_serving(&envd).await;
}

#[tokio::test]
async fn an_oversized_frame_is_refused() {
    let envd = Envd::start(&[]).await;
    let header = ((MAX_FRAME_LEN + 1) as u32).to_be_bytes();
    let (r, closed) = raw_exchange(&envd, &header, false).await;
    assert_eq!(error_of(&r).0, ErrorCode::FrameTooLarge);
    assert!(closed);
    still_serving(&envd).await;
}

#[tokio::test]
async fn a_truncated_frame_is_reported() {
    let envd = Envd::start(&[]).await;
    let frame = encode_frame(&pb::Request {
        id: 1,
        token: String::new(),
        kind: Some(pb::request::Kind::Start(cmd(&["echo", "never"]))),
    })
    .unwrap();
    let (r, closed) = raw_exchange(&envd, &frame[..frame.len() - 3], true).await;
    let (code, msg) = error_of(&r);
    assert_eq!(code, ErrorCode::BadRequest);
    assert!(msg.contains("truncated frame"), "{msg}");
    assert!(closed);

    let (r, _) = raw_exchange(&envd, &frame[..2], true).await;
    assert!(error_of(&r).1.contains("truncated frame header"));
    still_serving(&envd).await;
}

#[tokio::test]
async fn an_undecodable_body_is_an_error_and_the_connection_goes_on() {
    let envd = Envd::start(&[]).await;
    let mut s = UnixStream::connect(envd.socket_path()).await.unwrap();
    s.write_all(&[0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff])
        .await
        .unwrap();
    let r: pb::Response = read_message(&mut s).await.unwrap().unwrap();
    assert_eq!(error_of(&r).0, ErrorCode::BadRequest);
    // Same connection, a valid request now.
    let health = encode_frame(&pb::Request {
        id: 9,
        token: String::new(),
        kind: Some(pb::request::Kind::Health(pb::HealthRequest {})),
    })
    .unwrap();
    s.write_all(&health).await.unwrap();
    let r: pb::Response = read_message(&mut s).await.unwrap().unwrap();
    assert_eq!(r.id, 9);
    assert!(matches!(r.kind, Some(pb::response::Kind::Health(_))));
}

#[tokio::test]
async fn an_unknown_message_kind_is_named_as_such() {
    let envd = Envd::start(&[]).await;
    // A request from a future client: id 5 and a field number this envd does not know.
    let mut body = Vec::new();
    pb::Request {
        id: 5,
        token: String::new(),
        kind: None,
    }
    .encode(&mut body)
    .unwrap();
    prost::encoding::bytes::encode(99, &b"from the future".to_vec(), &mut body);
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&body);
    let mut s = UnixStream::connect(envd.socket_path()).await.unwrap();
    s.write_all(&frame).await.unwrap();
    let r: pb::Response = read_message(&mut s).await.unwrap().unwrap();
    assert_eq!(r.id, 5);
    let (code, msg) = error_of(&r);
    assert_eq!(code, ErrorCode::UnknownRequest);
    assert!(msg.contains("unknown"), "{msg}");
    still_serving(&envd).await;
}

#[tokio::test]
async fn unknown_user_missing_cwd_and_empty_command_are_clear_errors() {
    let envd = Envd::start(&[]).await;
    let c = envd.client().await;

    let mut req = cmd(&["true"]);
    req.user = "no-such-user-here".into();
    let err = c.start(req).await.err().unwrap();
    assert_eq!(err.code(), Some(ErrorCode::UnknownUser));
    assert!(err.to_string().contains("no-such-user-here"), "{err}");

    let mut req = cmd(&["true"]);
    req.cwd = "/no/such/dir".into();
    let err = c.start(req).await.err().unwrap();
    assert_eq!(err.code(), Some(ErrorCode::BadCwd));
    assert!(err.to_string().contains("/no/such/dir"), "{err}");

    let err = c.start(pb::StartRequest::default()).await.err().unwrap();
    assert_eq!(err.code(), Some(ErrorCode::BadRequest));
    assert!(err.to_string().contains("empty command"), "{err}");

    let mut req = cmd(&["true"]);
    req.envs = env(&[("BAD=KEY", "x")]);
    assert_eq!(
        c.start(req).await.err().unwrap().code(),
        Some(ErrorCode::BadRequest)
    );

    let err = c.start(cmd(&["/no/such/program"])).await.err().unwrap();
    assert_eq!(err.code(), Some(ErrorCode::SpawnFailed));

    let mut tagged = sh("sleep 30");
    tagged.tag = "dup".into();
    let p = c.start(tagged.clone()).await.unwrap();
    assert_eq!(
        c.start(tagged).await.err().unwrap().code(),
        Some(ErrorCode::Conflict)
    );
    c.signal(pb::ProcessSelector::pid(p.pid), 9, false)
        .await
        .unwrap();

    // Shutdown is refused outside a VM.
    assert_eq!(
        c.shutdown(false).await.unwrap_err().code(),
        Some(ErrorCode::NotSupported)
    );

    // The same connection still works.
    assert_eq!(run_ok(&c, cmd(&["echo", "ok"])).await, "ok\n");
}

#[tokio::test]
async fn a_slow_reader_does_not_grow_envd_memory_without_bound() {
    let mut envd = Envd::start(&[]).await;
    let c = envd.client().await;
    const TOTAL: usize = 256 << 20;
    // 256 MiB of output that the client does not read for a while.
    let p = c
        .start(sh(&format!("exec head -c {TOTAL} /dev/zero")))
        .await
        .unwrap();
    let envd_pid = c.health().await.unwrap().pid;
    let proc_field = |path: String, key: &str| -> u64 {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap()
    };
    // The writer is stalled once it sits in pipe_write and its byte count stops moving: everything
    // between it and the idle client (pipe, pump, connection queue, socket) is full.
    let mut last = (String::new(), 0);
    let mut stable = 0;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while stable < 20 {
        assert!(std::time::Instant::now() < deadline, "writer never stalled");
        let wchan = std::fs::read_to_string(format!("/proc/{}/wchan", p.pid)).unwrap();
        let written = proc_field(format!("/proc/{}/io", p.pid), "wchar:");
        let now = (wchan, written);
        stable = if now.0.ends_with("pipe_write") && now == last {
            stable + 1
        } else {
            0
        };
        last = now;
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let written = last.1;
    let rss_kib = proc_field(format!("/proc/{envd_pid}/status"), "VmRSS:");
    assert!(
        written < 64 << 20,
        "{written} bytes went out with nobody reading"
    );
    assert!(
        rss_kib < 64 * 1024,
        "envd RSS {rss_kib} KiB with a stalled client"
    );
    // Now read it all: nothing lost.
    let out = p.collect().await.unwrap();
    assert_eq!(out.stdout.len(), TOTAL);
    assert!(out.stdout.iter().all(|b| *b == 0));
    assert!(envd.alive());
}
