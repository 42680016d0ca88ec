//! `host-agent envd --connect ADDR [--token T] <command>`: a scriptable client of envd.
//!
//! `exec` streams the process's stdout and stderr to its own and exits with the process's exit code
//! (128 + signal when a signal ended it), so scripts can use it like the command itself.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use envd_protocol::pb::{self, process_event::Event};
use envd_protocol::{client::end_status, Address, Client, READY_ATTEMPT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Args, Debug)]
pub struct EnvdArgs {
    /// unix:PATH, vsock:CID:PORT or hvsock:UDS_PATH:PORT
    #[arg(long)]
    connect: Address,
    /// Access token for envd (once one is set).
    #[arg(long, env = "ENVD_TOKEN", hide_env_values = true, default_value = "")]
    token: String,
    /// Keep retrying the connection until envd answers, up to this many milliseconds.
    #[arg(long, default_value_t = 0)]
    wait_ms: u64,
    #[command(subcommand)]
    command: EnvdCommand,
}

#[derive(Subcommand, Debug)]
enum EnvdCommand {
    /// Exit 0 when envd answers; print its version.
    Health,
    /// Send /init: instance env (additive), unsets, token, defaults, timestamp.
    Init {
        #[command(flatten)]
        init: InitArgs,
        /// RFC 3339; defaults to now.
        #[arg(long)]
        timestamp: Option<String>,
    },
    /// Run a command and stream its output; exit with its exit code.
    Exec(ExecArgs),
    /// Attach to a running process by pid or tag and stream its output.
    Reattach {
        #[arg(long, conflicts_with = "tag", required_unless_present = "tag")]
        pid: Option<u32>,
        #[arg(long)]
        tag: Option<String>,
    },
    /// List the processes envd started.
    List,
    /// Send a signal to a process (or its group).
    Signal {
        #[arg(long, conflicts_with = "tag", required_unless_present = "tag")]
        pid: Option<u32>,
        #[arg(long)]
        tag: Option<String>,
        #[arg(long, default_value_t = 15)]
        signal: i32,
        #[arg(long)]
        group: bool,
    },
    /// Power the guest off (envd must be PID 1).
    Shutdown {
        #[arg(long)]
        reboot: bool,
    },
}

use crate::cli_util::{ExecArgs, InitArgs};

fn selector(pid: Option<u32>, tag: Option<String>) -> pb::ProcessSelector {
    match (pid, tag) {
        (Some(pid), _) => pb::ProcessSelector::pid(pid),
        (None, Some(tag)) => pb::ProcessSelector::tag(tag),
        (None, None) => pb::ProcessSelector::default(),
    }
}

pub async fn run(args: EnvdArgs) -> anyhow::Result<i32> {
    let client = if args.wait_ms > 0 {
        Client::connect_when_ready(
            &args.connect,
            READY_ATTEMPT,
            Duration::from_millis(args.wait_ms),
        )
        .await?
    } else {
        Client::connect(&args.connect).await?
    }
    .with_token(args.token);

    match args.command {
        EnvdCommand::Health => {
            let h = client.health().await?;
            println!(
                "envd {} pid {} initialized {}",
                h.version, h.pid, h.initialized
            );
            Ok(0)
        }
        EnvdCommand::Init {
            init:
                InitArgs {
                    env,
                    unset,
                    access_token,
                    default_user,
                    default_workdir,
                },
            timestamp,
        } => {
            let at = match timestamp {
                Some(t) => humantime::parse_rfc3339(&t)
                    .with_context(|| format!("bad --timestamp {t:?}"))?,
                None => SystemTime::now(),
            };
            let r = client
                .init(pb::InitRequest {
                    env: env.into_iter().collect::<HashMap<_, _>>(),
                    unset,
                    timestamp: Some(prost_types_timestamp(at)),
                    access_token,
                    default_user,
                    default_workdir,
                })
                .await?;
            println!("applied {} clock_stepped {}", r.applied, r.clock_stepped);
            Ok(0)
        }
        EnvdCommand::Exec(ExecArgs {
            env,
            cwd,
            user,
            timeout_ms,
            stdin,
            tag,
            command,
        }) => {
            let mut argv = command.into_iter();
            let cmd = argv.next().context("no command given")?;
            let process = client
                .start(pb::StartRequest {
                    cmd,
                    args: argv.collect(),
                    envs: env.into_iter().collect(),
                    cwd: cwd.unwrap_or_default(),
                    user: user.unwrap_or_default(),
                    stdin,
                    pty: None,
                    timeout_ms,
                    tag: tag.unwrap_or_default(),
                })
                .await?;
            if stdin {
                let pid = process.pid;
                let client = &client;
                let forward = async move {
                    let mut input = tokio::io::stdin();
                    let mut buf = vec![0u8; 64 << 10];
                    loop {
                        let n = input.read(&mut buf).await?;
                        client
                            .stdin(pb::ProcessSelector::pid(pid), &buf[..n], n == 0)
                            .await?;
                        if n == 0 {
                            return anyhow::Ok(());
                        }
                    }
                };
                let (forwarded, status) = tokio::join!(forward, stream_output(process));
                if let Err(e) = forwarded {
                    tracing::warn!(error = %e, "stdin forwarding stopped");
                }
                status
            } else {
                stream_output(process).await
            }
        }
        EnvdCommand::Reattach { pid, tag } => {
            let process = client.reattach(selector(pid, tag)).await?;
            stream_output(process).await
        }
        EnvdCommand::List => {
            for p in client.list().await? {
                println!(
                    "{}\t{}\t{}\t{} {}",
                    p.pid,
                    if p.exited { "exited" } else { "running" },
                    if p.tag.is_empty() { "-" } else { &p.tag },
                    p.cmd,
                    p.args.join(" ")
                );
            }
            Ok(0)
        }
        EnvdCommand::Signal {
            pid,
            tag,
            signal,
            group,
        } => {
            client.signal(selector(pid, tag), signal, group).await?;
            Ok(0)
        }
        EnvdCommand::Shutdown { reboot } => {
            client.shutdown(reboot).await?;
            Ok(0)
        }
    }
}

fn prost_types_timestamp(at: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(at)
}

/// Copies output to our stdout/stderr as it comes; returns the process's exit status.
async fn stream_output(mut process: envd_protocol::Process) -> anyhow::Result<i32> {
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    while let Some(event) = process.next_event().await {
        match event?.event {
            Some(Event::Data(data)) => match data.output {
                Some(pb::data::Output::Stdout(b)) | Some(pb::data::Output::Pty(b)) => {
                    stdout.write_all(&b).await?;
                    stdout.flush().await?;
                }
                Some(pb::data::Output::Stderr(b)) => {
                    stderr.write_all(&b).await?;
                    stderr.flush().await?;
                }
                None => {}
            },
            Some(Event::End(end)) => {
                if end.timed_out {
                    eprintln!("host-agent: process {} killed: timeout passed", process.pid);
                }
                return end_status(&end).context("end event without a status");
            }
            Some(Event::Started(_)) | None => {}
        }
    }
    bail!("connection closed before the process ended")
}
