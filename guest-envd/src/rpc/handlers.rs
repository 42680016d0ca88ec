//! Request dispatch: authorization, `/init`, and the process operations.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use envd_protocol::pb::{self, request::Kind, ErrorCode};
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use rustix::termios::Winsize;
use tokio::sync::mpsc;

use super::{Outgoing, Sink};
use crate::config::Config;
use crate::env;
use crate::init::{InitError, InitOutcome, InitState};
use crate::process::fdio;
use crate::process::pump::{Attach, OutputSource, Pump, StreamKind};
use crate::process::reaper::Reaper;
use crate::process::spawn::{self, SpawnRequest, Stdio3};
use crate::process::stdin::{self, StdinOp, StdinTarget};
use crate::process::table::{ProcessHandle, ProcessTable, TableError};
use crate::users::{User, UserDb};

/// The daemon's state, shared by all connections.
pub struct Envd {
    config: Config,
    init: Mutex<InitState>,
    processes: Arc<ProcessTable>,
    reaper: Arc<Reaper>,
}

/// An error answered to the client.
struct Refusal(ErrorCode, String);

impl<E: std::fmt::Display> From<(ErrorCode, E)> for Refusal {
    fn from((code, e): (ErrorCode, E)) -> Self {
        Refusal(code, e.to_string())
    }
}

impl From<TableError> for Refusal {
    fn from(e: TableError) -> Self {
        let code = match e {
            TableError::TagInUse(_) => ErrorCode::Conflict,
            TableError::NoSelector => ErrorCode::BadRequest,
            _ => ErrorCode::NotFound,
        };
        Refusal(code, e.to_string())
    }
}

impl Envd {
    /// Must be called inside the runtime (it starts the reaper).
    pub fn new(config: Config) -> std::io::Result<Arc<Envd>> {
        Ok(Arc::new(Envd {
            config,
            init: Mutex::new(InitState::default()),
            processes: Arc::new(ProcessTable::default()),
            reaper: Reaper::start()?,
        }))
    }

    fn init_state(&self) -> MutexGuard<'_, InitState> {
        self.init.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub async fn handle(&self, request: pb::Request, tx: &mpsc::Sender<Outgoing>) {
        let sink = Sink {
            id: request.id,
            tx: tx.clone(),
        };
        let Some(kind) = request.kind else {
            sink.error(
                ErrorCode::UnknownRequest,
                "unknown or empty request kind (is the client newer than this envd?)".into(),
            )
            .await;
            return;
        };
        if !matches!(kind, Kind::Health(_)) {
            let authorized = self.init_state().authorize(&request.token);
            if let Err(e) = authorized {
                sink.error(ErrorCode::Unauthorized, e.to_string()).await;
                return;
            }
        }
        let result = match kind {
            Kind::Health(_) => Ok(pb::response::Kind::Health(pb::HealthResponse {
                version: envd_protocol::VERSION.to_string(),
                initialized: self.init_state().initialized(),
                pid: std::process::id(),
            })),
            Kind::Init(req) => self.init(&req, &request.token),
            // A started process answers through its event stream.
            Kind::Start(req) => match self.start(req, sink.clone()) {
                Ok(()) => return,
                Err(e) => Err(e),
            },
            Kind::Reattach(req) => match self.reattach(req, sink.clone()).await {
                Ok(()) => return,
                Err(e) => Err(e),
            },
            Kind::List(_) => Ok(pb::response::Kind::List(pb::ListResponse {
                processes: self.processes.list(),
            })),
            Kind::Stdin(req) => match self.stdin(req, sink.clone()).await {
                // The stdin task acknowledges once the bytes are written.
                Ok(()) => return,
                Err(e) => Err(e),
            },
            Kind::Signal(req) => self.signal(&req),
            Kind::Resize(req) => self.resize(&req),
            Kind::Shutdown(req) => {
                if !self.config.pid1 {
                    Err(Refusal(
                        ErrorCode::NotSupported,
                        "shutdown is only possible when envd runs as PID 1 in a VM".into(),
                    ))
                } else {
                    sink.send(pb::response::Kind::Ack(pb::Ack {})).await;
                    let _ = tx.send(Outgoing::PowerOff { reboot: req.reboot }).await;
                    return;
                }
            }
        };
        match result {
            Ok(kind) => sink.send(kind).await,
            Err(Refusal(code, message)) => sink.error(code, message).await,
        };
    }

    fn init(&self, req: &pb::InitRequest, token: &str) -> Result<pb::response::Kind, Refusal> {
        let applied = self.init_state().apply(req, token);
        let (outcome, at) = applied.map_err(|e| {
            let code = match e {
                InitError::Unauthorized => ErrorCode::Unauthorized,
                _ => ErrorCode::BadRequest,
            };
            Refusal(code, e.to_string())
        })?;
        let mut clock_stepped = false;
        if outcome == InitOutcome::Applied && self.config.set_clock && SystemTime::now() < at {
            match crate::pid1::set_clock(at) {
                Ok(()) => clock_stepped = true,
                Err(e) => tracing::warn!(error = %e, "cannot step the clock"),
            }
        }
        // Per-request lines are debug: in a VM, stderr is the serial console, where every byte is a
        // trap to the VMM (an info line per request cost ~15 ms of the guest's only vCPU under
        // nested emulation, more than the request itself). ENVD_LOG=debug shows them.
        tracing::debug!(
            applied = outcome == InitOutcome::Applied,
            env_keys = req.env.len(),
            unset = req.unset.len(),
            token_changed = req.access_token.is_some(),
            clock_stepped,
            "init"
        );
        Ok(pb::response::Kind::Init(pb::InitResponse {
            applied: outcome == InitOutcome::Applied,
            clock_stepped,
        }))
    }

    /// The user a process runs as, and whether envd must switch to it.
    fn resolve_user(&self, users: &UserDb, requested: &str) -> Result<(User, bool), Refusal> {
        let default_user = self.init_state().default_user().map(str::to_owned);
        let name = Some(requested)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .or(default_user)
            .or_else(|| self.config.template_user.clone());
        let euid = rustix::process::geteuid().as_raw();
        match name {
            Some(name) => {
                let user = users
                    .resolve(&name)
                    .map_err(|e| Refusal(ErrorCode::UnknownUser, e.to_string()))?;
                let switch = user.uid != euid;
                Ok((user, switch))
            }
            None => Ok((current_user(users, euid), false)),
        }
    }

    fn resolve_cwd(&self, requested: &str, user: &User) -> Result<PathBuf, Refusal> {
        let default_workdir = self.init_state().default_workdir().map(str::to_owned);
        let chosen = Some(requested.to_owned())
            .filter(|s| !s.is_empty())
            .or(default_workdir)
            .or_else(|| self.config.template_workdir.clone());
        match chosen {
            Some(dir) => {
                let path = PathBuf::from(&dir);
                if !path.is_absolute() {
                    return Err(Refusal(
                        ErrorCode::BadCwd,
                        format!("working directory {dir:?} is not an absolute path"),
                    ));
                }
                if !path.is_dir() {
                    return Err(Refusal(
                        ErrorCode::BadCwd,
                        format!("working directory {dir:?} does not exist or is not a directory"),
                    ));
                }
                Ok(path)
            }
            // The user's home, or / when it does not exist (nobody's home is /nonexistent).
            None => Ok(Some(PathBuf::from(&user.home))
                .filter(|p| p.is_dir())
                .unwrap_or_else(|| PathBuf::from("/"))),
        }
    }

    fn start(&self, req: pb::StartRequest, sink: Sink) -> Result<(), Refusal> {
        if req.cmd.is_empty() {
            return Err(Refusal(ErrorCode::BadRequest, "empty command".into()));
        }
        for (k, v) in &req.envs {
            env::validate(k, v).map_err(|e| Refusal(ErrorCode::BadRequest, e.to_string()))?;
        }
        if req.cmd.contains('\0') || req.args.iter().any(|a| a.contains('\0')) {
            return Err(Refusal(
                ErrorCode::BadRequest,
                "command or argument contains a NUL byte".into(),
            ));
        }
        let users = UserDb::load(&self.config.etc_dir)
            .map_err(|e| Refusal(ErrorCode::Internal, e.to_string()))?;
        let (user, switch) = self.resolve_user(&users, &req.user)?;
        let cwd = self.resolve_cwd(&req.cwd, &user)?;
        let child_env = {
            let init = self.init_state();
            env::layered(
                &user,
                &self.config.template_env,
                init.instance_env(),
                &req.envs,
            )
        };
        let pty = req.pty.map(|size| Winsize {
            ws_row: clamp_u16(size.rows),
            ws_col: clamp_u16(size.cols),
            ws_xpixel: 0,
            ws_ypixel: 0,
        });

        self.processes.reserve_tag(&req.tag)?;
        let spawned = spawn::spawn(
            &self.reaper,
            SpawnRequest {
                program: &req.cmd,
                args: &req.args,
                env: child_env,
                cwd: &cwd,
                switch_to: switch.then_some(&user),
                stdin: req.stdin,
                pty,
            },
        );
        let spawned = match spawned {
            Ok(s) => s,
            Err(e) => {
                self.processes.release_tag(&req.tag);
                let code = match e {
                    spawn::SpawnError::Pty(_) => ErrorCode::Internal,
                    _ => ErrorCode::SpawnFailed,
                };
                return Err(Refusal(code, e.to_string()));
            }
        };
        let pid = spawned.pid;
        tracing::debug!(pid, cmd = %req.cmd, user = %user.name, "started");

        let registered = register_fds(spawned.stdio);
        let (sources, stdin_target, pty_master) = match registered {
            Ok(r) => r,
            Err(e) => {
                // The child runs but envd cannot watch it: do not leave it behind unseen.
                let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
                self.processes.release_tag(&req.tag);
                return Err(Refusal(
                    ErrorCode::Internal,
                    format!("cannot watch process output: {e}"),
                ));
            }
        };
        let (attach_tx, attach_rx) = mpsc::channel(4);
        let exited = Arc::new(AtomicBool::new(false));
        let attached = Arc::new(AtomicBool::new(false));
        let info = pb::ProcessInfo {
            pid,
            tag: req.tag.clone(),
            cmd: req.cmd.clone(),
            args: req.args.clone(),
            cwd: cwd.display().to_string(),
            user: user.name.clone(),
            pty: req.pty.is_some(),
            exited: false,
            attached: false,
        };
        let handle = ProcessHandle::new(
            info,
            stdin_target.map(stdin::start),
            pty_master,
            attach_tx,
            Arc::clone(&exited),
            Arc::clone(&attached),
        );
        self.processes.insert(Arc::new(handle));
        let pump = Pump {
            pid,
            sources,
            exit: spawned.exit,
            attach: attach_rx,
            first: sink,
            timeout: (req.timeout_ms > 0).then(|| Duration::from_millis(req.timeout_ms)),
            exited,
            attached,
            table: Arc::clone(&self.processes),
        };
        tokio::spawn(pump.run());
        Ok(())
    }

    async fn reattach(&self, req: pb::ReattachRequest, sink: Sink) -> Result<(), Refusal> {
        let handle = self.processes.get(req.process.as_ref())?;
        handle.attach.send(Attach(sink)).await.map_err(|_| {
            Refusal(
                ErrorCode::NotFound,
                format!("process {} is gone", handle.pid),
            )
        })
    }

    async fn stdin(&self, req: pb::StdinRequest, sink: Sink) -> Result<(), Refusal> {
        let handle = self.processes.get(req.process.as_ref())?;
        let queue = handle.stdin.as_ref().ok_or_else(|| {
            Refusal(
                ErrorCode::BadRequest,
                format!("process {} was started without stdin", handle.pid),
            )
        })?;
        queue
            .send(StdinOp {
                data: req.data,
                close: req.close,
                reply: sink,
            })
            .await
            .map_err(|_| {
                Refusal(
                    ErrorCode::NotFound,
                    format!("process {} is gone", handle.pid),
                )
            })
    }

    fn signal(&self, req: &pb::SignalRequest) -> Result<pb::response::Kind, Refusal> {
        let handle = self.processes.get(req.process.as_ref())?;
        if handle.exited() {
            return Err(Refusal(
                ErrorCode::NotFound,
                format!("process {} has already exited", handle.pid),
            ));
        }
        let signal = Signal::try_from(req.signal).map_err(|_| {
            Refusal(
                ErrorCode::BadRequest,
                format!("unknown signal {}", req.signal),
            )
        })?;
        let pid = Pid::from_raw(handle.pid as i32);
        let sent = if req.group {
            killpg(pid, signal)
        } else {
            kill(pid, signal)
        };
        sent.map_err(|e| Refusal(ErrorCode::Internal, format!("kill: {e}")))?;
        Ok(pb::response::Kind::Ack(pb::Ack {}))
    }

    fn resize(&self, req: &pb::ResizeRequest) -> Result<pb::response::Kind, Refusal> {
        let handle = self.processes.get(req.process.as_ref())?;
        let master = handle.pty_master.as_ref().ok_or_else(|| {
            Refusal(
                ErrorCode::BadRequest,
                format!("process {} has no pty", handle.pid),
            )
        })?;
        let size = req
            .size
            .ok_or_else(|| Refusal(ErrorCode::BadRequest, "resize needs a size".into()))?;
        let winsize = Winsize {
            ws_row: clamp_u16(size.rows),
            ws_col: clamp_u16(size.cols),
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        rustix::termios::tcsetwinsize(master.get_ref(), winsize)
            .map_err(|e| Refusal(ErrorCode::Internal, format!("cannot resize the pty: {e}")))?;
        Ok(pb::response::Kind::Ack(pb::Ack {}))
    }
}

type Registered = (
    Vec<OutputSource>,
    Option<StdinTarget>,
    Option<Arc<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>>>,
);

fn register_fds(stdio: Stdio3) -> std::io::Result<Registered> {
    match stdio {
        Stdio3::Pipes {
            stdin,
            stdout,
            stderr,
        } => {
            let sources = vec![
                OutputSource {
                    kind: StreamKind::Stdout,
                    fd: Arc::new(fdio::async_fd(stdout)?),
                },
                OutputSource {
                    kind: StreamKind::Stderr,
                    fd: Arc::new(fdio::async_fd(stderr)?),
                },
            ];
            let stdin = stdin
                .map(fdio::async_fd)
                .transpose()?
                .map(StdinTarget::Pipe);
            Ok((sources, stdin, None))
        }
        Stdio3::Pty(master) => {
            let master = Arc::new(fdio::async_fd(master)?);
            let sources = vec![OutputSource {
                kind: StreamKind::Pty,
                fd: Arc::clone(&master),
            }];
            Ok((
                sources,
                Some(StdinTarget::Pty(Arc::clone(&master))),
                Some(master),
            ))
        }
    }
}

fn clamp_u16(v: u32) -> u16 {
    u16::try_from(v).unwrap_or(u16::MAX)
}

/// The user envd itself runs as, from passwd when it is there.
fn current_user(users: &UserDb, euid: u32) -> User {
    users.resolve(&euid.to_string()).unwrap_or_else(|_| User {
        name: if euid == 0 {
            "root".into()
        } else {
            euid.to_string()
        },
        uid: euid,
        gid: rustix::process::getegid().as_raw(),
        home: if euid == 0 {
            "/root".into()
        } else {
            "/".into()
        },
        shell: "/bin/sh".into(),
        groups: vec![],
    })
}
