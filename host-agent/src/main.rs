//! host-agent: the host side of envd-rs: `run` boots a VM in our KVM VMM, `restore` starts one
//! from a snapshot, `serve` is the orchestrator API, `ctl` its client, `envd` talks to the envd
//! inside.

mod cli_util;
mod ctl_cli;
mod envd_cli;
mod restore_cli;
mod run_cli;
mod serve_cli;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "host-agent", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Talk to an envd: init, exec, list, signal, health, shutdown.
    Envd(envd_cli::EnvdArgs),
    /// Boot a template (or kernel + initrd) in the KVM VMM and run it until the guest powers off.
    Run(run_cli::RunArgs),
    /// Start a sandbox from a snapshot: restore, /init with instance env, serve until power-off.
    Restore(restore_cli::RestoreArgs),
    /// Drive an agent through its API socket: health, metrics, pause, resume, snapshot, exec,
    /// init, processes, signal, shutdown.
    Ctl(ctl_cli::CtlArgs),
    /// Serve the orchestrator API (HTTP/JSON on a Unix socket) for one sandbox.
    Serve(serve_cli::ServeArgs),
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HOST_AGENT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match Cli::parse().command {
        Command::Run(args) => run_cli::run(args),
        Command::Restore(args) => restore_cli::run(args),
        Command::Ctl(args) => ctl_cli::run(args),
        Command::Serve(args) => serve_cli::run(args),
        Command::Envd(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(envd_cli::run(args))),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("host-agent: {}", error_chain(&e));
            std::process::exit(1);
        }
    }
}

/// The error and its causes, skipping a cause whose text the message already carries (many
/// errors quote their source in their own message).
fn error_chain(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let part = cause.to_string();
        if text.contains(&part) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    text
}
