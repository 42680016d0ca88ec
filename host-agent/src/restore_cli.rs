//! `host-agent restore`: start a sandbox from a snapshot: restore the VM, wait for envd, deliver the
//! instance `/init` (env, token, defaults, and a timestamp that steps the guest clock), optionally
//! run a first command, print the timing breakdown, then run (serving the orchestrator API for the
//! sandbox with `--api-sock`) until the guest powers off.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use clap::Args;
use envd_protocol::pb::{self, process_event::Event};
use envd_protocol::{Address, Client};
use host_agent::api;
use host_agent::vmm::builder::{RestoreConfig, Vmm};

#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// The snapshot directory (state, memory).
    #[arg(long)]
    snapshot: PathBuf,
    /// This sandbox's vsock Unix socket.
    #[arg(long)]
    vsock_uds: PathBuf,
    #[arg(long)]
    console_log: Option<PathBuf>,
    /// Once the sandbox is ready, serve the orchestrator API (HTTP/JSON, as `host-agent serve`
    /// does) for it on this Unix socket (created owner-only, removed on exit); see `host-agent ctl`.
    #[arg(long)]
    api_sock: Option<PathBuf>,
    /// Instance env for /init.
    #[arg(long = "env", value_parser = parse_key_value)]
    env: Vec<(String, String)>,
    #[arg(long, env = "ENVD_NEW_ACCESS_TOKEN", hide_env_values = true)]
    access_token: Option<String>,
    #[arg(long)]
    default_user: Option<String>,
    #[arg(long)]
    default_workdir: Option<String>,
    #[arg(long, default_value_t = envd_protocol::DEFAULT_VSOCK_PORT)]
    envd_port: u32,
    /// Give up when envd has not answered (and taken /init) this long after the restore began.
    #[arg(long, default_value_t = 60_000)]
    envd_timeout_ms: u64,
    /// Write the timing breakdown here as JSON.
    #[arg(long)]
    timings_json: Option<PathBuf>,
    /// Record this restore's working set into the snapshot directory once its first command has
    /// ended (or /init is done, without one): the 2 MiB regions of guest memory it wrote, which
    /// later restores copy into huge pages of their own before the guest runs. Restores without
    /// applying an existing one.
    #[arg(long)]
    record_working_set: bool,
    /// A first command to run once /init is done (its output is printed, its time measured).
    #[arg(last = true)]
    first_exec: Vec<String>,
}

use crate::cli_util::parse_key_value;

pub fn run(args: RestoreArgs) -> anyhow::Result<i32> {
    if let Some(path) = &args.api_sock {
        api::check_not_in_use(path)?;
    }
    let started = Instant::now();
    let vmm = Vmm::restore(&RestoreConfig {
        snapshot_dir: args.snapshot.clone(),
        vsock_uds: Some(args.vsock_uds.clone()),
        console_log: args.console_log.clone(),
        apply_working_set: !args.record_working_set,
    })?;
    let mut timings: Vec<(String, f64)> = vmm
        .timings
        .iter()
        .map(|(k, d)| (k.to_string(), d.as_secs_f64() * 1000.0))
        .collect();
    let vm = Arc::new(vmm.start()?);
    let mark = |timings: &mut Vec<(String, f64)>, name: &str| {
        timings.push((name.to_string(), started.elapsed().as_secs_f64() * 1000.0));
    };
    mark(&mut timings, "vcpus_running");

    let addr = Address::HybridVsock {
        uds: args.vsock_uds.clone(),
        port: args.envd_port,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let deadline = Duration::from_millis(args.envd_timeout_ms);
    let instance_init = !args.env.is_empty() || args.access_token.is_some();
    let first_exec = runtime.block_on(async {
        let client = Client::connect_when_ready(&addr, Duration::from_secs(1), deadline)
            .await
            .context("envd did not come back after the restore")?;
        mark(&mut timings, "envd_reachable");
        let request = pb::InitRequest {
            env: args.env.iter().cloned().collect::<HashMap<_, _>>(),
            unset: vec![],
            // One timestamp for every retry of this init episode.
            timestamp: Some(prost_types::Timestamp::from(SystemTime::now())),
            access_token: args.access_token.clone(),
            default_user: args.default_user.clone(),
            default_workdir: args.default_workdir.clone(),
        };
        let client = send_init(client, &addr, request, started, deadline).await?;
        if instance_init {
            vm.mark_instance_initialized();
        }
        mark(&mut timings, "init_done");
        let mut client = client;
        if let Some(token) = &args.access_token {
            client.set_token(token.clone());
        }
        if args.first_exec.is_empty() {
            return anyhow::Ok(None);
        }
        let status = first_exec(&client, &args.first_exec, started, &mut timings).await?;
        anyhow::Ok(Some(status))
    })?;
    // Nothing more runs on this runtime (the API, if any, has its own).
    drop(runtime);

    let line: Vec<String> = timings
        .iter()
        .map(|(k, ms)| format!("{k} {ms:.1}"))
        .collect();
    eprintln!(
        "host-agent: restore timings (ms since start): {}",
        line.join(", ")
    );
    if let Some(at) = timings.iter().find(|(k, _)| k == "first_exec_output") {
        eprintln!("restore_to_first_exec_ms: {:.1}", at.1);
    }
    if let Some(path) = &args.timings_json {
        let map: serde_json::Map<String, serde_json::Value> = timings
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::json!(v)))
            .collect();
        std::fs::write(path, serde_json::to_string_pretty(&map)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(status) = first_exec {
        eprintln!("host-agent: first command exited with {status}");
    }
    if args.record_working_set {
        let set = vm.record_working_set()?;
        set.save(&args.snapshot)?;
        let pages: u64 = set.regions.iter().map(|r| u64::from(r.written_pages)).sum();
        eprintln!(
            "host-agent: working set recorded: {} regions of 2 MiB ({pages} pages written)",
            set.regions.len()
        );
    }
    let Some(path) = &args.api_sock else {
        eprintln!("host-agent: sandbox ready");
        return crate::cli_util::wait_for_exit(&vm);
    };
    // The API takes the sandbox over, talking to envd with the token /init just set.
    let state = api::new_state_with_vm(
        api::ServeConfig {
            vsock_uds: args.vsock_uds.clone(),
            console_log: args.console_log.clone(),
            envd_port: args.envd_port,
            attach_envd: None,
        },
        vm,
        addr,
        args.access_token.clone(),
    );
    state.record_start(api::StartKind::Restore, timings);
    // "sandbox ready" once the socket is bound: scripts wait for that line, then use the API.
    crate::cli_util::serve_api_until_exit(path, state, || {
        eprintln!("host-agent: sandbox ready");
    })
}

/// Sends /init, reconnecting and retrying with the same request (same timestamp) until it is
/// answered or the deadline passes.
async fn send_init(
    mut client: Client,
    addr: &Address,
    request: pb::InitRequest,
    started: Instant,
    deadline: Duration,
) -> anyhow::Result<Client> {
    loop {
        match client.init(request.clone()).await {
            Ok(_) => return Ok(client),
            Err(e) if e.code().is_some() => return Err(e).context("envd refused /init"),
            Err(e) => {
                let left = deadline.saturating_sub(started.elapsed());
                if left.is_zero() {
                    return Err(e).context("/init was not answered before the deadline");
                }
                tracing::debug!(error = %e, "retrying /init");
                client = Client::connect_when_ready(addr, Duration::from_secs(1), left).await?;
            }
        }
    }
}

async fn first_exec(
    client: &Client,
    argv: &[String],
    started: Instant,
    timings: &mut Vec<(String, f64)>,
) -> anyhow::Result<i32> {
    let mut process = client
        .start(pb::StartRequest {
            cmd: argv[0].clone(),
            args: argv[1..].to_vec(),
            ..Default::default()
        })
        .await?;
    let mut first_output = true;
    while let Some(event) = process.next_event().await {
        match event?.event {
            Some(Event::Data(d)) => {
                if first_output {
                    timings.push((
                        "first_exec_output".into(),
                        started.elapsed().as_secs_f64() * 1000.0,
                    ));
                    first_output = false;
                }
                if let Some(pb::data::Output::Stdout(b) | pb::data::Output::Stderr(b)) = d.output {
                    print!("{}", String::from_utf8_lossy(&b));
                }
            }
            Some(Event::End(end)) => {
                if first_output {
                    timings.push((
                        "first_exec_output".into(),
                        started.elapsed().as_secs_f64() * 1000.0,
                    ));
                }
                timings.push((
                    "first_exec_end".into(),
                    started.elapsed().as_secs_f64() * 1000.0,
                ));
                return envd_protocol::client::end_status(&end).context("end without status");
            }
            _ => {}
        }
    }
    bail!("connection closed before the first command ended")
}
