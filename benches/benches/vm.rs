//! VM-level benchmarks, side by side with QEMU in the same run: restore to first exec, boot to first
//! exec, restore only, exec and init round trips over vsock, and the physical-limit anchors (a KVM VM
//! with one configured vCPU and no guest work; a host spawn of `/bin/true`).
//!
//! They need real KVM and vhost-vsock: on this project's machines they run inside the nested test
//! host (`make bench` does that), where every timing is emulated and only ratios mean something.
//! Without `ENVD_VM_BENCH=1` (set by `make bench` inside the harness) this binary does nothing.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode};
use envd_benches::{BOOT_PAIRS_FILE, GUEST_PROBE_FILE};
use envd_protocol::{pb, Address, Client, Output, READY_ATTEMPT};

const GUEST_CID: u32 = 3;
const ENVD_PORT: u32 = 49983;
const DEADLINE: Duration = Duration::from_secs(300);

struct Setup {
    work: PathBuf,
    template: PathBuf,
    agent: PathBuf,
    qemu: PathBuf,
    cmdline: String,
    agent_snapshot: PathBuf,
    qemu_snapshot: PathBuf,
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn env_path(var: &str, default: &str) -> PathBuf {
    std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(default))
}

/// Polls until envd answers, then sends /init with one instance variable and runs `argv`.
async fn init_and_exec(addr: &Address, argv: &[&str]) -> Client {
    let client = Client::connect_when_ready(addr, READY_ATTEMPT, DEADLINE)
        .await
        .expect("envd ready");
    client
        .init(pb::InitRequest {
            env: [("SANDBOX_ID".to_string(), "bench".to_string())].into(),
            timestamp: Some(prost_types::Timestamp::from(std::time::SystemTime::now())),
            ..Default::default()
        })
        .await
        .expect("init");
    exec_ok(&client, argv).await;
    client
}

/// Runs `argv` through envd to its end, checks that it exited 0 and returns what it printed.
async fn exec_ok(client: &Client, argv: &[&str]) -> Output {
    let out = client
        .start(pb::StartRequest {
            cmd: argv[0].into(),
            args: argv[1..].iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
        .await
        .expect("start")
        .collect()
        .await
        .expect("end");
    assert_eq!(
        out.exit_status(),
        Some(0),
        "{argv:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn qemu_args(s: &Setup, console: &Path) -> Vec<String> {
    let t = &s.template;
    let mut a: Vec<String> = [
        "-enable-kvm",
        "-M",
        "pc",
        "-cpu",
        "host",
        "-smp",
        "1",
        "-m",
        "256",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ]
    .iter()
    .map(|x| x.to_string())
    .collect();
    a.extend([
        "-kernel".into(),
        t.join("vmlinuz").display().to_string(),
        "-initrd".into(),
        t.join("initrd").display().to_string(),
        "-append".into(),
        s.cmdline.clone(),
        "-serial".into(),
        format!("file:{}", console.display()),
        "-device".into(),
        format!("vhost-vsock-pci,guest-cid={GUEST_CID}"),
    ]);
    a
}

fn spawn(cmd: &mut Command) -> Child {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn")
}

fn stop(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Boots QEMU, waits for envd, migrates the running VM to a file (QEMU's fastest restore input).
fn qemu_snapshot(s: &Setup) {
    let qmp = s.work.join("qmp.sock");
    let _ = std::fs::remove_file(&qmp);
    let mut args = qemu_args(s, &s.work.join("qemu-template.log"));
    args.extend([
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", qmp.display()),
    ]);
    let child = spawn(Command::new(&s.qemu).args(&args));
    rt().block_on(async {
        Client::connect_when_ready(&QEMU_ENVD, READY_ATTEMPT, DEADLINE)
            .await
            .expect("qemu envd ready")
    });
    let stream = UnixStream::connect(&qmp).expect("qmp");
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut writer = stream;
    let mut line = String::new();
    reader.read_line(&mut line).expect("greeting");
    let mut qmp_cmd = |cmd: String| -> String {
        writer.write_all(cmd.as_bytes()).expect("qmp write");
        loop {
            line.clear();
            reader.read_line(&mut line).expect("qmp read");
            if line.contains("\"return\"") || line.contains("\"error\"") {
                return line.clone();
            }
        }
    };
    qmp_cmd("{\"execute\":\"qmp_capabilities\"}\n".into());
    let uri = format!("exec:cat > {}", s.qemu_snapshot.display());
    qmp_cmd(format!(
        "{{\"execute\":\"migrate\",\"arguments\":{{\"uri\":\"{uri}\"}}}}\n"
    ));
    let started = Instant::now();
    loop {
        let status = qmp_cmd("{\"execute\":\"query-migrate\"}\n".into());
        if status.contains("\"completed\"") {
            break;
        }
        assert!(
            !status.contains("\"failed\""),
            "QEMU migration failed: {status}"
        );
        assert!(
            started.elapsed() < DEADLINE,
            "QEMU migration did not finish"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    stop(child);
}

/// Boots host-agent, waits for envd, takes a template snapshot.
fn agent_snapshot(s: &Setup) {
    let uds = s.work.join("tpl.sock");
    let api = s.work.join("tpl.api");
    let child = spawn(Command::new(&s.agent).args([
        "run",
        "--template",
        &s.template.display().to_string(),
        "--vsock-uds",
        &uds.display().to_string(),
        "--api-sock",
        &api.display().to_string(),
    ]));
    let addr = Address::HybridVsock {
        uds,
        port: ENVD_PORT,
    };
    rt().block_on(async {
        Client::connect_when_ready(&addr, READY_ATTEMPT, DEADLINE)
            .await
            .expect("host-agent envd ready")
    });
    let status = Command::new(&s.agent)
        .args(["ctl", "--api-sock"])
        .arg(&api)
        .args(["snapshot", "--template", "--keep-paused", "--dir"])
        .arg(&s.agent_snapshot)
        .stdout(Stdio::null())
        .status()
        .expect("ctl");
    assert!(status.success());
    stop(child);
    record_working_set(s);
}

/// One restore that records the template's working set (`host-agent restore --record-working-set`),
/// as an operator does once per template: every measured restore then copies its busiest regions
/// into huge pages before the guest runs.
fn record_working_set(s: &Setup) {
    let mut child = spawn(
        Command::new(&s.agent)
            .args(["restore", "--snapshot"])
            .arg(&s.agent_snapshot)
            .arg("--vsock-uds")
            .arg(s.work.join("record.sock"))
            .args(["--record-working-set", "--env", "SANDBOX_ID=bench"])
            .args(["--", "/bin/true"]),
    );
    let said = stderr_until_ready(&mut child);
    stop(child);
    let recorded = said.iter().find(|l| l.contains("working set recorded"));
    eprintln!(
        "{}",
        recorded.expect("the recording restore did not record a working set")
    );
}

/// What a `host-agent restore` printed on stderr before `sandbox ready` (or before it exited).
fn stderr_until_ready(child: &mut Child) -> Vec<String> {
    let stderr = child.stderr.take().expect("stderr");
    let mut said = Vec::new();
    for line in BufReader::new(stderr).lines() {
        let line = line.expect("stderr line");
        if line.contains("sandbox ready") {
            break;
        }
        said.push(line);
    }
    said
}

fn setup() -> Option<Setup> {
    if std::env::var_os("ENVD_VM_BENCH").is_none() {
        eprintln!("vm benches skipped: run them with `make bench` (they need KVM and vhost-vsock)");
        return None;
    }
    let template = env_path("ENVD_TEMPLATE", "/template");
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(template.join("template.json")).expect("template.json"),
    )
    .expect("template.json");
    let work = std::env::temp_dir().join("envd-vm-bench");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).expect("work dir");
    let s = Setup {
        agent: env_path("HOST_AGENT", "/usr/local/bin/host-agent"),
        qemu: env_path("ENVD_QEMU", "qemu-system-x86_64"),
        cmdline: manifest["cmdline"].as_str().expect("cmdline").to_string(),
        agent_snapshot: work.join("agent-snap"),
        qemu_snapshot: work.join("qemu.snap"),
        template,
        work,
    };
    agent_snapshot(&s);
    qemu_snapshot(&s);
    Some(s)
}

/// One host-agent restore to the end of the first `/bin/true`, measured from launch; returns the
/// duration and host-agent's own timings.
fn agent_restore_once(s: &Setup, i: u64) -> (Duration, serde_json::Value) {
    let uds = s.work.join(format!("r{i}.sock"));
    let timings = s.work.join(format!("r{i}.json"));
    let started = Instant::now();
    let mut child = spawn(
        Command::new(&s.agent)
            .args(["restore", "--snapshot"])
            .arg(&s.agent_snapshot)
            .arg("--vsock-uds")
            .arg(&uds)
            .args(["--env", "SANDBOX_ID=bench", "--timings-json"])
            .arg(&timings)
            .args(["--", "/bin/true"]),
    );
    let said = stderr_until_ready(&mut child);
    let elapsed = started.elapsed();
    stop(child);
    // A restore that failed fast must not pass for a fast restore.
    let t: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&timings).unwrap_or_default())
            .unwrap_or_default();
    assert!(
        t["first_exec_end"].as_f64().is_some()
            && said
                .iter()
                .any(|l| l.contains("first command exited with 0")),
        "host-agent restore did not run its first command: {said:?}"
    );
    (elapsed, t)
}

/// QEMU restoring the template VM from its migration file.
fn qemu_restore_args(s: &Setup, console: &Path) -> Vec<String> {
    let mut args = qemu_args(s, console);
    args.extend([
        "-incoming".into(),
        format!("exec:cat {}", s.qemu_snapshot.display()),
    ]);
    args
}

/// Launches a VMM, waits for its envd, sends `/init` and runs the first `/bin/true`; the time from
/// launch to that command's end.
fn launch_to_first_exec(vmm: &mut Command, envd: &Address) -> Duration {
    let started = Instant::now();
    let child = spawn(vmm);
    rt().block_on(init_and_exec(envd, &["/bin/true"]));
    let elapsed = started.elapsed();
    stop(child);
    elapsed
}

/// QEMU's guest, through vhost-vsock.
const QEMU_ENVD: Address = Address::Vsock {
    cid: Some(GUEST_CID),
    port: ENVD_PORT,
};

fn qemu_restore_once(s: &Setup) -> Duration {
    let args = qemu_restore_args(s, &s.work.join("qemu-restore.log"));
    launch_to_first_exec(Command::new(&s.qemu).args(&args), &QEMU_ENVD)
}

/// One host-agent boot of the template to the end of the first `/bin/true`, measured from launch.
fn agent_boot_once(s: &Setup, i: u64) -> Duration {
    let uds = s.work.join(format!("b{i}.sock"));
    let mut vmm = Command::new(&s.agent);
    vmm.args(["run", "--envd-timeout-ms", "0", "--template"])
        .arg(&s.template)
        .arg("--vsock-uds")
        .arg(&uds);
    let envd = Address::HybridVsock {
        uds,
        port: ENVD_PORT,
    };
    launch_to_first_exec(&mut vmm, &envd)
}

/// The same with QEMU booting the template's kernel and initrd.
fn qemu_boot_once(s: &Setup) -> Duration {
    let args = qemu_args(s, &s.work.join("qemu-boot.log"));
    launch_to_first_exec(Command::new(&s.qemu).args(args), &QEMU_ENVD)
}

/// Prints the test host's counters that decide whether a VM's memory gets huge pages (a boot
/// whose memory falls back to 4 KiB pages pays a nested-paging fault per page it touches), so
/// that a slow stretch of boots can be told apart from a slow VMM.
fn print_memory_counters(when: &str) {
    let vmstat = std::fs::read_to_string("/proc/vmstat").unwrap_or_default();
    let counter = |key: &str| {
        vmstat
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(' '))
            .unwrap_or("?")
            .to_string()
    };
    // Free blocks of 2 MiB (order 9) and 4 MiB (order 10), in 2 MiB units, over all zones.
    let buddy = std::fs::read_to_string("/proc/buddyinfo").unwrap_or_default();
    let free_2m: u64 = buddy
        .lines()
        .filter_map(|l| {
            let counts: Vec<u64> = l
                .split_whitespace()
                .filter_map(|w| w.parse().ok())
                .collect();
            // "Node 0, zone Normal c0 .. c10": the node number parses too.
            let orders = counts.get(1..)?;
            Some(orders.get(9).copied().unwrap_or(0) + 2 * orders.get(10).copied().unwrap_or(0))
        })
        .sum();
    eprintln!(
        "test-host memory {when}: thp_fault_alloc {} thp_fault_fallback {} compact_stall {} \
         compact_fail {} free_2m_blocks {free_2m}",
        counter("thp_fault_alloc"),
        counter("thp_fault_fallback"),
        counter("compact_stall"),
        counter("compact_fail"),
    );
}

/// The name of the interleaved boot comparison, as a bench filter selects it (its results go to
/// [`BOOT_PAIRS_FILE`]).
const BOOT_PAIRS: &str = "boot_to_first_exec_pairs";
const BOOT_PAIR_COUNT: usize = 10;

/// Whether criterion's command-line filter (the first free argument, as `vm-bench --bench NAME`
/// passes it) selects `name`; no filter selects everything.
fn filter_selects(name: &str) -> bool {
    std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .is_none_or(|filter| name.contains(filter.as_str()))
}

/// Boots the two VMMs alternately, `pairs` times each (which one goes first alternates too), and
/// writes every sample to `boot_to_first_exec_pairs.json` in the criterion directory, from which
/// bench-report prints `boot_to_first_exec_ratio_vs_qemu`. The criterion group above measures each
/// VMM in a stretch of its own, so a slow minute of the test host lands on one side only; here it
/// lands on both.
fn boot_pairs(s: &Setup, pairs: usize) {
    // One boot of each first, not counted: the criterion group before already warmed both, but a
    // filtered run may start here.
    agent_boot_once(s, 9000);
    qemu_boot_once(s);
    let mut agent = Vec::with_capacity(pairs);
    let mut qemu = Vec::with_capacity(pairs);
    for i in 0..pairs {
        if i.is_multiple_of(2) {
            agent.push(agent_boot_once(s, 9001 + i as u64));
            qemu.push(qemu_boot_once(s));
        } else {
            qemu.push(qemu_boot_once(s));
            agent.push(agent_boot_once(s, 9001 + i as u64));
        }
    }
    let ms = |v: &[Duration]| {
        v.iter()
            .map(|d| d.as_secs_f64() * 1000.0)
            .collect::<Vec<_>>()
    };
    let report = serde_json::json!({
        "pairs": pairs,
        "host_agent_ms": ms(&agent),
        "qemu_ms": ms(&qemu),
    });
    let path = write_for_report(BOOT_PAIRS_FILE, &report);
    eprintln!("{BOOT_PAIRS}: {pairs} pairs written to {}", path.display());
}

/// Writes `report` as `file` in the criterion directory, where bench-report reads it.
fn write_for_report(file: &str, report: &serde_json::Value) -> PathBuf {
    let dir = env_path("CRITERION_HOME", "target/criterion");
    let path = dir.join(file);
    if let Err(e) =
        std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, report.to_string()))
    {
        panic!("cannot write {}: {e}", path.display());
    }
    path
}

fn vm_benches(c: &mut Criterion) {
    let Some(s) = setup() else { return };
    print_memory_counters("before the restore groups");
    let mut restore = c.benchmark_group("restore_to_first_exec");
    restore.sample_size(10).sampling_mode(SamplingMode::Flat);
    restore.bench_function("host-agent", |b| {
        b.iter_custom(|iters| (0..iters).map(|i| agent_restore_once(&s, i).0).sum())
    });
    restore.bench_function("qemu", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| qemu_restore_once(&s)).sum())
    });
    restore.finish();

    let mut only = c.benchmark_group("restore_only");
    only.sample_size(10).sampling_mode(SamplingMode::Flat);
    only.bench_function("host-agent", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|i| {
                    let (_, t) = agent_restore_once(&s, 1000 + i);
                    Duration::from_secs_f64(t["vcpus_running"].as_f64().unwrap_or(0.0) / 1000.0)
                })
                .sum()
        })
    });
    only.finish();

    print_memory_counters("before the boot groups");
    let mut boot = c.benchmark_group("boot_to_first_exec");
    boot.sample_size(10).sampling_mode(SamplingMode::Flat);
    boot.bench_function("host-agent", |b| {
        b.iter_custom(|iters| (0..iters).map(|i| agent_boot_once(&s, i)).sum())
    });
    boot.bench_function("qemu", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| qemu_boot_once(&s)).sum())
    });
    boot.finish();
    print_memory_counters("after the boot groups");
    if filter_selects(BOOT_PAIRS) {
        boot_pairs(&s, BOOT_PAIR_COUNT);
        print_memory_counters("after the interleaved boots");
    }

    // Round trips in one running sandbox of each VMM (both restored from their snapshots), beside a
    // host spawn of /bin/true.
    let runtime = rt();
    // The test host's probe first, while no VM runs beside it.
    let probes = filter_selects(GUEST_PROBE_FILE);
    let test_host_probe = probes.then(test_host_probe);
    let uds = s.work.join("rt.sock");
    let sandbox = spawn(
        Command::new(&s.agent)
            .args(["restore", "--snapshot"])
            .arg(&s.agent_snapshot)
            .arg("--vsock-uds")
            .arg(&uds),
    );
    let addr = Address::HybridVsock {
        uds,
        port: ENVD_PORT,
    };
    let client = runtime.block_on(init_and_exec(&addr, &["/bin/true"]));
    roundtrip_benches(c, "host-agent_vsock", &runtime, &client);
    let agent_probe = probes.then(|| runtime.block_on(guest_probe(&client)));
    drop(client);
    stop(sandbox);

    let qemu =
        spawn(Command::new(&s.qemu).args(qemu_restore_args(&s, &s.work.join("qemu-rt.log"))));
    let client = runtime.block_on(init_and_exec(&QEMU_ENVD, &["/bin/true"]));
    roundtrip_benches(c, "qemu_vhost_vsock", &runtime, &client);
    let qemu_probe = probes.then(|| runtime.block_on(guest_probe(&client)));
    drop(client);
    stop(qemu);
    if let (Some(test_host), Some(agent), Some(qemu)) = (test_host_probe, agent_probe, qemu_probe) {
        write_probes(test_host, agent, qemu);
    }

    let mut spawn_group = c.benchmark_group("exec_roundtrip");
    spawn_group.bench_function("host_spawn", |b| {
        b.iter(|| {
            let st = Command::new("/bin/true").status().expect("spawn");
            assert!(st.success());
        })
    });
    spawn_group.finish();
    let mut loop_group = c.benchmark_group("spawn_loop_in_shell");
    loop_group.sample_size(10);
    loop_group.bench_function("test_host", |b| {
        b.iter(|| {
            let st = Command::new("sh")
                .args(["-c", SPAWN_LOOP])
                .status()
                .expect("spawn");
            assert!(st.success());
        })
    });
    loop_group.finish();

    // Last and small: under nested emulation each VM creation and teardown is slow.
    let mut anchor = c.benchmark_group("anchor");
    anchor.sample_size(10);
    anchor.bench_function("kvm_vm_with_one_vcpu", |b| {
        b.iter(|| host_agent::vmm::anchor::create_vm_with_vcpu().expect("kvm"))
    });
    anchor.finish();
}

/// The probe's path in the test host (`scripts/bench.sh` puts it there); each guest gets a copy
/// through envd, so the template and its snapshots stay what the other benchmarks measure.
const GUEST_PROBE: &str = "/usr/local/bin/guest-probe";
const GUEST_PROBE_IN_GUEST: &str = "/tmp/guest-probe";

/// Copies the guest probe into a sandbox through envd (a shell writing its stdin to the file) and
/// runs it there: the guest's own process start and CPUID cost.
async fn guest_probe(client: &Client) -> serde_json::Value {
    let binary = std::fs::read(GUEST_PROBE).expect("read the guest probe");
    let upload = client
        .start(pb::StartRequest {
            cmd: "sh".into(),
            args: vec![
                "-c".into(),
                format!("cat > {GUEST_PROBE_IN_GUEST} && chmod 755 {GUEST_PROBE_IN_GUEST}"),
            ],
            stdin: true,
            ..Default::default()
        })
        .await
        .expect("start the probe upload");
    client
        .stdin(pb::ProcessSelector::pid(upload.pid), &binary, true)
        .await
        .expect("send the guest probe");
    let copied = upload.collect().await.expect("probe upload");
    assert_eq!(copied.exit_status(), Some(0), "probe upload");
    let out = exec_ok(client, &[GUEST_PROBE_IN_GUEST]).await;
    serde_json::from_slice(&out.stdout).expect("guest probe output")
}

/// Runs the probe on the test host itself.
fn test_host_probe() -> serde_json::Value {
    let out = Command::new(GUEST_PROBE)
        .stderr(Stdio::inherit())
        .output()
        .expect("run the probe on the test host");
    assert!(out.status.success(), "probe on the test host failed");
    serde_json::from_slice(&out.stdout).expect("test host probe output")
}

/// Writes the three probes' results for bench-report.
fn write_probes(test_host: serde_json::Value, agent: serde_json::Value, qemu: serde_json::Value) {
    let report = serde_json::json!({
        "test_host": test_host,
        "host_agent_guest": agent,
        "qemu_guest": qemu,
    });
    write_for_report(GUEST_PROBE_FILE, &report);
}

/// Exec, init and health round trips over one connection to a running sandbox's envd.
fn roundtrip_benches(
    c: &mut Criterion,
    name: &str,
    runtime: &tokio::runtime::Runtime,
    client: &Client,
) {
    let mut exec = c.benchmark_group("exec_roundtrip");
    exec.bench_function(name, |b| {
        b.to_async(runtime).iter(|| async {
            exec_ok(client, &["/bin/true"]).await;
        })
    });
    exec.finish();
    let mut init = c.benchmark_group("init_roundtrip");
    init.bench_function(name, |b| {
        b.to_async(runtime).iter(|| async {
            client
                .init(pb::InitRequest {
                    env: [("K".to_string(), "v".to_string())].into(),
                    timestamp: Some(prost_types::Timestamp::from(std::time::SystemTime::now())),
                    ..Default::default()
                })
                .await
                .expect("init")
        })
    });
    init.finish();
    let mut health = c.benchmark_group("health_roundtrip");
    health.bench_function(name, |b| {
        b.to_async(runtime)
            .iter(|| async { client.health().await.expect("health") })
    });
    health.finish();
    // The same shell loop as on the test host, run by the guest: the guest's own cost of starting
    // processes, apart from envd and vsock (one exec round trip spread over SPAWN_LOOP's starts).
    let mut loop_group = c.benchmark_group("spawn_loop_in_shell");
    loop_group.sample_size(10);
    loop_group.bench_function(name, |b| {
        b.to_async(runtime).iter(|| async {
            exec_ok(client, &["sh", "-c", SPAWN_LOOP]).await;
        })
    });
    loop_group.finish();
}

/// 20 starts of /bin/true from a shell (busybox sh in the guest and in the test host).
const SPAWN_LOOP: &str = "i=0; while [ $i -lt 20 ]; do /bin/true; i=$((i+1)); done";

criterion_group!(benches, vm_benches);
criterion_main!(benches);
