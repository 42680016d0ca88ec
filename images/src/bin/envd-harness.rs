//! `envd-harness run [--timeout SECS] [--include HOST[:GUEST]]... -- CMD ARGS...`
//!
//! Boots the test host (Debian cloud kernel, KVM modules, QEMU, busybox, the files under test) under
//! QEMU TCG with a virtual EPYC CPU with SVM and nested paging, runs CMD inside, streams its output, and exits
//! with CMD's exit status. On a host with hardware KVM the command runs natively instead.
//!
//! Default includes (when they exist; `--no-default-includes` turns them off):
//! `<repo>/target/template` → `/template`; the static host-agent
//! (`target/x86_64-unknown-linux-gnu/release/host-agent`, else `target/release/host-agent`) →
//! `/usr/local/bin/host-agent`; `envd-e2e` next to this binary → `/usr/local/bin/envd-e2e`.
//! Exit status: CMD's; 124 when the deadline passed; 125 when the harness itself failed.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use envd_images::deb::DebCache;
use envd_images::harness::{self, HarnessError, Include, Mode, RunOptions};
use envd_images::paths;

#[derive(Parser)]
#[command(
    about = "Run a command inside the nested-KVM test host (QEMU TCG), or natively on hardware KVM"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Boot the test host and run CMD inside; exits with CMD's status.
    Run {
        /// Total deadline in seconds (boot + command); QEMU is killed when it passes.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        /// HOST_PATH[:GUEST_PATH] to copy into the test host (files or directories; dynamically linked
        /// executables bring their shared libraries). Without GUEST_PATH the file keeps its absolute host path.
        #[arg(long = "include")]
        includes: Vec<String>,
        /// Template directory to include at /template (default: <repo>/target/template if present).
        #[arg(long)]
        template: Option<PathBuf>,
        /// host-agent binary to include at /usr/local/bin/host-agent.
        #[arg(long)]
        host_agent: Option<PathBuf>,
        #[arg(long)]
        no_default_includes: bool,
        /// auto (native when hardware KVM is present), nested, or native.
        #[arg(long, value_enum, default_value = "auto")]
        mode: ModeArg,
        /// Outer VM memory in MiB.
        #[arg(long, default_value_t = 2048)]
        memory: u32,
        /// Extra test host kernel arguments (e.g. `loglevel=7` to see its boot in console.log).
        #[arg(long)]
        append: Option<String>,
        /// Emulate the test host's CPUs on one host thread (QEMU `-accel tcg,thread=single`)
        /// instead of one thread per CPU.
        #[arg(long)]
        single_thread_tcg: bool,
        /// The test host's CPU count. One by default: with two, QEMU 7.2's emulated SVM sometimes
        /// takes a cross-CPU interrupt (a reschedule IPI) in the test host's KVM right after VMRUN,
        /// before the host's state is back, and the test host kernel dies of a stack overflow in
        /// `__svm_vcpu_run` (seen in its console.log; earlier also as a guest reset or a hung test
        /// host). That is the emulator under the test host; with one CPU there are no such IPIs.
        #[arg(long, default_value_t = 1)]
        smp: u32,
        /// Seconds the test host may print nothing before the watchdog writes its state to
        /// stall-N.txt and sends it an NMI; still silent as long again, the run counts as stalled
        /// (0: no watchdog). Checks inside print well within this; only a hung test host stays
        /// silent that long (criterion benches can: `make bench` passes a longer one).
        #[arg(long, default_value_t = 180)]
        stall_secs: u64,
        /// How many times a stalled run starts again in a fresh test host.
        #[arg(long, default_value_t = 1)]
        stall_retries: u32,
        #[arg(required = true, last = true)]
        command: Vec<String>,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ModeArg {
    Auto,
    Nested,
    Native,
}

fn default_includes(template: Option<PathBuf>, host_agent: Option<PathBuf>) -> Vec<Include> {
    let root = paths::repo_root();
    let mut out = Vec::new();
    let template = template.or_else(|| Some(root.join("target/template")).filter(|p| p.is_dir()));
    if let Some(t) = template {
        out.push(Include {
            host: t,
            guest: harness::GUEST_TEMPLATE_DIR.into(),
        });
    }
    let host_agent = host_agent.or_else(|| {
        [
            "target/x86_64-unknown-linux-gnu/release/host-agent",
            "target/release/host-agent",
        ]
        .iter()
        .map(|p| root.join(p))
        .find(|p| p.is_file())
    });
    if let Some(h) = host_agent {
        out.push(Include {
            host: h,
            guest: harness::GUEST_HOST_AGENT.into(),
        });
    }
    // Built beside this binary: the e2e runner, and the serial-port tool the test host's init uses.
    for name in ["envd-e2e", "envd-serial-polling"] {
        if let Some(bin) = std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(|d| d.join(name)))
            .filter(|p| p.is_file())
        {
            out.push(Include {
                host: bin,
                guest: format!("/usr/local/bin/{name}"),
            });
        }
    }
    out
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let Cmd::Run {
        timeout,
        includes,
        template,
        host_agent,
        no_default_includes,
        mode,
        memory,
        append,
        single_thread_tcg,
        smp,
        stall_secs,
        stall_retries,
        command,
    } = Cli::parse().cmd;
    let mut incs = Vec::new();
    if !no_default_includes {
        incs = default_includes(template, host_agent);
    }
    for spec in &includes {
        match harness::parse_include(spec) {
            Ok(i) => {
                incs.retain(|x: &Include| x.guest != i.guest);
                incs.push(i)
            }
            Err(e) => {
                eprintln!("envd-harness: {e}");
                std::process::exit(125);
            }
        }
    }
    for i in &incs {
        tracing::info!("include {} -> {}", i.host.display(), i.guest);
    }
    let runs_dir = std::env::var_os("ENVD_HARNESS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| paths::repo_root().join("target/envd-harness"));
    harness::prune_runs(&runs_dir, 8);
    let work_dir = runs_dir.join(format!("run-{}", std::process::id()));
    let opts = RunOptions {
        timeout: Duration::from_secs(timeout),
        includes: incs,
        command,
        mode: match mode {
            ModeArg::Auto => Mode::Auto,
            ModeArg::Nested => Mode::Nested,
            ModeArg::Native => Mode::Native,
        },
        work_dir,
        qemu: None,
        memory_mib: memory,
        extra_cmdline: append,
        single_thread_tcg,
        smp,
        stall_after: (stall_secs > 0).then(|| Duration::from_secs(stall_secs)),
        stall_retries,
    };
    let cache = DebCache::new(&paths::cache_dir());
    let mut stdout = std::io::stdout();
    match harness::run(&opts, &cache, &mut stdout) {
        Ok(r) => {
            let f = |x: Option<f64>| x.map(|v| format!("{v:.2}s")).unwrap_or_else(|| "-".into());
            if r.native {
                eprintln!(
                    "envd-harness: native (hardware KVM); command {}, exit {}",
                    f(r.command_secs),
                    r.exit_code
                );
            } else {
                eprintln!(
                    "envd-harness: prepare {:.2}s, test host boot {} (guest uptime {}), command {}, total {:.2}s, exit {}",
                    r.prepare_secs,
                    f(r.boot_secs),
                    f(r.guest_uptime_at_ready),
                    f(r.command_secs),
                    r.total_secs,
                    r.exit_code
                );
            }
            std::process::exit(r.exit_code);
        }
        Err(e) => {
            eprintln!("envd-harness: {e}");
            std::process::exit(if matches!(e, HarnessError::Timeout { .. }) {
                124
            } else {
                125
            });
        }
    }
}
