//! Small pieces the subcommands share.

use std::path::Path;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;

use host_agent::api::{self, AppState};
use host_agent::vmm::builder::{GuestExit, RunningVm};

/// What `exec` runs, with what (shared by `envd exec` and `ctl exec`).
#[derive(clap::Args, Debug)]
pub struct ExecArgs {
    #[arg(long = "env", value_parser = parse_key_value)]
    pub env: Vec<(String, String)>,
    #[arg(long)]
    pub cwd: Option<String>,
    #[arg(long)]
    pub user: Option<String>,
    /// Kill the process group after this many milliseconds (0: never).
    #[arg(long, default_value_t = 0)]
    pub timeout_ms: u64,
    #[arg(long)]
    pub tag: Option<String>,
    /// Give this program's stdin to the process.
    #[arg(long)]
    pub stdin: bool,
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

/// The fields of `/init` (shared by `envd init` and `ctl init`).
#[derive(clap::Args, Debug)]
pub struct InitArgs {
    #[arg(long = "env", value_parser = parse_key_value)]
    pub env: Vec<(String, String)>,
    #[arg(long = "unset")]
    pub unset: Vec<String>,
    #[arg(long, env = "ENVD_NEW_ACCESS_TOKEN", hide_env_values = true)]
    pub access_token: Option<String>,
    #[arg(long)]
    pub default_user: Option<String>,
    #[arg(long)]
    pub default_workdir: Option<String>,
}

/// Parses a `KEY=VALUE` argument.
pub fn parse_key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))
}

/// Turns how the VM ended into the process exit code: 0 when the guest powered off or reset the
/// VM, an error (exit 1) when it failed or the guest kernel panicked.
pub fn exit_code<E: std::fmt::Display>(exit: Result<GuestExit, E>) -> anyhow::Result<i32> {
    match exit {
        Ok(GuestExit::PowerOff) => {
            eprintln!("host-agent: guest powered off");
            Ok(0)
        }
        Ok(GuestExit::Reset) => {
            eprintln!("host-agent: guest reset the VM; stopping");
            Ok(0)
        }
        Err(e) => anyhow::bail!("{e}"),
    }
}

/// Waits for the guest to stop the VM and turns how it ended into the process exit code.
pub fn wait_for_exit(vm: &RunningVm) -> anyhow::Result<i32> {
    exit_code(vm.wait())
}

/// Serves the API on `path` for the VM this process runs (`state` from
/// [`api::new_state_with_vm`]) until the VM stops, then removes the socket and turns how the VM
/// ended into the exit code, as [`wait_for_exit`] does. `POST /shutdown` ends it too (once the
/// guest powered off), and so do SIGTERM and SIGINT (exit 128 + the signal; the VM ends with the
/// process). `ready` runs once the socket is bound.
pub fn serve_api_until_exit(
    path: &Path,
    state: AppState,
    ready: impl FnOnce(),
) -> anyhow::Result<i32> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("api")
        .enable_all()
        .build()?;
    let signalled = Arc::new(AtomicI32::new(0));
    let served = runtime.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let listener = api::bind(path)?;
        ready();
        let mut term = signal(SignalKind::terminate());
        let mut int = signal(SignalKind::interrupt());
        let stop = {
            let state = state.clone();
            let signalled = signalled.clone();
            async move {
                let signal = async {
                    match (&mut term, &mut int) {
                        (Ok(term), Ok(int)) => tokio::select! {
                            _ = term.recv() => libc::SIGTERM,
                            _ = int.recv() => libc::SIGINT,
                        },
                        _ => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = state.vm_stopped() => {}
                    sig = signal => signalled.store(sig, Ordering::SeqCst),
                }
            }
        };
        let served = api::serve(listener, state.clone(), stop).await;
        let _ = std::fs::remove_file(path);
        served?;
        // After POST /shutdown the guest has powered off (or did not in time: give it a moment).
        if state.vm_exit().is_none() && signalled.load(Ordering::SeqCst) == 0 {
            let _ =
                tokio::time::timeout(std::time::Duration::from_secs(2), state.vm_stopped()).await;
        }
        anyhow::Ok(())
    });
    // Blocking work still in flight (a pause, a snapshot) ends with the process.
    runtime.shutdown_background();
    served?;
    match (state.vm_exit(), signalled.load(Ordering::SeqCst)) {
        (Some(exit), _) => exit_code(exit),
        (None, 0) => {
            anyhow::bail!("the guest did not power off after POST /shutdown; stopping the VM")
        }
        (None, sig) => {
            eprintln!("host-agent: stopped by signal {sig}; the VM ends with the process");
            Ok(128 + sig)
        }
    }
}
