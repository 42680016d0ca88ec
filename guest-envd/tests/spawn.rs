//! The posix_spawn path (envd's own user, no PTY): what the child inherits, how its program is
//! found, and the cases it hands to the fork path.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::*;
use envd_protocol::pb;

fn executable(path: &std::path::Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn status_field<'a>(status: &'a str, name: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .unwrap_or_else(|| panic!("no {name} in {status}"))
        .trim()
}

/// This process's fds without close-on-exec (envd inherits them; they are not envd's to close).
fn inherited_fds() -> Vec<u32> {
    const O_CLOEXEC: u32 = 0o2000000;
    std::fs::read_dir("/proc/self/fdinfo")
        .unwrap()
        .filter_map(|e| {
            let fd: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
            let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
            let flags = u32::from_str_radix(status_field(&info, "flags:"), 8).ok()?;
            (flags & O_CLOEXEC == 0).then_some(fd)
        })
        .collect()
}

#[tokio::test]
async fn a_child_starts_with_default_signals_its_own_group_and_only_its_stdio() {
    let envd = Envd::start(&[]).await;
    let c = envd.client().await;

    // envd (a Rust program) ignores SIGPIPE; an ignored signal survives exec unless reset. (glibc's
    // posix_spawn leaves its two internal real-time signals, 32 and 33, ignored: mask them out.)
    let status = run_ok(&c, cmd(&["cat", "/proc/self/status"])).await;
    let mask = |name| u64::from_str_radix(status_field(&status, name), 16).unwrap();
    assert_eq!(
        mask("SigIgn:") & 0x7fff_ffff,
        0,
        "ignored signals: {status}"
    );
    assert_eq!(mask("SigBlk:"), 0, "blocked signals: {status}");

    // /proc/self/stat: "pid (comm) state ppid pgrp ...": the child leads its own process group.
    let stat = run_ok(&c, cmd(&["cat", "/proc/self/stat"])).await;
    let after_comm = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let pid = stat.split_whitespace().next().unwrap();
    assert_eq!(fields[2], pid, "pgrp of {stat}");

    // Only 0, 1, 2, the directory ls itself opened, and whatever envd inherited from this test
    // without close-on-exec: none of envd's own sockets or pipes leak.
    let fds = run_ok(&c, cmd(&["ls", "/proc/self/fd"])).await;
    let mut fds: Vec<u32> = fds.split_whitespace().map(|f| f.parse().unwrap()).collect();
    fds.sort();
    let mut expected = vec![0, 1, 2, 3];
    expected.extend(inherited_fds().into_iter().filter(|fd| *fd > 3));
    expected.sort();
    expected.dedup();
    assert_eq!(fds, expected, "open fds in the child");
}

#[tokio::test]
async fn a_program_name_is_looked_up_in_the_commands_own_path() {
    let envd = Envd::start(&[]).await;
    let c = envd.client().await;
    let bin = envd.dir.path().join("only-here");
    std::fs::create_dir(&bin).unwrap();
    executable(&bin.join("greet"), "#!/bin/sh\necho found-in-path \"$@\"\n");

    let mut req = cmd(&["greet", "a", "b c"]);
    req.envs = env(&[(
        "PATH",
        &format!("/nonexistent:{}:/usr/bin:/bin", bin.display()),
    )]);
    assert_eq!(run_ok(&c, req).await, "found-in-path a b c\n");

    // Not in the command's PATH: not found, and envd goes on serving.
    let err = c.start(cmd(&["greet"])).await.err().expect("not found");
    assert_eq!(err.code(), Some(pb::ErrorCode::SpawnFailed), "{err}");
    assert!(err.to_string().contains("\"greet\" not found"), "{err}");
    assert_eq!(run_ok(&c, cmd(&["echo", "still"])).await, "still\n");
}

#[tokio::test]
async fn a_script_without_an_interpreter_line_runs_with_sh() {
    let envd = Envd::start(&[]).await;
    let c = envd.client().await;
    let script = envd.dir.path().join("plain-script");
    executable(&script, "echo ran-by-sh $0\n");
    let out = run_ok(&c, cmd(&[script.to_str().unwrap()])).await;
    assert_eq!(out, format!("ran-by-sh {}\n", script.display()));
}

#[tokio::test]
async fn stdin_pipe_and_working_directory_reach_the_child() {
    let envd = Envd::start(&[]).await;
    let c = envd.client().await;
    let dir = envd.dir.path().join("work");
    std::fs::create_dir(&dir).unwrap();
    let mut req = cmd(&["sh", "-c", "pwd; cat"]);
    req.cwd = dir.display().to_string();
    req.stdin = true;
    let p = c.start(req).await.expect("start");
    c.stdin(pb::ProcessSelector::pid(p.pid), b"from-stdin\n", true)
        .await
        .expect("stdin");
    let out = p.collect().await.expect("collect");
    assert_eq!(out.exit_status(), Some(0));
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!("{}\nfrom-stdin\n", dir.display())
    );
}
