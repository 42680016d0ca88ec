//! Starting a child: argv without a shell, the layered env, a working directory, a user (groups,
//! gid, uid, no capabilities left), and pipes or a PTY for its stdio.
//!
//! When the child runs as the same user as envd and needs no PTY, envd starts it with `posix_spawn`
//! (a vfork-style clone, see [`super::posix_spawn`]), the fastest way to start a process; switching
//! users or taking a controlling terminal needs code in the child, so those go through std's
//! `Command`, which forks.

use std::ffi::OsStr;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use caps::CapSet;
use nix::unistd::{setgid, setgroups, setuid, Gid, Uid};
use rustix::termios::Winsize;
use tokio::sync::oneshot;

use super::posix_spawn;
use super::reaper::{ExitStatus, Reaper};
use crate::users::User;

pub struct SpawnRequest<'a> {
    pub program: &'a str,
    pub args: &'a [String],
    pub env: Vec<(String, String)>,
    pub cwd: &'a Path,
    /// The user to switch to; `None` keeps envd's own identity.
    pub switch_to: Option<&'a User>,
    pub stdin: bool,
    pub pty: Option<Winsize>,
}

/// The parent's ends of a new child's stdio.
pub enum Stdio3 {
    Pipes {
        stdin: Option<OwnedFd>,
        stdout: OwnedFd,
        stderr: OwnedFd,
    },
    /// stdin, stdout and stderr are all the PTY; this is its master.
    Pty(OwnedFd),
}

pub struct Spawned {
    pub pid: u32,
    pub stdio: Stdio3,
    pub exit: oneshot::Receiver<ExitStatus>,
}

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("executable {program:?} not found (PATH={path})")]
    NotFound { program: String, path: String },
    #[error("cannot execute {program:?}: permission denied")]
    PermissionDenied { program: String },
    #[error("cannot start {program:?}: {source}")]
    Other { program: String, source: io::Error },
    #[error("cannot open a pty: {0}")]
    Pty(io::Error),
}

/// Starts the child and registers it with the reaper.
pub fn spawn(reaper: &Reaper, req: SpawnRequest<'_>) -> Result<Spawned, SpawnError> {
    if req.switch_to.is_none() && req.pty.is_none() {
        return spawn_posix(reaper, &req);
    }
    spawn_command(reaper, req)
}

/// What runs a program that has no `#!` line.
const SHELL: &str = "/bin/sh";

/// The fast path: pipes (or /dev/null) for stdio and glibc's posix_spawn.
fn spawn_posix(reaper: &Reaper, req: &SpawnRequest<'_>) -> Result<Spawned, SpawnError> {
    let other = |source: io::Error| SpawnError::Other {
        program: req.program.to_string(),
        source,
    };
    let path_var = req
        .env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_str());
    let Some(path) = posix_spawn::resolve_program(req.program, path_var, req.cwd) else {
        return Err(spawn_error(
            req.program,
            &req.env,
            io::Error::from(io::ErrorKind::NotFound),
        ));
    };
    let pipe = || nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| other(e.into()));
    let (stdin_child, stdin_parent) = if req.stdin {
        let (r, w) = pipe()?;
        (r, Some(w))
    } else {
        let null = std::fs::File::open("/dev/null").map_err(other)?;
        (OwnedFd::from(null), None)
    };
    let (stdout_parent, stdout_child) = pipe()?;
    let (stderr_parent, stderr_child) = pipe()?;
    let mut argv: Vec<&OsStr> = vec![OsStr::new(req.program)];
    argv.extend(req.args.iter().map(OsStr::new));
    let stdio = posix_spawn::ChildStdio {
        stdin: &stdin_child,
        stdout: &stdout_child,
        stderr: &stderr_child,
    };
    let (pid, stdio, exit) = reaper.spawn(|| {
        let pid = match posix_spawn::spawn(&path, &argv, &req.env, req.cwd, &stdio) {
            // A file without a `#!` line: run it with /bin/sh, as execvp does.
            Err(e) if e.raw_os_error() == Some(libc::ENOEXEC) => {
                let mut sh_argv = vec![OsStr::new(SHELL), path.as_os_str()];
                sh_argv.extend(req.args.iter().map(OsStr::new));
                posix_spawn::spawn(Path::new(SHELL), &sh_argv, &req.env, req.cwd, &stdio)
            }
            spawned => spawned,
        }
        .map_err(|e| spawn_error(req.program, &req.env, e))?;
        let stdio = Stdio3::Pipes {
            stdin: stdin_parent,
            stdout: stdout_parent,
            stderr: stderr_parent,
        };
        Ok::<_, SpawnError>((pid, stdio))
    })?;
    Ok(Spawned { pid, stdio, exit })
}

/// The general path: std's `Command`, with code in the forked child for users and PTYs.
fn spawn_command(reaper: &Reaper, req: SpawnRequest<'_>) -> Result<Spawned, SpawnError> {
    let mut cmd = Command::new(req.program);
    cmd.args(req.args)
        .env_clear()
        .envs(req.env.iter().map(|(k, v)| (k, v)))
        .current_dir(req.cwd);

    let (pid, stdio, exit) = reaper.spawn(|| {
        // Opened under the reaper's lock: every fork of envd happens under it, so these descriptors
        // (created without CLOEXEC by openpty) cannot leak into another child before they are marked.
        let pty = match req.pty {
            Some(size) => Some(open_pty(size).map_err(SpawnError::Pty)?),
            None => None,
        };
        match &pty {
            Some((_, slave)) => {
                let clone = |fd: &OwnedFd| fd.try_clone().map(Stdio::from).map_err(SpawnError::Pty);
                cmd.stdin(clone(slave)?)
                    .stdout(clone(slave)?)
                    .stderr(clone(slave)?);
                // SAFETY: the closure only makes async-signal-safe syscalls (setsid, ioctl) on the
                // child's own descriptors between fork and exec.
                unsafe {
                    cmd.pre_exec(|| {
                        rustix::process::setsid()?;
                        rustix::process::ioctl_tiocsctty(std::io::stdin())?;
                        Ok(())
                    });
                }
            }
            None => {
                cmd.stdin(if req.stdin {
                    Stdio::piped()
                } else {
                    Stdio::null()
                })
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                // Its own process group, so that signals and timeouts reach its children too.
                .process_group(0);
            }
        }
        if let Some(user) = req.switch_to {
            let groups: Vec<Gid> = user.groups.iter().map(|g| Gid::from_raw(*g)).collect();
            let (uid, gid) = (Uid::from_raw(user.uid), Gid::from_raw(user.gid));
            // SAFETY: runs between fork and exec; it only calls setgroups/setgid/setuid/capset/prctl
            // with data prepared before the fork.
            unsafe {
                cmd.pre_exec(move || {
                    setgroups(&groups)?;
                    setgid(gid)?;
                    setuid(uid)?;
                    // setuid to a non-root uid already empties the permitted and effective sets;
                    // clear the inheritable and ambient ones too so nothing survives exec.
                    if !uid.is_root() {
                        caps::clear(None, CapSet::Inheritable).map_err(io::Error::other)?;
                        caps::clear(None, CapSet::Ambient).map_err(io::Error::other)?;
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| spawn_error(req.program, &req.env, e))?;
        let stdio = match pty {
            // The slave stays open only in the child; the parent keeps the master.
            Some((master, _slave)) => Stdio3::Pty(master),
            None => Stdio3::Pipes {
                stdin: child.stdin.take().map(OwnedFd::from),
                stdout: child
                    .stdout
                    .take()
                    .map(OwnedFd::from)
                    .ok_or_else(|| missing_pipe(req.program))?,
                stderr: child
                    .stderr
                    .take()
                    .map(OwnedFd::from)
                    .ok_or_else(|| missing_pipe(req.program))?,
            },
        };
        Ok((child.id(), stdio))
    })?;
    Ok(Spawned { pid, stdio, exit })
}

fn missing_pipe(program: &str) -> SpawnError {
    SpawnError::Other {
        program: program.to_string(),
        source: io::Error::other("stdio pipe missing after spawn"),
    }
}

fn spawn_error(program: &str, env: &[(String, String)], e: io::Error) -> SpawnError {
    match e.kind() {
        io::ErrorKind::NotFound => SpawnError::NotFound {
            program: program.to_string(),
            path: env
                .iter()
                .find(|(k, _)| k == "PATH")
                .map(|(_, v)| v.clone())
                .unwrap_or_default(),
        },
        io::ErrorKind::PermissionDenied => SpawnError::PermissionDenied {
            program: program.to_string(),
        },
        _ => SpawnError::Other {
            program: program.to_string(),
            source: e,
        },
    }
}

/// Opens a PTY pair with the given size; both ends close on exec (the child gets dup2'd copies).
fn open_pty(size: Winsize) -> io::Result<(OwnedFd, OwnedFd)> {
    let pty = nix::pty::openpty(
        Some(&nix::pty::Winsize {
            ws_row: size.ws_row,
            ws_col: size.ws_col,
            ws_xpixel: 0,
            ws_ypixel: 0,
        }),
        None,
    )?;
    for fd in [&pty.master, &pty.slave] {
        rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::CLOEXEC)?;
    }
    Ok((pty.master, pty.slave))
}
