//! Writing to a child's stdin without blocking the connection that asked.
//!
//! Each process with stdin has a small task and queue: writes are applied in the order they arrive
//! and each is acknowledged once written, while the connection goes on serving (and streaming the
//! output that the child must be able to flush before it reads more input).

use std::os::fd::OwnedFd;
use std::sync::Arc;

use bytes::Bytes;
use envd_protocol::pb;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;

use super::fdio;
use crate::rpc::Sink;

/// How many writes may wait for one child; the connection waits beyond that.
const QUEUE: usize = 8;

/// End-of-transmission: what "closing" a terminal's input means.
const EOT: u8 = 0x04;

pub struct StdinOp {
    pub data: Bytes,
    pub close: bool,
    pub reply: Sink,
}

pub enum StdinTarget {
    /// The write end of the child's stdin pipe; dropping it closes the child's stdin.
    Pipe(AsyncFd<OwnedFd>),
    /// The PTY master, shared with the output pump.
    Pty(Arc<AsyncFd<OwnedFd>>),
}

impl StdinTarget {
    fn fd(&self) -> &AsyncFd<OwnedFd> {
        match self {
            StdinTarget::Pipe(fd) => fd,
            StdinTarget::Pty(fd) => fd,
        }
    }
}

/// Starts the writer task for one child.
pub fn start(target: StdinTarget) -> mpsc::Sender<StdinOp> {
    let (tx, rx) = mpsc::channel(QUEUE);
    tokio::spawn(run(target, rx));
    tx
}

async fn run(target: StdinTarget, mut ops: mpsc::Receiver<StdinOp>) {
    let mut target = Some(target);
    while let Some(op) = ops.recv().await {
        let result = match &target {
            None => Err("stdin is already closed".to_string()),
            Some(t) => fdio::write_all(t.fd(), &op.data)
                .await
                .map_err(|e| format!("cannot write to stdin: {e}")),
        };
        let result = match result {
            Ok(()) if op.close => match target.take() {
                Some(StdinTarget::Pty(fd)) => {
                    let eot = fdio::write_all(&fd, &[EOT]).await;
                    target = Some(StdinTarget::Pty(fd));
                    eot.map_err(|e| format!("cannot write to stdin: {e}"))
                }
                // Dropping the pipe's write end is what closes the child's stdin.
                Some(StdinTarget::Pipe(_)) | None => Ok(()),
            },
            other => other,
        };
        match result {
            Ok(()) => op.reply.send(pb::response::Kind::Ack(pb::Ack {})).await,
            Err(message) => op.reply.error(pb::ErrorCode::BadRequest, message).await,
        };
    }
}
