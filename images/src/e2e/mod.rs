//! The full-stack e2e runner (runs inside the test host, or natively on hardware KVM): for each VMM, boot
//! the template, wait for guest-envd, run the checks, shut the guest down, and report timings; then
//! host-agent's own checks (guest-initiated vsock, vCPU counts, bad input) and a side-by-side boot
//! comparison.

pub mod bootcmp;
pub mod checks;
pub mod client;
pub mod hostagent;
pub mod vmm;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::template::Manifest;
use client::EnvdCli;
use vmm::{Template, Vm, Vmm};

#[derive(Debug, Default, Clone)]
pub struct Summary {
    pub vmm: String,
    pub passed: usize,
    pub failed: usize,
    /// The template booted to envd ready (later boots of this VMM are only attempted if it did).
    pub booted: bool,
    pub boot_to_ready: Option<Duration>,
    pub first_exec: Option<Duration>,
    pub exec_median: Option<Duration>,
    pub shutdown: Option<Duration>,
}

impl Summary {
    pub fn new(vmm: &str) -> Self {
        Summary {
            vmm: vmm.to_string(),
            ..Default::default()
        }
    }

    pub fn pass(&mut self, out: &mut dyn Write, what: &str, detail: &str) {
        self.passed += 1;
        let detail = if detail.is_empty() {
            String::new()
        } else {
            format!(" ({detail})")
        };
        let _ = writeln!(out, "{}: PASS {what}{detail}", self.vmm);
        let _ = out.flush();
    }

    pub fn fail(&mut self, out: &mut dyn Write, what: &str, why: &str) {
        self.failed += 1;
        let _ = writeln!(out, "{}: FAIL {what}: {why}", self.vmm);
        let _ = out.flush();
    }

    /// Records one check's outcome.
    pub fn record(&mut self, out: &mut dyn Write, what: &str, r: Result<String, String>) {
        match r {
            Ok(detail) => self.pass(out, what, &detail),
            Err(why) => self.fail(out, what, &why),
        }
    }

    /// `NAME: N passed, M failed`
    pub fn line(&self) -> String {
        format!(
            "{}: {} passed, {} failed",
            self.vmm, self.passed, self.failed
        )
    }
}

pub struct Runner<'a> {
    pub template_dir: &'a Path,
    pub manifest: &'a Manifest,
    pub host_agent: PathBuf,
    pub work_dir: PathBuf,
    pub boot_deadline: Duration,
}

pub fn secs(d: Option<Duration>) -> String {
    d.map(|d| format!("{:.3}s", d.as_secs_f64()))
        .unwrap_or_else(|| "-".into())
}

/// A VM that answered health, and the client that reaches its envd.
pub struct Ready {
    pub vm: Vm,
    pub cli: EnvdCli,
    pub boot_to_ready: Duration,
    pub attempts: u32,
}

impl Runner<'_> {
    pub fn template(&self) -> Template<'_> {
        Template {
            dir: self.template_dir,
            manifest: self.manifest,
        }
    }

    pub fn cli(&self, address: &str) -> EnvdCli {
        EnvdCli {
            host_agent: self.host_agent.clone(),
            address: address.to_string(),
        }
    }

    /// Boots the template under `vmm` in `dir` and polls health until envd answers. On failure the error
    /// carries the console and VMM stderr tails.
    pub fn boot_ready(&self, vmm: &dyn Vmm, dir: &Path) -> Result<Ready, String> {
        let mut vm = vmm.boot(&self.template(), dir)?;
        let cli = self.cli(&vm.address);
        let deadline = vm.started + self.boot_deadline;
        let ready = {
            let mut alive = || vm.alive();
            cli.wait_ready(deadline, &mut alive)
        };
        match ready {
            Ok(attempts) => Ok(Ready {
                boot_to_ready: vm.started.elapsed(),
                vm,
                cli,
                attempts,
            }),
            Err(e) => {
                // Let a VMM that is exiting finish writing its message.
                let _ = vm.wait_exit(Duration::from_millis(500));
                Err(format!("{e}\n{}", vm.tails(vmm.name(), 30)))
            }
        }
    }

    /// Asks envd to power off and requires the VMM process to exit 0.
    pub fn shutdown(cli: &EnvdCli, vm: &mut Vm) -> Result<Duration, String> {
        let t = Instant::now();
        cli.shutdown(Duration::from_secs(30))
            .and_then(|o| o.ok())
            .and_then(|_| vm.wait_exit(Duration::from_secs(60)))
            .and_then(|st| {
                if st.success() {
                    Ok(t.elapsed())
                } else {
                    Err(format!("the VMM exited with {st}"))
                }
            })
    }

    /// Runs every check under `vmm`, printing one line per check; the caller prints [`Summary::line`].
    pub fn run(&self, vmm: &dyn Vmm, out: &mut dyn Write) -> Summary {
        let name = vmm.name();
        let mut s = Summary::new(name);
        let _ = std::fs::create_dir_all(&self.work_dir);
        let Ready {
            mut vm,
            cli,
            boot_to_ready,
            attempts,
        } = match self.boot_ready(vmm, &self.work_dir.join(name)) {
            Ok(r) => r,
            Err(e) => {
                s.fail(out, "envd ready", &e);
                return s;
            }
        };
        s.booted = true;
        s.boot_to_ready = Some(boot_to_ready);
        s.pass(
            out,
            "envd ready",
            &format!("{}, {attempts} health attempts", secs(s.boot_to_ready)),
        );
        // One exec's cost: the first, and the median of five more.
        let mut times = Vec::new();
        for _ in 0..6 {
            let t = Instant::now();
            match cli
                .exec(&[], &["true"], Duration::from_secs(30))
                .and_then(|o| o.ok())
            {
                Ok(_) => times.push(t.elapsed()),
                Err(e) => {
                    s.fail(out, "exec true", &e);
                    break;
                }
            }
        }
        if !times.is_empty() {
            s.first_exec = Some(times[0]);
            let mut rest = times[1..].to_vec();
            rest.sort();
            s.exec_median = rest.get(rest.len() / 2).copied();
        }
        let ctx = checks::Ctx {
            cli: &cli,
            manifest: self.manifest,
        };
        for (what, check) in checks::CHECKS {
            let t = Instant::now();
            let r = vm
                .alive()
                .and_then(|_| check(&ctx))
                .map(|_| format!("{:.2}s", t.elapsed().as_secs_f64()));
            s.record(out, what, r);
        }
        for (what, check) in vmm.live_checks() {
            let t = Instant::now();
            let r = vm
                .alive()
                .and_then(|_| check(&ctx, &vm))
                .map(|d| join_detail(&format!("{:.2}s", t.elapsed().as_secs_f64()), &d));
            s.record(out, what, r);
        }
        // Clean power-off on request: the VMM process exits 0.
        match Self::shutdown(&cli, &mut vm) {
            Ok(d) => {
                s.shutdown = Some(d);
                s.pass(out, "clean shutdown, VMM exits 0", &secs(s.shutdown));
            }
            Err(e) => s.fail(out, "clean shutdown, VMM exits 0", &e),
        }
        if s.failed > 0 {
            let _ = writeln!(out, "{}", vm.tails(name, 30));
        }
        let reported = reported_ready_ms(&vm.stderr_log)
            .map(|ms| format!(" (the VMM reports envd ready {ms} ms after start)"))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "{name}: timing: template boot to envd ready {}{reported}, first exec {}, exec median {}, shutdown {}",
            secs(s.boot_to_ready),
            secs(s.first_exec),
            secs(s.exec_median),
            secs(s.shutdown)
        );
        s
    }
}

fn join_detail(a: &str, b: &str) -> String {
    if b.is_empty() {
        a.to_string()
    } else {
        format!("{a}, {b}")
    }
}

/// `host-agent: envd ready N ms after start` in a host-agent stderr log.
pub fn reported_ready_ms(stderr_log: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(stderr_log).ok()?;
    parse_reported_ready(&text)
}

pub fn parse_reported_ready(text: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        l.split_once("envd ready ")?
            .1
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reported_ready() {
        let text = "host-agent: VM built in 12 ms, vCPUs running\nhost-agent: envd ready 3456 ms after start\n";
        assert_eq!(parse_reported_ready(text), Some(3456));
        assert_eq!(
            parse_reported_ready("host-agent: VM built in 12 ms\n"),
            None
        );
    }

    #[test]
    fn summary_counts() {
        let mut s = Summary::new("x");
        let mut out = Vec::new();
        s.record(&mut out, "a", Ok(String::new()));
        s.record(&mut out, "b", Err("why".into()));
        s.record(&mut out, "c", Ok("1s".into()));
        assert_eq!(s.line(), "x: 2 passed, 1 failed");
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "x: PASS a\nx: FAIL b: why\nx: PASS c (1s)\n"
        );
    }
}
