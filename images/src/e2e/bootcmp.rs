//! Boot to envd ready, side by side in one run: QEMU and host-agent boot the same kernel and initrd a few
//! times each, interleaved (so that drift in the emulated host hits both alike). Readiness is probed the
//! same way for both: one `host-agent envd --wait-ms N health` process started right after the VMM, which
//! retries connect + health with at most ~100 ms between attempts. An attempt made before the guest's
//! vsock is up waits in either VMM until it is, and envd listens by then (it binds before its vsock
//! transport module brings the device up), so the first answer comes as soon as envd serves. (envd used
//! to log a console line when it listened, which gave a second measure; it prints nothing on the happy
//! path now: each console byte costs the guest a trap to the VMM.) Emulated timings are compared as
//! ratios only.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use super::vmm::Vmm;
use super::{reported_ready_ms, Runner, Summary};

pub const RATIO_LABEL: &str = "boot_to_envd_ready_ratio host-agent/qemu";
/// One boot: VMM start to envd's first health answer, and what the VMM itself reported (host-agent).
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub ready: Duration,
    pub reported_ms: Option<u64>,
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
    let ready = loop {
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
    Runner::shutdown(&cli, &mut vm).map_err(|e| format!("{e}\n{}", vm.tails(vmm.name(), 20)))?;
    Ok(Timing {
        ready,
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
) -> Option<f64> {
    let what = format!("boot to envd ready x{boots}, side by side");
    let mut times: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
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
                        "boot: {name} #{} envd ready {:.3}s{reported}",
                        i + 1,
                        t.ready.as_secs_f64(),
                    );
                    times[k].push(t.ready);
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
    for (k, (vmm, s, ok)) in vmms.into_iter().enumerate() {
        medians[k] = median(&times[k]);
        let _ = writeln!(
            out,
            "boot: {} median envd ready {} of {} ({})",
            vmm.name(),
            super::secs(medians[k]),
            times[k].len(),
            list(&times[k]),
        );
        if !ok {
            s.fail(out, &what, "not attempted: the template did not boot");
        } else if errors[k].is_empty() {
            s.pass(out, &what, &format!("median {}", super::secs(medians[k])));
        } else {
            s.fail(out, &what, &errors[k].join("; "));
        }
    }
    match medians {
        [Some(q), Some(h)] => ratio(q, h),
        _ => None,
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
}
