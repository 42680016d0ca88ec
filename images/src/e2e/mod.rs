//! The full-stack e2e runner (runs inside the test host, or natively on hardware KVM): for each VMM, boot
//! the template, wait for guest-envd, run the checks, shut the guest down, and report timings.

pub mod checks;
pub mod client;
pub mod vmm;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::template::Manifest;
use client::EnvdCli;
use vmm::{Template, Vmm};

#[derive(Debug, Default, Clone)]
pub struct Summary {
    pub vmm: String,
    pub passed: usize,
    pub failed: usize,
    pub boot_to_ready: Option<Duration>,
    pub first_exec: Option<Duration>,
    pub exec_median: Option<Duration>,
    pub shutdown: Option<Duration>,
}

pub struct Runner<'a> {
    pub template_dir: &'a Path,
    pub manifest: &'a Manifest,
    pub host_agent: PathBuf,
    pub work_dir: PathBuf,
    pub boot_deadline: Duration,
}

fn secs(d: Option<Duration>) -> String {
    d.map(|d| format!("{:.3}s", d.as_secs_f64()))
        .unwrap_or_else(|| "-".into())
}

impl Runner<'_> {
    /// Runs every check under `vmm`, printing one line per check and a closing `NAME: N passed, M failed`.
    pub fn run(&self, vmm: &dyn Vmm, out: &mut dyn Write) -> Summary {
        let name = vmm.name();
        let mut s = Summary {
            vmm: name.to_string(),
            ..Default::default()
        };
        let fail = |s: &mut Summary, out: &mut dyn Write, what: &str, why: &str| {
            s.failed += 1;
            let _ = writeln!(out, "{name}: FAIL {what}: {why}");
        };
        let _ = std::fs::create_dir_all(&self.work_dir);
        let template = Template {
            dir: self.template_dir,
            manifest: self.manifest,
        };
        let mut vm = match vmm.boot(&template, &self.work_dir) {
            Ok(vm) => vm,
            Err(e) => {
                fail(&mut s, out, "boot", &e);
                let _ = writeln!(out, "{name}: {} passed, {} failed", s.passed, s.failed);
                return s;
            }
        };
        let cli = EnvdCli {
            host_agent: self.host_agent.clone(),
            address: vm.address.clone(),
        };
        let deadline = vm.started + self.boot_deadline;
        let ready = {
            let mut alive = || vm.alive();
            cli.wait_ready(deadline, &mut alive)
        };
        match ready {
            Ok(attempts) => {
                s.passed += 1;
                s.boot_to_ready = Some(vm.started.elapsed());
                let _ = writeln!(
                    out,
                    "{name}: PASS envd ready ({}, {attempts} health attempts)",
                    secs(s.boot_to_ready)
                );
            }
            Err(e) => {
                fail(&mut s, out, "envd ready", &e);
                let _ = writeln!(
                    out,
                    "{name}: console tail ({}):\n{}",
                    vm.console_log.display(),
                    crate::harness::tail(&vm.console_log, 30)
                );
                let _ = writeln!(out, "{name}: {} passed, {} failed", s.passed, s.failed);
                return s;
            }
        }
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
                    fail(&mut s, out, "exec true", &e);
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
            match vm.alive().and_then(|_| check(&ctx)) {
                Ok(()) => {
                    s.passed += 1;
                    let _ = writeln!(
                        out,
                        "{name}: PASS {what} ({:.2}s)",
                        t.elapsed().as_secs_f64()
                    );
                }
                Err(e) => fail(&mut s, out, what, &e),
            }
            let _ = out.flush();
        }
        // Clean power-off on request: the VMM process exits 0.
        let t = Instant::now();
        let result = cli
            .shutdown(Duration::from_secs(30))
            .and_then(|o| o.ok())
            .and_then(|_| vm.wait_exit(Duration::from_secs(60)))
            .and_then(|st| {
                if st.success() {
                    Ok(())
                } else {
                    Err(format!("the VMM exited with {st}"))
                }
            });
        match result {
            Ok(()) => {
                s.passed += 1;
                s.shutdown = Some(t.elapsed());
                let _ = writeln!(out, "{name}: PASS clean shutdown ({})", secs(s.shutdown));
            }
            Err(e) => fail(&mut s, out, "clean shutdown", &e),
        }
        if s.failed > 0 {
            let _ = writeln!(
                out,
                "{name}: console tail ({}):\n{}",
                vm.console_log.display(),
                crate::harness::tail(&vm.console_log, 30)
            );
        }
        let _ = writeln!(
            out,
            "{name}: timing: template boot to envd ready {}, first exec {}, exec median {}, shutdown {}",
            secs(s.boot_to_ready),
            secs(s.first_exec),
            secs(s.exec_median),
            secs(s.shutdown)
        );
        let _ = writeln!(out, "{name}: {} passed, {} failed", s.passed, s.failed);
        s
    }
}
