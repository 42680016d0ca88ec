//! The table of processes envd started: lookup by pid or tag, list, and bounded retention of ended
//! processes whose end no client has collected yet.

use std::collections::{HashMap, VecDeque};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use envd_protocol::pb;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;

use super::pump::Attach;
use super::stdin::StdinOp;

/// How many ended-but-uncollected processes are kept for a later reattach; the oldest go first.
const MAX_UNCOLLECTED: usize = 256;

/// What the rest of envd can do with a running process.
pub struct ProcessHandle {
    pub pid: u32,
    pub info: pb::ProcessInfo,
    exited: Arc<AtomicBool>,
    attached: Arc<AtomicBool>,
    pub stdin: Option<mpsc::Sender<StdinOp>>,
    pub pty_master: Option<Arc<AsyncFd<OwnedFd>>>,
    pub attach: mpsc::Sender<Attach>,
}

impl ProcessHandle {
    pub fn new(
        info: pb::ProcessInfo,
        stdin: Option<mpsc::Sender<StdinOp>>,
        pty_master: Option<Arc<AsyncFd<OwnedFd>>>,
        attach: mpsc::Sender<Attach>,
        exited: Arc<AtomicBool>,
        attached: Arc<AtomicBool>,
    ) -> Self {
        ProcessHandle {
            pid: info.pid,
            info,
            exited,
            attached,
            stdin,
            pty_master,
            attach,
        }
    }

    /// Whether the process has ended (its pid may already belong to someone else).
    pub fn exited(&self) -> bool {
        self.exited.load(Ordering::Acquire)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TableError {
    #[error("no process with pid {0}")]
    NoPid(u32),
    #[error("no process tagged {0:?}")]
    NoTag(String),
    #[error("a process selector (pid or tag) is required")]
    NoSelector,
    #[error("tag {0:?} already names a running process")]
    TagInUse(String),
}

#[derive(Default)]
struct Inner {
    by_pid: HashMap<u32, Arc<ProcessHandle>>,
    /// Tag to pid; a pid of 0 reserves a tag while its process is being started.
    tags: HashMap<String, u32>,
    uncollected: VecDeque<u32>,
}

#[derive(Default)]
pub struct ProcessTable {
    inner: Mutex<Inner>,
}

impl ProcessTable {
    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reserves `tag` for a process about to start. Empty tags need no reservation.
    pub fn reserve_tag(&self, tag: &str) -> Result<(), TableError> {
        if tag.is_empty() {
            return Ok(());
        }
        let mut inner = self.inner();
        let taken = match inner.tags.get(tag) {
            None => false,
            Some(0) => true,
            // An ended process keeps its tag for reattach only until a new process claims it.
            Some(pid) => inner.by_pid.get(pid).is_some_and(|h| !h.exited()),
        };
        if taken {
            return Err(TableError::TagInUse(tag.to_string()));
        }
        inner.tags.insert(tag.to_string(), 0);
        Ok(())
    }

    /// Releases a reservation whose process failed to start.
    pub fn release_tag(&self, tag: &str) {
        let mut inner = self.inner();
        if inner.tags.get(tag) == Some(&0) {
            inner.tags.remove(tag);
        }
    }

    pub fn insert(&self, handle: Arc<ProcessHandle>) {
        let mut inner = self.inner();
        if !handle.info.tag.is_empty() {
            inner.tags.insert(handle.info.tag.clone(), handle.pid);
        }
        inner.by_pid.insert(handle.pid, handle);
    }

    pub fn get(
        &self,
        selector: Option<&pb::ProcessSelector>,
    ) -> Result<Arc<ProcessHandle>, TableError> {
        use pb::process_selector::Selector;
        let inner = self.inner();
        match selector.and_then(|s| s.selector.as_ref()) {
            Some(Selector::Pid(pid)) => inner
                .by_pid
                .get(pid)
                .cloned()
                .ok_or(TableError::NoPid(*pid)),
            Some(Selector::Tag(tag)) => inner
                .tags
                .get(tag)
                .and_then(|pid| inner.by_pid.get(pid))
                .cloned()
                .ok_or_else(|| TableError::NoTag(tag.clone())),
            None => Err(TableError::NoSelector),
        }
    }

    pub fn list(&self) -> Vec<pb::ProcessInfo> {
        let mut list: Vec<_> = self
            .inner()
            .by_pid
            .values()
            .map(|h| pb::ProcessInfo {
                exited: h.exited(),
                attached: h.attached.load(Ordering::Acquire),
                ..h.info.clone()
            })
            .collect();
        list.sort_by_key(|p| p.pid);
        list
    }

    /// Marks a process as ended with nobody to receive its end; it stays listed (and reattachable)
    /// until collected or pushed out by newer ones. Returns the handles evicted.
    pub fn mark_uncollected(&self, pid: u32) -> Vec<Arc<ProcessHandle>> {
        let mut inner = self.inner();
        inner.uncollected.push_back(pid);
        let mut evicted = Vec::new();
        while inner.uncollected.len() > MAX_UNCOLLECTED {
            if let Some(old) = inner.uncollected.pop_front() {
                if let Some(h) = inner.by_pid.remove(&old) {
                    if inner.tags.get(&h.info.tag) == Some(&old) {
                        inner.tags.remove(&h.info.tag);
                    }
                    evicted.push(h);
                }
            }
        }
        evicted
    }

    /// Forgets a process whose end was delivered.
    pub fn remove(&self, pid: u32) {
        let mut inner = self.inner();
        if let Some(h) = inner.by_pid.remove(&pid) {
            if inner.tags.get(&h.info.tag) == Some(&pid) {
                inner.tags.remove(&h.info.tag);
            }
        }
        inner.uncollected.retain(|p| *p != pid);
    }
}
