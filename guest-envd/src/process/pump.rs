//! The output pump: one task per process that forwards its output, in order per stream, to the
//! attached client, then its end event after all of it.
//!
//! The pump owns the process's delivery state, so attach, output and end are serialized without
//! locks. While a client is attached, a slow client slows the pump, the pipe fills and the child
//! blocks: memory stays bounded. While none is attached (it disconnected), output goes to a bounded
//! backlog (oldest chunks dropped first, counted) that a reattach receives before live output.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use envd_protocol::{pb, MAX_CHUNK_LEN};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::fdio;
use super::reaper::ExitStatus;
use super::table::ProcessTable;
use crate::rpc::Sink;

/// Output kept for a detached process, per process.
const BACKLOG_LIMIT: usize = 1 << 20;

/// After the process exits, at most this much is drained per stream: all of what the process itself
/// wrote is already in the pipe (at most its capacity); more would come from a descendant that
/// still holds the pipe open, which must not delay the end event indefinitely.
const DRAIN_LIMIT: usize = 4 << 20;

/// A client attaching to the process's event stream.
pub struct Attach(pub Sink);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum StreamKind {
    Stdout = 0,
    Stderr = 1,
    Pty = 2,
}

pub struct OutputSource {
    pub kind: StreamKind,
    pub fd: Arc<AsyncFd<OwnedFd>>,
}

pub struct Pump {
    pub pid: u32,
    pub sources: Vec<OutputSource>,
    pub exit: oneshot::Receiver<ExitStatus>,
    pub attach: mpsc::Receiver<Attach>,
    pub first: Sink,
    pub timeout: Option<Duration>,
    pub exited: Arc<AtomicBool>,
    pub attached: Arc<AtomicBool>,
    pub table: Arc<ProcessTable>,
}

fn data_event(kind: StreamKind, bytes: Bytes, dropped_before: u64) -> pb::ProcessEvent {
    let output = match kind {
        StreamKind::Stdout => pb::data::Output::Stdout(bytes),
        StreamKind::Stderr => pb::data::Output::Stderr(bytes),
        StreamKind::Pty => pb::data::Output::Pty(bytes),
    };
    pb::ProcessEvent {
        event: Some(pb::process_event::Event::Data(pb::Data {
            output: Some(output),
            dropped_before,
        })),
    }
}

fn data_len(event: &pb::ProcessEvent) -> Option<(StreamKind, usize)> {
    match &event.event {
        Some(pb::process_event::Event::Data(d)) => match &d.output {
            Some(pb::data::Output::Stdout(b)) => Some((StreamKind::Stdout, b.len())),
            Some(pb::data::Output::Stderr(b)) => Some((StreamKind::Stderr, b.len())),
            Some(pb::data::Output::Pty(b)) => Some((StreamKind::Pty, b.len())),
            None => None,
        },
        _ => None,
    }
}

/// Where events go: the attached client, or the backlog.
struct Delivery {
    pid: u32,
    sub: Option<Sink>,
    /// Mirrors `sub.is_some()` for the process list.
    attached: Arc<AtomicBool>,
    backlog: VecDeque<pb::ProcessEvent>,
    backlog_bytes: usize,
    dropped: [u64; 3],
}

impl Delivery {
    /// Sends to the attached client; returns whether it was delivered live.
    async fn deliver(&mut self, event: pb::ProcessEvent) -> bool {
        let event = match &self.sub {
            Some(sub) => match sub.event(event).await {
                Ok(()) => return true,
                Err(event) => {
                    self.detach();
                    event
                }
            },
            None => event,
        };
        self.buffer(event);
        false
    }

    fn detach(&mut self) {
        tracing::debug!(pid = self.pid, "client detached; buffering output");
        self.sub = None;
        self.attached.store(false, Ordering::Release);
    }

    fn buffer(&mut self, event: pb::ProcessEvent) {
        let size = data_len(&event).map_or(0, |(_, n)| n);
        while self.backlog_bytes + size > BACKLOG_LIMIT {
            let Some(old) = self.backlog.pop_front() else {
                break;
            };
            if let Some((kind, n)) = data_len(&old) {
                self.backlog_bytes -= n;
                self.dropped[kind as usize] += n as u64;
            }
        }
        self.backlog_bytes += size;
        self.backlog.push_back(event);
    }

    /// Attaches a client: it gets a started event, then the backlog, then live events.
    async fn attach(&mut self, sink: Sink) {
        if let Some(old) = self.sub.take() {
            old.error(
                pb::ErrorCode::Conflict,
                "another client reattached to this process".into(),
            )
            .await;
        }
        let started = pb::ProcessEvent {
            event: Some(pb::process_event::Event::Started(pb::Started {
                pid: self.pid,
            })),
        };
        if sink.event(started).await.is_err() {
            return;
        }
        while let Some(mut event) = self.backlog.pop_front() {
            if let Some((kind, n)) = data_len(&event) {
                self.backlog_bytes -= n;
                let dropped = std::mem::take(&mut self.dropped[kind as usize]);
                if let Some(pb::process_event::Event::Data(d)) = &mut event.event {
                    d.dropped_before += dropped;
                }
            }
            if let Err(event) = sink.event(event).await {
                self.backlog.push_front(event);
                return;
            }
        }
        self.sub = Some(sink);
        self.attached.store(true, Ordering::Release);
    }
}

/// Completes when the attached client's connection is gone.
async fn detached(sub: Option<&Sink>) {
    match sub {
        Some(sink) => sink.tx.closed().await,
        None => std::future::pending().await,
    }
}

async fn read_source(source: Option<&OutputSource>, buf: &mut [u8]) -> std::io::Result<usize> {
    match source {
        Some(s) => fdio::read(&s.fd, buf).await,
        None => std::future::pending().await,
    }
}

impl Pump {
    pub async fn run(self) {
        let Pump {
            pid,
            sources,
            mut exit,
            mut attach,
            first,
            timeout,
            exited,
            attached,
            table,
        } = self;
        let mut delivery = Delivery {
            pid,
            sub: None,
            attached,
            backlog: VecDeque::new(),
            backlog_bytes: 0,
            dropped: [0; 3],
        };
        delivery.attach(first).await;

        let mut open: Vec<bool> = sources.iter().map(|_| true).collect();
        let mut bufs = [vec![0u8; MAX_CHUNK_LEN], vec![0u8; MAX_CHUNK_LEN]];
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut timed_out = false;
        let status = loop {
            let [buf0, buf1] = &mut bufs;
            let src0 = sources.first().filter(|_| open[0]);
            let src1 = sources
                .get(1)
                .filter(|_| open.get(1).copied().unwrap_or(false));
            tokio::select! {
                Some(Attach(sink)) = attach.recv() => delivery.attach(sink).await,
                r = read_source(src0, buf0), if src0.is_some() => {
                    forward(&mut delivery, &sources[0], &bufs[0], r, &mut open[0]).await;
                }
                r = read_source(src1, buf1), if src1.is_some() => {
                    forward(&mut delivery, &sources[1], &bufs[1], r, &mut open[1]).await;
                }
                status = &mut exit => break status.ok(),
                // Notice a client that went away even while the process is quiet.
                _ = detached(delivery.sub.as_ref()), if delivery.sub.is_some() => delivery.detach(),
                _ = sleep_until(deadline), if deadline.is_some() && !timed_out => {
                    timed_out = true;
                    tracing::info!(pid, "timeout passed; killing the process group");
                    let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
                }
            }
        };
        exited.store(true, Ordering::Release);

        // Everything the process wrote before it exited is in the pipes now: take it all.
        for (i, source) in sources.iter().enumerate() {
            let mut drained = 0;
            while open[i] && drained < DRAIN_LIMIT {
                match fdio::read_now(source.fd.get_ref(), &mut bufs[0]) {
                    Ok(0) | Err(_) => open[i] = false,
                    Ok(n) => {
                        drained += n;
                        let bytes = Bytes::copy_from_slice(&bufs[0][..n]);
                        delivery.deliver(data_event(source.kind, bytes, 0)).await;
                    }
                }
            }
        }

        let status = match status {
            Some(ExitStatus::Code(c)) => Some(pb::end::Status::ExitCode(c)),
            Some(ExitStatus::Signal(s)) => Some(pb::end::Status::Signal(s)),
            None => None,
        };
        let end = pb::ProcessEvent {
            event: Some(pb::process_event::Event::End(pb::End { status, timed_out })),
        };
        tracing::debug!(pid, ?end, "process ended");
        if delivery.deliver(end).await {
            table.remove(pid);
            return;
        }
        // Nobody took the end: keep it for a reattach, as long as the table keeps this process.
        drop(table.mark_uncollected(pid));
        while let Some(Attach(sink)) = attach.recv().await {
            delivery.attach(sink).await;
            if delivery.sub.is_some() {
                table.remove(pid);
                return;
            }
        }
    }
}

async fn forward(
    delivery: &mut Delivery,
    source: &OutputSource,
    buf: &[u8],
    read: std::io::Result<usize>,
    open: &mut bool,
) {
    match read {
        Ok(0) => *open = false,
        Ok(n) => {
            let bytes = Bytes::copy_from_slice(&buf[..n]);
            delivery.deliver(data_event(source.kind, bytes, 0)).await;
        }
        Err(e) => {
            tracing::warn!(pid = delivery.pid, error = %e, "reading process output failed");
            *open = false;
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
