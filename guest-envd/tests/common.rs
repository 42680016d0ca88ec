//! Starts the real guest-envd binary on a Unix socket for a test, and stops it afterwards.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime};

use envd_protocol::{pb, Address, Client};

pub struct Envd {
    child: Child,
    pub dir: tempfile::TempDir,
    pub addr: Address,
}

impl Envd {
    /// Starts envd with a template env.
    pub async fn start(template_env: &[(&str, &str)]) -> Envd {
        Self::start_with(template_env, &[]).await
    }

    pub async fn start_with(template_env: &[(&str, &str)], extra_args: &[&str]) -> Envd {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("envd.sock");
        let env_file = dir.path().join("template-env.json");
        let env: HashMap<_, _> = template_env.iter().cloned().collect();
        std::fs::write(&env_file, serde_json::to_string(&env).expect("json")).expect("write env");
        let child = Command::new(env!("CARGO_BIN_EXE_guest-envd"))
            .arg("--listen")
            .arg(format!("unix:{}", sock.display()))
            .arg("--template-env")
            .arg(&env_file)
            .args(extra_args)
            .env("ENVD_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn guest-envd");
        let addr = Address::Unix(sock);
        let envd = Envd { child, dir, addr };
        // Polls until envd answers health, with a deadline; not a fixed sleep.
        Client::connect_when_ready(&envd.addr, Duration::from_secs(1), Duration::from_secs(10))
            .await
            .expect("envd did not become ready");
        envd
    }

    pub async fn client(&self) -> Client {
        Client::connect(&self.addr).await.expect("connect")
    }

    pub fn socket_path(&self) -> PathBuf {
        match &self.addr {
            Address::Unix(p) => p.clone(),
            _ => unreachable!(),
        }
    }

    /// Whether the envd process is still alive.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Envd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn now() -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp::from(SystemTime::now()))
}

pub fn at(seconds: i64) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp { seconds, nanos: 0 })
}

pub fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub fn cmd(argv: &[&str]) -> pb::StartRequest {
    pb::StartRequest {
        cmd: argv[0].to_string(),
        args: argv[1..].iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

pub fn sh(script: &str) -> pb::StartRequest {
    cmd(&["sh", "-c", script])
}

/// Runs a command to its end and returns its stdout as a string, asserting it exited 0.
pub async fn run_ok(client: &Client, req: pb::StartRequest) -> String {
    let out = client
        .start(req)
        .await
        .expect("start")
        .collect()
        .await
        .expect("collect");
    assert_eq!(
        out.exit_status(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf8")
}

pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}
