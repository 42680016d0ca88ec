//! `host-agent run`: boot a template (or a kernel and initrd) in our VMM, wait for envd over vsock,
//! optionally serve the orchestrator API for the VM (`--api-sock`), and run until the guest powers
//! off.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use envd_protocol::{Address, Client, READY_ATTEMPT};
use host_agent::api;
use host_agent::template::TemplateBoot;
use host_agent::vmm::builder::{VmConfig, Vmm, VsockConfig};

#[derive(Args, Debug)]
pub struct RunArgs {
    /// A template directory (vmlinuz, initrd, template.json with the cmdline).
    #[arg(long, required_unless_present = "kernel")]
    template: Option<PathBuf>,
    /// A bzImage (instead of --template).
    #[arg(long, conflicts_with = "template")]
    kernel: Option<PathBuf>,
    #[arg(long, conflicts_with = "template")]
    initrd: Option<PathBuf>,
    /// Kernel command line (default: the template's).
    #[arg(long)]
    cmdline: Option<String>,
    #[arg(long, default_value_t = 256)]
    mem_mib: u64,
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// Host side of the hybrid vsock: host-initiated connections go to this Unix socket
    /// (`CONNECT <port>`), guest-initiated ones to `<PATH>_<port>`.
    #[arg(long)]
    vsock_uds: Option<PathBuf>,
    #[arg(long, default_value_t = 3)]
    guest_cid: u64,
    /// Where the serial console goes (default: discarded).
    #[arg(long)]
    console_log: Option<PathBuf>,
    /// envd's vsock port.
    #[arg(long, default_value_t = envd_protocol::DEFAULT_VSOCK_PORT)]
    envd_port: u32,
    /// Serve the orchestrator API (HTTP/JSON, as `host-agent serve` does) for this VM on this Unix
    /// socket (created owner-only, removed on exit); see `host-agent ctl`.
    #[arg(long, requires = "vsock_uds")]
    api_sock: Option<PathBuf>,
    /// Fail when envd has not answered this many milliseconds after start (0: do not wait for it).
    #[arg(long, default_value_t = 120_000)]
    envd_timeout_ms: u64,
}

pub fn run(args: RunArgs) -> anyhow::Result<i32> {
    if let Some(path) = &args.api_sock {
        api::check_not_in_use(path)?;
    }
    let (kernel, initrd, cmdline) = match &args.template {
        Some(dir) => {
            let t = TemplateBoot::read(dir)?;
            (
                t.kernel,
                Some(t.initrd),
                args.cmdline.clone().unwrap_or(t.cmdline),
            )
        }
        None => (
            args.kernel
                .clone()
                .context("--kernel or --template is required")?,
            args.initrd.clone(),
            args.cmdline
                .clone()
                .unwrap_or_else(|| "console=ttyS0 panic=-1 reboot=k".to_string()),
        ),
    };
    let config = VmConfig {
        kernel,
        initrd,
        cmdline,
        mem_mib: args.mem_mib,
        vcpus: args.vcpus,
        vsock: args.vsock_uds.clone().map(|uds_path| VsockConfig {
            guest_cid: args.guest_cid,
            uds_path,
        }),
        console_log: args.console_log.clone(),
    };
    let started = Instant::now();
    let vmm = Vmm::build(&config)?;
    let build_time = vmm.timings.last().map(|(_, d)| *d).unwrap_or_default();
    let timings = vmm.timings.clone();
    let vm = std::sync::Arc::new(vmm.start()?);
    let vcpus_running = started.elapsed();
    let steps: Vec<String> = timings
        .iter()
        .map(|(k, d)| format!("{k} {:.1}", d.as_secs_f64() * 1000.0))
        .collect();
    eprintln!(
        "host-agent: VM built in {} ms ({}), vCPUs running",
        build_time.as_millis(),
        steps.join(", ")
    );
    // The API takes the VM over (and is then its only waiter).
    let api = match (&args.api_sock, &args.vsock_uds) {
        (Some(path), Some(uds)) => {
            let state = api::new_state_with_vm(
                api::ServeConfig {
                    vsock_uds: uds.clone(),
                    console_log: args.console_log.clone(),
                    envd_port: args.envd_port,
                    attach_envd: None,
                },
                vm.clone(),
                Address::HybridVsock {
                    uds: uds.clone(),
                    port: args.envd_port,
                },
                None,
            );
            state.record_start(
                api::StartKind::Boot,
                vec![(
                    "vcpus_running".to_string(),
                    vcpus_running.as_secs_f64() * 1000.0,
                )],
            );
            Some((path.clone(), state))
        }
        _ => None,
    };

    if let (Some(uds), true) = (&args.vsock_uds, args.envd_timeout_ms > 0) {
        let addr = Address::HybridVsock {
            uds: uds.clone(),
            port: args.envd_port,
        };
        let deadline = Duration::from_millis(args.envd_timeout_ms);
        let api_sock = args.api_sock.clone();
        std::thread::Builder::new()
            .name("envd-wait".into())
            .spawn(move || wait_for_envd(addr, started, deadline, api_sock))?;
    }

    match api {
        Some((path, state)) => crate::cli_util::serve_api_until_exit(&path, state, || {}),
        None => crate::cli_util::wait_for_exit(&vm),
    }
}

/// Waits for envd's health answer; a guest whose envd never answers ends the run with an error
/// (removing the API socket, if any).
fn wait_for_envd(addr: Address, started: Instant, deadline: Duration, api_sock: Option<PathBuf>) {
    let fail = |message: String| -> ! {
        eprintln!("host-agent: {message}");
        if let Some(path) = &api_sock {
            let _ = std::fs::remove_file(path);
        }
        std::process::exit(1);
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => fail(format!("cannot start the async runtime: {e}")),
    };
    let ready = runtime.block_on(Client::connect_when_ready(&addr, READY_ATTEMPT, deadline));
    match ready {
        Ok(_) => eprintln!(
            "host-agent: envd ready {} ms after start",
            started.elapsed().as_millis()
        ),
        Err(e) => fail(format!("{e}; stopping the VM")),
    }
}
