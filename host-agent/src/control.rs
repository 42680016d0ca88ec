//! The control socket of a running sandbox: pause, resume, snapshot, status, as one JSON object per
//! line over a Unix socket (owner-only). `host-agent ctl` is its client.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use envd_protocol::{Address, Client};
use host_agent::vmm::builder::RunningVm;
use host_agent::vmm::snapshot::SnapshotKind;
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum ControlRequest {
    Status,
    Pause,
    Resume,
    Snapshot { dir: PathBuf, kind: SnapshotKind },
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ControlResponse {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
}

/// The longest request line accepted.
const MAX_REQUEST: u64 = 64 << 10;

/// Serves the control socket on its own thread.
pub fn serve(path: &Path, vm: Arc<RunningVm>, envd: Option<Address>) -> anyhow::Result<()> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            anyhow::bail!("control socket {} is in use", path.display());
        }
        std::fs::remove_file(path).with_context(|| format!("removing stale {}", path.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                let vm = vm.clone();
                let envd = envd.clone();
                let _ = std::thread::Builder::new()
                    .name("control-conn".into())
                    .spawn(move || handle(stream, &vm, envd.as_ref()));
            }
        })?;
    Ok(())
}

fn handle(stream: UnixStream, vm: &RunningVm, envd: Option<&Address>) {
    let Ok(reader_stream) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(std::io::Read::take(reader_stream, MAX_REQUEST));
    let mut writer = stream;
    let mut line = String::new();
    while matches!(reader.read_line(&mut line), Ok(n) if n > 0) {
        let response = match serde_json::from_str::<ControlRequest>(line.trim()) {
            Ok(req) => dispatch(req, vm, envd),
            Err(e) => ControlResponse {
                ok: false,
                error: Some(format!("bad request: {e}")),
                result: None,
            },
        };
        let Ok(mut text) = serde_json::to_string(&response) else {
            return;
        };
        text.push('\n');
        if writer.write_all(text.as_bytes()).is_err() {
            return;
        }
        line.clear();
    }
}

fn ok(result: serde_json::Value) -> ControlResponse {
    ControlResponse {
        ok: true,
        error: None,
        result: Some(result),
    }
}

fn fail(e: impl std::fmt::Display) -> ControlResponse {
    ControlResponse {
        ok: false,
        error: Some(e.to_string()),
        result: None,
    }
}

fn dispatch(req: ControlRequest, vm: &RunningVm, envd: Option<&Address>) -> ControlResponse {
    match req {
        ControlRequest::Status => ok(serde_json::json!({
            "paused": vm.is_paused(),
            "instance_initialized": vm.instance_initialized(),
        })),
        ControlRequest::Pause => {
            if !vm.is_paused() {
                // Ask envd, while the guest still runs, whether an /init reached it: a client may
                // have sent one directly over vsock. If it cannot say, assume it did.
                if let Some(addr) = envd {
                    match envd_initialized(addr) {
                        Ok(false) => {}
                        Ok(true) => vm.mark_instance_initialized(),
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot ask envd before pausing; template snapshots refused");
                            vm.mark_instance_initialized();
                        }
                    }
                }
            }
            match vm.pause() {
                Ok(()) => ok(serde_json::json!({"paused": true})),
                Err(e) => fail(e),
            }
        }
        ControlRequest::Resume => match vm.resume() {
            Ok(()) => ok(serde_json::json!({"paused": false})),
            Err(e) => fail(e),
        },
        ControlRequest::Snapshot { dir, kind } => match vm.snapshot(&dir, kind) {
            Ok(report) => ok(serde_json::to_value(report).unwrap_or_default()),
            Err(e) => fail(e),
        },
    }
}

fn envd_initialized(addr: &Address) -> anyhow::Result<bool> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let client = tokio::time::timeout(Duration::from_secs(5), Client::connect(addr))
            .await
            .context("envd did not accept a connection within 5 s")??;
        let health = tokio::time::timeout(Duration::from_secs(5), client.health())
            .await
            .context("envd did not answer health within 5 s")??;
        Ok(health.initialized)
    })
}

/// Sends one request to a control socket and returns the answer.
pub fn request(path: &Path, req: &ControlRequest) -> anyhow::Result<ControlResponse> {
    let mut stream = UnixStream::connect(path)
        .with_context(|| format!("cannot connect to the control socket {}", path.display()))?;
    let mut text = serde_json::to_string(req)?;
    text.push('\n');
    stream.write_all(text.as_bytes())?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    serde_json::from_str(line.trim()).context("bad answer from the control socket")
}
