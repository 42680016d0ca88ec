//! HTTP handlers: parse, call the sandbox, answer JSON (or an NDJSON stream for exec).

use std::time::{Duration, Instant, SystemTime};

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use envd_protocol::pb::{self, process_event::Event};
use serde_json::{json, Value};

use super::error::ApiError;
use super::metrics::{inc, GaugeGuard, Metrics};
use super::sandbox::{AppState, EnvdConn};
use super::types::*;

type ApiResult = Result<Json<Value>, ApiError>;

/// How long envd may take to report that a process started.
const START_TIMEOUT: Duration = Duration::from_secs(60);

pub async fn health(State(state): State<AppState>) -> Json<Value> {
    let sandbox = state.sandbox();
    let mut body = json!({
        "status": "ok",
        "vm": state.vm_state(),
        "version": env!("CARGO_PKG_VERSION"),
    });
    if let Some(reason) = sandbox.and_then(|s| s.stop_reason()) {
        body["vm_exit"] = json!(reason);
    }
    Json(body)
}

pub async fn metrics(State(state): State<AppState>) -> Json<Value> {
    let mut body = state.metrics.snapshot();
    body["vm"] = json!(state.vm_state());
    Json(body)
}

pub async fn boot(
    State(state): State<AppState>,
    JsonBody(req): JsonBody<BootRequest>,
) -> ApiResult {
    state.boot(req).await.map(Json)
}

pub async fn restore(
    State(state): State<AppState>,
    JsonBody(req): JsonBody<RestoreRequest>,
) -> ApiResult {
    state.restore(req).await.map(Json)
}

pub async fn init(
    State(state): State<AppState>,
    JsonBody(req): JsonBody<InitRequest>,
) -> ApiResult {
    let sandbox = state.require_sandbox()?;
    let request = pb::InitRequest {
        env: reveal_env(&req.env),
        unset: req.unset,
        timestamp: Some(prost_types::Timestamp::from(SystemTime::now())),
        access_token: req.access_token.map(|s| s.0),
        default_user: req.default_user,
        default_workdir: req.default_workdir,
    };
    let answer = sandbox
        .init(request, Instant::now(), Duration::from_secs(10))
        .await?;
    Ok(Json(
        json!({"applied": answer.applied, "clock_stepped": answer.clock_stepped}),
    ))
}

pub async fn pause(State(state): State<AppState>, JsonBody(_): JsonBody<Empty>) -> ApiResult {
    state.pause().await.map(Json)
}

pub async fn resume(State(state): State<AppState>, JsonBody(_): JsonBody<Empty>) -> ApiResult {
    state.resume().await.map(Json)
}

pub async fn snapshot(
    State(state): State<AppState>,
    JsonBody(req): JsonBody<SnapshotRequest>,
) -> ApiResult {
    state.snapshot(req.dir, req.kind).await.map(Json)
}

pub async fn shutdown(
    State(state): State<AppState>,
    JsonBody(req): JsonBody<ShutdownRequest>,
) -> ApiResult {
    let timeout = Duration::from_millis(req.timeout_ms.unwrap_or(10_000));
    let answer = state.shutdown(timeout).await;
    // The agent exits once this answer is out, whether or not the guest powered off cleanly.
    state.exit.notify_one();
    answer.map(Json)
}

pub async fn list_processes(State(state): State<AppState>) -> ApiResult {
    let sandbox = state.require_sandbox()?;
    let list = sandbox
        .call(|c| async move { c.client.list().await })
        .await?;
    let processes: Vec<Value> = list
        .into_iter()
        .map(|p| {
            json!({
                "pid": p.pid,
                "tag": p.tag,
                "cmd": p.cmd,
                "args": p.args,
                "cwd": p.cwd,
                "user": p.user,
                "pty": p.pty,
                "exited": p.exited,
                "attached": p.attached,
            })
        })
        .collect();
    Ok(Json(json!({"processes": processes})))
}

pub async fn signal_process(
    State(state): State<AppState>,
    Path(pid): Path<String>,
    JsonBody(req): JsonBody<SignalRequest>,
) -> ApiResult {
    let pid: u32 = pid
        .parse()
        .map_err(|_| ApiError::bad_request("the pid in the path must be a number"))?;
    let sandbox = state.require_sandbox()?;
    sandbox
        .call(|c| async move {
            c.client
                .signal(pb::ProcessSelector::pid(pid), req.signal, req.group)
                .await
        })
        .await?;
    Ok(Json(
        json!({"pid": pid, "signal": req.signal, "group": req.group}),
    ))
}

/// Starts a process and streams its events as NDJSON: `started`, then `stdout`/`stderr`/`pty`
/// chunks as they come, then `end`. Start failures (unknown user, bad cwd, ...) are answered with
/// an error status before any streaming. A client that goes away leaves the process running.
pub async fn exec(
    State(state): State<AppState>,
    JsonBody(req): JsonBody<ExecRequest>,
) -> Result<Response, ApiError> {
    let sandbox = state.require_sandbox()?;
    if req.cmd.is_empty() {
        return Err(ApiError::bad_request("cmd must not be empty"));
    }
    let conn = sandbox.connect().await?;
    let start = pb::StartRequest {
        cmd: req.cmd,
        args: req.args,
        envs: reveal_env(&req.env),
        cwd: req.cwd.unwrap_or_default(),
        user: req.user.unwrap_or_default(),
        stdin: req.stdin.is_some(),
        pty: None,
        timeout_ms: req.timeout_ms,
        tag: req.tag.unwrap_or_default(),
    };
    // envd answers a start with `started` (or an error) right after spawning; a guest that does
    // not is reported rather than waited on forever.
    let process = match tokio::time::timeout(START_TIMEOUT, conn.client.start(start)).await {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => {
            inc(&state.metrics.execs_refused);
            return Err(e.into());
        }
        Err(_) => {
            inc(&state.metrics.execs_refused);
            return Err(ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "envd_timeout",
                format!("envd did not report the process started within {START_TIMEOUT:?}"),
            ));
        }
    };
    inc(&state.metrics.execs_started);
    tracing::debug!(pid = process.pid, "process started");
    if let Some(input) = &req.stdin {
        if let Err(e) = conn
            .client
            .stdin(
                pb::ProcessSelector::pid(process.pid),
                input.0.as_bytes(),
                true,
            )
            .await
        {
            tracing::warn!(pid = process.pid, error = %e, "cannot write the process's stdin");
        }
    }
    let stream = ExecStream {
        pid: process.pid,
        process,
        _conn: conn,
        metrics: state.metrics.clone(),
        _active: GaugeGuard::new(state.metrics.clone(), |m| &m.execs_active),
        started_sent: false,
        done: false,
    };
    let body = Body::from_stream(futures::stream::unfold(stream, |mut s| async move {
        s.next_line()
            .await
            .map(|line| (Ok::<_, std::convert::Infallible>(line), s))
    }));
    Ok((
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "application/x-ndjson"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response())
}

struct ExecStream {
    pid: u32,
    process: envd_protocol::Process,
    // Owns the envd connection this process's events arrive on.
    _conn: EnvdConn,
    metrics: std::sync::Arc<Metrics>,
    _active: GaugeGuard,
    started_sent: bool,
    done: bool,
}

impl Drop for ExecStream {
    fn drop(&mut self) {
        if !self.done {
            inc(&self.metrics.streams_dropped);
            tracing::debug!(
                pid = self.pid,
                "exec stream dropped before the end; the process keeps running"
            );
        }
    }
}

fn line(value: Value) -> Bytes {
    let mut text = value.to_string();
    text.push('\n');
    Bytes::from(text)
}

fn data_event(kind: &str, bytes: &[u8], dropped_before: u64) -> Value {
    let mut v = json!({
        "type": kind,
        "data": String::from_utf8_lossy(bytes),
        "data_b64": base64::engine::general_purpose::STANDARD.encode(bytes),
    });
    if dropped_before > 0 {
        v["dropped_before"] = json!(dropped_before);
    }
    v
}

impl ExecStream {
    async fn next_line(&mut self) -> Option<Bytes> {
        if self.done {
            return None;
        }
        if !self.started_sent {
            self.started_sent = true;
            return Some(line(json!({"type": "started", "pid": self.pid})));
        }
        loop {
            let event = match self.process.next_event().await {
                None => {
                    self.done = true;
                    return Some(line(json!({
                        "type": "error",
                        "code": "envd_unavailable",
                        "message": "the connection to envd closed before the process ended",
                    })));
                }
                Some(Err(e)) => {
                    self.done = true;
                    let e = ApiError::from(e);
                    return Some(line(
                        json!({"type": "error", "code": e.code, "message": e.message}),
                    ));
                }
                Some(Ok(event)) => event,
            };
            match event.event {
                Some(Event::Data(d)) => {
                    let (kind, bytes) = match d.output {
                        Some(pb::data::Output::Stdout(b)) => ("stdout", b),
                        Some(pb::data::Output::Stderr(b)) => ("stderr", b),
                        Some(pb::data::Output::Pty(b)) => ("pty", b),
                        None => continue,
                    };
                    return Some(line(data_event(kind, &bytes, d.dropped_before)));
                }
                Some(Event::End(end)) => {
                    self.done = true;
                    self.metrics.record_end(&end);
                    let (exit_code, signal) = match end.status {
                        Some(pb::end::Status::ExitCode(c)) => (Some(c), None),
                        Some(pb::end::Status::Signal(s)) => (None, Some(s)),
                        None => (None, None),
                    };
                    return Some(line(json!({
                        "type": "end",
                        "pid": self.pid,
                        "exit_code": exit_code,
                        "signal": signal,
                        "status": envd_protocol::client::end_status(&end),
                        "timed_out": end.timed_out,
                    })));
                }
                Some(Event::Started(_)) | None => continue,
            }
        }
    }
}

pub async fn unknown_route() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "unknown_route",
        "no such operation (see openapi.yaml)",
    )
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this path does not take that method (see openapi.yaml)",
    )
}
