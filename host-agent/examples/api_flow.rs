//! The orchestrator API against a real VM: run inside the test harness (or on a host with hardware
//! KVM), with a template at `/template` (or `$TEMPLATE`) and `host-agent` on PATH:
//!
//! ```sh
//! envd-harness run --timeout 900 --include target/x86_64-unknown-linux-gnu/release/examples/api_flow:/usr/local/bin/api-flow -- api-flow
//! ```
//!
//! Boots the template through `POST /boot`, checks pause/resume/snapshot conflicts, takes a
//! template snapshot, shuts down; then a second agent restores it with instance env and a token,
//! streams exec output, runs 50 execs at once, drops a client mid-stream, refuses a template
//! snapshot of the initialized sandbox, answers bad input with 400, shows its metrics, shuts down
//! cleanly, and no secret appears in the agents' logs or the guest console. Prints
//! `api-flow: N passed, M failed`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use host_agent::api::client::{ApiClient, EventStream};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::{json, Value};

const TOKEN: &str = "tok-SECRET-d41c";
const ENV_SECRET: &str = "env-SECRET-98fe";

struct Report {
    passed: u32,
    failed: u32,
}

impl Report {
    fn check(&mut self, name: &str, ok: bool, detail: impl std::fmt::Display) {
        if ok {
            self.passed += 1;
            println!("PASS {name}");
        } else {
            self.failed += 1;
            println!("FAIL {name}: {detail}");
        }
    }
}

async fn send(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<String>,
) -> anyhow::Result<(u16, Incoming)> {
    let method = hyper::Method::from_bytes(method.as_bytes())?;
    // A body or not, the content type is JSON (an empty body counts as `{}`).
    let (status, body) = ApiClient::new(sock)
        .send(method, path, Some(body.unwrap_or_default()))
        .await?;
    Ok((status.as_u16(), body))
}

async fn call(sock: &Path, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    match async {
        let (status, body) = send(sock, method, path, body.map(|b| b.to_string())).await?;
        let bytes = body.collect().await?.to_bytes();
        Ok::<_, anyhow::Error>((
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        ))
    }
    .await
    {
        Ok(r) => r,
        Err(e) => (0, json!({"client_error": e.to_string()})),
    }
}

struct Events(EventStream);

impl Events {
    async fn next(&mut self) -> Option<Value> {
        self.0.next().await.ok().flatten()
    }

    async fn collect(mut self) -> (String, Value) {
        let mut out = String::new();
        while let Some(ev) = self.next().await {
            match ev["type"].as_str() {
                Some("stdout") | Some("stderr") => out.push_str(ev["data"].as_str().unwrap_or("")),
                Some("end") | Some("error") => return (out, ev),
                _ => {}
            }
        }
        (out, Value::Null)
    }
}

async fn exec(sock: &Path, body: Value) -> (u16, Option<Events>) {
    match send(sock, "POST", "/exec", Some(body.to_string())).await {
        Ok((status, body)) => (status, Some(Events(EventStream::new(body)))),
        Err(_) => (0, None),
    }
}

struct Agent {
    child: Child,
    sock: PathBuf,
}

fn start_agent(dir: &Path, name: &str) -> anyhow::Result<Agent> {
    let sock = dir.join(format!("{name}.sock"));
    let child = Command::new("host-agent")
        .arg("serve")
        .arg("--api-sock")
        .arg(&sock)
        .arg("--console-log")
        .arg(dir.join(format!("{name}.console.log")))
        .env("HOST_AGENT_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join(format!("{name}.log")))?)
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        anyhow::ensure!(Instant::now() < deadline, "agent {name} never served");
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(Agent { child, sock })
}

fn wait_exit(agent: &mut Agent, within: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Ok(Some(s)) = agent.child.try_wait() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = agent.child.kill();
    None
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let template = std::env::var("TEMPLATE").unwrap_or_else(|_| "/template".into());
    let dir = std::env::temp_dir().join(format!("api-flow-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut r = Report {
        passed: 0,
        failed: 0,
    };
    if let Err(e) = flow(&mut r, &template, &dir).await {
        r.check("flow ran to the end", false, e);
    }
    // No secret in any agent log or guest console.
    let mut leaked = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap().flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "log") {
            let text =
                String::from_utf8_lossy(&std::fs::read(&path).unwrap_or_default()).to_string();
            if text.contains(TOKEN) || text.contains(ENV_SECRET) {
                leaked.push(path.display().to_string());
            }
        }
    }
    r.check(
        "no secret in agent logs or consoles (searched)",
        leaked.is_empty(),
        leaked.join(", "),
    );
    for name in ["boot.log", "restore.log"] {
        if r.failed > 0 {
            if let Ok(t) = std::fs::read_to_string(dir.join(name)) {
                let tail: Vec<&str> = t.lines().rev().take(15).collect();
                println!(
                    "--- {name} (tail) ---\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
        }
    }
    println!("api-flow: {} passed, {} failed", r.passed, r.failed);
    std::process::exit(if r.failed == 0 { 0 } else { 1 });
}

async fn flow(r: &mut Report, template: &str, dir: &Path) -> anyhow::Result<()> {
    // ---- Boot a template and snapshot it.
    let mut boot = start_agent(dir, "boot")?;
    let s = &boot.sock.clone();
    let (status, body) = call(s, "GET", "/health", None).await;
    r.check(
        "health 200 with no VM",
        status == 200 && body["vm"] == "none",
        &body,
    );
    let started = Instant::now();
    let (status, body) = call(
        s,
        "POST",
        "/boot",
        Some(json!({"template_dir": template, "mem_mib": 256})),
    )
    .await;
    r.check(
        "POST /boot",
        status == 200 && body["vm"] == "running",
        &body,
    );
    anyhow::ensure!(status == 200, "boot failed: {body}");
    println!(
        "boot: {} ms, timings {}",
        started.elapsed().as_millis(),
        body["timings_ms"]
    );
    let (status, body) = call(s, "POST", "/boot", Some(json!({"template_dir": template}))).await;
    r.check(
        "second boot is 409 vm_exists",
        status == 409 && body["code"] == "vm_exists",
        &body,
    );
    let (_, ev) = exec(s, json!({"cmd": "echo", "args": ["booted"]})).await;
    let (out, end) = ev.unwrap().collect().await;
    r.check(
        "exec after boot",
        out == "booted\n" && end["exit_code"] == 0,
        format!("{out:?} {end}"),
    );
    let (status, body) = call(
        s,
        "POST",
        "/snapshot",
        Some(json!({"dir": dir.join("x"), "kind": "full"})),
    )
    .await;
    r.check(
        "snapshot while running is 409 not_paused",
        status == 409 && body["code"] == "not_paused",
        &body,
    );
    let (status, body) = call(s, "POST", "/resume", None).await;
    r.check(
        "resume while running is 409 not_paused",
        status == 409 && body["code"] == "not_paused",
        &body,
    );
    let (status, body) = call(s, "POST", "/pause", None).await;
    r.check(
        "POST /pause",
        status == 200 && body["vm"] == "paused",
        &body,
    );
    let (status, body) = call(s, "POST", "/pause", None).await;
    r.check(
        "pause while paused is 409 already_paused",
        status == 409 && body["code"] == "already_paused",
        &body,
    );
    let (status, _) = exec(s, json!({"cmd": "true"})).await;
    r.check("exec while paused is 409", status == 409, status);
    let (_, body) = call(s, "GET", "/health", None).await;
    r.check("health says paused", body["vm"] == "paused", &body);
    let tpl = dir.join("template-snap");
    let (status, body) = call(
        s,
        "POST",
        "/snapshot",
        Some(json!({"dir": tpl, "kind": "template"})),
    )
    .await;
    r.check("template snapshot of a fresh boot", status == 200, &body);
    anyhow::ensure!(status == 200, "template snapshot failed: {body}");
    let (status, body) = call(s, "POST", "/resume", Some(json!({}))).await;
    r.check(
        "POST /resume",
        status == 200 && body["vm"] == "running",
        &body,
    );
    let (status, body) = call(s, "POST", "/shutdown", None).await;
    r.check(
        "POST /shutdown after boot",
        status == 200 && body["clean"] == true,
        &body,
    );
    let exit = wait_exit(&mut boot, Duration::from_secs(30));
    r.check(
        "boot agent exited 0",
        exit.is_some_and(|e| e.success()),
        format!("{exit:?}"),
    );

    // ---- Restore it as a sandbox with instance env and a token.
    let mut sandbox = start_agent(dir, "restore")?;
    let s = &sandbox.sock.clone();
    let started = Instant::now();
    let (status, body) = call(
        s,
        "POST",
        "/restore",
        Some(json!({"snapshot_dir": tpl, "env": {"INSTANCE_SECRET": ENV_SECRET, "A": "1"}, "access_token": TOKEN, "default_workdir": "/tmp"})),
    )
    .await;
    r.check(
        "POST /restore with env and token",
        status == 200 && body["init"]["applied"] == true,
        &body,
    );
    anyhow::ensure!(status == 200, "restore failed: {body}");
    println!(
        "restore: {} ms, timings {}",
        started.elapsed().as_millis(),
        body["timings_ms"]
    );
    let (_, ev) = exec(
        s,
        json!({"cmd": "sh", "args": ["-c", "echo $INSTANCE_SECRET $A $B; pwd"], "env": {"B": "2"}}),
    )
    .await;
    let (out, end) = ev.unwrap().collect().await;
    r.check(
        "exec sees instance + per-command env and default workdir",
        out == format!("{ENV_SECRET} 1 2\n/tmp\n") && end["exit_code"] == 0,
        format!("{out:?} {end}"),
    );
    println!(
        "restore to first exec end: {} ms",
        started.elapsed().as_millis()
    );

    let (status, body) = call(s, "POST", "/init", Some(json!({"env": {"LATER": "l"}}))).await;
    r.check(
        "POST /init (more env, later)",
        status == 200 && body["applied"] == true,
        &body,
    );
    let (_, ev) = exec(s, json!({"cmd": "sh", "args": ["-c", "echo $LATER $A"]})).await;
    let (out, _) = ev.unwrap().collect().await;
    r.check("init is additive", out == "l 1\n", format!("{out:?}"));

    // Streamed output arrives before the exit.
    let t = Instant::now();
    let (status, ev) = exec(
        s,
        json!({"cmd": "sh", "args": ["-c", "echo early; sleep 3; echo late; exit 4"]}),
    )
    .await;
    let mut ev = ev.unwrap();
    let _started = ev.next().await;
    let first = ev.next().await.unwrap_or(Value::Null);
    let first_at = t.elapsed();
    let (rest, end) = ev.collect().await;
    let end_at = t.elapsed();
    r.check(
        "output streamed before exit",
        status == 200
            && first["data"] == "early\n"
            && rest == "late\n"
            && end["exit_code"] == 4
            && end_at >= first_at + Duration::from_secs(2),
        format!("first {first} at {first_at:?}, end {end} at {end_at:?}"),
    );

    // 50 execs at once (each bounded, so a stuck one is reported rather than hanging the run).
    let t = Instant::now();
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move {
                let run = async {
                    let (status, ev) = exec(
                        &s,
                        json!({"cmd": "sh", "args": ["-c", "echo $N"], "env": {"N": i.to_string()}}),
                    )
                    .await;
                    match ev {
                        Some(ev) if status == 200 => {
                            let (out, end) = ev.collect().await;
                            if out == format!("{i}\n") && end["exit_code"] == 0 {
                                Ok(())
                            } else {
                                Err(format!("#{i}: {out:?} {end}"))
                            }
                        }
                        _ => Err(format!("#{i}: status {status}")),
                    }
                };
                match tokio::time::timeout(Duration::from_secs(240), run).await {
                    Ok(r) => r,
                    Err(_) => Err(format!("#{i}: no end within 240 s")),
                }
            })
        })
        .collect();
    let mut ok = 0;
    let mut errors = Vec::new();
    for t in tasks {
        match t.await {
            Ok(Ok(())) => ok += 1,
            Ok(Err(e)) => errors.push(e),
            Err(e) => errors.push(e.to_string()),
        }
    }
    println!("50 concurrent execs took {} ms", t.elapsed().as_millis());
    if !errors.is_empty() {
        let (_, metrics) = call(s, "GET", "/metrics", None).await;
        println!("metrics after the concurrent execs: {metrics}");
    }
    r.check(
        "50 concurrent execs",
        ok == 50,
        format!("{ok}/50 ok; {}", errors.join("; ")),
    );

    // A client drops mid-stream: the process and the agent stay healthy.
    let (_, ev) = exec(
        s,
        json!({"cmd": "sh", "args": ["-c", "echo up; sleep 60"], "tag": "dropped"}),
    )
    .await;
    let mut ev = ev.unwrap();
    let pid = ev.next().await.unwrap_or(Value::Null)["pid"]
        .as_u64()
        .unwrap_or(0);
    let _ = ev.next().await;
    drop(ev);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, health) = call(s, "GET", "/health", None).await;
    let (_, list) = call(s, "GET", "/processes", None).await;
    let running = list["processes"]
        .as_array()
        .is_some_and(|ps| ps.iter().any(|p| p["pid"] == pid && p["exited"] == false));
    r.check(
        "dropped client: agent healthy, process still running",
        status == 200 && running,
        format!("{health} {list}"),
    );
    let (status, body) = call(
        s,
        "POST",
        &format!("/processes/{pid}/signal"),
        Some(json!({"signal": 9})),
    )
    .await;
    r.check("signal the dropped process", status == 200, &body);

    // Bad input, conflicts, template refusal.
    let (status, body) = call(s, "POST", "/exec", None).await;
    r.check("empty exec body is 400", status == 400, &body);
    let status = match send(s, "POST", "/exec", Some("{oops".into())).await {
        Ok((status, _)) => status,
        Err(_) => 0,
    };
    r.check("malformed JSON is 400", status == 400, status);
    let (status, body) = call(s, "POST", "/exec", Some(json!({"cmd": "true", "bogus": 1}))).await;
    r.check(
        "unknown field is 400",
        status == 400 && body["code"] == "bad_request",
        &body,
    );
    let (status, body) = call(s, "POST", "/restore", Some(json!({"snapshot_dir": tpl}))).await;
    r.check(
        "second restore is 409 vm_exists",
        status == 409 && body["code"] == "vm_exists",
        &body,
    );
    let (status, body) = call(s, "POST", "/pause", None).await;
    r.check("pause the restored sandbox", status == 200, &body);
    let (status, body) = call(
        s,
        "POST",
        "/snapshot",
        Some(json!({"dir": dir.join("bad-template"), "kind": "template"})),
    )
    .await;
    r.check(
        "template snapshot after instance env is 409 instance_initialized",
        status == 409 && body["code"] == "instance_initialized",
        &body,
    );
    let (status, body) = call(
        s,
        "POST",
        "/snapshot",
        Some(json!({"dir": dir.join("full-snap"), "kind": "full"})),
    )
    .await;
    r.check("full snapshot of the sandbox", status == 200, &body);
    let (status, body) = call(s, "POST", "/resume", None).await;
    r.check("resume after snapshot", status == 200, &body);
    let (_, ev) = exec(s, json!({"cmd": "echo", "args": ["after resume"]})).await;
    let (out, _) = ev.unwrap().collect().await;
    r.check(
        "exec after resume",
        out == "after resume\n",
        format!("{out:?}"),
    );

    let (status, metrics) = call(s, "GET", "/metrics", None).await;
    println!("metrics: {metrics}");
    r.check(
        "metrics: restore breakdown, exits, vsock connects",
        status == 200
            && metrics["last_start"]["kind"] == "restore"
            && metrics["last_start"]["steps_ms"]["init_done"].is_number()
            && metrics["exits"]["total"].as_u64().unwrap_or(0) >= 53
            && metrics["vsock"]["connects"].as_u64().unwrap_or(0) >= 54,
        &metrics,
    );
    let (status, body) = call(s, "POST", "/shutdown", Some(json!({"timeout_ms": 20000}))).await;
    r.check(
        "POST /shutdown powers the guest off",
        status == 200 && body["clean"] == true && body["vm_exit"] == "power_off",
        &body,
    );
    let exit = wait_exit(&mut sandbox, Duration::from_secs(30));
    r.check(
        "restore agent exited 0, socket removed",
        exit.is_some_and(|e| e.success()) && !s.exists(),
        format!("{exit:?}"),
    );
    Ok(())
}
