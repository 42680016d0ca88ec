//! Drives guest-envd through the `host-agent envd` client CLI, each call bounded by a deadline.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// What one CLI call returned. `code` is `None` when a signal ended the CLI.
#[derive(Debug, Clone)]
pub struct Output {
    pub code: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Output {
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// `Err` with the CLI's stderr unless it exited 0.
    pub fn ok(self) -> Result<Self, String> {
        if self.code == Some(0) {
            Ok(self)
        } else {
            Err(format!(
                "exit {:?}: {}",
                self.code,
                String::from_utf8_lossy(&self.stderr).trim()
            ))
        }
    }
}

type Readers = (
    std::thread::JoinHandle<Vec<u8>>,
    std::thread::JoinHandle<Vec<u8>>,
);

/// A started CLI call, for running many at once.
pub struct Pending {
    child: Child,
    readers: Option<Readers>,
    what: String,
}

impl Pending {
    /// The output if the CLI has exited, else `None` (does not wait).
    pub fn poll(&mut self) -> Result<Option<Output>, String> {
        match self.child.try_wait() {
            Ok(Some(status)) => {
                let (o, e) = self.readers.take().ok_or("output already taken")?;
                Ok(Some(Output {
                    code: status.code(),
                    stdout: o.join().unwrap_or_default(),
                    stderr: e.join().unwrap_or_default(),
                }))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(format!("{}: {e}", self.what)),
        }
    }

    /// Waits until `deadline`; kills the CLI and errs when it passes.
    pub fn wait(mut self, deadline: Instant) -> Result<Output, String> {
        loop {
            if let Some(o) = self.poll()? {
                return Ok(o);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return Err(format!(
                    "{}: no answer before the deadline (killed)",
                    self.what
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[derive(Debug, Clone)]
pub struct EnvdCli {
    pub host_agent: PathBuf,
    /// e.g. `vsock:3:49983`
    pub address: String,
}

impl EnvdCli {
    pub fn start(&self, args: &[String]) -> Result<Pending, String> {
        let what = format!(
            "host-agent envd --connect {} {}",
            self.address,
            args.join(" ")
        );
        let mut child = Command::new(&self.host_agent)
            .arg("envd")
            .arg("--connect")
            .arg(&self.address)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting {}: {e}", self.host_agent.display()))?;
        let mut so = child.stdout.take().ok_or("no stdout pipe")?;
        let mut se = child.stderr.take().ok_or("no stderr pipe")?;
        let ro = std::thread::spawn(move || {
            let mut b = Vec::new();
            let _ = so.read_to_end(&mut b);
            b
        });
        let re = std::thread::spawn(move || {
            let mut b = Vec::new();
            let _ = se.read_to_end(&mut b);
            b
        });
        Ok(Pending {
            child,
            readers: Some((ro, re)),
            what,
        })
    }

    pub fn call(&self, args: &[String], timeout: Duration) -> Result<Output, String> {
        self.start(args)?.wait(Instant::now() + timeout)
    }

    pub fn health(&self, timeout: Duration) -> Result<Output, String> {
        self.call(&["health".to_string()], timeout)
    }

    /// `exec [--env K=V]... -- ARGV`
    pub fn exec_args(env: &[(&str, &str)], argv: &[&str]) -> Vec<String> {
        let mut a = vec!["exec".to_string()];
        for (k, v) in env {
            a.push("--env".into());
            a.push(format!("{k}={v}"));
        }
        a.push("--".into());
        a.extend(argv.iter().map(|s| s.to_string()));
        a
    }

    pub fn exec(
        &self,
        env: &[(&str, &str)],
        argv: &[&str],
        timeout: Duration,
    ) -> Result<Output, String> {
        self.call(&Self::exec_args(env, argv), timeout)
    }

    pub fn init(&self, env: &[(&str, &str)], timeout: Duration) -> Result<Output, String> {
        let mut a = vec!["init".to_string()];
        for (k, v) in env {
            a.push("--env".into());
            a.push(format!("{k}={v}"));
        }
        self.call(&a, timeout)
    }

    /// One CLI process that retries connect + health itself (`--wait-ms`, attempts of 500 ms, backoff up
    /// to 100 ms) until envd answers: the finest-grained readiness probe, for boot timing.
    pub fn start_health_wait(&self, wait: Duration) -> Result<Pending, String> {
        self.start(&[
            "--wait-ms".to_string(),
            wait.as_millis().to_string(),
            "health".to_string(),
        ])
    }

    pub fn shutdown(&self, timeout: Duration) -> Result<Output, String> {
        self.call(&["shutdown".to_string()], timeout)
    }

    /// Polls `health` until envd answers or `deadline` passes. Each attempt has its own short timeout (a
    /// vsock connect to a guest that is not listening yet can wait ~2 s in the kernel).
    pub fn wait_ready(
        &self,
        deadline: Instant,
        vm_alive: &mut dyn FnMut() -> Result<(), String>,
    ) -> Result<u32, String> {
        let mut attempts = 0;
        let mut last = String::new();
        while Instant::now() < deadline {
            vm_alive()?;
            attempts += 1;
            let per_try = (deadline - Instant::now()).min(Duration::from_secs(3));
            match self.health(per_try) {
                Ok(o) if o.code == Some(0) => return Ok(attempts),
                Ok(o) => last = String::from_utf8_lossy(&o.stderr).trim().to_string(),
                Err(e) => last = e,
            }
            // Each attempt spawns the CLI; do not starve the booting guest of CPU.
            std::thread::sleep(Duration::from_millis(250));
        }
        Err(format!("envd did not answer health within the deadline after {attempts} attempts; last: {last}"))
    }
}
