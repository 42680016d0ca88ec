//! Small pieces the subcommands share.

use host_agent::vmm::builder::{GuestExit, RunningVm};

/// Parses a `KEY=VALUE` argument.
pub fn parse_key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))
}

/// Waits for the guest to stop the VM and turns how it ended into the process exit code.
pub fn wait_for_exit(vm: &RunningVm) -> anyhow::Result<i32> {
    match vm.wait() {
        Ok(GuestExit::PowerOff) => {
            eprintln!("host-agent: guest powered off");
            Ok(0)
        }
        Ok(GuestExit::Reset) => {
            eprintln!("host-agent: guest reset the VM; stopping");
            Ok(0)
        }
        Err(e) => anyhow::bail!(e),
    }
}
