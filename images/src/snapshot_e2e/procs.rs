//! Child processes with deadlines. Every child is registered so that the run's watchdog can kill it,
//! its stdout and stderr are collected by reader threads (no pipe can fill up), and it is killed
//! (SIGKILL, by its own pid) and reaped when its handle drops. Waiting is always polling against a
//! deadline, never a fixed sleep.

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often a wait looks again.
pub const POLL: Duration = Duration::from_millis(20);

/// Pids of children that have not been reaped yet.
static LIVE: Mutex<Vec<u32>> = Mutex::new(Vec::new());

fn register(pid: u32) {
    LIVE.lock().unwrap_or_else(|e| e.into_inner()).push(pid);
}

fn unregister(pid: u32) {
    LIVE.lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|p| *p != pid);
}

/// Kills every child that is still registered (the watchdog's last act), each by its own pid.
pub fn kill_registered() {
    let pids = LIVE.lock().unwrap_or_else(|e| e.into_inner()).clone();
    for pid in pids {
        // SAFETY: kill(2) on a pid we spawned and have not reaped yet.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGKILL);
        }
    }
}

#[derive(Default)]
struct Stream {
    bytes: Vec<u8>,
    first_at: Option<Instant>,
}

fn reader(mut from: impl Read + Send + 'static, into: Arc<Mutex<Stream>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 16 << 10];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let mut s = into.lock().unwrap_or_else(|e| e.into_inner());
                    if s.first_at.is_none() {
                        s.first_at = Some(Instant::now());
                    }
                    s.bytes.extend_from_slice(&buf[..n]);
                }
            }
        }
    })
}

/// A running child.
pub struct Bg {
    pub name: String,
    child: Child,
    pid: u32,
    pub started: Instant,
    /// Wall-clock time (seconds since the epoch) just before the spawn.
    pub started_wall: f64,
    stdout: Arc<Mutex<Stream>>,
    stderr: Arc<Mutex<Stream>>,
    readers: Vec<JoinHandle<()>>,
    status: Option<ExitStatus>,
}

impl Bg {
    pub fn spawn(name: &str, prog: &Path, args: &[String]) -> Result<Bg, String> {
        Self::spawn_env(name, prog, args, &[])
    }

    /// Like [`Bg::spawn`], with extra environment variables for the child.
    pub fn spawn_env(
        name: &str,
        prog: &Path,
        args: &[String],
        envs: &[(&str, &str)],
    ) -> Result<Bg, String> {
        let started_wall = wall_secs();
        let started = Instant::now();
        let mut child = Command::new(prog)
            .args(args)
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {} ({name}): {e}", prog.display()))?;
        let pid = child.id();
        register(pid);
        let stdout = Arc::new(Mutex::new(Stream::default()));
        let stderr = Arc::new(Mutex::new(Stream::default()));
        let mut readers = Vec::new();
        if let Some(out) = child.stdout.take() {
            readers.push(reader(out, stdout.clone()));
        }
        if let Some(err) = child.stderr.take() {
            readers.push(reader(err, stderr.clone()));
        }
        Ok(Bg {
            name: name.to_string(),
            child,
            pid,
            started,
            started_wall,
            stdout,
            stderr,
            readers,
            status: None,
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn stdout(&self) -> String {
        let s = self.stdout.lock().unwrap_or_else(|e| e.into_inner());
        String::from_utf8_lossy(&s.bytes).into_owned()
    }

    pub fn stderr(&self) -> String {
        let s = self.stderr.lock().unwrap_or_else(|e| e.into_inner());
        String::from_utf8_lossy(&s.bytes).into_owned()
    }

    /// When the first stdout byte arrived.
    pub fn first_stdout_at(&self) -> Option<Instant> {
        self.stdout
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .first_at
    }

    /// The exit status, if the child has exited (reaps it).
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            if let Ok(Some(st)) = self.child.try_wait() {
                unregister(self.pid);
                self.status = Some(st);
            }
        }
        self.status
    }

    /// Waits until `ready` holds; an error when the child exits first or the deadline passes.
    pub fn wait_until(
        &mut self,
        what: &str,
        deadline: Instant,
        mut ready: impl FnMut(&Bg) -> bool,
    ) -> Result<Duration, String> {
        loop {
            if ready(self) {
                return Ok(self.started.elapsed());
            }
            if let Some(st) = self.try_status() {
                self.drain(Instant::now() + Duration::from_secs(2));
                if ready(self) {
                    return Ok(self.started.elapsed());
                }
                return Err(format!("{} exited ({st}) before {what}", self.name));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{}: no {what} after {:.1} s (deadline)",
                    self.name,
                    self.started.elapsed().as_secs_f64()
                ));
            }
            std::thread::sleep(POLL);
        }
    }

    /// Waits for the child to exit; `None` when the deadline passed first (it still runs).
    pub fn wait_exit(&mut self, deadline: Instant) -> Option<ExitStatus> {
        loop {
            if let Some(st) = self.try_status() {
                self.drain(deadline.max(Instant::now() + Duration::from_secs(2)));
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(POLL);
        }
    }

    /// Waits (bounded) until the reader threads saw end of file.
    fn drain(&mut self, deadline: Instant) {
        while !self.readers.iter().all(|r| r.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(POLL);
        }
        if self.readers.iter().all(|r| r.is_finished()) {
            for r in self.readers.drain(..) {
                let _ = r.join();
            }
        }
    }

    /// Kills the child (if it still runs) and reaps it.
    pub fn kill(&mut self) -> Option<ExitStatus> {
        if self.try_status().is_none() {
            let _ = self.child.kill();
            if let Ok(st) = self.child.wait() {
                self.status = Some(st);
            }
            unregister(self.pid);
            self.drain(Instant::now() + Duration::from_secs(2));
        }
        self.status
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Seconds since the epoch, now.
pub fn wall_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// What a finished command gave.
#[derive(Debug, Clone)]
pub struct Out {
    pub code: Option<i32>,
    pub status: String,
    pub stdout: String,
    pub stderr: String,
    pub timed_out: bool,
    pub took: Duration,
}

impl Out {
    pub fn ok(&self) -> bool {
        self.code == Some(0)
    }

    /// One line for a failure message.
    pub fn why(&self) -> String {
        if self.timed_out {
            return format!(
                "no exit after {:.1} s (killed); stderr: {}",
                self.took.as_secs_f64(),
                tail(&self.stderr, 5)
            );
        }
        format!("{}; stderr: {}", self.status, tail(&self.stderr, 5))
    }
}

/// Runs a command to its end or the deadline (then kills it).
pub fn run(name: &str, prog: &Path, args: &[String], timeout: Duration) -> Out {
    let deadline = Instant::now() + timeout;
    let mut bg = match Bg::spawn(name, prog, args) {
        Ok(bg) => bg,
        Err(e) => {
            return Out {
                code: None,
                status: e.clone(),
                stdout: String::new(),
                stderr: e,
                timed_out: false,
                took: Duration::ZERO,
            }
        }
    };
    let exited = bg.wait_exit(deadline);
    let timed_out = exited.is_none();
    let st = if timed_out { bg.kill() } else { exited };
    Out {
        code: if timed_out {
            None
        } else {
            st.and_then(|s| s.code())
        },
        status: st
            .map(|s| s.to_string())
            .unwrap_or_else(|| "unknown".into()),
        stdout: bg.stdout(),
        stderr: bg.stderr(),
        timed_out,
        took: bg.started.elapsed(),
    }
}

/// The last `n` non-empty lines of `text`, joined with " | ".
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let from = lines.len().saturating_sub(n);
    lines[from..].join(" | ")
}

/// The last `n` lines of `text` as a block (for console logs).
pub fn tail_block(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.len().saturating_sub(n);
    lines[from..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_and_times_out() {
        let sh = Path::new("/bin/sh");
        let out = run(
            "echo",
            sh,
            &["-c".into(), "echo hi; echo err >&2; exit 3".into()],
            Duration::from_secs(10),
        );
        assert_eq!(out.code, Some(3));
        assert_eq!(out.stdout, "hi\n");
        assert_eq!(out.stderr, "err\n");
        let out = run(
            "sleep",
            sh,
            &["-c".into(), "exec sleep 10".into()],
            Duration::from_millis(200),
        );
        assert!(out.timed_out);
        assert!(out.took < Duration::from_secs(5));
    }

    #[test]
    fn tails() {
        assert_eq!(tail("a\n\nb\nc\n", 2), "b | c");
        assert_eq!(tail_block("a\nb\nc", 2), "b\nc");
    }
}
