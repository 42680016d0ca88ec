//! The async envd client used by the host side (CLI, VMM, benchmarks, tests).
//!
//! One connection carries many requests: each gets an id, and a reader task routes responses back by
//! id, so stdin writes and signals can go out while a process's output streams in.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{ReadHalf, WriteHalf};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::address::Address;
use crate::frame::{self, FrameError};
use crate::pb;
use crate::transport::{self, Connection};

/// How many events of one process the client buffers before it stops reading the connection.
const STREAM_BUFFER: usize = 64;

/// The largest stdin piece sent in one frame; bigger writes are split.
const MAX_STDIN_CHUNK: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("envd did not answer at {addr} within {waited:?}: {last_error}")]
    NotReady {
        addr: String,
        waited: Duration,
        last_error: String,
    },
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("envd refused the request ({code:?}): {message}")]
    Server {
        code: pb::ErrorCode,
        message: String,
    },
    #[error("connection to envd closed: {0}")]
    Closed(String),
    #[error("unexpected response from envd: {0}")]
    Protocol(String),
}

impl ClientError {
    /// The server's error code, when envd answered with an error.
    pub fn code(&self) -> Option<pb::ErrorCode> {
        match self {
            ClientError::Server { code, .. } => Some(*code),
            _ => None,
        }
    }
}

fn server_error(e: pb::Error) -> ClientError {
    ClientError::Server {
        code: pb::ErrorCode::try_from(e.code).unwrap_or(pb::ErrorCode::Unspecified),
        message: e.message,
    }
}

type UnaryReply = Result<pb::response::Kind, ClientError>;
type StreamItem = Result<pb::ProcessEvent, ClientError>;

enum Route {
    Unary(oneshot::Sender<UnaryReply>),
    Stream(mpsc::Sender<StreamItem>),
}

#[derive(Default)]
struct Routes {
    by_id: HashMap<u64, Route>,
    /// Set once the connection is gone; new requests fail with it.
    closed: Option<String>,
}

/// A connection to envd.
pub struct Client {
    writer: tokio::sync::Mutex<WriteHalf<Connection>>,
    routes: Arc<Mutex<Routes>>,
    next_id: AtomicU64,
    token: String,
    reader: JoinHandle<()>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// A started (or reattached) process: its pid and its event stream.
pub struct Process {
    pub pid: u32,
    events: mpsc::Receiver<StreamItem>,
}

/// Everything a process printed, and how it ended.
#[derive(Debug, Default, Clone)]
pub struct Output {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub pty: Vec<u8>,
    pub end: Option<pb::End>,
}

impl Output {
    /// The exit code, or `128 + signal` when a signal ended the process (the shell convention).
    pub fn exit_status(&self) -> Option<i32> {
        self.end.as_ref().and_then(end_status)
    }
}

/// `exit_code`, or `128 + signal` for a killed process.
pub fn end_status(end: &pb::End) -> Option<i32> {
    match end.status {
        Some(pb::end::Status::ExitCode(c)) => Some(c),
        Some(pb::end::Status::Signal(s)) => Some(128 + s),
        None => None,
    }
}

impl Process {
    /// The next event; `None` after the end event has been returned.
    pub async fn next_event(&mut self) -> Option<Result<pb::ProcessEvent, ClientError>> {
        self.events.recv().await
    }

    /// Collects all output until the end event.
    pub async fn collect(mut self) -> Result<Output, ClientError> {
        let mut out = Output::default();
        while let Some(event) = self.next_event().await {
            match event?.event {
                Some(pb::process_event::Event::Data(data)) => match data.output {
                    Some(pb::data::Output::Stdout(b)) => out.stdout.extend_from_slice(&b),
                    Some(pb::data::Output::Stderr(b)) => out.stderr.extend_from_slice(&b),
                    Some(pb::data::Output::Pty(b)) => out.pty.extend_from_slice(&b),
                    None => {}
                },
                Some(pb::process_event::Event::End(end)) => {
                    out.end = Some(end);
                    return Ok(out);
                }
                Some(pb::process_event::Event::Started(_)) | None => {}
            }
        }
        Err(ClientError::Closed(
            "event stream ended before the process's end event".into(),
        ))
    }
}

/// How long one attempt of [`Client::connect_when_ready`] should wait on a guest that is still
/// booting. Both ways to reach a guest's vsock hold a connection request until the guest's device
/// is up and answers: host-agent's hybrid vsock for up to 10 s, the kernel's vsock for its 2 s
/// connect timeout (which `connect` retries). An attempt that gives up sooner only ends in a
/// retry that waits out its backoff, and, when the guest was about to answer, a connection the
/// guest accepts for a client that has left (measured: ~190 ms of a boot lost that way).
pub const READY_ATTEMPT: Duration = Duration::from_secs(5);

impl Client {
    /// Connects to envd at `addr`.
    pub async fn connect(addr: &Address) -> Result<Client, ClientError> {
        let conn = transport::connect(addr)
            .await
            .map_err(|source| ClientError::Connect {
                addr: addr.to_string(),
                source,
            })?;
        Ok(Self::from_connection(conn))
    }

    /// Connects and checks health, retrying with backoff until `deadline` passes. Each attempt is
    /// bounded by `attempt_timeout` and by what is left of `deadline` (a vsock connect to a guest
    /// that is not listening yet can block for seconds in the kernel). For a guest that is still
    /// booting, [`READY_ATTEMPT`] is the attempt to use.
    pub async fn connect_when_ready(
        addr: &Address,
        attempt_timeout: Duration,
        deadline: Duration,
    ) -> Result<Client, ClientError> {
        let started = Instant::now();
        let mut backoff = Duration::from_millis(2);
        loop {
            let attempt = async {
                let client = Client::connect(addr).await?;
                client.health().await?;
                Ok::<_, ClientError>(client)
            };
            let limit = attempt_timeout.min(deadline.saturating_sub(started.elapsed()));
            let last_error = match tokio::time::timeout(limit, attempt).await {
                Ok(Ok(client)) => return Ok(client),
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("attempt timed out after {limit:?}"),
            };
            let waited = started.elapsed();
            if waited + backoff >= deadline {
                return Err(ClientError::NotReady {
                    addr: addr.to_string(),
                    waited,
                    last_error,
                });
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(100));
        }
    }

    /// Wraps an already connected stream.
    pub fn from_connection(conn: Connection) -> Client {
        let (read_half, write_half) = tokio::io::split(conn);
        let routes = Arc::new(Mutex::new(Routes::default()));
        let reader = tokio::spawn(read_responses(read_half, Arc::clone(&routes)));
        Client {
            writer: tokio::sync::Mutex::new(write_half),
            routes,
            next_id: AtomicU64::new(1),
            token: String::new(),
            reader,
        }
    }

    /// Sets the access token sent with every request.
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = token.into();
        self
    }

    pub fn set_token(&mut self, token: impl Into<String>) {
        self.token = token.into();
    }

    async fn send(
        &self,
        id: u64,
        kind: pb::request::Kind,
        route: Route,
    ) -> Result<(), ClientError> {
        {
            let mut routes = lock(&self.routes);
            if let Some(reason) = &routes.closed {
                return Err(ClientError::Closed(reason.clone()));
            }
            routes.by_id.insert(id, route);
        }
        let request = pb::Request {
            id,
            token: self.token.clone(),
            kind: Some(kind),
        };
        let mut writer = self.writer.lock().await;
        if let Err(e) = frame::write_message(&mut *writer, &request).await {
            lock(&self.routes).by_id.remove(&id);
            return Err(e.into());
        }
        Ok(())
    }

    async fn unary(&self, kind: pb::request::Kind) -> Result<pb::response::Kind, ClientError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.send(id, kind, Route::Unary(tx)).await?;
        rx.await
            .map_err(|_| ClientError::Closed("reader stopped".into()))?
    }

    async fn ack(&self, kind: pb::request::Kind) -> Result<(), ClientError> {
        match self.unary(kind).await? {
            pb::response::Kind::Ack(_) => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    pub async fn health(&self) -> Result<pb::HealthResponse, ClientError> {
        match self
            .unary(pb::request::Kind::Health(pb::HealthRequest {}))
            .await?
        {
            pb::response::Kind::Health(h) => Ok(h),
            other => Err(unexpected(&other)),
        }
    }

    pub async fn init(&self, req: pb::InitRequest) -> Result<pb::InitResponse, ClientError> {
        match self.unary(pb::request::Kind::Init(req)).await? {
            pb::response::Kind::Init(r) => Ok(r),
            other => Err(unexpected(&other)),
        }
    }

    pub async fn list(&self) -> Result<Vec<pb::ProcessInfo>, ClientError> {
        match self
            .unary(pb::request::Kind::List(pb::ListRequest {}))
            .await?
        {
            pb::response::Kind::List(l) => Ok(l.processes),
            other => Err(unexpected(&other)),
        }
    }

    /// Starts a process and waits until envd reports it started.
    pub async fn start(&self, req: pb::StartRequest) -> Result<Process, ClientError> {
        self.open_stream(pb::request::Kind::Start(req)).await
    }

    /// Attaches to a running (or ended but uncollected) process: output buffered while nobody was
    /// attached comes first, then live output and the end event.
    pub async fn reattach(&self, process: pb::ProcessSelector) -> Result<Process, ClientError> {
        self.open_stream(pb::request::Kind::Reattach(pb::ReattachRequest {
            process: Some(process),
        }))
        .await
    }

    async fn open_stream(&self, kind: pb::request::Kind) -> Result<Process, ClientError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, mut rx) = mpsc::channel(STREAM_BUFFER);
        self.send(id, kind, Route::Stream(tx)).await?;
        match rx.recv().await {
            Some(Ok(pb::ProcessEvent {
                event: Some(pb::process_event::Event::Started(s)),
            })) => Ok(Process {
                pid: s.pid,
                events: rx,
            }),
            Some(Ok(other)) => Err(ClientError::Protocol(format!(
                "expected a started event, got {other:?}"
            ))),
            Some(Err(e)) => Err(e),
            None => Err(ClientError::Closed("reader stopped".into())),
        }
    }

    /// Writes to a process's stdin, and closes it when `close` is set.
    pub async fn stdin(
        &self,
        process: pb::ProcessSelector,
        data: &[u8],
        close: bool,
    ) -> Result<(), ClientError> {
        let mut chunks = data.chunks(MAX_STDIN_CHUNK).peekable();
        if chunks.peek().is_none() {
            return self
                .ack(pb::request::Kind::Stdin(pb::StdinRequest {
                    process: Some(process),
                    data: Default::default(),
                    close,
                }))
                .await;
        }
        while let Some(chunk) = chunks.next() {
            let last = chunks.peek().is_none();
            self.ack(pb::request::Kind::Stdin(pb::StdinRequest {
                process: Some(process.clone()),
                data: bytes::Bytes::copy_from_slice(chunk),
                close: close && last,
            }))
            .await?;
        }
        Ok(())
    }

    pub async fn signal(
        &self,
        process: pb::ProcessSelector,
        signal: i32,
        group: bool,
    ) -> Result<(), ClientError> {
        self.ack(pb::request::Kind::Signal(pb::SignalRequest {
            process: Some(process),
            signal,
            group,
        }))
        .await
    }

    pub async fn resize(
        &self,
        process: pb::ProcessSelector,
        rows: u32,
        cols: u32,
    ) -> Result<(), ClientError> {
        self.ack(pb::request::Kind::Resize(pb::ResizeRequest {
            process: Some(process),
            size: Some(pb::PtySize { rows, cols }),
        }))
        .await
    }

    /// Asks envd (as PID 1) to power the guest off, or reboot it.
    pub async fn shutdown(&self, reboot: bool) -> Result<(), ClientError> {
        self.ack(pb::request::Kind::Shutdown(pb::ShutdownRequest { reboot }))
            .await
    }
}

fn unexpected(kind: &pb::response::Kind) -> ClientError {
    ClientError::Protocol(format!("unexpected response {kind:?}"))
}

fn lock(routes: &Mutex<Routes>) -> std::sync::MutexGuard<'_, Routes> {
    // A poisoned lock only means a panic elsewhere; the map itself is always consistent.
    routes.lock().unwrap_or_else(|e| e.into_inner())
}

async fn read_responses(mut reader: ReadHalf<Connection>, routes: Arc<Mutex<Routes>>) {
    let reason = loop {
        let response: pb::Response = match frame::read_message(&mut reader).await {
            Ok(Some(r)) => r,
            Ok(None) => break "envd closed the connection".to_string(),
            Err(e) => break e.to_string(),
        };
        let Some(kind) = response.kind else {
            continue;
        };
        if response.id == 0 {
            // A connection-level error (e.g. an oversized frame); envd closes the connection next.
            if let pb::response::Kind::Error(e) = kind {
                break server_error(e).to_string();
            }
            continue;
        }
        let stream_tx = {
            let mut routes = lock(&routes);
            match routes.by_id.get(&response.id) {
                None => continue,
                Some(Route::Unary(_)) => {
                    if let Some(Route::Unary(tx)) = routes.by_id.remove(&response.id) {
                        let _ = tx.send(match kind {
                            pb::response::Kind::Error(e) => Err(server_error(e)),
                            other => Ok(other),
                        });
                    }
                    continue;
                }
                Some(Route::Stream(tx)) => tx.clone(),
            }
        };
        let (item, last) = match kind {
            pb::response::Kind::Event(ev) => {
                let last = matches!(ev.event, Some(pb::process_event::Event::End(_)));
                (Ok(ev), last)
            }
            pb::response::Kind::Error(e) => (Err(server_error(e)), true),
            other => (Err(unexpected(&other)), true),
        };
        if last {
            lock(&routes).by_id.remove(&response.id);
        }
        // Awaiting here is the client's backpressure: a slow consumer stops reading the connection.
        if stream_tx.send(item).await.is_err() {
            lock(&routes).by_id.remove(&response.id);
        }
    };
    let pending = {
        let mut routes = lock(&routes);
        routes.closed = Some(reason.clone());
        std::mem::take(&mut routes.by_id)
    };
    for (_, route) in pending {
        match route {
            Route::Unary(tx) => {
                let _ = tx.send(Err(ClientError::Closed(reason.clone())));
            }
            Route::Stream(tx) => {
                let _ = tx.try_send(Err(ClientError::Closed(reason.clone())));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A guest that takes the connection but never answers: a long attempt must still end at the
    /// deadline.
    #[tokio::test]
    async fn ready_attempts_end_at_the_deadline() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("silent.sock");
        // Bound and listening, never accepting: connects succeed, nothing ever answers.
        let _listener = tokio::net::UnixListener::bind(&path).expect("bind");
        let started = Instant::now();
        let result = Client::connect_when_ready(
            &Address::Unix(path),
            Duration::from_secs(60),
            Duration::from_millis(300),
        )
        .await;
        assert!(matches!(result, Err(ClientError::NotReady { .. })));
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "took {:?}",
            started.elapsed()
        );
    }
}
