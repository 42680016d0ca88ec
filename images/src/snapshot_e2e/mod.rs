//! The full-stack snapshot/restore checks (`envd-snapshot-e2e`, run inside the test host): boot the
//! template with `host-agent run`, take a template snapshot, restore it many times at once with
//! different instance env, and check isolation, memory sharing, pause/resume, the guest clock, a
//! process surviving a full snapshot, damaged snapshots and the restore timings. Everything is driven
//! through the host-agent CLI, every wait has a deadline, and a watchdog ends the run (killing the
//! children it started) if the whole deadline passes.

pub mod checks;
pub mod files;
pub mod procs;
pub mod sandbox;

use std::sync::Mutex;
use std::time::{Duration, Instant};

static RESULTS: Mutex<Vec<(String, bool)>> = Mutex::new(Vec::new());

/// Prints `PASS name: detail` or `FAIL name: why` and keeps the result for the summary.
pub fn record(name: &str, r: Result<String, String>) -> bool {
    match &r {
        Ok(d) => println!("PASS {name}: {d}"),
        Err(e) => println!("FAIL {name}: {e}"),
    }
    RESULTS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((name.to_string(), r.is_ok()));
    r.is_ok()
}

/// (passed, failed) so far.
pub fn counts() -> (usize, usize) {
    let r = RESULTS.lock().unwrap_or_else(|e| e.into_inner());
    let passed = r.iter().filter(|(_, ok)| *ok).count();
    (passed, r.len() - passed)
}

pub fn summary_line() -> String {
    let (p, f) = counts();
    format!("snapshot: {p} passed, {f} failed")
}

/// Ends the process when `deadline` passes (plus `grace` for the checks, which are themselves
/// bounded by the deadline, to report): kills the registered children, prints the summary, exits 1.
pub fn start_watchdog(deadline: Instant, grace: Duration) {
    let end = deadline + grace;
    let _ = std::thread::Builder::new()
        .name("watchdog".into())
        .spawn(move || {
            loop {
                let left = end.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                std::thread::park_timeout(left);
            }
            procs::kill_registered();
            record(
                "deadline",
                Err("the run's deadline passed; children killed".into()),
            );
            println!("{}", summary_line());
            std::process::exit(1);
        });
}

/// Runs every check in order; returns whether all passed.
pub fn run_all(run: &mut checks::Run) -> bool {
    record("1_template_snapshot", run.template_snapshot());
    record("3_clones_env", run.clones_env());
    record("7_memory_sharing", run.memory_sharing());
    record("5_pause_resume_env", run.pause_resume_env());
    record(
        "template_snapshot_refused_after_init",
        run.template_snapshot_refused(),
    );
    record(
        "2_process_survives_full_snapshot",
        run.process_survives_full_snapshot(),
    );
    record(
        "2b_process_runs_on_in_snapshotted_sandbox",
        run.stream_after_resume
            .take()
            .unwrap_or_else(|| Err("skipped: check 2 did not get that far".into())),
    );
    record("6_clock_at_restore", run.clock_at_restore());
    record("connections_after_restore", run.connections_after_restore());
    record("6b_clock_minutes_later", run.clock_later());
    record("4_secret_not_in_template", run.secret_not_in_template());
    record("clean_shutdown", run.shutdown_all());
    record("9_timings", run.timings());
    record("10_working_set", run.working_set());
    for d in files::Damage::ALL {
        record(&format!("8_bad_input/{}", d.slug()), run.bad_input(d));
    }
    counts().1 == 0
}
