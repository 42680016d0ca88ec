//! What a machine's own work costs where it runs, apart from envd and vsock: the vm bench runs this
//! (built static) on the test host and, through envd, inside each VMM's guest, and bench-report
//! sets the results side by side.
//!
//! - process start: `PROGRAM` started and waited for with `Command::status`, `SPAWNS` times (in
//!   this static build std forks and execs: it takes `posix_spawn` only after looking glibc's
//!   version up at run time, which a static binary cannot), the same on every machine;
//! - CPUID: one instruction, `CPUID_ROUNDS` rounds of `CPUID_BATCH`. In a guest every CPUID is a VM
//!   exit, so its cost is the price of an exit there; glibc's start-up runs ~35 of them in every
//!   process, which is most of what makes a guest's process start slower than its host's under
//!   nested emulation.
//!
//! Usage: `guest-probe [PROGRAM]` (default `/bin/true`); prints one JSON object with the medians
//! and the process-start samples.

use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

use envd_benches::median;

const SPAWNS: usize = 60;
const CPUID_ROUNDS: usize = 20;
const CPUID_BATCH: u32 = 50;

fn main() -> ExitCode {
    let program = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "/bin/true".into());
    let mut spawn_ms = Vec::with_capacity(SPAWNS);
    for _ in 0..SPAWNS {
        let t = Instant::now();
        let status = Command::new(&program)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        match status {
            Ok(s) if s.success() => spawn_ms.push(t.elapsed().as_secs_f64() * 1e3),
            Ok(s) => {
                eprintln!("guest-probe: {program} ended with {s}");
                return ExitCode::FAILURE;
            }
            Err(e) => {
                eprintln!("guest-probe: cannot start {program}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let cpuid_us: Vec<f64> = (0..CPUID_ROUNDS)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..CPUID_BATCH {
                cpuid();
            }
            t.elapsed().as_secs_f64() * 1e6 / f64::from(CPUID_BATCH)
        })
        .collect();
    println!(
        "{{\"program\":{:?},\"spawn_ms_median\":{:.4},\"cpuid_us_median\":{:.4},\"spawn_ms\":[{}]}}",
        program,
        median(&spawn_ms).unwrap_or(f64::NAN),
        median(&cpuid_us).unwrap_or(f64::NAN),
        spawn_ms
            .iter()
            .map(|x| format!("{x:.3}"))
            .collect::<Vec<_>>()
            .join(",")
    );
    ExitCode::SUCCESS
}

/// One CPUID (the maximum extended leaf, which every x86-64 CPU has).
fn cpuid() {
    std::hint::black_box(std::arch::x86_64::__cpuid(0x8000_0000));
}
