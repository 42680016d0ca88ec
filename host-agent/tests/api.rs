//! The orchestrator API through a real HTTP client (hyper) over the Unix socket, against the real
//! `host-agent serve` binary. Without a VM: health, bad input, conflicts, routes against
//! openapi.yaml, socket permissions. With the real guest-envd binary attached on a Unix socket
//! (`--attach-envd`, no VM): exec streaming, 50 concurrent execs, a client dropping mid-stream,
//! init, processes and signals, errors, secrets kept out of logs, metrics and error bodies,
//! shutdown. The same flow against a VM runs in the harness (`examples/api_flow.rs`).

mod common;

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::start_agent;
use host_agent::api::client::{ApiClient, EventStream};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::{json, Value};

const TOKEN: &str = "tok-SECRET-7c1f9a";
const ENV_SECRET: &str = "env-SECRET-42b7e0";

/// Sends one request on a new connection; returns the status and the streaming body.
async fn send(sock: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, Incoming) {
    let method = hyper::Method::from_bytes(method.as_bytes()).unwrap();
    let (status, body) = ApiClient::new(sock)
        .send(method, path, body.map(str::to_string))
        .await
        .unwrap();
    (status.as_u16(), body)
}

async fn call(sock: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
    let (status, body) = send(sock, method, path, body).await;
    let bytes = body.collect().await.unwrap().to_bytes();
    let value = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
        panic!(
            "{method} {path}: not JSON: {:?}",
            String::from_utf8_lossy(&bytes)
        )
    });
    (status, value)
}

/// Reads NDJSON events from an exec stream.
struct Events(EventStream);

impl Events {
    async fn next(&mut self) -> Option<Value> {
        self.0.next().await.expect("an NDJSON line")
    }

    /// All events to the end: (stdout, stderr, end event).
    async fn collect(mut self) -> (String, String, Value) {
        let (mut out, mut err) = (String::new(), String::new());
        while let Some(ev) = self.next().await {
            match ev["type"].as_str().unwrap() {
                "stdout" => out.push_str(ev["data"].as_str().unwrap()),
                "stderr" => err.push_str(ev["data"].as_str().unwrap()),
                "end" => return (out, err, ev),
                "started" => {}
                other => panic!("unexpected event {other}: {ev}"),
            }
        }
        panic!("stream ended without an end event (stdout so far: {out:?})")
    }
}

async fn exec(sock: &Path, body: Value) -> (u16, Events) {
    let (status, body) = send(sock, "POST", "/exec", Some(&body.to_string())).await;
    (status, Events(EventStream::new(body)))
}

async fn assert_healthy(sock: &Path) {
    let (status, body) = call(sock, "GET", "/health", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "ok");
}

// ---------------------------------------------------------------------------------------------
// Without a VM

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_answers_200_json_with_no_vm() {
    let agent = start_agent(false);
    let (status, body) = call(&agent.sock, "GET", "/health", None).await;
    assert_eq!(status, 200);
    assert_eq!(body["status"], "ok");
    assert_eq!(body["vm"], "none");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_is_owner_only_and_not_stolen() {
    let agent = start_agent(false);
    let mode = std::fs::metadata(&agent.sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode {mode:o}");
    // A second agent on the same live socket refuses to start.
    let out = Command::new(env!("CARGO_BIN_EXE_host-agent"))
        .arg("serve")
        .arg("--api-sock")
        .arg(&agent.sock)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use"));
    assert_healthy(&agent.sock).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_json_and_unknown_fields_are_400_and_the_agent_keeps_serving() {
    let agent = start_agent(false);
    let cases: &[(&str, &str)] = &[
        ("/exec", "{not json"),
        ("/exec", r#"{"cmd": "true""#),
        ("/exec", r#"{"cmd": "true", "bogus": 1}"#),
        ("/exec", r#"{"args": ["x"]}"#),
        ("/exec", "[1, 2]"),
        (
            "/restore",
            r#"{"snapshot_dir": "/x", "env": {"A": "b"}, "extra": true}"#,
        ),
        ("/boot", r#"{"template_dir": "/t", "memory": 5}"#),
        ("/init", r#"{"env": "not a map"}"#),
        ("/snapshot", r#"{"dir": "/x", "kind": "partial"}"#),
        ("/snapshot", r#"{"dir": "/x"}"#),
        ("/pause", r#"{"now": true}"#),
        ("/resume", "garbage"),
        ("/shutdown", r#"{"timeout_ms": "soon"}"#),
        ("/processes/12/signal", r#"{"signal": 9, "who": "me"}"#),
        ("/processes/abc/signal", "{}"),
    ];
    for (path, body) in cases {
        let (status, answer) = call(&agent.sock, "POST", path, Some(body)).await;
        assert_eq!(status, 400, "POST {path} {body}: {answer}");
        assert_eq!(
            answer["code"], "bad_request",
            "POST {path} {body}: {answer}"
        );
        assert!(answer["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    assert_healthy(&agent.sock).await;
    let (_, metrics) = call(&agent.sock, "GET", "/metrics", None).await;
    assert!(metrics["requests"]["4xx"].as_u64().unwrap() >= cases.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_that_need_a_vm_are_409_without_one() {
    let agent = start_agent(false);
    let cases: &[(&str, &str, Option<&str>)] = &[
        ("POST", "/pause", None),
        ("POST", "/resume", Some("{}")),
        (
            "POST",
            "/snapshot",
            Some(r#"{"dir": "/tmp/x", "kind": "full"}"#),
        ),
        ("POST", "/exec", Some(r#"{"cmd": "true"}"#)),
        ("POST", "/init", Some(r#"{"env": {"A": "1"}}"#)),
        ("GET", "/processes", None),
        ("POST", "/processes/1/signal", None),
    ];
    for (method, path, body) in cases {
        let (status, answer) = call(&agent.sock, method, path, *body).await;
        assert_eq!(status, 409, "{method} {path}: {answer}");
        assert_eq!(answer["code"], "no_vm", "{method} {path}: {answer}");
    }
    // A snapshot that cannot be read is a clear 422, and the agent still has no VM.
    let (status, answer) = call(
        &agent.sock,
        "POST",
        "/restore",
        Some(r#"{"snapshot_dir": "/nonexistent/snapshot"}"#),
    )
    .await;
    assert_eq!(status, 422, "{answer}");
    assert_eq!(answer["code"], "restore_failed");
    let (status, answer) = call(
        &agent.sock,
        "POST",
        "/boot",
        Some(r#"{"template_dir": "/nonexistent"}"#),
    )
    .await;
    assert_eq!(status, 400, "{answer}");
    // A kernel that is not a kernel: readable, so not a bad request, but it cannot boot.
    let garbage = agent.sock.with_file_name("not-a-kernel");
    std::fs::write(&garbage, [0x5a_u8; 4096]).unwrap();
    let body = serde_json::json!({ "kernel": garbage }).to_string();
    let (status, answer) = call(&agent.sock, "POST", "/boot", Some(&body)).await;
    assert_eq!(status, 422, "{answer}");
    assert_eq!(answer["code"], "boot_failed", "{answer}");
    let (_, health) = call(&agent.sock, "GET", "/health", None).await;
    assert_eq!(health["vm"], "none");
}

fn openapi() -> Value {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("openapi.yaml"))
        .unwrap();
    serde_yaml::from_str(&text).expect("openapi.yaml is YAML")
}

fn openapi_operations(doc: &Value) -> BTreeSet<(String, String)> {
    let mut ops = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in ["get", "post", "put", "delete", "patch"] {
            if item.get(method).is_some() {
                ops.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    ops
}

/// Checks every `$ref` in `v` resolves inside `doc`.
fn check_refs(doc: &Value, v: &Value, at: &str) {
    match v {
        Value::Object(map) => {
            for (k, child) in map {
                if k == "$ref" {
                    let target = child.as_str().unwrap();
                    let pointer = target.strip_prefix('#').expect("local refs only");
                    assert!(
                        doc.pointer(pointer).is_some(),
                        "{at}: dangling $ref {target}"
                    );
                } else {
                    check_refs(doc, child, &format!("{at}/{k}"));
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|i| check_refs(doc, i, at)),
        _ => {}
    }
}

#[test]
fn openapi_file_is_well_formed() {
    // The document parses as the typed OpenAPI 3.0 model of the openapiv3 crate (the structure of
    // the spec); the checks below add what that model lets through (refs, operation ids, params).
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("openapi.yaml"))
        .expect("openapi.yaml");
    let typed: openapiv3::OpenAPI =
        serde_yaml::from_str(&text).expect("openapi.yaml is a valid OpenAPI 3.0 document");
    assert!(!typed.paths.paths.is_empty());
    let doc = openapi();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    assert!(doc["info"]["title"].is_string() && doc["info"]["version"].is_string());
    check_refs(&doc, &doc, "");
    let mut operation_ids = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        assert!(path.starts_with('/'));
        for (method, op) in item.as_object().unwrap() {
            assert!(
                op["responses"].as_object().is_some_and(|r| !r.is_empty()),
                "{method} {path}"
            );
            assert!(operation_ids.insert(op["operationId"].as_str().unwrap().to_string()));
            // Every {param} in the path is declared as a required path parameter.
            for name in path
                .split('{')
                .skip(1)
                .map(|s| s.split('}').next().unwrap())
            {
                let declared = op["parameters"].as_array().is_some_and(|ps| {
                    ps.iter()
                        .any(|p| p["name"] == name && p["in"] == "path" && p["required"] == true)
                });
                assert!(
                    declared,
                    "{method} {path}: path parameter {name} not declared"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_routes_match_openapi() {
    let doc = openapi();
    let documented = openapi_operations(&doc);
    let served: BTreeSet<(String, String)> = host_agent::api::ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(documented, served, "openapi.yaml and api::ROUTES differ");

    // Each documented operation is routed (never the unknown-route or wrong-method answer)...
    let agent = start_agent(false);
    for (method, path) in &documented {
        if path == "/shutdown" {
            continue; // ends the agent; exercised below
        }
        let concrete = path.replace("{pid}", "1");
        let (status, body) = call(&agent.sock, method, &concrete, Some("{}")).await;
        assert!(
            status != 404 && status != 405,
            "{method} {path} is documented but not served: {status} {body}"
        );
    }
    // ...and what is not documented is not served.
    let (status, body) = call(&agent.sock, "GET", "/nope", None).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (404, Some("unknown_route"))
    );
    let (status, body) = call(&agent.sock, "DELETE", "/health", None).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (405, Some("method_not_allowed"))
    );
    let (status, body) = call(&agent.sock, "GET", "/exec", None).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (405, Some("method_not_allowed"))
    );

    // Shutdown answers, then the agent exits and removes its socket.
    let (status, body) = call(&agent.sock, "POST", "/shutdown", None).await;
    assert_eq!(status, 200, "{body}");
    let mut agent = agent;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(s) = agent.child.try_wait().unwrap() {
            assert!(s.success());
            break;
        }
        assert!(
            Instant::now() < deadline,
            "agent did not exit after /shutdown"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!agent.sock.exists());
}

// ---------------------------------------------------------------------------------------------
// With guest-envd attached (no VM)

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_streams_output_before_the_exit() {
    let agent = start_agent(true);
    let started = Instant::now();
    let (status, mut events) = exec(
        &agent.sock,
        json!({"cmd": "sh", "args": ["-c", "echo first; sleep 2; echo second >&2; exit 3"]}),
    )
    .await;
    assert_eq!(status, 200);
    let ev = events.next().await.unwrap();
    assert_eq!(ev["type"], "started");
    assert!(ev["pid"].as_u64().unwrap() > 0);
    let ev = events.next().await.unwrap();
    assert_eq!(ev["type"], "stdout");
    assert_eq!(ev["data"], "first\n");
    assert_eq!(ev["data_b64"], "Zmlyc3QK");
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "first output came only after {:?}",
        started.elapsed()
    );
    let (_, err, end) = events.collect().await;
    assert!(started.elapsed() >= Duration::from_secs(2));
    assert_eq!(err, "second\n");
    assert_eq!(end["exit_code"], 3);
    assert_eq!(end["status"], 3);
    assert!(end["signal"].is_null());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_execs() {
    let agent = start_agent(true);
    let sock = agent.sock.clone();
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let sock = sock.clone();
            tokio::spawn(async move {
                let (status, events) = exec(
                    &sock,
                    json!({"cmd": "sh", "args": ["-c", "echo $N; exit $((N % 7))"], "env": {"N": i.to_string()}}),
                )
                .await;
                assert_eq!(status, 200);
                let (out, _, end) = events.collect().await;
                (i, out, end)
            })
        })
        .collect();
    for t in tasks {
        let (i, out, end) = t.await.unwrap();
        assert_eq!(out, format!("{i}\n"));
        assert_eq!(end["exit_code"], i % 7);
    }
    let (_, metrics) = call(&agent.sock, "GET", "/metrics", None).await;
    assert_eq!(metrics["execs"]["started"], 50);
    assert_eq!(metrics["exits"]["total"], 50);
    assert_eq!(metrics["execs"]["active"], 0);
    assert_eq!(metrics["vsock"]["open"], 0);
    assert!(metrics["vsock"]["connects"].as_u64().unwrap() >= 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_dropping_mid_stream_leaves_the_process_and_agent_healthy() {
    let agent = start_agent(true);
    let (status, mut events) = exec(
        &agent.sock,
        json!({"cmd": "sh", "args": ["-c", "echo up; sleep 30"], "tag": "sleeper"}),
    )
    .await;
    assert_eq!(status, 200);
    let pid = events.next().await.unwrap()["pid"].as_u64().unwrap();
    assert_eq!(events.next().await.unwrap()["data"], "up\n");
    drop(events); // the client goes away mid-stream

    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_healthy(&agent.sock).await;
    let (status, list) = call(&agent.sock, "GET", "/processes", None).await;
    assert_eq!(status, 200, "{list}");
    let entry = list["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pid"] == pid)
        .unwrap_or_else(|| panic!("pid {pid} not listed: {list}"))
        .clone();
    assert_eq!(entry["exited"], false);
    assert_eq!(entry["tag"], "sleeper");
    assert_eq!(entry["attached"], false);

    // Other execs still work, and the dropped process can be signalled.
    let (_, events) = exec(&agent.sock, json!({"cmd": "echo", "args": ["still here"]})).await;
    assert_eq!(events.collect().await.0, "still here\n");
    let (status, answer) = call(
        &agent.sock,
        "POST",
        &format!("/processes/{pid}/signal"),
        Some(r#"{"signal": 9, "group": true}"#),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let (_, metrics) = call(&agent.sock, "GET", "/metrics", None).await;
    assert_eq!(metrics["execs"]["streams_dropped_by_client"], 1);
    assert_eq!(metrics["execs"]["active"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_env_token_and_no_secret_in_logs_metrics_or_errors() {
    let agent = start_agent(true);
    let (status, answer) = call(
        &agent.sock,
        "POST",
        "/init",
        Some(
            &json!({"env": {"INSTANCE_SECRET": ENV_SECRET, "PLAIN": "p"}, "access_token": TOKEN})
                .to_string(),
        ),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["applied"], true);

    // The agent now talks to envd with the token; the env reached the process.
    let (status, events) = exec(
        &agent.sock,
        json!({"cmd": "sh", "args": ["-c", "echo $INSTANCE_SECRET $PLAIN $CMD"], "env": {"CMD": "c"}}),
    )
    .await;
    assert_eq!(status, 200);
    let (out, _, end) = events.collect().await;
    assert_eq!(out, format!("{ENV_SECRET} p c\n"));
    assert_eq!(end["exit_code"], 0);

    // Additive: a second init keeps the first one's keys.
    let (status, _) = call(
        &agent.sock,
        "POST",
        "/init",
        Some(r#"{"env": {"MORE": "m"}}"#),
    )
    .await;
    assert_eq!(status, 200);
    let (_, events) = exec(
        &agent.sock,
        json!({"cmd": "sh", "args": ["-c", "echo $INSTANCE_SECRET $MORE"]}),
    )
    .await;
    assert_eq!(events.collect().await.0, format!("{ENV_SECRET} m\n"));

    // Wrong types carrying secrets: 400 without echoing them.
    let mut bodies = Vec::new();
    for (path, body) in [
        ("/init", json!({"access_token": [TOKEN]})),
        ("/init", json!({"env": {"K": [ENV_SECRET]}})),
        (
            "/exec",
            json!({"cmd": "true", "env": {"K": {"v": ENV_SECRET}}}),
        ),
        (
            "/restore",
            json!({"snapshot_dir": 5, "access_token": TOKEN, "env": {"K": ENV_SECRET}}),
        ),
        ("/exec", json!({"cmd": ENV_SECRET.len(), "stdin": TOKEN})),
    ] {
        let (status, answer) = call(&agent.sock, "POST", path, Some(&body.to_string())).await;
        assert_eq!(status, 400, "{answer}");
        bodies.push(answer.to_string());
    }
    // Errors from envd, health, metrics, the process list.
    let (status, answer) = call(
        &agent.sock,
        "POST",
        "/exec",
        Some(r#"{"cmd": "true", "user": "no-such-user-x"}"#),
    )
    .await;
    assert_eq!(
        (status, answer["code"].as_str()),
        (400, Some("unknown_user")),
        "{answer}"
    );
    bodies.push(answer.to_string());
    let (status, answer) = call(
        &agent.sock,
        "POST",
        "/exec",
        Some(r#"{"cmd": "/no/such/program"}"#),
    )
    .await;
    assert_eq!(
        (status, answer["code"].as_str()),
        (422, Some("spawn_failed")),
        "{answer}"
    );
    bodies.push(answer.to_string());
    let (status, answer) = call(
        &agent.sock,
        "POST",
        "/exec",
        Some(r#"{"cmd": "true", "cwd": "/no/such/dir"}"#),
    )
    .await;
    assert_eq!(
        (status, answer["code"].as_str()),
        (400, Some("bad_cwd")),
        "{answer}"
    );
    bodies.push(answer.to_string());
    let (status, answer) = call(&agent.sock, "POST", "/processes/999999/signal", None).await;
    assert_eq!(
        (status, answer["code"].as_str()),
        (404, Some("not_found")),
        "{answer}"
    );
    bodies.push(answer.to_string());
    for path in ["/metrics", "/health", "/processes"] {
        bodies.push(call(&agent.sock, "GET", path, None).await.1.to_string());
    }
    for body in &bodies {
        assert!(
            !body.contains(TOKEN) && !body.contains(ENV_SECRET),
            "secret in an answer: {body}"
        );
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let log = std::fs::read_to_string(&agent.log).unwrap();
    assert!(!log.is_empty(), "the agent logged nothing at debug level");
    assert!(
        !log.contains(TOKEN) && !log.contains(ENV_SECRET),
        "secret in the agent's log:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_with_stdin_timeout_and_signal_end() {
    let agent = start_agent(true);
    let (_, events) = exec(&agent.sock, json!({"cmd": "cat", "stdin": "piped in"})).await;
    let (out, _, end) = events.collect().await;
    assert_eq!(
        (out.as_str(), end["exit_code"].as_i64()),
        ("piped in", Some(0))
    );

    let (_, events) = exec(
        &agent.sock,
        json!({"cmd": "sleep", "args": ["30"], "timeout_ms": 300}),
    )
    .await;
    let (_, _, end) = events.collect().await;
    assert_eq!(end["timed_out"], true);
    assert_eq!(end["signal"], 9);
    assert_eq!(end["status"], 137);

    // VM operations on an envd without a VM are refused, the sandbox keeps working.
    for path in ["/pause", "/resume", "/snapshot"] {
        let body = (path == "/snapshot").then_some(r#"{"dir": "/tmp/x", "kind": "template"}"#);
        let (status, answer) = call(&agent.sock, "POST", path, body).await;
        assert_eq!(
            (status, answer["code"].as_str()),
            (409, Some("no_vm")),
            "{path}: {answer}"
        );
    }
    let (status, answer) = call(
        &agent.sock,
        "POST",
        "/boot",
        Some(r#"{"template_dir": "/t"}"#),
    )
    .await;
    assert_eq!(
        (status, answer["code"].as_str()),
        (409, Some("vm_exists")),
        "{answer}"
    );
    assert_healthy(&agent.sock).await;
}
