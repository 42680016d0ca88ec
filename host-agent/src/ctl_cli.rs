//! `host-agent ctl --api-sock PATH <op>`: a thin client of one agent's orchestrator API (`host-agent
//! serve`, or `run` / `restore` with `--api-sock`). Each answer is printed as one line of JSON on
//! stdout; an API error is printed on stderr with its code and message, and the exit status is 1.
//! `exec` streams the process's output to ours and exits with its exit code.

use std::io::{Read, Write};
use std::path::PathBuf;

use anyhow::{bail, Context};
use base64::Engine;
use clap::{Args, Subcommand};
use host_agent::api::client::{ApiClient, EventStream};
use hyper::Method;
use serde_json::{json, Value};

use crate::cli_util::{ExecArgs, InitArgs};

#[derive(Args, Debug)]
pub struct CtlArgs {
    /// The agent's API socket.
    #[arg(long)]
    api_sock: PathBuf,
    #[command(subcommand)]
    op: CtlOp,
}

#[derive(Subcommand, Debug)]
enum CtlOp {
    /// The agent and its VM: `{"status": "ok", "vm": "none"|"running"|"paused"|"stopped", ...}`.
    Health,
    /// Counters and the last boot/restore timing breakdown.
    Metrics,
    /// Pause the VM.
    Pause,
    /// Resume the VM.
    Resume,
    /// Pause (if running), snapshot into DIR, and resume unless --keep-paused.
    Snapshot {
        #[arg(long)]
        dir: PathBuf,
        /// A template snapshot: refused once the sandbox received instance env or a token.
        #[arg(long)]
        template: bool,
        #[arg(long)]
        keep_paused: bool,
    },
    /// Run a command; stream its stdout and stderr to ours; exit with its exit code (128 + signal
    /// when a signal ended it).
    Exec(ExecArgs),
    /// Send /init: instance env (additive), unsets, a new access token, defaults.
    Init(InitArgs),
    /// List the processes envd started.
    Processes,
    /// Send a signal (a number or a name: TERM, SIGKILL, ...; default TERM) to a process.
    Signal {
        pid: u32,
        #[arg(default_value = "TERM", value_parser = parse_signal)]
        signal: i32,
        /// Signal the process's group.
        #[arg(long)]
        group: bool,
    },
    /// Power the guest off; the agent exits once it answered.
    Shutdown {
        /// How long the agent waits for the guest to power off.
        #[arg(long)]
        timeout_ms: Option<u64>,
    },
}

/// A signal number, or a name with or without `SIG`.
fn parse_signal(s: &str) -> Result<i32, String> {
    if let Ok(n) = s.parse::<i32>() {
        return if n > 0 && n < 65 {
            Ok(n)
        } else {
            Err(format!("no signal {n}"))
        };
    }
    let name = s.to_ascii_uppercase();
    let name = name.strip_prefix("SIG").unwrap_or(&name);
    let n = match name {
        "HUP" => libc::SIGHUP,
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "KILL" => libc::SIGKILL,
        "USR1" => libc::SIGUSR1,
        "USR2" => libc::SIGUSR2,
        "PIPE" => libc::SIGPIPE,
        "ALRM" => libc::SIGALRM,
        "TERM" => libc::SIGTERM,
        "CONT" => libc::SIGCONT,
        "STOP" => libc::SIGSTOP,
        "TSTP" => libc::SIGTSTP,
        "WINCH" => libc::SIGWINCH,
        _ => return Err(format!("unknown signal {s:?}")),
    };
    Ok(n)
}

/// The environment as a JSON object.
fn env_object(env: &[(String, String)]) -> Value {
    Value::Object(
        env.iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect(),
    )
}

/// One operation; the API's error (with its code) as the error.
async fn call(
    client: &ApiClient,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> anyhow::Result<Value> {
    let what = format!("{method} {path}");
    client.call(method, path, body.as_ref()).await.context(what)
}

pub fn run(args: CtlArgs) -> anyhow::Result<i32> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run_op(args))
}

async fn run_op(args: CtlArgs) -> anyhow::Result<i32> {
    let client = ApiClient::new(&args.api_sock);
    let answer = match args.op {
        CtlOp::Health => call(&client, Method::GET, "/health", None).await?,
        CtlOp::Metrics => call(&client, Method::GET, "/metrics", None).await?,
        CtlOp::Pause => call(&client, Method::POST, "/pause", None).await?,
        CtlOp::Resume => call(&client, Method::POST, "/resume", None).await?,
        CtlOp::Processes => call(&client, Method::GET, "/processes", None).await?,
        CtlOp::Snapshot {
            dir,
            template,
            keep_paused,
        } => snapshot(&client, dir, template, keep_paused).await?,
        CtlOp::Init(InitArgs {
            env,
            unset,
            access_token,
            default_user,
            default_workdir,
        }) => {
            let mut body = json!({"env": env_object(&env), "unset": unset});
            for (key, value) in [
                ("access_token", access_token),
                ("default_user", default_user),
                ("default_workdir", default_workdir),
            ] {
                if let Some(v) = value {
                    body[key] = json!(v);
                }
            }
            call(&client, Method::POST, "/init", Some(body)).await?
        }
        CtlOp::Signal { pid, signal, group } => {
            call(
                &client,
                Method::POST,
                &format!("/processes/{pid}/signal"),
                Some(json!({"signal": signal, "group": group})),
            )
            .await?
        }
        CtlOp::Shutdown { timeout_ms } => {
            let body = match timeout_ms {
                Some(ms) => json!({"timeout_ms": ms}),
                None => json!({}),
            };
            call(&client, Method::POST, "/shutdown", Some(body)).await?
        }
        CtlOp::Exec(ExecArgs {
            env,
            cwd,
            user,
            timeout_ms,
            tag,
            stdin,
            command,
        }) => {
            let Some((cmd, cmd_args)) = command.split_first() else {
                bail!("exec needs a command");
            };
            let mut body = json!({
                "cmd": cmd,
                "args": cmd_args,
                "env": env_object(&env),
                "timeout_ms": timeout_ms,
            });
            for (key, value) in [("cwd", cwd), ("user", user), ("tag", tag)] {
                if let Some(v) = value {
                    body[key] = json!(v);
                }
            }
            if stdin {
                let mut input = String::new();
                std::io::stdin()
                    .read_to_string(&mut input)
                    .context("reading stdin (the API takes it as UTF-8 text)")?;
                body["stdin"] = json!(input);
            }
            let events = client.exec(&body).await.context("POST /exec")?;
            return stream_output(events).await;
        }
    };
    println!("{answer}");
    Ok(0)
}

/// Pauses the VM unless it is paused, takes the snapshot, and resumes the VM if this paused it and
/// `keep_paused` is not set. The snapshot's answer is the result.
async fn snapshot(
    client: &ApiClient,
    dir: PathBuf,
    template: bool,
    keep_paused: bool,
) -> anyhow::Result<Value> {
    // The agent may run elsewhere: give it an absolute path.
    let dir = std::path::absolute(&dir)
        .with_context(|| format!("cannot make {} absolute", dir.display()))?;
    let health = call(client, Method::GET, "/health", None).await?;
    let mut paused_here = false;
    if health["vm"] != "paused" {
        match client.call(Method::POST, "/pause", None).await {
            Ok(_) => paused_here = true,
            // Paused by someone else in between.
            Err(e) if e.code() == Some("already_paused") => {}
            Err(e) => return Err(e).context("POST /pause"),
        }
    }
    let kind = if template { "template" } else { "full" };
    let taken = call(
        client,
        Method::POST,
        "/snapshot",
        Some(json!({"dir": dir, "kind": kind})),
    )
    .await;
    if paused_here && !keep_paused {
        let resumed = call(client, Method::POST, "/resume", None).await;
        match (&taken, resumed) {
            (Ok(_), Err(e)) => return Err(e.context("the snapshot was taken")),
            (Err(_), Err(e)) => eprintln!("host-agent: cannot resume the VM: {e:#}"),
            (_, Ok(_)) => {}
        }
    }
    taken
}

/// Writes a chunk to stdout or stderr as it comes.
fn write_chunk(to: &mut impl Write, event: &Value) -> anyhow::Result<()> {
    let bytes = match event["data_b64"].as_str() {
        Some(b64) => base64::engine::general_purpose::STANDARD
            .decode(b64)
            .context("an output chunk is not valid base64")?,
        None => event["data"]
            .as_str()
            .unwrap_or_default()
            .as_bytes()
            .to_vec(),
    };
    to.write_all(&bytes)?;
    to.flush()?;
    Ok(())
}

/// Copies the process's output to our stdout and stderr; returns its exit status.
async fn stream_output(mut events: EventStream) -> anyhow::Result<i32> {
    let mut pid = None;
    while let Some(event) = events.next().await.context("reading the exec stream")? {
        match event["type"].as_str() {
            Some("started") => pid = event["pid"].as_u64(),
            Some("stdout") | Some("pty") => write_chunk(&mut std::io::stdout().lock(), &event)?,
            Some("stderr") => write_chunk(&mut std::io::stderr().lock(), &event)?,
            Some("end") => {
                if event["timed_out"] == true {
                    eprintln!(
                        "host-agent: process {} killed: timeout passed",
                        pid.map_or_else(|| "?".to_string(), |p| p.to_string())
                    );
                }
                let status = event["status"]
                    .as_i64()
                    .and_then(|s| i32::try_from(s).ok())
                    .context("end event without a status")?;
                return Ok(status);
            }
            Some("error") => bail!(
                "exec stream: {}: {}",
                event["code"].as_str().unwrap_or("?"),
                event["message"].as_str().unwrap_or("")
            ),
            _ => tracing::debug!(%event, "unknown exec event"),
        }
    }
    bail!("the exec stream ended before the process did")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_by_number_or_name() {
        assert_eq!(parse_signal("9"), Ok(9));
        assert_eq!(parse_signal("KILL"), Ok(libc::SIGKILL));
        assert_eq!(parse_signal("sigterm"), Ok(libc::SIGTERM));
        assert_eq!(parse_signal("usr1"), Ok(libc::SIGUSR1));
        assert!(parse_signal("0").is_err());
        assert!(parse_signal("-3").is_err());
        assert!(parse_signal("NOPE").is_err());
    }
}
