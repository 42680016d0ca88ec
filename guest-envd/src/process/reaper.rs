//! Collects the exit status of every child, including orphans re-parented to envd when it is PID 1.
//!
//! A single `waitpid(-1)` loop runs on SIGCHLD and hands each status to whoever registered that pid.
//! Spawning happens while holding the same lock that reaping takes, so a child that exits at once is
//! registered before the reaper can see it, and std's own reaping of a child whose exec failed cannot
//! race with ours.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    Code(i32),
    Signal(i32),
}

#[derive(Default)]
pub struct Reaper {
    waiters: Mutex<HashMap<i32, oneshot::Sender<ExitStatus>>>,
}

impl Reaper {
    /// Installs the SIGCHLD handler and starts the reaping task. Must run inside the runtime, before
    /// the first spawn.
    pub fn start() -> std::io::Result<Arc<Reaper>> {
        let reaper = Arc::new(Reaper::default());
        let mut sigchld = signal(SignalKind::child())?;
        let task_reaper = Arc::clone(&reaper);
        tokio::spawn(async move {
            // Children that ended before the handler existed.
            task_reaper.reap();
            while sigchld.recv().await.is_some() {
                task_reaper.reap();
            }
        });
        Ok(reaper)
    }

    fn waiters(&self) -> MutexGuard<'_, HashMap<i32, oneshot::Sender<ExitStatus>>> {
        self.waiters.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `spawn` (which returns the new child's pid and whatever else it made) while reaping is
    /// held off, and registers the pid. The receiver yields the child's exit status.
    pub fn spawn<T, E>(
        &self,
        spawn: impl FnOnce() -> Result<(u32, T), E>,
    ) -> Result<(u32, T, oneshot::Receiver<ExitStatus>), E> {
        let mut waiters = self.waiters();
        let (pid, made) = spawn()?;
        let (tx, rx) = oneshot::channel();
        waiters.insert(pid as i32, tx);
        Ok((pid, made, rx))
    }

    fn reap(&self) {
        let mut waiters = self.waiters();
        loop {
            let (pid, status) = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid, ExitStatus::Code(code)),
                Ok(WaitStatus::Signaled(pid, sig, _)) => (pid, ExitStatus::Signal(sig as i32)),
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
                Ok(_) => continue,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "waitpid failed");
                    return;
                }
            };
            match waiters.remove(&pid.as_raw()) {
                Some(tx) => {
                    let _ = tx.send(status);
                }
                None => tracing::debug!(pid = pid.as_raw(), ?status, "reaped an orphan"),
            }
        }
    }
}
