//! `host-agent ctl`, the API's command-line client, against the real `host-agent serve` binary
//! with the real guest-envd attached on a Unix socket (`--attach-envd`, no VM): JSON answers on
//! stdout, exec's streamed output and exit codes, API errors as a message with the error code and a
//! non-zero exit, init, processes and signals, shutdown. (`run` and `restore --api-sock` serve the
//! same API for a VM; the snapshot e2e drives them with `ctl` inside the harness.)

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::start_agent;
use serde_json::Value;

fn ctl_command(sock: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_host-agent"));
    cmd.arg("ctl").arg("--api-sock").arg(sock).args(args);
    cmd
}

fn ctl(sock: &Path, args: &[&str]) -> Output {
    ctl_command(sock, args).output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The JSON answer a successful ctl printed: exactly one line.
fn json_answer(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "ctl failed ({}): {}",
        out.status,
        text(&out.stderr)
    );
    let stdout = text(&out.stdout);
    assert_eq!(stdout.lines().count(), 1, "one line of JSON: {stdout:?}");
    serde_json::from_str(&stdout).unwrap_or_else(|_| panic!("not JSON: {stdout:?}"))
}

#[test]
fn health_metrics_and_processes_print_json() {
    let agent = start_agent(true);
    let health = json_answer(&ctl(&agent.sock, &["health"]));
    assert_eq!(health["status"], "ok");
    assert_eq!(health["vm"], "none");
    let out = ctl(&agent.sock, &["exec", "--", "true"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let metrics = json_answer(&ctl(&agent.sock, &["metrics"]));
    assert_eq!(metrics["execs"]["started"], 1);
    assert_eq!(metrics["exits"]["zero"], 1);
    let list = json_answer(&ctl(&agent.sock, &["processes"]));
    assert!(list["processes"].is_array(), "{list}");
}

#[test]
fn exec_streams_output_and_exits_with_the_commands_code() {
    let agent = start_agent(true);
    let out = ctl(
        &agent.sock,
        &[
            "exec",
            "--env",
            "GREETING=hi there",
            "--cwd",
            "/tmp",
            "--",
            "sh",
            "-c",
            "echo \"$GREETING\" from $PWD; echo to-stderr >&2; printf 'no newline'; exit 7",
        ],
    );
    assert_eq!(out.status.code(), Some(7), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "hi there from /tmp\nno newline");
    assert!(
        text(&out.stderr).contains("to-stderr\n"),
        "{}",
        text(&out.stderr)
    );

    // Exact bytes, not only UTF-8.
    let out = ctl(&agent.sock, &["exec", "--", "printf", "\\377\\000\\n"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(out.stdout, b"\xff\x00\n");

    // A signal ends it: 128 + the signal, as a shell reports it.
    let out = ctl(&agent.sock, &["exec", "--", "sh", "-c", "kill -9 $$"]);
    assert_eq!(out.status.code(), Some(137), "{}", text(&out.stderr));

    // A timeout kills it, and says so.
    let out = ctl(
        &agent.sock,
        &["exec", "--timeout-ms", "300", "--", "sleep", "30"],
    );
    assert_eq!(out.status.code(), Some(137));
    assert!(text(&out.stderr).contains("timeout passed"));

    // Our stdin, given to the process.
    let mut child = ctl_command(&agent.sock, &["exec", "--stdin", "--", "tr", "a-z", "A-Z"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"piped in\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(text(&out.stdout), "PIPED IN\n");
}

#[test]
fn exec_output_comes_before_the_exit() {
    let agent = start_agent(true);
    let started = Instant::now();
    let mut child = ctl_command(
        &agent.sock,
        &["exec", "--", "sh", "-c", "echo first; sleep 2; echo second"],
    )
    .stdout(Stdio::piped())
    .spawn()
    .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "first");
    assert!(
        started.elapsed() < Duration::from_millis(1800),
        "the first line came only after {:?}",
        started.elapsed()
    );
    assert_eq!(lines.next().unwrap().unwrap(), "second");
    assert!(child.wait().unwrap().success());
    assert!(started.elapsed() >= Duration::from_secs(2));
}

#[test]
fn api_errors_exit_non_zero_with_the_error_code() {
    let agent = start_agent(true);
    let scratch = tempfile::tempdir().unwrap();
    let never_written = scratch.path().join("snap").display().to_string();
    for (args, code) in [
        (
            &["exec", "--user", "no-such-user-x", "--", "true"][..],
            "400 unknown_user",
        ),
        (
            &["exec", "--cwd", "/no/such/dir", "--", "true"][..],
            "400 bad_cwd",
        ),
        (&["exec", "--", "/no/such/program"][..], "422 spawn_failed"),
        (&["pause"][..], "409 no_vm"),
        (&["resume"][..], "409 no_vm"),
        (&["snapshot", "--dir", &never_written][..], "409 no_vm"),
        (&["signal", "999999", "KILL"][..], "404 not_found"),
    ] {
        let out = ctl(&agent.sock, args);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains(code),
            "{args:?}: want {code:?} in {stderr:?}"
        );
        assert!(out.stdout.is_empty(), "{args:?}: {}", text(&out.stdout));
    }
    assert!(!Path::new(&never_written).exists());

    // Bad arguments are refused before anything is sent.
    let out = ctl(&agent.sock, &["signal", "1", "NOPE"]);
    assert_eq!(out.status.code(), Some(2));

    // No agent at all.
    let out = ctl(&agent.sock.with_extension("missing"), &["health"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("cannot connect to the API socket"),
        "{}",
        text(&out.stderr)
    );
    json_answer(&ctl(&agent.sock, &["health"]));
}

#[test]
fn init_processes_signal_and_shutdown() {
    let mut agent = start_agent(true);
    let answer = json_answer(&ctl(
        &agent.sock,
        &["init", "--env", "INSTANCE=one", "--env", "OTHER=two"],
    ));
    assert_eq!(answer["applied"], true, "{answer}");
    let answer = json_answer(&ctl(&agent.sock, &["init", "--unset", "OTHER"]));
    assert_eq!(answer["applied"], true, "{answer}");
    let out = ctl(
        &agent.sock,
        &["exec", "--", "sh", "-c", "echo ${INSTANCE}-${OTHER:-unset}"],
    );
    assert_eq!(text(&out.stdout), "one-unset\n");

    // A process running in another ctl: listed, then signalled; that ctl exits 128 + 9.
    let mut sleeper = ctl_command(
        &agent.sock,
        &["exec", "--tag", "ctl-sleeper", "--", "sleep", "30"],
    )
    .stdout(Stdio::null())
    .spawn()
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let pid = loop {
        let list = json_answer(&ctl(&agent.sock, &["processes"]));
        let found = list["processes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["tag"] == "ctl-sleeper" && p["exited"] == false)
            .and_then(|p| p["pid"].as_u64());
        if let Some(pid) = found {
            break pid;
        }
        assert!(
            Instant::now() < deadline,
            "the sleeper is not listed: {list}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let answer = json_answer(&ctl(&agent.sock, &["signal", &pid.to_string(), "KILL"]));
    assert_eq!(answer["signal"], 9, "{answer}");
    let status = sleeper.wait().unwrap();
    assert_eq!(status.code(), Some(137));

    // Shutdown answers, then the agent exits and removes its socket.
    let answer = json_answer(&ctl(&agent.sock, &["shutdown"]));
    assert_eq!(answer["clean"], true, "{answer}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while agent.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the agent did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!agent.sock.exists());
}

#[test]
fn run_and_restore_refuse_a_live_api_socket_before_creating_a_vm() {
    let agent = start_agent(false);
    let dir = tempfile::tempdir().unwrap();
    let vsock = dir.path().join("v.sock");
    for args in [
        vec!["run", "--kernel", "/nonexistent/bzImage"],
        vec!["restore", "--snapshot", "/nonexistent/snapshot"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_host-agent"))
            .args(&args)
            .arg("--vsock-uds")
            .arg(&vsock)
            .arg("--api-sock")
            .arg(&agent.sock)
            .output()
            .unwrap();
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains("in use"), "{args:?}: {stderr}");
    }
    json_answer(&ctl(&agent.sock, &["health"]));

    // A VM that cannot be created leaves no API socket behind.
    let sock = dir.path().join("api.sock");
    let out = Command::new(env!("CARGO_BIN_EXE_host-agent"))
        .args(["run", "--kernel", "/nonexistent/bzImage", "--vsock-uds"])
        .arg(&vsock)
        .arg("--api-sock")
        .arg(&sock)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(!sock.exists());

    // The API needs envd's vsock.
    let out = Command::new(env!("CARGO_BIN_EXE_host-agent"))
        .args(["run", "--kernel", "/nonexistent/bzImage", "--api-sock"])
        .arg(&sock)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("--vsock-uds"));
}
