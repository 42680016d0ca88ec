//! `host-agent ctl --control-sock PATH <op>`: pause, resume, snapshot or ask the status of a
//! running sandbox.

use std::path::PathBuf;

use anyhow::bail;
use clap::{Args, Subcommand};
use host_agent::vmm::snapshot::SnapshotKind;

use crate::control::{self, ControlRequest};

#[derive(Args, Debug)]
pub struct CtlArgs {
    #[arg(long)]
    control_sock: PathBuf,
    #[command(subcommand)]
    op: CtlOp,
}

#[derive(Subcommand, Debug)]
enum CtlOp {
    Status,
    Pause,
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
}

fn call(args: &CtlArgs, req: ControlRequest) -> anyhow::Result<serde_json::Value> {
    let response = control::request(&args.control_sock, &req)?;
    if !response.ok {
        bail!(response.error.unwrap_or_else(|| "request failed".into()));
    }
    Ok(response.result.unwrap_or_default())
}

pub fn run(args: CtlArgs) -> anyhow::Result<i32> {
    let result = match &args.op {
        CtlOp::Status => call(&args, ControlRequest::Status)?,
        CtlOp::Pause => call(&args, ControlRequest::Pause)?,
        CtlOp::Resume => call(&args, ControlRequest::Resume)?,
        CtlOp::Snapshot {
            dir,
            template,
            keep_paused,
        } => {
            let status = call(&args, ControlRequest::Status)?;
            let was_paused = status.get("paused").and_then(|p| p.as_bool()) == Some(true);
            if !was_paused {
                call(&args, ControlRequest::Pause)?;
            }
            let kind = if *template {
                SnapshotKind::Template
            } else {
                SnapshotKind::Full
            };
            let taken = call(
                &args,
                ControlRequest::Snapshot {
                    dir: dir.clone(),
                    kind,
                },
            );
            if !was_paused && !keep_paused {
                call(&args, ControlRequest::Resume)?;
            }
            taken?
        }
    };
    println!("{result}");
    Ok(0)
}
