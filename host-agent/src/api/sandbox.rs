//! The sandbox this agent serves: at most one VM (booted or restored), the envd inside it, the
//! token to talk to envd, and the lifecycle operations on the VM. Exactly one lifecycle operation
//! runs at a time; a concurrent one is refused with `busy`.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use envd_protocol::{pb, Address, Client, ClientError, READY_ATTEMPT};
use tokio::sync::watch;

use super::error::ApiError;
use super::metrics::{inc, GaugeGuard, Metrics, StartTimings};
use super::types::{reveal_env, BootRequest, RestoreRequest, Secret};
use crate::template::TemplateBoot;
use crate::vmm::builder::{GuestExit, RestoreConfig, RunningVm, VmConfig, Vmm, VsockConfig};
use crate::vmm::snapshot::SnapshotKind;

/// How the agent was started.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The hybrid-vsock Unix socket of the VM this agent creates.
    pub vsock_uds: PathBuf,
    pub console_log: Option<PathBuf>,
    pub envd_port: u32,
    /// Development and tests: serve an envd that runs without a VM (e.g. `unix:PATH`). Exec, init
    /// and processes work; VM operations answer `no_vm`.
    pub attach_envd: Option<Address>,
}

/// A bound on one connection attempt to envd (a vsock connect to a guest not listening yet can
/// block for seconds in the kernel).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a unary request to envd may take.
const ENVD_CALL_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Sandbox {
    /// None when attached to an envd without a VM.
    vm: Option<Arc<RunningVm>>,
    addr: Address,
    token: Mutex<Option<Secret>>,
    /// How the VM ended, once it has (a failure as its message).
    stopped: watch::Receiver<Option<VmExit>>,
    metrics: Arc<Metrics>,
    /// Set by resume: the guest handles the vsock transport reset of a snapshot (or stale
    /// connections) only once it runs again, and a connection made in that moment can be reset.
    /// The next connection is checked with a health round trip (retried with backoff) first.
    probe_next: std::sync::atomic::AtomicBool,
}

/// One connection to envd, counted while open.
pub struct EnvdConn {
    pub client: Client,
    _open: GaugeGuard,
}

/// How a VM ended: the guest stopped it, or it failed (the error's message).
pub type VmExit = Result<GuestExit, String>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn exit_reason(exit: &VmExit) -> String {
    match exit {
        Ok(GuestExit::PowerOff) => "power_off".to_string(),
        Ok(GuestExit::Reset) => "reset".to_string(),
        Err(e) => format!("failed: {e}"),
    }
}

impl Sandbox {
    fn new(
        vm: Option<Arc<RunningVm>>,
        addr: Address,
        token: Option<Secret>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let (tx, rx) = watch::channel(None);
        if let Some(vm) = &vm {
            let vm = vm.clone();
            // RunningVm::wait blocks until the guest stops the VM. This thread is the VM's only
            // waiter: everyone else learns how it ended through the watch channel.
            let _ = std::thread::Builder::new()
                .name("vm-wait".into())
                .spawn(move || {
                    let exit = vm.wait().map_err(|e| e.to_string());
                    tracing::info!(reason = %exit_reason(&exit), "the VM stopped");
                    let _ = tx.send(Some(exit));
                });
        } else {
            // Keep the sender alive so that the receiver never reports a stop.
            std::mem::forget(tx);
        }
        Arc::new(Sandbox {
            vm,
            addr,
            token: Mutex::new(token),
            stopped: rx,
            metrics,
            probe_next: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Why the VM stopped ("power_off", "reset", "failed: ..."), once it has.
    pub fn stop_reason(&self) -> Option<String> {
        self.stopped.borrow().as_ref().map(exit_reason)
    }

    /// How the VM ended, once it has.
    pub fn vm_exit(&self) -> Option<VmExit> {
        self.stopped.borrow().clone()
    }

    /// Waits until the VM stops (never, for an attached envd without a VM).
    pub async fn stopped(&self) -> VmExit {
        let mut stopped = self.stopped.clone();
        loop {
            if let Some(exit) = stopped.borrow_and_update().clone() {
                return exit;
            }
            if stopped.changed().await.is_err() {
                // The waiter thread is gone without a word (it could not be started).
                return Err("the VM's waiter thread ended".to_string());
            }
        }
    }

    /// "running", "paused", "stopped", or "none" for an attached envd without a VM.
    pub fn vm_state(&self) -> &'static str {
        match &self.vm {
            None => "none",
            Some(_) if self.stop_reason().is_some() => "stopped",
            Some(vm) if vm.is_paused() => "paused",
            Some(_) => "running",
        }
    }

    /// The VM, for operations that need one.
    pub fn vm(&self) -> Result<&Arc<RunningVm>, ApiError> {
        let vm = self.vm.as_ref().ok_or_else(|| {
            ApiError::conflict(
                "no_vm",
                "this agent serves an envd without a VM (--attach-envd)",
            )
        })?;
        if self.stop_reason().is_some() {
            return Err(ApiError::vm_stopped());
        }
        Ok(vm)
    }

    /// Refuses envd operations when the guest cannot answer (paused or stopped).
    pub fn check_envd_reachable(&self) -> Result<(), ApiError> {
        match self.vm_state() {
            "paused" => Err(ApiError::vm_paused()),
            "stopped" => Err(ApiError::vm_stopped()),
            _ => Ok(()),
        }
    }

    fn token(&self) -> String {
        lock(&self.token)
            .as_ref()
            .map(|s| s.0.clone())
            .unwrap_or_default()
    }

    /// A new connection to envd (each exec stream has its own, so that one slow HTTP client
    /// cannot stall other streams through a shared connection's backpressure).
    pub async fn connect(&self) -> Result<EnvdConn, ApiError> {
        self.check_envd_reachable()?;
        let attempt = if self
            .probe_next
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            let ready =
                Client::connect_when_ready(&self.addr, Duration::from_secs(1), CONNECT_TIMEOUT * 2);
            tokio::time::timeout(CONNECT_TIMEOUT * 2, ready).await
        } else {
            tokio::time::timeout(CONNECT_TIMEOUT, Client::connect(&self.addr)).await
        };
        match attempt {
            Ok(Ok(client)) => {
                inc(&self.metrics.vsock_connects);
                Ok(EnvdConn {
                    client: client.with_token(self.token()),
                    _open: GaugeGuard::new(self.metrics.clone(), |m| &m.vsock_open),
                })
            }
            Ok(Err(e)) => {
                inc(&self.metrics.vsock_connect_failures);
                Err(e.into())
            }
            Err(_) => {
                inc(&self.metrics.vsock_connect_failures);
                Err(ApiError::new(
                    axum::http::StatusCode::GATEWAY_TIMEOUT,
                    "envd_unavailable",
                    format!("envd did not accept a connection within {CONNECT_TIMEOUT:?}"),
                ))
            }
        }
    }

    /// Runs one unary envd call on a fresh connection, bounded in time.
    pub async fn call<T, F, Fut>(&self, f: F) -> Result<T, ApiError>
    where
        F: FnOnce(EnvdConn) -> Fut,
        Fut: std::future::Future<Output = Result<T, ClientError>>,
    {
        let conn = self.connect().await?;
        match tokio::time::timeout(ENVD_CALL_TIMEOUT, f(conn)).await {
            Ok(r) => r.map_err(ApiError::from),
            Err(_) => Err(ApiError::new(
                axum::http::StatusCode::GATEWAY_TIMEOUT,
                "envd_timeout",
                format!("envd did not answer within {ENVD_CALL_TIMEOUT:?}"),
            )),
        }
    }

    /// Waits for envd to answer health, giving up at the deadline or when the VM stops.
    async fn wait_for_envd(&self, deadline: Duration) -> Result<(), ApiError> {
        let mut stopped = self.stopped.clone();
        let ready = Client::connect_when_ready(&self.addr, READY_ATTEMPT, deadline);
        tokio::select! {
            r = ready => match r {
                Ok(_) => {
                    inc(&self.metrics.vsock_connects);
                    Ok(())
                }
                Err(e) => Err(ApiError::new(
                    axum::http::StatusCode::GATEWAY_TIMEOUT,
                    "envd_unavailable",
                    e.to_string(),
                )),
            },
            _ = stopped.wait_for(|s| s.is_some()) => Err(ApiError::vm_error(format!(
                "the VM stopped before envd answered: {}",
                self.stop_reason().unwrap_or_default()
            ))),
        }
    }

    /// Sends /init, reconnecting and retrying with the same request (the same timestamp) until
    /// envd answers or the deadline passes. Records instance env or a token as applied (which rules
    /// out template snapshots) and switches to a new token.
    pub async fn init(
        &self,
        request: pb::InitRequest,
        started: Instant,
        deadline: Duration,
    ) -> Result<pb::InitResponse, ApiError> {
        let instance = !request.env.is_empty() || request.access_token.is_some();
        let new_token = request.access_token.clone().map(Secret);
        let answer = loop {
            let conn = self.connect().await;
            let result = match conn {
                Ok(conn) => {
                    match tokio::time::timeout(ENVD_CALL_TIMEOUT, conn.client.init(request.clone()))
                        .await
                    {
                        Ok(Ok(r)) => break r,
                        Ok(Err(e)) if e.code().is_some() => return Err(e.into()),
                        Ok(Err(e)) => ApiError::from(e),
                        Err(_) => ApiError::new(
                            axum::http::StatusCode::GATEWAY_TIMEOUT,
                            "envd_timeout",
                            "envd did not answer /init",
                        ),
                    }
                }
                Err(e) if e.code == "envd_unavailable" => e,
                Err(e) => return Err(e),
            };
            if started.elapsed() + Duration::from_millis(50) >= deadline {
                return Err(ApiError::new(
                    result.status,
                    result.code,
                    format!(
                        "/init was not answered before the deadline: {}",
                        result.message
                    ),
                ));
            }
            tracing::debug!(code = result.code, "retrying /init");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        inc(&self.metrics.inits);
        if answer.applied {
            if instance {
                if let Some(vm) = &self.vm {
                    vm.mark_instance_initialized();
                }
            }
            if let Some(token) = new_token {
                *lock(&self.token) = Some(token);
            }
        }
        Ok(answer)
    }
}

/// What created a VM, for the metrics' timing breakdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartKind {
    Boot,
    Restore,
}

impl StartKind {
    fn name(self) -> &'static str {
        match self {
            StartKind::Boot => "boot",
            StartKind::Restore => "restore",
        }
    }
}

/// The agent's state, shared by all requests.
pub struct Shared {
    pub config: ServeConfig,
    pub metrics: Arc<Metrics>,
    sandbox: Mutex<Option<Arc<Sandbox>>>,
    lifecycle: tokio::sync::Mutex<()>,
    /// The agent was started with its VM (`host-agent run` or `restore`): it serves that VM only
    /// and never creates another one.
    adopted: bool,
    /// Notified when the agent should exit (after POST /shutdown).
    pub exit: tokio::sync::Notify,
}

pub type AppState = Arc<Shared>;

/// The state of an agent that starts with no VM (`host-agent serve`), or with an attached envd.
pub fn new_state(config: ServeConfig) -> AppState {
    let metrics = Arc::new(Metrics::default());
    let sandbox = config
        .attach_envd
        .clone()
        .map(|addr| Sandbox::new(None, addr, None, metrics.clone()));
    Arc::new(Shared {
        config,
        metrics,
        sandbox: Mutex::new(sandbox),
        lifecycle: tokio::sync::Mutex::new(()),
        adopted: false,
        exit: tokio::sync::Notify::new(),
    })
}

/// The state of an agent serving a VM it already runs (`host-agent run` or `restore
/// --api-sock`): envd is at `envd`, and `token` is the access token envd already has (from the
/// restore's /init), if any. `POST /boot` and `POST /restore` answer 409 `vm_exists`, even once the
/// VM stopped. The VM's end is waited for here: use [`Shared::vm_stopped`], not
/// [`RunningVm::wait`].
pub fn new_state_with_vm(
    config: ServeConfig,
    vm: Arc<RunningVm>,
    envd: Address,
    token: Option<String>,
) -> AppState {
    let metrics = Arc::new(Metrics::default());
    let sandbox = Sandbox::new(Some(vm), envd, token.map(Secret), metrics.clone());
    Arc::new(Shared {
        config,
        metrics,
        sandbox: Mutex::new(Some(sandbox)),
        lifecycle: tokio::sync::Mutex::new(()),
        adopted: true,
        exit: tokio::sync::Notify::new(),
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl Shared {
    pub fn sandbox(&self) -> Option<Arc<Sandbox>> {
        lock(&self.sandbox).clone()
    }

    /// The sandbox, for operations that need envd.
    pub fn require_sandbox(&self) -> Result<Arc<Sandbox>, ApiError> {
        self.sandbox().ok_or_else(ApiError::no_vm)
    }

    pub fn vm_state(&self) -> &'static str {
        self.sandbox().map_or("none", |s| s.vm_state())
    }

    pub fn lifecycle(&self) -> Result<tokio::sync::MutexGuard<'_, ()>, ApiError> {
        self.lifecycle.try_lock().map_err(|_| ApiError::busy())
    }

    /// Refuses to create a VM when one exists (a stopped one is replaced).
    fn check_no_vm(&self) -> Result<(), ApiError> {
        if self.adopted {
            return Err(ApiError::conflict(
                "vm_exists",
                "this agent was started with its VM (host-agent run or restore); it serves that VM only",
            ));
        }
        match self.sandbox() {
            Some(s) if s.vm.is_none() => Err(ApiError::conflict(
                "vm_exists",
                "this agent serves an attached envd (--attach-envd); it cannot create a VM",
            )),
            Some(s) if s.stop_reason().is_none() => Err(ApiError::conflict(
                "vm_exists",
                "this sandbox already has a VM (one VM per agent)",
            )),
            _ => Ok(()),
        }
    }

    fn envd_addr(&self) -> Address {
        Address::HybridVsock {
            uds: self.config.vsock_uds.clone(),
            port: self.config.envd_port,
        }
    }

    /// How the VM ended, once it has (None while it runs, or when there is no VM).
    pub fn vm_exit(&self) -> Option<VmExit> {
        self.sandbox().and_then(|s| s.vm_exit())
    }

    /// Waits until the sandbox's VM stops (never, without a VM).
    pub async fn vm_stopped(&self) -> VmExit {
        match self.sandbox() {
            Some(s) if s.vm.is_some() => s.stopped().await,
            _ => std::future::pending().await,
        }
    }

    /// Records the timing breakdown of the boot or restore that created an adopted VM (see
    /// [`new_state_with_vm`]) and counts it, as `POST /boot` and `/restore` do for theirs.
    pub fn record_start(&self, kind: StartKind, steps_ms: Vec<(String, f64)>) {
        match kind {
            StartKind::Boot => inc(&self.metrics.boots),
            StartKind::Restore => inc(&self.metrics.restores),
        }
        self.record_timings(kind.name(), steps_ms);
    }

    fn install(&self, vm: RunningVm) -> Arc<Sandbox> {
        let sandbox = Sandbox::new(
            Some(Arc::new(vm)),
            self.envd_addr(),
            None,
            self.metrics.clone(),
        );
        *lock(&self.sandbox) = Some(sandbox.clone());
        sandbox
    }

    fn record_timings(
        &self,
        kind: &'static str,
        steps_ms: Vec<(String, f64)>,
    ) -> serde_json::Value {
        let timings = StartTimings { kind, steps_ms };
        let json = timings.as_json();
        *lock(&self.metrics.last_start) = Some(timings);
        json
    }

    pub async fn boot(&self, req: BootRequest) -> Result<serde_json::Value, ApiError> {
        let _guard = self.lifecycle()?;
        self.check_no_vm()?;
        let (kernel, initrd, cmdline) = match (&req.template_dir, &req.kernel) {
            (Some(_), Some(_)) => {
                return Err(ApiError::bad_request(
                    "give either template_dir or kernel, not both",
                ))
            }
            (Some(dir), None) => {
                let t =
                    TemplateBoot::read(dir).map_err(|e| ApiError::bad_request(e.to_string()))?;
                (
                    t.kernel,
                    Some(t.initrd),
                    req.cmdline.clone().unwrap_or(t.cmdline),
                )
            }
            (None, Some(kernel)) => (
                kernel.clone(),
                req.initrd.clone(),
                req.cmdline
                    .clone()
                    .unwrap_or_else(|| "console=ttyS0 panic=-1 reboot=k".to_string()),
            ),
            (None, None) => {
                return Err(ApiError::bad_request("template_dir or kernel is required"))
            }
        };
        let config = VmConfig {
            kernel,
            initrd,
            cmdline,
            mem_mib: req.mem_mib,
            vcpus: req.vcpus,
            vsock: Some(VsockConfig {
                guest_cid: req.guest_cid,
                uds_path: self.config.vsock_uds.clone(),
            }),
            console_log: self.config.console_log.clone(),
        };
        // A stopped VM is replaced: drop it first so that its vsock socket is free.
        *lock(&self.sandbox) = None;
        tracing::info!(mem_mib = req.mem_mib, vcpus = req.vcpus, "booting a VM");
        let started = Instant::now();
        let vm = tokio::task::spawn_blocking(move || {
            let vmm = Vmm::build(&config).map_err(|e| ApiError::unprocessable("boot_failed", e))?;
            vmm.start().map_err(ApiError::vm_error)
        })
        .await
        .map_err(|e| ApiError::internal(e.to_string()))??;
        let mut steps = vec![("vcpus_running".to_string(), ms(started.elapsed()))];
        let sandbox = self.install(vm);
        inc(&self.metrics.boots);
        if req.envd_timeout_ms > 0 {
            sandbox
                .wait_for_envd(Duration::from_millis(req.envd_timeout_ms))
                .await?;
            steps.push(("envd_reachable".to_string(), ms(started.elapsed())));
        }
        let timings = self.record_timings("boot", steps);
        Ok(serde_json::json!({"vm": sandbox.vm_state(), "timings_ms": timings["steps_ms"]}))
    }

    pub async fn restore(&self, req: RestoreRequest) -> Result<serde_json::Value, ApiError> {
        let _guard = self.lifecycle()?;
        self.check_no_vm()?;
        *lock(&self.sandbox) = None;
        let config = RestoreConfig {
            snapshot_dir: req.snapshot_dir.clone(),
            vsock_uds: Some(self.config.vsock_uds.clone()),
            console_log: self.config.console_log.clone(),
            apply_working_set: true,
        };
        tracing::info!(
            env_keys = req.env.len(),
            token = req.access_token.is_some(),
            "restoring a snapshot"
        );
        let started = Instant::now();
        let (vm, mut steps) = tokio::task::spawn_blocking(move || {
            let vmm =
                Vmm::restore(&config).map_err(|e| ApiError::unprocessable("restore_failed", e))?;
            let steps: Vec<(String, f64)> = vmm
                .timings
                .iter()
                .map(|(k, d)| (k.to_string(), ms(*d)))
                .collect();
            let vm = vmm.start().map_err(ApiError::vm_error)?;
            Ok::<_, ApiError>((vm, steps))
        })
        .await
        .map_err(|e| ApiError::internal(e.to_string()))??;
        steps.push(("vcpus_running".to_string(), ms(started.elapsed())));
        let sandbox = self.install(vm);
        inc(&self.metrics.restores);
        let deadline = Duration::from_millis(req.envd_timeout_ms);
        sandbox
            .wait_for_envd(deadline.saturating_sub(started.elapsed()))
            .await?;
        steps.push(("envd_reachable".to_string(), ms(started.elapsed())));
        let request = pb::InitRequest {
            env: reveal_env(&req.env),
            unset: vec![],
            timestamp: Some(prost_types::Timestamp::from(SystemTime::now())),
            access_token: req.access_token.map(|s| s.0),
            default_user: req.default_user,
            default_workdir: req.default_workdir,
        };
        let init = sandbox.init(request, started, deadline).await?;
        steps.push(("init_done".to_string(), ms(started.elapsed())));
        let timings = self.record_timings("restore", steps);
        Ok(serde_json::json!({
            "vm": sandbox.vm_state(),
            "init": {"applied": init.applied, "clock_stepped": init.clock_stepped},
            "timings_ms": timings["steps_ms"],
        }))
    }

    pub async fn pause(&self) -> Result<serde_json::Value, ApiError> {
        let _guard = self.lifecycle()?;
        let sandbox = self.require_sandbox()?;
        let vm = sandbox.vm()?.clone();
        if vm.is_paused() {
            return Err(crate::vmm::builder::ControlError::AlreadyPaused.into());
        }
        // Ask envd, while the guest still runs, whether an /init reached it (a client may have sent
        // one directly over vsock). If it cannot say, assume it did: template snapshots are refused.
        match sandbox
            .call(|c| async move { c.client.health().await })
            .await
        {
            Ok(h) if !h.initialized => {}
            Ok(_) => vm.mark_instance_initialized(),
            Err(e) => {
                tracing::warn!(
                    code = e.code,
                    "cannot ask envd before pausing; template snapshots refused"
                );
                vm.mark_instance_initialized();
            }
        }
        tokio::task::spawn_blocking(move || vm.pause())
            .await
            .map_err(|e| ApiError::internal(e.to_string()))??;
        inc(&self.metrics.pauses);
        Ok(serde_json::json!({"vm": sandbox.vm_state()}))
    }

    pub async fn resume(&self) -> Result<serde_json::Value, ApiError> {
        let _guard = self.lifecycle()?;
        let sandbox = self.require_sandbox()?;
        let vm = sandbox.vm()?.clone();
        tokio::task::spawn_blocking(move || vm.resume())
            .await
            .map_err(|e| ApiError::internal(e.to_string()))??;
        sandbox
            .probe_next
            .store(true, std::sync::atomic::Ordering::SeqCst);
        inc(&self.metrics.resumes);
        Ok(serde_json::json!({"vm": sandbox.vm_state()}))
    }

    pub async fn snapshot(
        &self,
        dir: PathBuf,
        kind: SnapshotKind,
    ) -> Result<serde_json::Value, ApiError> {
        let _guard = self.lifecycle()?;
        let sandbox = self.require_sandbox()?;
        let vm = sandbox.vm()?.clone();
        let report = tokio::task::spawn_blocking(move || vm.snapshot(&dir, kind))
            .await
            .map_err(|e| ApiError::internal(e.to_string()))??;
        inc(&self.metrics.snapshots);
        Ok(serde_json::json!({
            "dir": report.dir,
            "kind": kind,
            "memory_bytes_written": report.memory_bytes_written,
            "took_ms": report.took_ms,
            "vm": sandbox.vm_state(),
        }))
    }

    /// Powers the guest off through envd and waits for the VM to stop (bounded). The agent exits
    /// after answering, whatever happened: the VM ends with the process.
    pub async fn shutdown(&self, timeout: Duration) -> Result<serde_json::Value, ApiError> {
        let _guard = self.lifecycle()?;
        let Some(sandbox) = self.sandbox() else {
            return Ok(serde_json::json!({"vm_exit": null, "clean": true}));
        };
        let Some(vm) = sandbox.vm.clone() else {
            // An attached envd is not ours to stop.
            return Ok(serde_json::json!({"vm_exit": null, "clean": true}));
        };
        if let Some(reason) = sandbox.stop_reason() {
            return Ok(serde_json::json!({"vm_exit": reason, "clean": true}));
        }
        if vm.is_paused() {
            let vm = vm.clone();
            tokio::task::spawn_blocking(move || vm.resume())
                .await
                .map_err(|e| ApiError::internal(e.to_string()))??;
            sandbox
                .probe_next
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
        let asked = sandbox
            .call(|c| async move { c.client.shutdown(false).await })
            .await;
        if let Err(e) = &asked {
            tracing::warn!(code = e.code, message = %e.message, "envd did not take the shutdown request");
        }
        let mut stopped = sandbox.stopped.clone();
        let waited = tokio::time::timeout(timeout, stopped.wait_for(|s| s.is_some())).await;
        let reason = sandbox.stop_reason();
        Ok(serde_json::json!({
            "vm_exit": reason,
            "clean": asked.is_ok() && waited.is_ok(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An agent started with its VM (`run` / `restore --api-sock`), here without the VM itself
    /// (that needs KVM): creating another one is refused before anything is tried.
    #[tokio::test]
    async fn an_agent_started_with_its_vm_never_creates_another() {
        let state = Arc::new(Shared {
            config: ServeConfig {
                vsock_uds: PathBuf::from("/nonexistent/v.sock"),
                console_log: None,
                envd_port: envd_protocol::DEFAULT_VSOCK_PORT,
                attach_envd: None,
            },
            metrics: Arc::new(Metrics::default()),
            sandbox: Mutex::new(None),
            lifecycle: tokio::sync::Mutex::new(()),
            adopted: true,
            exit: tokio::sync::Notify::new(),
        });
        let boot: BootRequest = serde_json::from_str(r#"{"template_dir": "/t"}"#).unwrap();
        let e = state.boot(boot).await.unwrap_err();
        assert_eq!(
            (e.status, e.code),
            (axum::http::StatusCode::CONFLICT, "vm_exists")
        );
        let restore: RestoreRequest =
            serde_json::from_str(r#"{"snapshot_dir": "/nonexistent"}"#).unwrap();
        let e = state.restore(restore).await.unwrap_err();
        assert_eq!(
            (e.status, e.code),
            (axum::http::StatusCode::CONFLICT, "vm_exists")
        );
        assert_eq!(
            state
                .metrics
                .boots
                .load(std::sync::atomic::Ordering::Relaxed),
            0
        );

        state.record_start(StartKind::Restore, vec![("init_done".into(), 12.34)]);
        let m = state.metrics.snapshot();
        assert_eq!(m["lifecycle"]["restores"], 1);
        assert_eq!(m["last_start"]["kind"], "restore");
        assert_eq!(m["last_start"]["steps_ms"]["init_done"], 12.3);
    }
}
