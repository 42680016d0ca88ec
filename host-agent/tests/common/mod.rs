//! What the integration tests share: a real `host-agent serve` on a Unix socket in a temporary
//! directory, optionally with the real guest-envd binary attached (`--attach-envd`, no VM).

// Each test crate uses its own part of this.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Agent {
    pub child: Child,
    pub sock: PathBuf,
    pub log: PathBuf,
    _envd: Option<Child>,
    _dir: tempfile::TempDir,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(envd) = &mut self._envd {
            let _ = envd.kill();
            let _ = envd.wait();
        }
    }
}

pub fn wait_for_socket(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(path).is_err() {
        assert!(
            Instant::now() < deadline,
            "{} never answered",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The guest-envd binary of this workspace (built by `cargo test --workspace`; built here when
/// missing).
pub fn guest_envd() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let bin = target.join("debug/guest-envd");
    if !bin.exists() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "-q", "-p", "guest-envd"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("cargo build -p guest-envd");
        assert!(status.success());
    }
    bin
}

pub fn start_agent(with_envd: bool) -> Agent {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let log = dir.path().join("agent.log");
    let mut envd = None;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_host-agent"));
    cmd.arg("serve").arg("--api-sock").arg(&sock);
    if with_envd {
        let envd_sock = dir.path().join("envd.sock");
        let envd_log = std::fs::File::create(dir.path().join("envd.log")).unwrap();
        envd = Some(
            Command::new(guest_envd())
                .arg("--listen")
                .arg(format!("unix:{}", envd_sock.display()))
                .env("ENVD_LOG", "debug")
                .stdout(Stdio::null())
                .stderr(envd_log)
                .spawn()
                .unwrap(),
        );
        wait_for_socket(&envd_sock);
        cmd.arg("--attach-envd")
            .arg(format!("unix:{}", envd_sock.display()));
    }
    let child = cmd
        .env("HOST_AGENT_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    wait_for_socket(&sock);
    Agent {
        child,
        sock,
        log,
        _envd: envd,
        _dir: dir,
    }
}
