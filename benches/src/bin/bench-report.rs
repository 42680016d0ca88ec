//! Prints the medians criterion measured (from `target/criterion/**/new/estimates.json`) and the
//! side-by-side ratios the project reports. Run after `cargo bench`; `make bench` does both.

use std::path::{Path, PathBuf};

use envd_benches::{median, BOOT_PAIRS_FILE, GUEST_PROBE_FILE};
use serde_json::Value;

/// (label, numerator, denominator): each a criterion "group/function" id.
const RATIOS: &[(&str, &str, &str)] = &[
    // The two VMMs' criterion groups, each measured in a stretch of its own. The headline boot
    // ratio comes from the interleaved pairs (below), where a slow stretch of the test host lands
    // on both VMMs: in one run host-agent's group took 3.57 s a boot while its ten interleaved
    // boots of the same run took 2.5-2.8 s.
    (
        "boot_to_first_exec_ratio_vs_qemu_separate_groups",
        "boot_to_first_exec/host-agent",
        "boot_to_first_exec/qemu",
    ),
    (
        "exec_roundtrip_vsock_ratio_vs_host_spawn",
        "exec_roundtrip/host-agent_vsock",
        "exec_roundtrip/host_spawn",
    ),
    (
        "exec_roundtrip_vsock_ratio_vs_qemu",
        "exec_roundtrip/host-agent_vsock",
        "exec_roundtrip/qemu_vhost_vsock",
    ),
    (
        "init_roundtrip_vsock_ratio_vs_qemu",
        "init_roundtrip/host-agent_vsock",
        "init_roundtrip/qemu_vhost_vsock",
    ),
    (
        "health_roundtrip_vsock_ratio_vs_qemu",
        "health_roundtrip/host-agent_vsock",
        "health_roundtrip/qemu_vhost_vsock",
    ),
    (
        "guest_spawn_loop_ratio_vs_test_host",
        "spawn_loop_in_shell/host-agent_vsock",
        "spawn_loop_in_shell/test_host",
    ),
    (
        "exec_roundtrip_ratio_vs_direct_spawn_piped",
        "exec_roundtrip/envd_unix",
        "exec_roundtrip/direct_spawn_piped",
    ),
    (
        "exec_roundtrip_ratio_vs_direct_spawn",
        "exec_roundtrip/envd_unix",
        "exec_roundtrip/direct_spawn",
    ),
];

/// Process starts in one `spawn_loop_in_shell` iteration (benches/benches/vm.rs's SPAWN_LOOP).
const SPAWN_LOOP_STARTS: f64 = 20.0;

fn median_ns(criterion_dir: &Path, id: &str) -> Option<f64> {
    let path = criterion_dir.join(id).join("new").join("estimates.json");
    let text = std::fs::read_to_string(path).ok()?;
    let json: Value = serde_json::from_str(&text).ok()?;
    json.get("median")?.get("point_estimate")?.as_f64()
}

fn main() {
    let criterion_dir = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/criterion"));
    let mut ids = Vec::new();
    collect_ids(&criterion_dir, &criterion_dir, &mut ids);
    ids.sort();
    if ids.is_empty() {
        eprintln!(
            "bench-report: no criterion results under {} (run cargo bench first)",
            criterion_dir.display()
        );
        std::process::exit(1);
    }
    println!("{:<45} {:>12}", "benchmark", "median");
    for id in &ids {
        if let Some(ns) = median_ns(&criterion_dir, id) {
            println!("{id:<45} {:>12}", human(ns));
        }
    }
    for (label, num, den) in RATIOS {
        if let (Some(n), Some(d)) = (
            median_ns(&criterion_dir, num),
            median_ns(&criterion_dir, den),
        ) {
            println!("{label}: {:.2}", n / d);
        }
    }
    // The guest's own process start (its 20-start shell loop, per start) as the anchor of an exec
    // round trip: what envd and vsock add, apart from what the emulated guest pays for any start.
    if let (Some(exec), Some(spawn_loop)) = (
        median_ns(&criterion_dir, "exec_roundtrip/host-agent_vsock"),
        median_ns(&criterion_dir, "spawn_loop_in_shell/host-agent_vsock"),
    ) {
        println!(
            "exec_roundtrip_vsock_ratio_vs_guest_spawn: {:.2}",
            exec / (spawn_loop / SPAWN_LOOP_STARTS)
        );
    }
    if let Some(probes) = guest_probes(&criterion_dir) {
        print_probes(
            &probes,
            median_ns(&criterion_dir, "exec_roundtrip/host-agent_vsock"),
        );
    }
    if let Some(ns) = median_ns(&criterion_dir, "init_roundtrip/envd_unix") {
        println!("init_roundtrip_us_median: {:.1}", ns / 1000.0);
    }
    // The three headline lines, last.
    let pairs = boot_pairs(&criterion_dir);
    if let Some(pairs) = &pairs {
        println!(
            "boot_to_first_exec interleaved ({} pairs): host-agent {:.1} ms, qemu {:.1} ms (medians)",
            pairs.agent.len().min(pairs.qemu.len()),
            pairs.agent_ms,
            pairs.qemu_ms
        );
        println!("  host-agent samples: {}", ms_list(&pairs.agent));
        println!("  qemu samples:       {}", ms_list(&pairs.qemu));
    }
    let restore = median_ns(&criterion_dir, "restore_to_first_exec/host-agent");
    if let Some(ns) = restore {
        println!("restore_to_first_exec_ms_median: {:.1}", ns / 1e6);
    }
    if let (Some(n), Some(d)) = (
        restore,
        median_ns(&criterion_dir, "restore_to_first_exec/qemu"),
    ) {
        println!("restore_to_first_exec_ratio_vs_qemu: {:.2}", n / d);
    }
    match &pairs {
        Some(pairs) => println!(
            "boot_to_first_exec_ratio_vs_qemu: {:.2}",
            pairs.agent_ms / pairs.qemu_ms
        ),
        // Only a VM run (its criterion boot group is there) is missing the pairs.
        None if median_ns(&criterion_dir, "boot_to_first_exec/host-agent").is_some() => println!(
            "boot_to_first_exec_ratio_vs_qemu: n/a (no {BOOT_PAIRS_FILE} in {})",
            criterion_dir.display()
        ),
        None => {}
    }
}

/// One machine's probe medians: a process start (spawn and wait) and one CPUID.
#[derive(Debug, PartialEq)]
struct Probe {
    spawn_ms: f64,
    cpuid_us: f64,
}

struct Probes {
    test_host: Probe,
    host_agent_guest: Probe,
    qemu_guest: Probe,
}

fn guest_probes(criterion_dir: &Path) -> Option<Probes> {
    let text = std::fs::read_to_string(criterion_dir.join(GUEST_PROBE_FILE)).ok()?;
    let json: Value = serde_json::from_str(&text).ok()?;
    let probe = |key: &str| -> Option<Probe> {
        let p = json.get(key)?;
        Some(Probe {
            spawn_ms: p.get("spawn_ms_median")?.as_f64()?,
            cpuid_us: p.get("cpuid_us_median")?.as_f64()?,
        })
    };
    Some(Probes {
        test_host: probe("test_host")?,
        host_agent_guest: probe("host_agent_guest")?,
        qemu_guest: probe("qemu_guest")?,
    })
}

/// The process-start floor of each machine, and an exec round trip against its guest's floor:
/// what no VMM or agent can go under, and what ours adds to it.
fn print_probes(p: &Probes, exec_roundtrip_ns: Option<f64>) {
    println!(
        "process start (guest-probe: spawn and wait for /bin/true), medians: test host {:.2} ms, host-agent's guest {:.2} ms, QEMU's guest {:.2} ms",
        p.test_host.spawn_ms, p.host_agent_guest.spawn_ms, p.qemu_guest.spawn_ms
    );
    println!(
        "one CPUID (a VM exit in a guest), medians: test host {:.2} µs, host-agent's guest {:.1} µs, QEMU's guest {:.1} µs",
        p.test_host.cpuid_us, p.host_agent_guest.cpuid_us, p.qemu_guest.cpuid_us
    );
    println!(
        "guest_process_start_ratio_vs_test_host: {:.2}",
        p.host_agent_guest.spawn_ms / p.test_host.spawn_ms
    );
    if let Some(ns) = exec_roundtrip_ns {
        println!(
            "exec_roundtrip_vsock_ratio_vs_guest_process_start: {:.2}",
            ns / 1e6 / p.host_agent_guest.spawn_ms
        );
    }
}

struct BootPairs {
    agent: Vec<f64>,
    qemu: Vec<f64>,
    agent_ms: f64,
    qemu_ms: f64,
}

/// The medians of the interleaved boot samples, when the file is there and well formed.
fn boot_pairs(criterion_dir: &Path) -> Option<BootPairs> {
    let text = std::fs::read_to_string(criterion_dir.join(BOOT_PAIRS_FILE)).ok()?;
    let json: Value = serde_json::from_str(&text).ok()?;
    let samples = |key: &str| -> Option<Vec<f64>> {
        json.get(key)?
            .as_array()?
            .iter()
            .map(Value::as_f64)
            .collect::<Option<Vec<f64>>>()
            .filter(|v| !v.is_empty())
    };
    let agent = samples("host_agent_ms")?;
    let qemu = samples("qemu_ms")?;
    Some(BootPairs {
        agent_ms: median(&agent)?,
        qemu_ms: median(&qemu)?,
        agent,
        qemu,
    })
}

/// Samples in the order taken, in whole milliseconds.
fn ms_list(v: &[f64]) -> String {
    v.iter()
        .map(|x| format!("{x:.0}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Every "group/function" directory holding a `new/estimates.json`.
fn collect_ids(root: &Path, dir: &Path, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if !path.is_dir() {
            continue;
        }
        if path.join("new").join("estimates.json").is_file() {
            if let Ok(rel) = path.strip_prefix(root) {
                out.push(rel.to_string_lossy().into_owned());
            }
        } else if path.file_name().is_some_and(|n| n != "report") {
            collect_ids(root, &path, out);
        }
    }
}

fn human(ns: f64) -> String {
    if ns >= 1e6 {
        format!("{:.3} ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{:.1} µs", ns / 1e3)
    } else {
        format!("{ns:.0} ns")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_probe_file_is_read_and_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(guest_probes(dir.path()).is_none());
        let path = dir.path().join(GUEST_PROBE_FILE);
        let machine = |spawn: f64, cpuid: f64| {
            format!(
                r#"{{"program":"/bin/true","spawn_ms_median":{spawn},"cpuid_us_median":{cpuid},"spawn_ms":[1.0]}}"#
            )
        };
        std::fs::write(
            &path,
            format!(
                r#"{{"test_host":{},"host_agent_guest":{},"qemu_guest":{}}}"#,
                machine(3.0, 0.2),
                machine(6.5, 105.0),
                machine(6.9, 104.0)
            ),
        )
        .expect("write");
        let p = guest_probes(dir.path()).expect("probes");
        assert_eq!(
            p.test_host,
            Probe {
                spawn_ms: 3.0,
                cpuid_us: 0.2
            }
        );
        assert_eq!(
            p.host_agent_guest,
            Probe {
                spawn_ms: 6.5,
                cpuid_us: 105.0
            }
        );
        assert_eq!(
            p.qemu_guest,
            Probe {
                spawn_ms: 6.9,
                cpuid_us: 104.0
            }
        );
        std::fs::write(
            &path,
            format!(
                r#"{{"test_host":{},"host_agent_guest":{}}}"#,
                machine(3.0, 0.2),
                machine(6.5, 105.0)
            ),
        )
        .expect("write");
        assert!(guest_probes(dir.path()).is_none(), "a machine missing");
    }

    #[test]
    fn boot_pairs_file_is_read_and_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(boot_pairs(dir.path()).is_none());
        let path = dir.path().join(BOOT_PAIRS_FILE);
        std::fs::write(
            &path,
            r#"{"pairs":3,"host_agent_ms":[30.0,10.0,20.0],"qemu_ms":[40.0,50.0,45.0]}"#,
        )
        .expect("write");
        let pairs = boot_pairs(dir.path()).expect("pairs");
        assert_eq!(
            (pairs.agent.len(), pairs.agent_ms, pairs.qemu_ms),
            (3, 20.0, 45.0)
        );
        assert_eq!(pairs.qemu, [40.0, 50.0, 45.0], "samples kept in order");
        std::fs::write(&path, r#"{"host_agent_ms":[1.0],"qemu_ms":["x"]}"#).expect("write");
        assert!(boot_pairs(dir.path()).is_none());
        std::fs::write(&path, r#"{"host_agent_ms":[],"qemu_ms":[1.0]}"#).expect("write");
        assert!(boot_pairs(dir.path()).is_none());
    }
}
