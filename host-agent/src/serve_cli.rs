//! `host-agent serve --api-sock PATH`: one agent per sandbox, driven over an HTTP/JSON API on a
//! Unix socket (see `api/` and `openapi.yaml`). It starts with no VM; `POST /boot` or
//! `POST /restore` creates one; `POST /shutdown` ends the VM and the agent.

use std::path::PathBuf;

use clap::Args;
use envd_protocol::Address;
use host_agent::api;

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// The API's Unix socket (created owner-only).
    #[arg(long)]
    api_sock: PathBuf,
    /// The VM's hybrid-vsock Unix socket (default: the API socket's path + ".vsock").
    #[arg(long)]
    vsock_uds: Option<PathBuf>,
    /// Where the guest's serial console goes (default: discarded).
    #[arg(long)]
    console_log: Option<PathBuf>,
    #[arg(long, default_value_t = envd_protocol::DEFAULT_VSOCK_PORT)]
    envd_port: u32,
    /// Development and tests: serve an envd already running without a VM (e.g. unix:PATH);
    /// exec, init and processes work, VM operations answer 409 no_vm.
    #[arg(long)]
    attach_envd: Option<Address>,
}

pub fn run(args: ServeArgs) -> anyhow::Result<i32> {
    let vsock_uds = args.vsock_uds.clone().unwrap_or_else(|| {
        let mut p = args.api_sock.clone().into_os_string();
        p.push(".vsock");
        PathBuf::from(p)
    });
    let state = api::new_state(api::ServeConfig {
        vsock_uds,
        console_log: args.console_log.clone(),
        envd_port: args.envd_port,
        attach_envd: args.attach_envd.clone(),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let listener = api::bind(&args.api_sock)?;
        eprintln!("host-agent: serving the API on {}", args.api_sock.display());
        let stop = async {
            use tokio::signal::unix::{signal, SignalKind};
            match (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) {
                (Ok(mut term), Ok(mut int)) => {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                }
                _ => std::future::pending::<()>().await,
            }
        };
        let served = api::serve(listener, state, stop).await;
        let _ = std::fs::remove_file(&args.api_sock);
        served
    })?;
    eprintln!("host-agent: API stopped");
    // The VM (if any) ends with the process.
    Ok(0)
}
