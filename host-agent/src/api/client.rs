//! A small client of the API over its Unix socket: HTTP/1 through hyper, one connection per
//! request. `host-agent ctl` is built on it, and the tests use it.

use std::path::{Path, PathBuf};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// The longest NDJSON line accepted from an exec stream (envd's output chunks are at most 64 KiB,
/// sent as text and as base64).
const MAX_LINE: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the API socket {path}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("cannot build the request: {0}")]
    Request(#[from] hyper::http::Error),
    /// The API answered with an error: its status and the JSON error's code and message.
    #[error("{status} {code}: {message}")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    #[error("the answer is not JSON (HTTP {status}): {text:?}")]
    NotJson { status: u16, text: String },
    #[error("an exec stream line is longer than {MAX_LINE} bytes")]
    LineTooLong,
}

impl ClientError {
    /// The API's error code, for an error the API answered.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Api { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// The API of one agent, at its socket.
#[derive(Debug, Clone)]
pub struct ApiClient {
    sock: PathBuf,
}

impl ApiClient {
    pub fn new(sock: impl Into<PathBuf>) -> Self {
        ApiClient { sock: sock.into() }
    }

    pub fn socket(&self) -> &Path {
        &self.sock
    }

    /// Sends one request on a new connection; returns the status and the body, still streaming.
    /// A body, when given, is sent as JSON.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<String>,
    ) -> Result<(StatusCode, Incoming), ClientError> {
        let stream = tokio::net::UnixStream::connect(&self.sock)
            .await
            .map_err(|source| ClientError::Connect {
                path: self.sock.clone(),
                source,
            })?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "API connection ended with an error");
            }
        });
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "localhost");
        if body.is_some() {
            request = request.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let request = request.body(Full::new(Bytes::from(body.unwrap_or_default())))?;
        let response = sender.send_request(request).await?;
        Ok((response.status(), response.into_body()))
    }

    /// One JSON operation: the answer's JSON on success (2xx), otherwise the API's error.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, ClientError> {
        let (status, body) = self.send(method, path, body.map(|b| b.to_string())).await?;
        let bytes = body.collect().await?.to_bytes();
        if !status.is_success() {
            return Err(api_error(status, &bytes));
        }
        serde_json::from_slice(&bytes).map_err(|_| ClientError::NotJson {
            status: status.as_u16(),
            text: String::from_utf8_lossy(&bytes).into_owned(),
        })
    }

    /// `POST /exec`: the stream of the process's events once it started, otherwise the API's
    /// error (unknown user, bad cwd, no VM, ...).
    pub async fn exec(&self, request: &Value) -> Result<EventStream, ClientError> {
        let (status, body) = self
            .send(Method::POST, "/exec", Some(request.to_string()))
            .await?;
        if !status.is_success() {
            let bytes = body.collect().await?.to_bytes();
            return Err(api_error(status, &bytes));
        }
        Ok(EventStream::new(body))
    }
}

/// The API error in an answer's body (`{"code", "message"}`).
fn api_error(status: StatusCode, bytes: &[u8]) -> ClientError {
    let parsed: Option<Value> = serde_json::from_slice(bytes).ok();
    let field = |k: &str| {
        parsed
            .as_ref()
            .and_then(|v| v.get(k))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    match (field("code"), field("message")) {
        (Some(code), message) => ClientError::Api {
            status: status.as_u16(),
            code,
            message: message.unwrap_or_default(),
        },
        (None, _) => ClientError::NotJson {
            status: status.as_u16(),
            text: String::from_utf8_lossy(bytes).into_owned(),
        },
    }
}

/// The NDJSON events of an exec stream: `started`, `stdout`/`stderr`/`pty` chunks, then `end`
/// (or `error`).
pub struct EventStream {
    body: Incoming,
    buf: Vec<u8>,
}

impl EventStream {
    pub fn new(body: Incoming) -> Self {
        EventStream {
            body,
            buf: Vec::new(),
        }
    }

    /// The next event; `None` once the stream ended.
    pub async fn next(&mut self) -> Result<Option<Value>, ClientError> {
        loop {
            if let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return parse_line(&line).map(Some);
            }
            if self.buf.len() > MAX_LINE {
                return Err(ClientError::LineTooLong);
            }
            match self.body.frame().await {
                Some(frame) => {
                    if let Ok(data) = frame?.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
                None if self.buf.iter().all(u8::is_ascii_whitespace) => return Ok(None),
                None => {
                    let line = std::mem::take(&mut self.buf);
                    return parse_line(&line).map(Some);
                }
            }
        }
    }
}

fn parse_line(line: &[u8]) -> Result<Value, ClientError> {
    serde_json::from_slice(line).map_err(|_| ClientError::NotJson {
        status: 200,
        text: String::from_utf8_lossy(line).into_owned(),
    })
}
