//! `envd-snapshot-e2e`: full-stack snapshot/restore checks, run inside the test host
//! (`envd-harness run --include target/release/envd-snapshot-e2e:/usr/local/bin/envd-snapshot-e2e --
//! envd-snapshot-e2e`) or on a host with hardware KVM. Prints `PASS`/`FAIL` per check, the restore
//! timings, and `snapshot: N passed, M failed`; exits non-zero when anything failed.
//!
//! Inputs (flags, else env vars set by the harness, else defaults): the template directory
//! (`$ENVD_TEMPLATE_DIR`, `/template`), the host-agent CLI (`$ENVD_HOST_AGENT`,
//! `/usr/local/bin/host-agent`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use envd_images::snapshot_e2e::{self, checks::Run, sandbox::Env};

#[derive(Parser)]
#[command(about = "Full-stack snapshot/restore checks of host-agent")]
struct Cli {
    #[arg(long, env = "ENVD_TEMPLATE_DIR", default_value = "/template")]
    template: PathBuf,
    #[arg(
        long,
        env = "ENVD_HOST_AGENT",
        default_value = "/usr/local/bin/host-agent"
    )]
    host_agent: PathBuf,
    /// Where sockets, logs and snapshots go (default: a fresh directory under $TMPDIR).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// How many clones of the template snapshot run at once.
    #[arg(long, default_value_t = 10)]
    clones: usize,
    /// Deadline for the whole run, in seconds.
    #[arg(long, default_value_t = 420)]
    deadline: u64,
    /// Keep the work directory (snapshots, console logs) afterwards.
    #[arg(long)]
    keep: bool,
}

fn main() {
    let cli = Cli::parse();
    let deadline = Instant::now() + Duration::from_secs(cli.deadline);
    snapshot_e2e::start_watchdog(deadline, Duration::from_secs(30));
    let (work, made) = match cli.work_dir {
        Some(w) => (w, false),
        None => (
            std::env::temp_dir().join(format!("snap-e2e-{}", std::process::id())),
            true,
        ),
    };
    if let Err(e) = std::fs::create_dir_all(&work) {
        println!("FAIL setup: cannot create {}: {e}", work.display());
        println!("snapshot: 0 passed, 1 failed");
        std::process::exit(1);
    }
    for (what, p) in [("template", &cli.template), ("host-agent", &cli.host_agent)] {
        if !p.exists() {
            println!("FAIL setup: no {what} at {}", p.display());
            println!("snapshot: 0 passed, 1 failed");
            std::process::exit(1);
        }
    }
    println!(
        "envd-snapshot-e2e: host-agent {}, template {}, work dir {}, {} clones, deadline {} s",
        cli.host_agent.display(),
        cli.template.display(),
        work.display(),
        cli.clones,
        cli.deadline
    );
    let mut run = Run::new(
        Env {
            host_agent: cli.host_agent,
            template: cli.template,
            work: work.clone(),
            deadline,
        },
        cli.clones,
    );
    let ok = snapshot_e2e::run_all(&mut run);
    drop(run);
    if made && !cli.keep {
        let _ = std::fs::remove_dir_all(&work);
    }
    println!("{}", snapshot_e2e::summary_line());
    std::process::exit(if ok { 0 } else { 1 });
}
