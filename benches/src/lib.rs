//! Helpers shared by the benchmarks: a guest-envd started as a local process on a Unix socket, the
//! files the vm bench leaves for bench-report, and the median they are all summarised with.

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

/// Written by the vm bench into the criterion directory, read by bench-report: both VMMs' boots to
/// the first exec, taken alternately.
pub const BOOT_PAIRS_FILE: &str = "boot_to_first_exec_pairs.json";
/// The same for `guest-probe`'s results on the test host and in both guests.
pub const GUEST_PROBE_FILE: &str = "guest_probe.json";

/// The median (the mean of the middle two for an even count); `None` for no samples or a NaN.
pub fn median(samples: &[f64]) -> Option<f64> {
    if samples.is_empty() || samples.iter().any(|x| x.is_nan()) {
        return None;
    }
    let mut v = samples.to_vec();
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len().is_multiple_of(2) {
        (v[mid - 1] + v[mid]) / 2.0
    } else {
        v[mid]
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[1.0, f64::NAN]), None);
    }
}
