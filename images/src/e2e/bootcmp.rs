//! Boot to envd ready, side by side in one run: QEMU and host-agent boot the same kernel and initrd a few
//! times each, interleaved (so that drift in the emulated host hits both alike). Readiness is probed the
//! same way for both: one `host-agent envd --wait-ms N health` process started right after the VMM, which
//! retries connect + health with at most ~100 ms between attempts. Its resolution depends on how a VMM's
//! vsock treats a connect before the guest driver is up (vhost-vsock: the attempt hangs until its 500 ms
//! timeout), so a second, VMM-neutral measure is taken too: when guest-envd's `envd ready` log line
//! shows up in the serial console log. Emulated timings are compared as ratios only.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use super::vmm::Vmm;
use super::{reported_ready_ms, Runner, Summary};

pub const RATIO_LABEL: &str = "boot_to_envd_ready_ratio host-agent/qemu";
pub const CONSOLE_RATIO_LABEL: &str = "boot_to_envd_console_ready_ratio host-agent/qemu";
/// What guest-envd logs to the console once it listens.
pub const CONSOLE_MARKER: &str = "envd ready";

/// One boot: VMM start to envd's first health answer, to envd's console line, and what the VMM itself
/// reported (host-agent).
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub ready: Duration,
    pub console: Option<Duration>,
    pub reported_ms: Option<u64>,
}

/// The ratios of the medians (host-agent/qemu): health answered, console line.
#[derive(Debug, Clone, Copy, Default)]
pub struct Ratios {
    pub ready: Option<f64>,
    pub console: Option<f64>,
}

/// Watches a growing log for a marker.
struct Watch {
    pos: u64,
    tail: String,
    seen: Option<Duration>,
}

impl Watch {
    fn new() -> Self {
        Watch {
            pos: 0,
            tail: String::new(),
            seen: None,
        }
    }

    fn poll(&mut self, path: &Path, since: Instant) {
        if self.seen.is_some() {
            return;
        }
        let chunk = crate::harness::read_new(path, &mut self.pos);
        if chunk.is_empty() {
            return;
        }
        self.tail.push_str(&String::from_utf8_lossy(&chunk));
        if self.tail.contains(CONSOLE_MARKER) {
            self.seen = Some(since.elapsed());
        }
        // Keep only enough to match a marker split across reads.
        if let Some(cut) = self.tail.len().checked_sub(CONSOLE_MARKER.len()) {
            let cut = (cut..self.tail.len())
                .find(|&i| self.tail.is_char_boundary(i))
                .unwrap_or(self.tail.len());
            self.tail.drain(..cut);
        }
    }
}

pub fn median(v: &[Duration]) -> Option<Duration> {
    let mut v = v.to_vec();
    v.sort();
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2),
    }
}

/// `b / a` of two medians.
pub fn ratio(a: Duration, b: Duration) -> Option<f64> {
    (a.as_secs_f64() > 0.0).then(|| b.as_secs_f64() / a.as_secs_f64())
}

/// Boots, waits for the first health answer, shuts down (the VMM must exit 0).
pub fn boot_once(runner: &Runner<'_>, vmm: &dyn Vmm, dir: &Path) -> Result<Timing, String> {
    let mut vm = vmm.boot(&runner.template(), dir)?;
    let cli = runner.cli(&vm.address);
    let mut probe = cli.start_health_wait(runner.boot_deadline)?;
    let deadline = vm.started + runner.boot_deadline + Duration::from_secs(5);
    let mut watch = Watch::new();
    let ready = loop {
        watch.poll(&vm.console_log, vm.started);
        if let Some(o) = probe.poll()? {
            if o.code == Some(0) {
                break vm.started.elapsed();
            }
            let _ = vm.wait_exit(Duration::from_millis(500));
            return Err(format!(
                "health probe exit {:?}: {}\n{}",
                o.code,
                String::from_utf8_lossy(&o.stderr).trim(),
                vm.tails(vmm.name(), 20)
            ));
        }
        if let Err(e) = vm.alive() {
            return Err(format!("{e}\n{}", vm.tails(vmm.name(), 20)));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "envd not ready within {:?}\n{}",
                runner.boot_deadline,
                vm.tails(vmm.name(), 20)
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    drop(probe);
    watch.poll(&vm.console_log, vm.started);
    Runner::shutdown(&cli, &mut vm).map_err(|e| format!("{e}\n{}", vm.tails(vmm.name(), 20)))?;
    Ok(Timing {
        ready,
        console: watch.seen,
        reported_ms: reported_ready_ms(&vm.stderr_log),
    })
}

fn list(v: &[Duration]) -> String {
    v.iter()
        .map(|d| format!("{:.3}", d.as_secs_f64()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Boots each VMM `boots` times, interleaved; records one check per VMM ("all boots reached envd ready
/// and powered off cleanly") and prints the medians. The `bool`: whether that VMM's template boot worked
/// (if not, its boots are not attempted). Returns host-agent/qemu of the medians when both have timings.
pub fn compare(
    runner: &Runner<'_>,
    vmms: [(&dyn Vmm, &mut Summary, bool); 2],
    boots: usize,
    out: &mut dyn Write,
) -> Ratios {
    let what = format!("boot to envd ready x{boots}, side by side");
    let mut times: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
    let mut consoles: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
    let mut errors: [Vec<String>; 2] = [Vec::new(), Vec::new()];
    for i in 0..boots {
        // Alternate which VMM goes first.
        let order = if i % 2 == 0 { [0, 1] } else { [1, 0] };
        for k in order {
            let (vmm, _, ok) = &vmms[k];
            // Not after a failed boot either: each failure can cost a whole boot deadline.
            if !ok || !errors[k].is_empty() {
                continue;
            }
            let name = vmm.name();
            let dir = runner.work_dir.join(format!("{name}-boot{}", i + 1));
            match boot_once(runner, *vmm, &dir) {
                Ok(t) => {
                    let reported = t
                        .reported_ms
                        .map(|ms| format!(" (the VMM reports {ms} ms)"))
                        .unwrap_or_default();
                    let _ = writeln!(
                        out,
                        "boot: {name} #{} envd ready {:.3}s, console line {}{reported}",
                        i + 1,
                        t.ready.as_secs_f64(),
                        super::secs(t.console)
                    );
                    times[k].push(t.ready);
                    consoles[k].extend(t.console);
                }
                Err(e) => {
                    let _ = writeln!(out, "boot: {name} #{} FAILED: {e}", i + 1);
                    errors[k].push(format!("#{}: {}", i + 1, e.lines().next().unwrap_or("")));
                }
            }
            let _ = out.flush();
        }
    }
    let mut medians = [None, None];
    let mut console_medians = [None, None];
    for (k, (vmm, s, ok)) in vmms.into_iter().enumerate() {
        medians[k] = median(&times[k]);
        console_medians[k] = median(&consoles[k]);
        let _ = writeln!(
            out,
            "boot: {} median envd ready {} of {} ({}), console line {} ({})",
            vmm.name(),
            super::secs(medians[k]),
            times[k].len(),
            list(&times[k]),
            super::secs(console_medians[k]),
            list(&consoles[k])
        );
        if !ok {
            s.fail(out, &what, "not attempted: the template did not boot");
        } else if errors[k].is_empty() {
            s.pass(out, &what, &format!("median {}", super::secs(medians[k])));
        } else {
            s.fail(out, &what, &errors[k].join("; "));
        }
    }
    let r = |m: [Option<Duration>; 2]| match m {
        [Some(q), Some(h)] => ratio(q, h),
        _ => None,
    };
    Ratios {
        ready: r(medians),
        console: r(console_medians),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_ratio() {
        let ms = Duration::from_millis;
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[ms(5), ms(1), ms(3)]), Some(ms(3)));
        assert_eq!(median(&[ms(4), ms(1), ms(3), ms(2)]), Some(ms(2500) / 1000));
        assert_eq!(ratio(ms(2000), ms(1000)), Some(0.5));
        assert_eq!(ratio(ms(0), ms(1000)), None);
    }

    #[test]
    fn watches_for_the_marker_across_reads() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        let mut f = std::fs::File::create(&log).unwrap();
        let t = Instant::now();
        let mut w = Watch::new();
        w.poll(&log, t);
        f.write_all("[ 1.0] boot ... INFO guest_envd: envd re".as_bytes())
            .unwrap();
        w.poll(&log, t);
        assert!(w.seen.is_none());
        f.write_all("ady listen=vsock:49983\n".as_bytes()).unwrap();
        w.poll(&log, t);
        assert!(w.seen.is_some());
        // Multi-byte text near a cut does not panic.
        let mut w = Watch::new();
        f.write_all("ééééé\n".as_bytes()).unwrap();
        w.poll(&log, t);
        assert!(w.seen.is_some());
    }
}
