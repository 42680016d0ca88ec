//! host-agent: the host side of envd-rs. Today: a client CLI for envd (`host-agent envd ...`);
//! the KVM VMM grows here next.

mod envd_cli;

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
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HOST_AGENT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
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
    let code = match cli.command {
        Command::Envd(args) => runtime.block_on(envd_cli::run(args)),
    };
    match code {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("host-agent: {e:#}");
            std::process::exit(1);
        }
    }
}
