//! The envd service: listeners, one reader and one writer task per connection, and request dispatch.
//!
//! Every connection has a bounded outgoing queue drained by its writer; responses and process events
//! of all requests on the connection go through it, tagged with their request id. Bad input gets an
//! error response; only what breaks the framing (an oversized or truncated frame) closes the
//! connection, and nothing a client sends stops envd serving the others.

mod handlers;
mod listener;

use envd_protocol::frame::{self, FrameError};
use envd_protocol::pb;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

pub use handlers::Envd;
pub use listener::{serve, Listener};

/// Responses queued per connection before request handling and process output wait for the client.
const OUTGOING_QUEUE: usize = 64;

/// Frames batched into one socket write when the queue holds several.
const WRITE_BATCH_BYTES: usize = 256 << 10;

pub enum Outgoing {
    Response(pb::Response),
    /// Stop writing after everything queued before it.
    Close,
    /// Power off (or reboot) once everything queued before it is written.
    PowerOff {
        reboot: bool,
    },
}

/// Where the responses to one request go.
#[derive(Clone)]
pub struct Sink {
    pub id: u64,
    pub tx: mpsc::Sender<Outgoing>,
}

impl Sink {
    /// Queues a response; false when the connection is gone.
    pub async fn send(&self, kind: pb::response::Kind) -> bool {
        self.tx
            .send(Outgoing::Response(pb::Response {
                id: self.id,
                kind: Some(kind),
            }))
            .await
            .is_ok()
    }

    pub async fn error(&self, code: pb::ErrorCode, message: String) -> bool {
        self.send(pb::response::Kind::Error(pb::Error {
            code: code as i32,
            message,
        }))
        .await
    }

    /// Queues a process event; gives it back when the connection is gone.
    pub async fn event(&self, event: pb::ProcessEvent) -> Result<(), pb::ProcessEvent> {
        let response = pb::Response {
            id: self.id,
            kind: Some(pb::response::Kind::Event(event)),
        };
        match self.tx.send(Outgoing::Response(response)).await {
            Ok(()) => Ok(()),
            Err(mpsc::error::SendError(Outgoing::Response(pb::Response {
                kind: Some(pb::response::Kind::Event(event)),
                ..
            }))) => Err(event),
            Err(_) => Err(pb::ProcessEvent::default()),
        }
    }
}

/// Serves one connection until the client closes it or breaks the framing.
pub async fn serve_connection<S>(stream: S, envd: std::sync::Arc<Envd>)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut reader, writer) = tokio::io::split(stream);
    let (tx, rx) = mpsc::channel(OUTGOING_QUEUE);
    let writer_task = tokio::spawn(write_loop(writer, rx));
    let connection_error = Sink {
        id: 0,
        tx: tx.clone(),
    };
    loop {
        let body = match frame::read_frame(&mut reader).await {
            Ok(Some(body)) => body,
            Ok(None) => break,
            Err(e @ FrameError::TooLarge { .. }) => {
                tracing::warn!(error = %e, "closing connection");
                connection_error
                    .error(pb::ErrorCode::FrameTooLarge, e.to_string())
                    .await;
                break;
            }
            Err(e @ (FrameError::Truncated { .. } | FrameError::TruncatedHeader { .. })) => {
                tracing::warn!(error = %e, "closing connection");
                connection_error
                    .error(pb::ErrorCode::BadRequest, e.to_string())
                    .await;
                break;
            }
            Err(e) => {
                tracing::debug!(error = %e, "connection read failed");
                break;
            }
        };
        match frame::decode_body::<pb::Request>(&body) {
            Ok(request) => envd.handle(request, &tx).await,
            Err(e) => {
                // The length was valid, so the stream is still aligned: answer and go on.
                connection_error
                    .error(pb::ErrorCode::BadRequest, e.to_string())
                    .await;
            }
        }
    }
    let _ = tx.send(Outgoing::Close).await;
    drop(tx);
    drop(connection_error);
    let _ = writer_task.await;
}

async fn write_loop<W: AsyncWrite + Unpin>(mut writer: W, mut rx: mpsc::Receiver<Outgoing>) {
    let mut buf = Vec::with_capacity(64 << 10);
    let mut finish = None;
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                Outgoing::Response(response) => {
                    if let Err(e) = frame::encode_frame_into(&response, &mut buf) {
                        tracing::error!(error = %e, "cannot encode a response");
                    }
                }
                other => {
                    finish = Some(other);
                    break;
                }
            }
            if buf.len() < WRITE_BATCH_BYTES {
                next = rx.try_recv().ok();
            }
        }
        if let Err(e) = writer.write_all(&buf).await {
            tracing::debug!(error = %e, "client went away");
            return;
        }
        buf.clear();
        match finish.take() {
            Some(Outgoing::PowerOff { reboot }) => {
                let _ = writer.flush().await;
                crate::pid1::power_off(reboot);
            }
            Some(_) => break,
            None => {}
        }
    }
    let _ = writer.shutdown().await;
}
