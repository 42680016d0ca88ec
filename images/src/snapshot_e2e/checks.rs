//! The snapshot/restore checks, in the order they run (later ones use what earlier ones left: the
//! template snapshot, the running clones, the full snapshot and its restored sandbox).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::files::{self, Damage, Mem};
use super::procs::{self, POLL};
use super::sandbox::{strings, Env, Sandbox};

/// The restore timing keys, in the order they happen.
pub const TIMING_KEYS: &[&str] = &[
    "state_read",
    "vm_created",
    "memory_mapped",
    "state_set",
    "vcpus_running",
    "envd_reachable",
    "init_done",
    "first_exec_output",
    "first_exec_end",
];

const TICK_TAG: &str = "snap-ticker";
const TICK_LOOP: &str = "i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.2; done";
const ECHO_ENV: &str = "echo $CLONE_ID $SECRET $TEMPLATE_ONLY";

pub struct Clone {
    pub id: usize,
    pub secret: String,
    pub sb: Sandbox,
}

impl Clone {
    fn expected(&self) -> String {
        format!("{} {} from-image", self.id, self.secret)
    }
}

pub struct Run {
    pub env: Env,
    pub clones_wanted: usize,
    template_snap: Option<PathBuf>,
    /// (file name, content digest) of the template snapshot's files right after it was taken.
    template_digests: Vec<(String, String)>,
    boot_to_first_exec_ms: Option<f64>,
    secrets: Vec<String>,
    clones: Vec<Clone>,
    clone_restore_ms: Vec<f64>,
    full_snap: Option<PathBuf>,
    /// Host ports of clone 0's vsock connections still open when its full snapshot was taken.
    open_at_snapshot: Vec<u32>,
    /// Connections to the restored full snapshot refused during check 2 (then retried).
    restored_refusals: Vec<String>,
    /// Check 2b's result, found while check 2 runs.
    pub stream_after_resume: Option<Result<String, String>>,
    restored: Option<Sandbox>,
}

fn json_of(text: &str) -> Option<serde_json::Value> {
    text.lines()
        .rev()
        .find_map(|l| serde_json::from_str::<serde_json::Value>(l.trim()).ok())
}

/// host-agent's own message on stderr (its first `host-agent: ` line), or "".
fn agent_message(stderr: &str) -> String {
    stderr
        .lines()
        .find(|l| l.starts_with("host-agent: "))
        .unwrap_or("")
        .to_string()
}

/// The VM's state in `host-agent ctl health`'s answer ("running", "paused", ...; "?" when it has
/// none).
fn vm_state(stdout: &str) -> String {
    json_of(stdout)
        .as_ref()
        .and_then(|v| v.get("vm"))
        .and_then(|v| v.as_str())
        .unwrap_or("?")
        .to_string()
}

fn field(v: &Option<serde_json::Value>, key: &str) -> String {
    v.as_ref()
        .and_then(|v| v.get(key))
        .map(|x| x.to_string())
        .unwrap_or_else(|| "?".into())
}

/// Bytes of data (not holes) in a file.
fn data_bytes(path: &Path) -> u64 {
    std::fs::File::open(path)
        .and_then(|f| files::data_ranges(&f))
        .map(|r| r.iter().map(|(a, b)| b - a).sum())
        .unwrap_or(0)
}

fn ticks(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("tick "))
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}

/// The filter that makes restore log each host vsock connection (port opened, closed).
const VSOCK_DEBUG: &str = "warn,host_agent::vmm::devices::virtio::vsock=debug";

/// `text` without ANSI colour sequences.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// From a VSOCK_DEBUG log: the host ports of host-initiated connections, in order, and those not
/// closed yet.
fn vsock_ports(log: &str) -> (Vec<u32>, Vec<u32>) {
    let port = |l: &str| -> Option<u32> {
        let at = l.find("local_port=")? + "local_port=".len();
        l[at..]
            .split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    };
    let (mut opened, mut open) = (vec![], vec![]);
    for l in strip_ansi(log).lines() {
        if l.contains("host client connecting to the guest") {
            if let Some(p) = port(l) {
                opened.push(p);
                open.push(p);
            }
        } else if l.contains("vsock: connection closed") {
            if let Some(p) = port(l) {
                open.retain(|x| *x != p);
            }
        }
    }
    (opened, open)
}

/// Whether a guest `date +%s` reading `g` (whole seconds: the true time is in [g, g+1)) can be
/// within 1 s of a host time in [lo, hi].
fn within_1s(g: f64, lo: f64, hi: f64) -> bool {
    g + 1.0 > lo - 1.0 && g <= hi + 1.0
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    Some(s[s.len() / 2])
}

/// Processes (other than us) whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<String> {
    let me = std::process::id().to_string();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    dir.flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_string_lossy().into_owned();
            if !pid.chars().all(|c| c.is_ascii_digit()) || pid == me {
                return None;
            }
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            cmd.contains(needle)
                .then(|| format!("{pid}: {}", cmd.trim()))
        })
        .collect()
}

/// Whether `path` is on tmpfs.
fn on_tmpfs(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs with a valid C string and a zeroed out-struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    rc == 0 && st.f_type == libc::TMPFS_MAGIC
}

fn mem_available_mib() -> String {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| format!("{} MiB", kb / 1024))
        .unwrap_or_else(|| "?".into())
}

impl Run {
    pub fn new(env: Env, clones_wanted: usize) -> Run {
        Run {
            env,
            clones_wanted,
            template_snap: None,
            template_digests: vec![],
            boot_to_first_exec_ms: None,
            secrets: vec![],
            clones: vec![],
            clone_restore_ms: vec![],
            full_snap: None,
            open_at_snapshot: vec![],
            restored_refusals: vec![],
            stream_after_resume: None,
            restored: None,
        }
    }

    fn template(&self) -> Result<PathBuf, String> {
        self.template_snap
            .clone()
            .ok_or_else(|| "skipped: no template snapshot (check 1 failed)".into())
    }

    fn clone_at(&self, i: usize) -> Result<&Clone, String> {
        if self.clones.is_empty() {
            return Err("skipped: no running clone (check 3 failed)".into());
        }
        Ok(&self.clones[i % self.clones.len()])
    }

    /// Check 1: boot the template with `run`, measure boot to first exec, take a template snapshot, stop.
    pub fn template_snapshot(&mut self) -> Result<String, String> {
        let env = &self.env;
        let t0 = Instant::now();
        let mut vm = Sandbox::boot(env, "boot")?;
        let mut first = vm.envd_bg(
            "first exec",
            &["--wait-ms", "120000", "exec", "--", "echo", "first-exec"],
        )?;
        let deadline = env.until(Duration::from_secs(150));
        loop {
            if first.try_status().is_some() {
                break;
            }
            if let Some(st) = vm.proc.try_status() {
                return Err(format!(
                    "host-agent run exited ({st}) during boot; {}",
                    vm.tails()
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "no first exec output by the deadline; {}",
                    vm.tails()
                ));
            }
            std::thread::sleep(POLL);
        }
        let st = first.wait_exit(Instant::now() + Duration::from_secs(2));
        let first_at = first.first_stdout_at();
        if !st.is_some_and(|s| s.success()) || !first.stdout().contains("first-exec") {
            return Err(format!(
                "first exec failed ({st:?}): stdout {:?} stderr {}; {}",
                first.stdout(),
                procs::tail(&first.stderr(), 4),
                vm.tails()
            ));
        }
        let boot_ms = first_at
            .map(|t| t.duration_since(t0).as_secs_f64() * 1000.0)
            .ok_or("no first exec output time")?;
        self.boot_to_first_exec_ms = Some(boot_ms);
        println!("  boot_to_first_exec_ms: {boot_ms:.1}");

        let snap = env.work.join("template-snap");
        let out = vm.ctl(
            env,
            &[
                "snapshot",
                "--dir",
                &snap.display().to_string(),
                "--template",
            ],
            Duration::from_secs(180),
        );
        if !out.ok() {
            return Err(format!(
                "template snapshot failed: {}; {}",
                out.why(),
                vm.tails()
            ));
        }
        let report = json_of(&out.stdout);
        for f in ["state", "memory", "snapshot.json"] {
            if !snap.join(f).is_file() {
                return Err(format!("the snapshot has no {f} file"));
            }
        }
        let meta = std::fs::read_to_string(snap.join("snapshot.json")).unwrap_or_default();
        let meta: Option<serde_json::Value> = serde_json::from_str(&meta).ok();
        if field(&meta, "kind") != "\"template\"" {
            return Err(format!("snapshot.json kind is {}", field(&meta, "kind")));
        }
        let health = vm.ctl(env, &["health"], Duration::from_secs(20));
        if vm_state(&health.stdout) != "running" {
            return Err(format!(
                "after the snapshot the VM is not running: health {:?} {}",
                health.stdout.trim(),
                health.why()
            ));
        }
        let stopped = vm.shutdown(env, Duration::from_secs(60))?;
        let memory = snap.join("memory");
        let mem_len = std::fs::metadata(&memory).map(|m| m.len()).unwrap_or(0);
        let state_len = std::fs::metadata(snap.join("state"))
            .map(|m| m.len())
            .unwrap_or(0);
        let started = Instant::now();
        for f in ["state", "memory", "snapshot.json"] {
            let d =
                files::content_digest(&snap.join(f)).map_err(|e| format!("digest of {f}: {e}"))?;
            self.template_digests.push((f.to_string(), d));
        }
        println!(
            "  template snapshot digests taken in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        self.template_snap = Some(snap);
        Ok(format!(
            "boot_to_first_exec_ms {boot_ms:.0}; template snapshot memory_bytes_written {} took_ms {}; \
             memory file {:.0} MiB ({:.1} MiB data), state {state_len} bytes; run {stopped}",
            field(&report, "memory_bytes_written"),
            field(&report, "took_ms"),
            mib(mem_len),
            mib(data_bytes(&memory)),
        ))
    }

    /// Check 3: the template snapshot restored N times at once, each with its own instance env.
    pub fn clones_env(&mut self) -> Result<String, String> {
        let snap = self.template()?;
        let env = &self.env;
        let n = self.clones_wanted;
        let started = Instant::now();
        let mut pending = vec![];
        let mut failed: Vec<String> = vec![];
        for i in 0..n {
            let secret = format!("secret-{i}-{}", files::random_hex());
            self.secrets.push(secret.clone());
            let envs = vec![
                ("CLONE_ID".to_string(), i.to_string()),
                ("SECRET".to_string(), secret.clone()),
            ];
            match Sandbox::restore(
                env,
                &format!("clone{i}"),
                &snap,
                &envs,
                &["sh", "-c", &format!("{ECHO_ENV}; date +%s")],
                (i == 0).then_some(VSOCK_DEBUG),
                &[],
            ) {
                Ok(sb) => pending.push(Clone { id: i, secret, sb }),
                Err(e) => failed.push(format!("clone {i}: {e}")),
            }
        }
        let deadline = env.until(Duration::from_secs(300));
        let mut memory_related = true;
        let mut slowest = Duration::ZERO;
        for mut c in pending {
            match c.sb.wait_ready(deadline) {
                Ok(d) => {
                    slowest = slowest.max(d);
                    self.clones.push(c);
                }
                Err(e) => {
                    let text = format!("{} {}", c.sb.proc.stderr(), c.sb.console_text());
                    let st = c.sb.proc.try_status();
                    let oom = text.contains("Cannot allocate memory")
                        || text.to_lowercase().contains("out of memory")
                        || st.is_some_and(|s| {
                            std::os::unix::process::ExitStatusExt::signal(&s) == Some(9)
                        });
                    memory_related &= oom;
                    failed.push(format!("clone {}: {e}; {}", c.id, c.sb.tails()));
                }
            }
        }
        println!(
            "  {} of {n} clones ready {:.1} s after the first restore started (slowest {:.1} s); MemAvailable {}",
            self.clones.len(),
            started.elapsed().as_secs_f64(),
            slowest.as_secs_f64(),
            mem_available_mib()
        );
        println!(
            "  template memory file data with the clones running: {:.1} MiB",
            mib(data_bytes(&snap.join("memory")))
        );
        let mut wrong = vec![];
        for c in &self.clones {
            if let Ok(t) = c.sb.timings_json() {
                if let Some(ms) = t.get("first_exec_output").and_then(|v| v.as_f64()) {
                    self.clone_restore_ms.push(ms);
                }
            }
            let first = c.sb.proc.stdout();
            if first.lines().next().map(str::trim) != Some(c.expected().as_str()) {
                wrong.push(format!(
                    "clone {}: restore's first command printed {:?}, want {:?}",
                    c.id,
                    first.trim(),
                    c.expected()
                ));
            }
            let out =
                c.sb.sh(env, &format!("{ECHO_ENV}; env"), Duration::from_secs(60));
            if !out.ok() {
                wrong.push(format!("clone {}: exec failed: {}", c.id, out.why()));
                continue;
            }
            let line = out.stdout.lines().next().unwrap_or("").trim().to_string();
            if line != c.expected() {
                wrong.push(format!(
                    "clone {}: shows {line:?}, want {:?}",
                    c.id,
                    c.expected()
                ));
            }
            for (j, s) in self.secrets.iter().enumerate() {
                if j != c.id && out.stdout.contains(s.as_str()) {
                    wrong.push(format!("clone {}: its env holds clone {j}'s secret", c.id));
                }
            }
        }
        if !wrong.is_empty() {
            return Err(wrong.join("; "));
        }
        let got = self.clones.len();
        if failed.is_empty() {
            return Ok(format!(
                "{got}/{n} clones restored at once; each shows only its own CLONE_ID and SECRET plus TEMPLATE_ONLY=from-image \
                 (first command and a later exec), no other clone's secret in its env"
            ));
        }
        if memory_related && got >= 2 {
            return Ok(format!(
                "only {got} of {n} clones fit in the test host's memory (the rest failed for lack of memory: {}); \
                 the {got} that run each show only their own env",
                failed.join("; ")
            ));
        }
        Err(format!(
            "{got}/{n} clones came up; failures: {}",
            failed.join("; ")
        ))
    }

    /// Check 7: clone memory stays shared with the template's memory file until written.
    pub fn memory_sharing(&self) -> Result<String, String> {
        if self.clones.len() < 2 {
            return Err("skipped: fewer than 2 running clones".into());
        }
        let memory = std::fs::canonicalize(self.template()?.join("memory"))
            .map_err(|e| format!("template memory file: {e}"))?;
        let memory = memory.display().to_string();
        let (mut all, mut file_all) = (Mem::default(), Mem::default());
        let mut unshared = vec![];
        for c in &self.clones {
            let pid = c.sb.proc.pid();
            let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
                .map_err(|e| format!("/proc/{pid}/smaps_rollup: {e}"))?;
            let m = files::parse_rollup(&rollup);
            let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
            let f = files::parse_smaps_for(&smaps, &memory);
            println!(
                "  clone {} pid {pid}: Rss {} kB, Pss {} kB, Shared_Clean {} kB, Shared_Dirty {} kB, Private_Dirty {} kB; \
                 of which the template memory mapping: Rss {} kB, Pss {} kB, Shared_Clean {} kB, Shared_Dirty {} kB, Private_Dirty {} kB",
                c.id, m.rss, m.pss, m.shared_clean, m.shared_dirty, m.private_dirty,
                f.rss, f.pss, f.shared_clean, f.shared_dirty, f.private_dirty
            );
            if f.shared_clean + f.shared_dirty == 0 {
                unshared.push(c.id);
            }
            all.add(&m);
            file_all.add(&f);
        }
        let n = self.clones.len();
        let ratio = all.pss as f64 / all.rss.max(1) as f64;
        let file_ratio = file_all.pss as f64 / file_all.rss.max(1) as f64;
        let summary = format!(
            "{n} clones: sum Rss {} kB, sum Pss {} kB (Pss/Rss {ratio:.2}), sum Shared_Clean {} kB, sum Shared_Dirty {} kB, \
             sum Private_Dirty {} kB; template memory mapping: sum Rss {} kB, sum Pss {} kB (Pss/Rss {file_ratio:.2}), \
             sum Shared_Clean {} kB, sum Shared_Dirty {} kB, sum Private_Dirty {} kB{}",
            all.rss, all.pss, all.shared_clean, all.shared_dirty, all.private_dirty,
            file_all.rss, file_all.pss, file_all.shared_clean, file_all.shared_dirty, file_all.private_dirty,
            if on_tmpfs(Path::new(&memory)) {
                " (the snapshot is on tmpfs, whose shared file pages count as Shared_Dirty)"
            } else {
                ""
            }
        );
        if !unshared.is_empty() {
            return Err(format!(
                "{summary}; clones {unshared:?} share no page of the template memory file"
            ));
        }
        if ratio > 0.5 {
            return Err(format!(
                "{summary}; Pss is not well below Rss (want <= 0.5)"
            ));
        }
        Ok(summary)
    }

    /// Check 5: pause and resume keep the instance env.
    pub fn pause_resume_env(&self) -> Result<String, String> {
        let env = &self.env;
        let c = self.clone_at(1)?;
        let t = Duration::from_secs(30);
        let out = c.sb.ctl(env, &["pause"], t);
        if !out.ok() {
            return Err(format!("ctl pause: {}", out.why()));
        }
        let health = c.sb.ctl(env, &["health"], t);
        if vm_state(&health.stdout) != "paused" {
            return Err(format!("health after pause: {:?}", health.stdout.trim()));
        }
        let out = c.sb.ctl(env, &["resume"], t);
        if !out.ok() {
            return Err(format!("ctl resume: {}", out.why()));
        }
        let health = c.sb.ctl(env, &["health"], t);
        if vm_state(&health.stdout) != "running" {
            return Err(format!("health after resume: {:?}", health.stdout.trim()));
        }
        let out = c.sb.sh(env, ECHO_ENV, Duration::from_secs(60));
        if !out.ok() || out.stdout.trim() != c.expected() {
            return Err(format!(
                "after resume the clone shows {:?} ({}), want {:?}",
                out.stdout.trim(),
                out.status,
                c.expected()
            ));
        }
        Ok(format!(
            "clone {}: paused (health vm=paused), resumed (vm=running), exec shows {:?}",
            c.id,
            out.stdout.trim()
        ))
    }

    /// A template snapshot of a sandbox that got instance env is refused, and it keeps running.
    pub fn template_snapshot_refused(&self) -> Result<String, String> {
        let env = &self.env;
        let c = self.clone_at(2)?;
        let dir = env.work.join("refused-snap");
        let out = c.sb.ctl(
            env,
            &[
                "snapshot",
                "--dir",
                &dir.display().to_string(),
                "--template",
            ],
            Duration::from_secs(60),
        );
        if out.ok() || out.timed_out {
            return Err(format!(
                "template snapshot of clone {} was not refused: {} {}",
                c.id,
                out.why(),
                out.stdout.trim()
            ));
        }
        if !out.stderr.contains("refusing a template snapshot") {
            return Err(format!(
                "refused without the expected message: {}",
                out.why()
            ));
        }
        for f in ["state", "memory"] {
            if dir.join(f).exists() {
                return Err(format!(
                    "the refused snapshot left {}",
                    dir.join(f).display()
                ));
            }
        }
        let after = c.sb.sh(env, ECHO_ENV, Duration::from_secs(60));
        if !after.ok() || after.stdout.trim() != c.expected() {
            return Err(format!(
                "after the refusal the clone shows {:?} ({})",
                after.stdout.trim(),
                after.status
            ));
        }
        Ok(format!(
            "clone {}: {:?}; no files written; the clone still runs",
            c.id,
            procs::tail(&out.stderr, 1)
        ))
    }

    /// Check 2: a process started before a full snapshot keeps running after the restore, and its output
    /// continues on reattach.
    pub fn process_survives_full_snapshot(&mut self) -> Result<String, String> {
        let env = &self.env;
        let c = self.clone_at(0)?;
        let mut ticker = c.sb.envd_bg(
            "ticker",
            &["exec", "--tag", TICK_TAG, "--", "sh", "-c", TICK_LOOP],
        )?;
        ticker.wait_until("tick 3", env.until(Duration::from_secs(60)), |p| {
            ticks(&p.stdout()).iter().any(|t| *t >= 3)
        })?;
        let before = ticks(&ticker.stdout()).into_iter().max().unwrap_or(0);
        let snap = env.work.join("full-snap");
        let out = c.sb.ctl(
            env,
            &["snapshot", "--dir", &snap.display().to_string()],
            Duration::from_secs(180),
        );
        if !out.ok() {
            return Err(format!(
                "full snapshot failed: {}; {}",
                out.why(),
                c.sb.tails()
            ));
        }
        let report = json_of(&out.stdout);
        let at_return = ticks(&ticker.stdout()).into_iter().max().unwrap_or(0);
        let (opened, open) = vsock_ports(&c.sb.proc.stderr());
        println!(
            "  clone 0 host vsock ports: {} connections made, open at the snapshot: {open:?}",
            opened.len()
        );
        let resumed_at = Instant::now();
        let original = ticker
            .wait_until(
                "ticks after the resume",
                env.until(Duration::from_secs(30)),
                |p| ticks(&p.stdout()).iter().any(|t| *t > at_return + 1),
            )
            .is_ok();
        let client_ticks = ticks(&ticker.stdout());
        let client_status = ticker.try_status();
        let client_err = procs::tail(&ticker.stderr(), 2);
        ticker.kill();
        // 2b: the client that streamed the process's output before the snapshot keeps getting it.
        // 2b: after the snapshot resumed clone 0, the process goes on there too. host-agent drops
        // host vsock connections when it snapshots (and resets the guest transport), so the old
        // exec stream may end; then a new reattach must see new ticks.
        let stream_result = if original {
            Ok(format!(
                "the exec client attached before the snapshot got ticks {}..{} after the resume",
                at_return + 1,
                client_ticks.iter().max().copied().unwrap_or(0)
            ))
        } else {
            let mut again =
                c.sb.envd_bg("reattach original", &["reattach", "--tag", TICK_TAG])?;
            let alive = again.wait_until(
                "new ticks on reattach",
                env.until(Duration::from_secs(30)),
                |p| ticks(&p.stdout()).iter().any(|t| *t > at_return + 1),
            );
            let seen = ticks(&again.stdout());
            again.kill();
            let old = format!(
                "the exec stream from before the snapshot ended {:.1} s after the resume at tick {} ({}; {client_err:?}, \
                 host-agent drops host vsock connections when it snapshots)",
                resumed_at.elapsed().as_secs_f64(),
                client_ticks.iter().max().copied().unwrap_or(0),
                client_status
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "still connected".into()),
            );
            match alive {
                Ok(_) => Ok(format!(
                    "{old}; a new reattach on clone 0 sees ticks {:?}..{:?}: the process runs on",
                    seen.iter().find(|t| **t > at_return + 1),
                    seen.last()
                )),
                Err(e) => Err(format!(
                    "{old}; a new reattach on clone 0 sees no new ticks ({e}; {seen:?})"
                )),
            }
        };
        self.stream_after_resume = Some(stream_result);
        self.open_at_snapshot = open;
        self.full_snap = Some(snap.clone());

        let mut r = Sandbox::restore(
            env,
            "restored",
            &snap,
            &[],
            &["date", "+%s"],
            Some(VSOCK_DEBUG),
            &[],
        )?;
        r.wait_ready(env.until(Duration::from_secs(120)))
            .map_err(|e| format!("restore of the full snapshot: {e}; {}", r.tails()))?;
        // A connection refused right after a restore is the subject of its own check
        // (connections_after_restore); here reattach and list are retried on that error.
        let mut refusals = vec![];
        let mut reattach_attempts = 0;
        let (mut re, seen) = loop {
            reattach_attempts += 1;
            let mut re = r.envd_bg("reattach", &["reattach", "--tag", TICK_TAG])?;
            let seen = re.wait_until(
                "3 ticks newer than the snapshot",
                env.until(Duration::from_secs(60)),
                |p| {
                    ticks(&p.stdout())
                        .iter()
                        .filter(|t| **t > at_return)
                        .count()
                        >= 3
                },
            );
            if seen.is_ok() || reattach_attempts == 3 || !re.stderr().contains("cannot connect") {
                break (re, seen);
            }
            refusals.push(format!("reattach: {}", procs::tail(&re.stderr(), 1)));
        };
        let new: Vec<u64> = ticks(&re.stdout())
            .into_iter()
            .filter(|t| *t > at_return)
            .collect();
        let re_err = procs::tail(&re.stderr(), 3);
        re.kill();
        let mut list_attempts = 0;
        let list = loop {
            list_attempts += 1;
            let list = r.envd(env, &["list"], Duration::from_secs(30));
            if list.ok() || list_attempts == 3 || !list.stderr.contains("cannot connect") {
                break list;
            }
            refusals.push(format!("list: {}", procs::tail(&list.stderr, 1)));
        };
        let listed = list
            .stdout
            .lines()
            .find(|l| l.contains(TICK_TAG))
            .map(str::to_string);
        let full_data = mib(data_bytes(&snap.join("memory")));
        let template_data = self
            .template_snap
            .as_ref()
            .map(|t| mib(data_bytes(&t.join("memory"))))
            .unwrap_or(0.0);
        let tails = r.tails();
        self.restored = Some(r);
        self.restored_refusals = refusals;
        if let Err(e) = seen {
            return Err(format!(
                "{e}: reattach printed ticks {:?} (stderr {re_err}); list: {:?}; {tails}",
                ticks(&re.stdout()),
                list.stdout.trim()
            ));
        }
        if new.windows(2).any(|w| w[1] != w[0] + 1) {
            return Err(format!(
                "ticks after the restore are not consecutive: {new:?}"
            ));
        }
        let listed = listed.ok_or_else(|| {
            format!(
                "the restored sandbox does not list {TICK_TAG}: stdout {:?}, {}",
                list.stdout.trim(),
                list.why()
            )
        })?;
        if !listed.contains("running") {
            return Err(format!(
                "{TICK_TAG} is not running after the restore: {listed:?}"
            ));
        }
        Ok(format!(
            "ticks up to {before} before the full snapshot (memory_bytes_written {}, took_ms {}), {at_return} when it returned; \
             restored sandbox lists {:?}; reattach by tag saw ticks {}..{}; \
             full snapshot memory {full_data:.1} MiB data; template memory file now {template_data:.1} MiB data; \
             reattach took {reattach_attempts} attempt(s), list {list_attempts}",
            field(&report, "memory_bytes_written"),
            field(&report, "took_ms"),
            listed.replace('\t', " "),
            new.first().copied().unwrap_or(0),
            new.last().copied().unwrap_or(0)
        ))
    }

    /// The restored sandboxes that are still running, with the line of restore's first-command
    /// output that holds the guest's `date +%s`.
    fn restored_sandboxes(&self) -> Vec<(String, &Sandbox, usize)> {
        let mut v: Vec<(String, &Sandbox, usize)> = self
            .clones
            .iter()
            .map(|c| (format!("clone {}", c.id), &c.sb, 1))
            .collect();
        if let Some(r) = &self.restored {
            v.push(("restored full snapshot".into(), r, 0));
        }
        v
    }

    /// Check 6: right after a restore the guest clock is within 1 s of the host's: restore's first command
    /// (run just after /init) printed the guest's `date +%s`; the host window is from /init done to
    /// the command's end (restore's timings, from its spawn time, plus 0.5 s for its start-up).
    pub fn clock_at_restore(&self) -> Result<String, String> {
        let sandboxes = self.restored_sandboxes();
        if sandboxes.is_empty() {
            return Err("skipped: no restored sandbox".into());
        }
        let (mut worst, mut widest) = (0.0f64, 0.0f64);
        let mut bad = vec![];
        for (name, sb, line) in &sandboxes {
            let out = sb.proc.stdout();
            let Some(g) = out
                .lines()
                .nth(*line)
                .and_then(|l| l.trim().parse::<f64>().ok())
            else {
                bad.push(format!(
                    "{name}: no date in the first command's output {out:?}"
                ));
                continue;
            };
            let t = match sb.timings_json() {
                Ok(t) => t,
                Err(e) => {
                    bad.push(format!("{name}: {e}"));
                    continue;
                }
            };
            let ms = |k: &str| t.get(k).and_then(|v| v.as_f64());
            let (Some(init), Some(end)) = (ms("init_done"), ms("first_exec_end")) else {
                bad.push(format!("{name}: timings lack init_done/first_exec_end"));
                continue;
            };
            let lo = sb.proc.started_wall + init / 1000.0;
            let hi = sb.proc.started_wall + end / 1000.0 + 0.5;
            let diff = g + 0.5 - (lo + hi) / 2.0;
            worst = worst.max(diff.abs());
            widest = widest.max(hi - lo);
            if !within_1s(g, lo, hi) {
                bad.push(format!(
                    "{name}: guest {g} vs host {lo:.3}..{hi:.3} (about {diff:+.1} s)"
                ));
            }
        }
        let summary = format!(
            "{} restored sandboxes: max |guest - host| about {worst:.2} s (guest date +%s in whole seconds, host window up to {widest:.2} s)",
            sandboxes.len()
        );
        if bad.is_empty() {
            Ok(summary)
        } else {
            Err(format!(
                "{summary}; off by more than 1 s: {}",
                bad.join("; ")
            ))
        }
    }

    /// Check 6b: minutes later (the clones ran side by side meanwhile) the guest clocks still agree.
    pub fn clock_later(&self) -> Result<String, String> {
        let env = &self.env;
        let sandboxes = self.restored_sandboxes();
        if sandboxes.is_empty() {
            return Err("skipped: no restored sandbox".into());
        }
        let (mut worst, mut worst_rtt) = (0.0f64, 0.0f64);
        let mut bad = vec![];
        let mut sources = std::collections::BTreeSet::new();
        let mut retried = vec![];
        for (name, sb, _) in &sandboxes {
            let script =
                "date +%s; cat /sys/devices/system/clocksource/clocksource0/current_clocksource";
            let mut attempt = 0;
            let (h1, out, h2) = loop {
                attempt += 1;
                let h1 = procs::wall_secs();
                let out = sb.sh(env, script, Duration::from_secs(30));
                let h2 = procs::wall_secs();
                if out.ok() || attempt == 3 || !out.stderr.contains("cannot connect") {
                    break (h1, out, h2);
                }
                retried.push(name.clone());
            };
            let mut lines = out.stdout.lines();
            let Some(g) = lines.next().and_then(|l| l.trim().parse::<f64>().ok()) else {
                bad.push(format!("{name}: date failed: {}", out.why()));
                continue;
            };
            sources.insert(lines.next().unwrap_or("?").trim().to_string());
            let diff = g + 0.5 - (h1 + h2) / 2.0;
            worst = worst.max(diff.abs());
            worst_rtt = worst_rtt.max(h2 - h1);
            if !within_1s(g, h1, h2) {
                bad.push(format!(
                    "{name}: guest {g} vs host {h1:.3}..{h2:.3} (about {diff:+.1} s)"
                ));
            }
        }
        let summary = format!(
            "{} sandboxes: max |guest - host| about {worst:.2} s (round trip up to {worst_rtt:.2} s); guest clocksource {:?}{}",
            sandboxes.len(),
            sources,
            if retried.is_empty() {
                String::new()
            } else {
                format!("; connection retried for {retried:?}")
            }
        );
        if bad.is_empty() {
            Ok(summary)
        } else {
            Err(format!(
                "{summary}; off by more than 1 s: {}",
                bad.join("; ")
            ))
        }
    }

    /// Each new host connection to envd after a restore gets through: 12 `health` calls in a row
    /// (each a new vsock connection, so a new host port) on the restored full snapshot and on a clone.
    pub fn connections_after_restore(&self) -> Result<String, String> {
        let env = &self.env;
        let mut targets: Vec<(String, &Sandbox)> = vec![];
        if let Some(r) = &self.restored {
            targets.push(("restored full snapshot".into(), r));
        }
        if let Ok(c) = self.clone_at(3) {
            targets.push((format!("clone {}", c.id), &c.sb));
        }
        if targets.is_empty() {
            return Err("skipped: no restored sandbox".into());
        }
        let mut lines = vec![];
        let mut failed = false;
        for (name, sb) in targets {
            let mut pattern = vec![];
            let mut first_err = None;
            let mut failed_ports = vec![];
            for _ in 0..12 {
                let before = vsock_ports(&sb.proc.stderr()).0.len();
                let out = sb.envd(env, &["health"], Duration::from_secs(20));
                let ports = vsock_ports(&sb.proc.stderr()).0;
                let mine = ports.get(before..).unwrap_or(&[]).to_vec();
                if out.ok() {
                    pattern.push("ok".to_string());
                } else {
                    pattern.push(format!("FAIL{mine:?}"));
                    failed_ports.extend(mine);
                    first_err.get_or_insert_with(|| out.why());
                }
            }
            let earlier = if name == "restored full snapshot" {
                self.restored_refusals.clone()
            } else {
                vec![]
            };
            if !earlier.is_empty() {
                first_err.get_or_insert_with(|| earlier[0].clone());
            }
            let oks = pattern.iter().filter(|p| *p == "ok").count();
            let sockets = sb.sh(
                env,
                "ls -l /proc/1/fd | grep -c socket",
                Duration::from_secs(30),
            );
            let mut line = format!(
                "{name}: {oks}/12 [{}]{}, envd (pid 1) holds {} sockets",
                pattern.join(" "),
                if earlier.is_empty() {
                    String::new()
                } else {
                    format!(" (and {} refused during check 2)", earlier.len())
                },
                if sockets.ok() {
                    sockets.stdout.trim().to_string()
                } else {
                    format!("? ({})", sockets.why())
                }
            );
            if let Some(e) = first_err {
                failed = true;
                let (opened, _) = vsock_ports(&sb.proc.stderr());
                let stale: Vec<u32> = failed_ports
                    .iter()
                    .copied()
                    .filter(|p| self.open_at_snapshot.contains(p))
                    .collect();
                line.push_str(&format!(
                    "; first failure: {e}; host ports used by this host-agent so far: {}..={}; failed ports {failed_ports:?}, \
                     of which open in clone 0 when it was snapshotted: {stale:?} (open then: {:?})",
                    opened.first().copied().unwrap_or(0),
                    opened.last().copied().unwrap_or(0),
                    self.open_at_snapshot,
                ));
            }
            lines.push(line);
        }
        if failed {
            Err(lines.join("; "))
        } else {
            Ok(lines.join("; "))
        }
    }

    /// Check 4: no clone's secret appears in the template snapshot's files.
    pub fn secret_not_in_template(&self) -> Result<String, String> {
        let snap = self.template()?;
        if self.secrets.is_empty() {
            return Err("skipped: no clone got a secret".into());
        }
        let started = Instant::now();
        let needles: Vec<Vec<u8>> = self.secrets.iter().map(|s| s.as_bytes().to_vec()).collect();
        let mut searched = vec![];
        let mut found = vec![];
        let entries = std::fs::read_dir(&snap).map_err(|e| format!("{}: {e}", snap.display()))?;
        for e in entries.flatten() {
            let p = e.path();
            if !p.is_file() {
                continue;
            }
            let hits =
                files::find_needles(&p, &needles).map_err(|e| format!("{}: {e}", p.display()))?;
            searched.push(format!(
                "{} ({:.1} MiB data)",
                e.file_name().to_string_lossy(),
                mib(data_bytes(&p))
            ));
            for (i, hit) in hits.iter().enumerate() {
                if *hit {
                    found.push(format!("clone {i}'s secret in {}", p.display()));
                }
            }
        }
        if !found.is_empty() {
            return Err(found.join("; "));
        }
        // The clones must not have changed the template's files at all.
        for (f, before) in &self.template_digests {
            let now =
                files::content_digest(&snap.join(f)).map_err(|e| format!("digest of {f}: {e}"))?;
            if &now != before {
                return Err(format!(
                    "the template snapshot's {f} changed while the clones ran"
                ));
            }
        }
        // Positive control: the same search finds clone 0's secret in clone 0's full snapshot.
        let control = match (&self.full_snap, self.clones.iter().find(|c| c.id == 0)) {
            (Some(full), Some(c0)) => {
                let hits =
                    files::find_needles(&full.join("memory"), &[c0.secret.as_bytes().to_vec()])
                        .map_err(|e| format!("{}: {e}", full.display()))?;
                if !hits[0] {
                    return Err(format!(
                        "the search found no secret in the template, but it does not find clone 0's secret in clone 0's \
                         full snapshot either, so it proves nothing (searched {})",
                        searched.join(", ")
                    ));
                }
                "positive control: clone 0's secret is found in clone 0's full snapshot memory"
            }
            _ => "no positive control (no full snapshot of clone 0)",
        };
        Ok(format!(
            "none of {} secrets in {} (after the clones ran; searched in {:.1} s); template files unchanged (content digests); {control}",
            needles.len(),
            searched.join(", "),
            started.elapsed().as_secs_f64()
        ))
    }

    /// Every sandbox powers off through envd and its host-agent exits 0.
    pub fn shutdown_all(&mut self) -> Result<String, String> {
        let env = &self.env;
        let mut sbs: Vec<Sandbox> = self.clones.drain(..).map(|c| c.sb).collect();
        sbs.extend(self.restored.take());
        if sbs.is_empty() {
            return Err("skipped: nothing running".into());
        }
        let mut bad = vec![];
        for sb in &sbs {
            let out = sb.envd(env, &["shutdown"], Duration::from_secs(30));
            if !out.ok() {
                bad.push(format!("{}: envd shutdown: {}", sb.name, out.why()));
            }
        }
        let deadline = env.until(Duration::from_secs(90));
        for sb in &mut sbs {
            match sb.proc.wait_exit(deadline) {
                Some(st) if st.success() => {}
                Some(st) => bad.push(format!("{} exited {st}; {}", sb.name, sb.tails())),
                None => bad.push(format!(
                    "{} still runs after shutdown; {}",
                    sb.name,
                    sb.tails()
                )),
            }
        }
        if bad.is_empty() {
            Ok(format!(
                "{} sandboxes powered off, each host-agent exited 0",
                sbs.len()
            ))
        } else {
            Err(bad.join("; "))
        }
    }

    /// Check 9: restore timings of one clone (alone) against boot to first exec of `run`.
    pub fn timings(&self) -> Result<String, String> {
        let env = &self.env;
        let snap = self.template()?;
        let mut t = Sandbox::restore(
            env,
            "timing",
            &snap,
            &[("CLONE_ID".into(), "timing".into())],
            &["echo", "first-exec"],
            None,
            &[],
        )?;
        t.wait_ready(env.until(Duration::from_secs(120)))
            .map_err(|e| format!("{e}; {}", t.tails()))?;
        let map = t.timings_json()?;
        let mut parts = vec![];
        let mut prev = 0.0;
        let mut order_ok = true;
        for k in TIMING_KEYS {
            let v = map
                .get(*k)
                .and_then(|v| v.as_f64())
                .ok_or_else(|| format!("timings JSON lacks {k}: {map:?}"))?;
            order_ok &= v >= prev;
            prev = v;
            parts.push(format!("{k} {v:.1}"));
        }
        println!("  restore breakdown (ms since start): {}", parts.join(", "));
        let restore_ms = map["first_exec_output"].as_f64().unwrap_or(f64::NAN);
        let printed = t.proc.stderr().lines().find_map(|l| {
            l.strip_prefix("restore_to_first_exec_ms:")
                .map(|v| v.trim().to_string())
        });
        let first_ok = t.proc.stdout().contains("first-exec");
        let stopped = t.shutdown(env, Duration::from_secs(60));
        let boot_ms = self
            .boot_to_first_exec_ms
            .ok_or("no boot_to_first_exec_ms (check 1 failed)")?;
        let ratio = restore_ms / boot_ms;
        println!("restore_to_first_exec_ms: {restore_ms:.1}");
        println!("boot_to_first_exec_ms: {boot_ms:.1}");
        println!("restore_to_first_exec/boot_to_first_exec ratio: {ratio:.3}");
        if let Some(m) = median(&self.clone_restore_ms) {
            println!(
                "  (median restore_to_first_exec_ms of the {} clones restored at once: {m:.1}, ratio to boot {:.3})",
                self.clone_restore_ms.len(),
                m / boot_ms
            );
        }
        if !first_ok {
            return Err(format!(
                "the first command's output is missing: {:?}",
                t.proc.stdout()
            ));
        }
        if printed.is_none() {
            return Err("restore did not print restore_to_first_exec_ms".into());
        }
        if !order_ok {
            return Err(format!("timings out of order: {}", parts.join(", ")));
        }
        stopped?;
        if ratio >= 1.0 {
            return Err(format!(
                "restore to first exec is not faster than a boot (ratio {ratio:.3})"
            ));
        }
        Ok(format!(
            "restore_to_first_exec_ms {restore_ms:.1} (host-agent printed {}), boot_to_first_exec_ms {boot_ms:.1}, ratio {ratio:.3}",
            printed.unwrap_or_default()
        ))
    }

    /// Check 10: a working set recorded by one restore (`--record-working-set`) is applied by the
    /// next, whose guest then runs commands as any other; a corrupt `working-set.json` makes a
    /// restore fail cleanly, saying which file. Runs on a copy of the template directory, so the
    /// other checks' clones restore without one.
    pub fn working_set(&self) -> Result<String, String> {
        let env = &self.env;
        let snap = self.template()?;
        let copy = env.work.join("ws-snap");
        std::fs::create_dir_all(&copy).map_err(|e| format!("mkdir {}: {e}", copy.display()))?;
        for f in ["state", "snapshot.json"] {
            std::fs::copy(snap.join(f), copy.join(f)).map_err(|e| format!("copying {f}: {e}"))?;
        }
        files::link_or_copy(&snap.join("memory"), &copy.join("memory"))
            .map_err(|e| format!("copying memory: {e}"))?;
        let deadline = env.until(Duration::from_secs(120));
        let mut rec = Sandbox::restore(
            env,
            "ws-record",
            &copy,
            &[],
            &["true"],
            None,
            &["--record-working-set"],
        )?;
        rec.wait_ready(deadline)?;
        let recorded = rec
            .proc
            .stderr()
            .lines()
            .find(|l| l.contains("working set recorded"))
            .map(str::to_string);
        rec.shutdown(env, Duration::from_secs(60))?;
        let recorded = recorded.ok_or("the recording restore printed no 'working set recorded'")?;
        let text = std::fs::read_to_string(copy.join("working-set.json"))
            .map_err(|e| format!("working-set.json after recording: {e}"))?;
        let set: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| format!("working-set.json is not JSON ({e}): {text}"))?;
        let written: Vec<u64> = set["regions"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|r| r["written_pages"].as_u64())
                    .collect()
            })
            .unwrap_or_default();
        if written.is_empty() {
            return Err(format!("no regions recorded: {text}"));
        }
        // Regions a restore copies: host-agent's working_set::MIN_WRITTEN_PAGES.
        let hot = written.iter().filter(|w| **w >= 20).count();

        let mut sb = Sandbox::restore(
            env,
            "ws-apply",
            &copy,
            &[("WS".to_string(), "applied".to_string())],
            &["sh", "-c", "echo $WS"],
            None,
            &[],
        )?;
        sb.wait_ready(env.until(Duration::from_secs(120)))?;
        let first = sb.proc.stdout();
        let timings = sb.timings_json()?;
        let counted = sb.sh(
            env,
            "i=0; while [ $i -lt 300 ]; do i=$((i+1)); done; seq 1 2000 | md5sum",
            Duration::from_secs(60),
        );
        sb.shutdown(env, Duration::from_secs(60))?;
        if first.lines().next().map(str::trim) != Some("applied") {
            return Err(format!("first command printed {first:?}, want \"applied\""));
        }
        if hot > 0 && !timings.contains_key("working_set_copied") {
            return Err(format!(
                "{hot} regions worth copying, but the restore's timings show no working_set_copied: {timings:?}"
            ));
        }
        // md5 of `seq 1 2000`'s output (the lines "1" to "2000"), as coreutils computes it here.
        const SEQ_MD5: &str = "ea4d0a24dabcaa11f9aa979b872d162b";
        let seq_md5 = counted.stdout.split_whitespace().next().unwrap_or("");
        if !counted.ok() || seq_md5 != SEQ_MD5 {
            return Err(format!(
                "a command after the restore did not compute md5 {SEQ_MD5}: {}",
                counted.why()
            ));
        }

        std::fs::write(
            copy.join("working-set.json"),
            "{\"format\": 1, \"regions\": 7",
        )
        .map_err(|e| format!("corrupting working-set.json: {e}"))?;
        let run = env.work.join("ws-bad");
        std::fs::create_dir_all(&run).map_err(|e| format!("mkdir {}: {e}", run.display()))?;
        let p = |x: &Path| x.display().to_string();
        let out = env.host_agent(
            "ws-bad",
            &strings(&[
                "restore",
                "--snapshot",
                &p(&copy),
                "--vsock-uds",
                &p(&run.join("v.sock")),
                "--",
                "echo",
                "should-not-run",
            ]),
            Duration::from_secs(60),
        );
        let message = agent_message(&out.stderr);
        if out.ok() || out.timed_out || !message.contains("working-set.json") {
            return Err(format!(
                "a corrupt working-set.json did not fail the restore with a message naming it: {}",
                out.why()
            ));
        }
        Ok(format!(
            "{recorded}; {hot} of {} regions copied by the next restore (first output at {:.1} ms, \
             working set copied at {:.1} ms); md5 of seq in the guest {seq_md5}; corrupt file: {message:?}",
            written.len(),
            timings.get("first_exec_output").and_then(|v| v.as_f64()).unwrap_or(-1.0),
            timings.get("working_set_copied").and_then(|v| v.as_f64()).unwrap_or(-1.0),
        ))
    }

    /// Check 8: a damaged snapshot: non-zero exit, a clear message, nothing left behind.
    pub fn bad_input(&self, damage: Damage) -> Result<String, String> {
        let env = &self.env;
        let snap = self.template()?;
        let case = env.work.join(format!("bad-{}", damage.slug()));
        let copy = case.join("snap");
        let run = case.join("run");
        for d in [&copy, &run] {
            std::fs::create_dir_all(d).map_err(|e| format!("mkdir {}: {e}", d.display()))?;
        }
        let io = |what: &str, e: std::io::Error| format!("{what}: {e}");
        let mut state = std::fs::read(snap.join("state")).map_err(|e| io("reading state", e))?;
        damage.damage_state(&mut state);
        std::fs::write(copy.join("state"), &state).map_err(|e| io("writing state", e))?;
        std::fs::copy(snap.join("snapshot.json"), copy.join("snapshot.json"))
            .map_err(|e| io("copying snapshot.json", e))?;
        match damage {
            Damage::MissingMemory => {}
            Damage::MemoryWrongSize => {
                files::sparse_copy(&snap.join("memory"), &copy.join("memory"))
                    .map_err(|e| io("copying memory", e))?;
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(copy.join("memory"))
                    .map_err(|e| io("opening the memory copy", e))?;
                let len = f.metadata().map_err(|e| io("memory copy", e))?.len();
                f.set_len(len - 4096)
                    .map_err(|e| io("truncating memory", e))?;
            }
            _ => files::link_or_copy(&snap.join("memory"), &copy.join("memory"))
                .map_err(|e| io("copying memory", e))?,
        }
        let p = |x: &Path| x.display().to_string();
        let args = strings(&[
            "restore",
            "--snapshot",
            &p(&copy),
            "--vsock-uds",
            &p(&run.join("v.sock")),
            "--console-log",
            &p(&run.join("console.log")),
            "--api-sock",
            &p(&run.join("api.sock")),
            "--timings-json",
            &p(&run.join("timings.json")),
            "--env",
            "SECRET=bad-input",
            "--",
            "echo",
            "should-not-run",
        ]);
        let out = env.host_agent(damage.slug(), &args, Duration::from_secs(60));
        let leftovers: Vec<String> = std::fs::read_dir(&run)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        let procs_left = processes_mentioning(&p(&case));
        let message = agent_message(&out.stderr);
        let result = if out.timed_out {
            Err(format!("restore did not exit within 60 s: {}", out.why()))
        } else if out.ok() || out.code.is_none() {
            Err(format!("restore did not fail cleanly: {}", out.why()))
        } else if message.is_empty() {
            Err(format!("no 'host-agent: ' message: {}", out.why()))
        } else if !damage
            .expect_any()
            .iter()
            .any(|w| message.to_lowercase().contains(w))
        {
            Err(format!(
                "message does not say what is wrong (want one of {:?}): {message:?}",
                damage.expect_any()
            ))
        } else if out.stdout.contains("should-not-run") {
            Err("the first command ran".into())
        } else if !leftovers.is_empty() {
            Err(format!(
                "left behind in the run directory: {leftovers:?} ({message:?})"
            ))
        } else if !procs_left.is_empty() {
            Err(format!("processes left: {procs_left:?}"))
        } else {
            Ok(format!(
                "exit {} in {:.2} s: {message:?}; no sockets, logs or processes left",
                out.code.unwrap_or(-1),
                out.took.as_secs_f64()
            ))
        };
        let _ = std::fs::remove_dir_all(&case);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_vsock_debug_log() {
        let log = "\u{1b}[2mx\u{1b}[0m vsock: host client connecting to the guest \u{1b}[3mlocal_port\u{1b}[0m\u{1b}[2m=\u{1b}[0m1073741826 \u{1b}[3mpeer_port\u{1b}[0m=49983\n\
                   vsock: host client connecting to the guest local_port=1073741827 peer_port=49983\n\
                   vsock: connection closed local_port=1073741826 peer_port=49983\n";
        assert_eq!(
            vsock_ports(log),
            (vec![1073741826, 1073741827], vec![1073741827])
        );
    }

    #[test]
    fn parses_ticks_and_json() {
        assert_eq!(
            ticks("tick 1\ntick 2\nnoise\ntick x\n tick 10 \n"),
            vec![1, 2, 10]
        );
        let v = json_of("log line\n{\"took_ms\":12,\"paused\":false}\n");
        assert_eq!(field(&v, "took_ms"), "12");
        assert_eq!(field(&v, "paused"), "false");
        assert_eq!(field(&v, "nope"), "?");
        assert_eq!(
            vm_state("{\"status\":\"ok\",\"vm\":\"paused\",\"version\":\"0.1.0\"}\n"),
            "paused"
        );
        assert_eq!(vm_state("host-agent: POST /pause: 409 no_vm: ...\n"), "?");
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
    }
}
