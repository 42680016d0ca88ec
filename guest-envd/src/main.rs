//! guest-envd: the daemon inside a sandbox VM. It takes `/init` (instance env, access token, default
//! user and workdir, timestamp) and starts processes with a layered environment, over vsock or a Unix
//! socket. It can run as the VM's init (PID 1).

mod config;
mod env;
mod init;
mod pid1;
mod process;
mod rpc;
mod users;

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use envd_protocol::Address;

use crate::config::Config;

#[derive(Parser, Debug)]
#[command(name = "guest-envd", version, about)]
struct Args {
    /// Where to listen: vsock:PORT or unix:PATH (default: the image config's, else vsock:49983).
    #[arg(long)]
    listen: Option<Address>,
    /// Image config (listen address, template env/user/workdir, modules to load).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Template env: a JSON object of strings (overrides the image config's template_env).
    #[arg(long)]
    template_env: Option<PathBuf>,
    /// Default user of the template (below /init's default user).
    #[arg(long)]
    template_user: Option<String>,
    /// Default workdir of the template (below /init's default workdir).
    #[arg(long)]
    template_workdir: Option<String>,
    /// Directory holding passwd and group.
    #[arg(long, default_value = "/etc")]
    etc_dir: PathBuf,
    /// Step the guest clock to init timestamps. On by default only when envd is PID 1: a test run on
    /// a host must never change the host's clock.
    #[arg(long)]
    set_clock: bool,
}

fn main() -> anyhow::Result<()> {
    let pid1 = pid1::is_pid1();
    if pid1 {
        // Before anything logs: /dev must exist for the console.
        pid1::mount_kernel_filesystems();
        pid1::ensure_console();
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ENVD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let args = Args::parse();

    let image_config_path = args
        .config
        .clone()
        .unwrap_or_else(|| PathBuf::from(config::IMAGE_CONFIG));
    let image = if args.config.is_some() || image_config_path.exists() {
        config::load_image_config(&image_config_path)?
    } else {
        config::ImageConfig::default()
    };
    let listen = match (args.listen, image.listen) {
        (Some(a), _) => a,
        (None, Some(s)) => s.parse().context("listen address in the image config")?,
        (None, None) => config::default_listen(),
    };
    let template_env = match &args.template_env {
        Some(path) => config::load_template_env(path)?,
        None => image.template_env,
    };
    let config = Config {
        listen,
        template_env,
        template_user: args.template_user.or(image.template_user),
        template_workdir: args.template_workdir.or(image.template_workdir),
        modules: image.modules,
        etc_dir: args.etc_dir,
        set_clock: args.set_clock || pid1,
        pid1,
    };

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let result = runtime.block_on(run(config));
    if pid1 {
        // init must never exit: the kernel would panic. Report and power off instead.
        tracing::error!(error = ?result, "envd stopped; powering off");
        pid1::power_off(false);
    }
    result
}

async fn run(config: Config) -> anyhow::Result<()> {
    let listener = listen_and_load_modules(&config)?;
    // On the happy path envd prints nothing while the guest boots: as PID 1 its stderr is the
    // serial console, where every byte traps to the VMM; the two info lines envd printed here cost
    // a boot ~120 ms of the guest's only vCPU in the nested harness. ENVD_LOG=debug shows them.
    tracing::debug!(
        listen = %config.listen,
        template_env_keys = config.template_env.len(),
        pid1 = config.pid1,
        version = envd_protocol::VERSION,
        "envd ready"
    );
    let envd = rpc::Envd::new(config).context("cannot start the process reaper")?;
    rpc::serve(listener, envd).await;
    Ok(())
}

/// Binds envd's listener and, as PID 1, loads the image's kernel modules, listening as soon as
/// the address family exists: AF_VSOCK comes with `vsock.ko`, early in the list, while the
/// transport that brings the device up (`vmw_vsock_virtio_transport.ko`) comes last. A listener
/// needs no transport, so the host's first connection, which reaches the guest the moment the
/// device comes up, finds envd listening instead of being refused and retried.
fn listen_and_load_modules(config: &Config) -> anyhow::Result<rpc::Listener> {
    let bind = || {
        rpc::Listener::bind(&config.listen)
            .with_context(|| format!("cannot listen on {}", config.listen))
    };
    if !config.pid1 {
        return bind();
    }
    let modules = &config.modules;
    // A Unix socket, or vsock built in or already loaded: listening works before any module. (Not
    // tried otherwise: an AF_VSOCK socket without the module only makes the kernel start a
    // usermode helper to ask for it, ~7 ms of the guest's boot for an EAFNOSUPPORT.)
    let family_ready =
        !matches!(config.listen, Address::Vsock { .. }) || pid1::vsock_family_loaded();
    let mut listener = family_ready.then(bind).and_then(Result::ok);
    let mut failed = 0;
    for module in modules {
        if pid1::load_module(module).is_err() {
            failed += 1;
        }
        if !family_ready && listener.is_none() && pid1::vsock_family_loaded() {
            listener = bind().ok();
        }
    }
    tracing::debug!(loaded = modules.len() - failed, failed, "kernel modules");
    listener.map_or_else(bind, Ok)
}
