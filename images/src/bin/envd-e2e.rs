//! `envd-e2e`: the full-stack checks, run inside the test host (`envd-harness run -- envd-e2e`) or on a
//! host with hardware KVM. For each available VMM (`qemu`, `host-agent`): boot the template, wait for
//! guest-envd, run the checks, power off; then host-agent's own checks (guest-initiated vsock, 2 and 4
//! vCPUs unless `--vcpu-boots` says otherwise, bad input) and, when both VMMs ran, a side-by-side boot comparison (`--boots` each). Prints
//! `VMM: N passed, M failed` per VMM, the line `boot_to_envd_ready_ratio host-agent/qemu: X`, and exits
//! non-zero if anything failed.
//!
//! Inputs (flags, else env vars set by the harness, else defaults): the template directory
//! (`$ENVD_TEMPLATE_DIR`, `/template`), the host-agent CLI (`$ENVD_HOST_AGENT`, `host-agent` on PATH), QEMU
//! (`$ENVD_QEMU`, `qemu-system-x86_64` on PATH).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use envd_images::e2e::vmm::{HostAgent, Qemu, Vmm};
use envd_images::e2e::{bootcmp, hostagent, Runner, Summary};
use envd_images::{paths, template};

#[derive(Parser)]
#[command(about = "Full-stack envd checks against a template, per VMM")]
struct Cli {
    #[arg(long, env = "ENVD_TEMPLATE_DIR", default_value = "/template")]
    template: PathBuf,
    #[arg(long, env = "ENVD_HOST_AGENT")]
    host_agent: Option<PathBuf>,
    #[arg(long, env = "ENVD_QEMU")]
    qemu: Option<PathBuf>,
    /// Only these VMMs (default: all available). Known: qemu, host-agent.
    #[arg(long = "vmm")]
    vmms: Vec<String>,
    /// vsock CID for the guest.
    #[arg(long, default_value_t = 3)]
    cid: u32,
    /// Deadline for the template to boot until envd answers health.
    #[arg(long, default_value_t = 120)]
    boot_timeout: u64,
    #[arg(long, env = "ENVD_E2E_DIR")]
    work_dir: Option<PathBuf>,
    /// Boots per VMM for the side-by-side boot comparison (0: skip it).
    #[arg(long, default_value_t = 3)]
    boots: usize,
    /// host-agent boots with these vCPU counts (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "2,4")]
    vcpu_boots: Vec<u32>,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let manifest = template::read_manifest(&cli.template).with_context(|| {
        format!(
            "no readable {} in {} (build the template first)",
            template::MANIFEST,
            cli.template.display()
        )
    })?;
    let host_agent = cli
        .host_agent
        .or_else(|| paths::which("host-agent"))
        .context("host-agent CLI not found (set ENVD_HOST_AGENT or put it on PATH)")?;
    let qemu = cli
        .qemu
        .or_else(|| paths::which("qemu-system-x86_64"))
        .unwrap_or_else(|| "qemu-system-x86_64".into());
    let qemu = Qemu {
        binary: qemu,
        cid: cli.cid,
        memory_mib: 256,
    };
    let ha = HostAgent {
        binary: host_agent.clone(),
        vcpus: 1,
        memory_mib: 256,
    };
    let work_dir = cli
        .work_dir
        .unwrap_or_else(|| std::env::temp_dir().join(format!("envd-e2e-{}", std::process::id())));
    let runner = Runner {
        template_dir: &cli.template,
        manifest: &manifest,
        host_agent,
        work_dir,
        boot_deadline: Duration::from_secs(cli.boot_timeout),
    };
    let mut out = std::io::stdout();
    let all: [&dyn Vmm; 2] = [&qemu, &ha];
    // Per VMM: its summary, if it ran.
    let mut ran: Vec<Option<Summary>> = vec![None, None];
    for (k, vmm) in all.iter().enumerate() {
        if !cli.vmms.is_empty() && !cli.vmms.iter().any(|v| v == vmm.name()) {
            continue;
        }
        if let Some(why) = vmm.unavailable() {
            println!("{}: skipped: {why}", vmm.name());
            continue;
        }
        let mut s = runner.run(*vmm, &mut out);
        if k == 1 {
            let vcpu_boots = &cli.vcpu_boots;
            if s.booted {
                hostagent::vcpu_checks(&runner, &ha, vcpu_boots, &mut s, &mut out);
            } else if !vcpu_boots.is_empty() {
                s.fail(
                    &mut out,
                    "multi-vCPU boots",
                    "not attempted: the template did not boot",
                );
            }
            hostagent::extra_checks(&runner, &ha, &mut s, &mut out);
        }
        ran[k] = Some(s);
    }
    if ran.iter().all(Option::is_none) {
        bail!("no VMM could run");
    }
    // `Some(ratio)` once the comparison ran (the ratio itself `None` if a VMM had no good boot).
    let mut compared = None;
    if let ([Some(sq), Some(sh)], true) = (ran.as_mut_slice(), cli.boots > 0) {
        let (bq, bh) = (sq.booted, sh.booted);
        compared = Some(bootcmp::compare(
            &runner,
            [(&qemu, sq, bq), (&ha, sh, bh)],
            cli.boots,
            &mut out,
        ));
    }
    let (mut passed, mut failed) = (0, 0);
    for s in ran.iter().flatten() {
        println!("{}", s.line());
        passed += s.passed;
        failed += s.failed;
    }
    let label = bootcmp::RATIO_LABEL;
    match compared {
        Some(Some(r)) => println!("{label}: {r:.2}"),
        Some(None) => println!("{label}: n/a (a VMM has no successful boot)"),
        None => {}
    }
    println!("e2e: {passed} passed, {failed} failed");
    if failed > 0 {
        std::process::exit(1);
    }
    Ok(())
}
