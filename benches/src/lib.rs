//! Helpers shared by the benchmarks: a guest-envd started as a local process on a Unix socket.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use envd_protocol::{Address, Client};

/// Where the guest-envd binary is: `$ENVD_BIN`, or next to the benchmark's own target directory.
pub fn envd_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("ENVD_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<bench> -> target/<profile>/guest-envd
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("bench binary under target/<profile>/deps");
    profile_dir.join("guest-envd")
}

/// A guest-envd process listening on a Unix socket in a temporary directory.
pub struct LocalEnvd {
    child: Child,
    _dir: tempfile::TempDir,
    pub addr: Address,
}

impl LocalEnvd {
    pub async fn start() -> LocalEnvd {
        let bin = envd_binary();
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("envd.sock");
        let child = Command::new(&bin)
            .arg("--listen")
            .arg(format!("unix:{}", sock.display()))
            .env("ENVD_LOG", "error")
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {} (build it first): {e}", bin.display()));
        let addr = Address::Unix(sock);
        Client::connect_when_ready(&addr, Duration::from_secs(1), Duration::from_secs(10))
            .await
            .expect("envd ready");
        LocalEnvd {
            child,
            _dir: dir,
            addr,
        }
    }
}

impl Drop for LocalEnvd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
