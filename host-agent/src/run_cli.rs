//! `host-agent run`: boot a template (or a kernel and initrd) in our VMM, wait for envd over vsock,
//! and run until the guest powers off.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use envd_protocol::{Address, Client};
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
    /// Serve pause/resume/snapshot on this Unix socket (see `host-agent ctl`).
    #[arg(long)]
    control_sock: Option<PathBuf>,
    /// Fail when envd has not answered this many milliseconds after start (0: do not wait for it).
    #[arg(long, default_value_t = 120_000)]
    envd_timeout_ms: u64,
}

/// What a template directory holds.
fn template_config(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf, String)> {
    let manifest = dir.join("template.json");
    let text = std::fs::read_to_string(&manifest)
        .with_context(|| format!("cannot read {}", manifest.display()))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", manifest.display()))?;
    let cmdline = json
        .get("cmdline")
        .and_then(|c| c.as_str())
        .with_context(|| format!("{} has no cmdline", manifest.display()))?
        .to_string();
    Ok((dir.join("vmlinuz"), dir.join("initrd"), cmdline))
}

pub fn run(args: RunArgs) -> anyhow::Result<i32> {
    let (kernel, initrd, cmdline) = match &args.template {
        Some(dir) => {
            let (k, i, c) = template_config(dir)?;
            (k, Some(i), args.cmdline.clone().unwrap_or(c))
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
    let vm = std::sync::Arc::new(vmm.start()?);
    eprintln!(
        "host-agent: VM built in {} ms, vCPUs running",
        build_time.as_millis()
    );
    if let Some(path) = &args.control_sock {
        let envd = args.vsock_uds.clone().map(|uds| Address::HybridVsock {
            uds,
            port: args.envd_port,
        });
        crate::control::serve(path, vm.clone(), envd)?;
    }

    if let (Some(uds), true) = (&args.vsock_uds, args.envd_timeout_ms > 0) {
        let addr = Address::HybridVsock {
            uds: uds.clone(),
            port: args.envd_port,
        };
        let deadline = Duration::from_millis(args.envd_timeout_ms);
        std::thread::Builder::new()
            .name("envd-wait".into())
            .spawn(move || wait_for_envd(addr, started, deadline))?;
    }

    crate::cli_util::wait_for_exit(&vm)
}

/// Waits for envd's health answer; a guest whose envd never answers ends the run with an error.
fn wait_for_envd(addr: Address, started: Instant, deadline: Duration) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("host-agent: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let ready = runtime.block_on(Client::connect_when_ready(
        &addr,
        Duration::from_secs(1),
        deadline,
    ));
    match ready {
        Ok(_) => eprintln!(
            "host-agent: envd ready {} ms after start",
            started.elapsed().as_millis()
        ),
        Err(e) => {
            eprintln!("host-agent: {e}; stopping the VM");
            std::process::exit(1);
        }
    }
}
