//! The orchestrator API: an HTTP/JSON API on a Unix socket (owner-only) through which an
//! orchestrator drives one sandbox: boot or restore its VM, init, exec with streamed output, list
//! and signal processes, pause, resume, snapshot, shut down, and read health and metrics.
//! `host-agent/openapi.yaml` describes it; a test checks [`ROUTES`] against that file.

pub mod client;
pub mod error;
mod handlers;
pub mod metrics;
pub mod sandbox;
pub mod types;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;

pub use sandbox::{new_state, new_state_with_vm, AppState, ServeConfig, StartKind, VmExit};

/// Every operation the server answers, as (method, path) in OpenAPI's path syntax.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/health"),
    ("GET", "/metrics"),
    ("POST", "/boot"),
    ("POST", "/restore"),
    ("POST", "/init"),
    ("POST", "/exec"),
    ("GET", "/processes"),
    ("POST", "/processes/{pid}/signal"),
    ("POST", "/pause"),
    ("POST", "/resume"),
    ("POST", "/snapshot"),
    ("POST", "/shutdown"),
];

async fn count_responses(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let response = next.run(req).await;
    state.metrics.record_status(response.status().as_u16());
    response
}

pub fn router(state: AppState) -> Router {
    use handlers::*;
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/boot", post(boot))
        .route("/restore", post(restore))
        .route("/init", post(init))
        .route("/exec", post(exec))
        .route("/processes", get(list_processes))
        .route("/processes/{pid}/signal", post(signal_process))
        .route("/pause", post(pause))
        .route("/resume", post(resume))
        .route("/snapshot", post(snapshot))
        .route("/shutdown", post(shutdown))
        .fallback(unknown_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            count_responses,
        ))
        .with_state(state)
}

/// Fails when another agent answers on the socket `path` (a stale socket file is fine: [`bind`]
/// replaces it). Lets `run` and `restore` refuse before they create a VM.
pub fn check_not_in_use(path: &Path) -> anyhow::Result<()> {
    if path.exists() && std::os::unix::net::UnixStream::connect(path).is_ok() {
        anyhow::bail!("API socket {} is in use by a live process", path.display());
    }
    Ok(())
}

/// Binds the API socket with owner-only permissions. A stale socket file is replaced; a live one
/// (another agent answers on it) is an error.
pub fn bind(path: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    use anyhow::Context;
    if path.exists() {
        check_not_in_use(path)?;
        std::fs::remove_file(path).with_context(|| format!("removing stale {}", path.display()))?;
    }
    // The socket file is created 0600 (no window where others could connect), then made sure of.
    let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
    let bound = std::os::unix::net::UnixListener::bind(path);
    rustix::process::umask(old);
    let listener = bound.with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    listener.set_nonblocking(true)?;
    Ok(tokio::net::UnixListener::from_std(listener)?)
}

/// Serves the API until `POST /shutdown` (or `stop` resolves), then returns. In-flight streams get
/// a short grace period.
pub async fn serve(
    listener: tokio::net::UnixListener,
    state: AppState,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let exit_state = state.clone();
    let (quit_tx, quit_rx) = tokio::sync::watch::channel(false);
    let app = router(state);
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        tokio::select! {
            _ = exit_state.exit.notified() => {}
            _ = stop => {}
        }
        let _ = quit_tx.send(true);
    });
    let mut quit = quit_rx;
    tokio::select! {
        r = server => r?,
        _ = async {
            let _ = quit.wait_for(|q| *q).await;
            tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        } => {}
    }
    Ok(())
}
