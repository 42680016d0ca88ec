//! The test harness: boots the test host image under QEMU (TCG, a virtual EPYC with SVM and nested paging,
//! so that `/dev/kvm` inside is real KVM) and runs one command inside, returning its output and exit code.
//! On a host with hardware KVM the command runs natively instead.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::deb::DebCache;
use crate::testhost::{self, TestHostError, TestHostOptions};
use crate::tree::TreeError;

/// `idle=poll`: the test host's CPU never halts. Test hosts sometimes went idle for good with work
/// pending (QEMU at 0% CPU, no output, no timeouts firing) - a wakeup that the emulated CPU missed
/// while halted; a CPU that never halts cannot miss one.
pub const OUTER_CMDLINE: &str = "console=ttyS0 panic=-1 quiet idle=poll";

/// Guest paths of the well-known includes, exported to the command as env vars.
pub const GUEST_TEMPLATE_DIR: &str = "/template";
pub const GUEST_HOST_AGENT: &str = "/usr/local/bin/host-agent";

#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error(transparent)]
    TestHost(#[from] TestHostError),
    #[error(transparent)]
    Tree(#[from] TreeError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("starting {qemu}: {source}")]
    Spawn {
        qemu: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "deadline of {secs}s passed ({phase}); QEMU was killed. Console tail ({console}):\n{tail}"
    )]
    Timeout {
        secs: u64,
        phase: &'static str,
        console: PathBuf,
        tail: String,
    },
    #[error("the test host stopped ({status}) before the command finished. Console tail ({console}):\n{tail}")]
    Died {
        status: String,
        console: PathBuf,
        tail: String,
    },
    #[error(
        "the test host stalled: no output for {silent_secs}s, even after an NMI; QEMU was killed. \
         Its state at each stall: {dumps}. Console tail ({console}):\n{tail}"
    )]
    Stalled {
        silent_secs: u64,
        dumps: String,
        console: PathBuf,
        tail: String,
    },
    #[error("bad --include {0:?}: expected HOST_PATH[:GUEST_PATH] with an absolute GUEST_PATH")]
    BadInclude(String),
    #[error("running {cmd}: {source}")]
    Native { cmd: String, source: std::io::Error },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> HarnessError + '_ {
    move |source| HarnessError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Include {
    pub host: PathBuf,
    pub guest: String,
}

/// Parses `HOST[:GUEST]`; without GUEST the file keeps its absolute host path.
pub fn parse_include(spec: &str) -> Result<Include, HarnessError> {
    let (host, guest) = match spec.split_once(':') {
        Some((h, g)) => (h, Some(g)),
        None => (spec, None),
    };
    if host.is_empty() {
        return Err(HarnessError::BadInclude(spec.to_string()));
    }
    let host = PathBuf::from(host);
    let guest = match guest {
        Some(g) if g.starts_with('/') && g.len() > 1 => g.to_string(),
        Some(_) => return Err(HarnessError::BadInclude(spec.to_string())),
        None => std::path::absolute(&host)
            .map_err(|_| HarnessError::BadInclude(spec.to_string()))?
            .to_string_lossy()
            .into_owned(),
    };
    Ok(Include { host, guest })
}

/// Quotes one word for POSIX sh.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

pub fn shell_command(argv: &[String]) -> String {
    argv.iter()
        .map(|a| shell_quote(a))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Hardware KVM: `/dev/kvm` exists and is backed by `kvm_intel` or `kvm_amd`, not by PVM.
pub fn hardware_kvm() -> bool {
    let m = |n: &str| Path::new("/sys/module").join(n).exists();
    Path::new("/dev/kvm").exists() && (m("kvm_intel") || m("kvm_amd")) && !m("kvm_pvm")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Auto,
    Nested,
    Native,
}

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub timeout: Duration,
    pub includes: Vec<Include>,
    pub command: Vec<String>,
    pub mode: Mode,
    /// Working directory for logs and the per-run initramfs.
    pub work_dir: PathBuf,
    pub qemu: Option<PathBuf>,
    /// Outer VM memory in MiB.
    pub memory_mib: u32,
    /// Extra kernel command line for the test host (e.g. `loglevel=7` to see its boot).
    pub extra_cmdline: Option<String>,
    /// Nested mode: all test host CPUs on one emulation thread (`-accel tcg,thread=single`).
    pub single_thread_tcg: bool,
    /// Nested mode: the test host's CPU count.
    pub smp: u32,
    /// Nested mode: how long the test host may print nothing before the watchdog steps in (see
    /// [`Watchdog`]); `None` turns it off.
    pub stall_after: Option<Duration>,
    /// Nested mode: how many times a run that stalled is started again in a fresh test host.
    pub stall_retries: u32,
}

#[derive(Debug, Clone)]
pub struct RunResult {
    pub exit_code: i32,
    pub native: bool,
    /// Host seconds from QEMU start until the test host's init was ready to run the command.
    pub boot_secs: Option<f64>,
    /// Test host kernel uptime when it was ready.
    pub guest_uptime_at_ready: Option<f64>,
    pub command_secs: Option<f64>,
    pub prepare_secs: f64,
    pub total_secs: f64,
}

/// Runs the command, streaming its output to `out`.
pub fn run(
    opts: &RunOptions,
    cache: &DebCache,
    out: &mut dyn Write,
) -> Result<RunResult, HarnessError> {
    let native = match opts.mode {
        Mode::Native => true,
        Mode::Nested => false,
        Mode::Auto => hardware_kvm(),
    };
    if native {
        return run_native(opts, out);
    }
    let mut attempt = 0;
    loop {
        match run_nested(opts, cache, out) {
            Err(HarnessError::Stalled {
                silent_secs, dumps, ..
            }) if attempt < opts.stall_retries => {
                attempt += 1;
                let banner = format!(
                    "\n=== envd-harness: the test host stalled (no output for {silent_secs}s, even \
                     after an NMI; state in {dumps}); running the command again in a fresh test host \
                     (retry {attempt} of {}) ===\n",
                    opts.stall_retries
                );
                tracing::warn!("{}", banner.trim());
                let _ = out.write_all(banner.as_bytes());
                keep_attempt_logs(&opts.work_dir, attempt);
            }
            other => return other,
        }
    }
}

fn env_exports(vars: &[(&str, String)]) -> String {
    vars.iter()
        .map(|(k, v)| format!("export {k}={}\n", shell_quote(v)))
        .collect()
}

fn run_native(opts: &RunOptions, out: &mut dyn Write) -> Result<RunResult, HarnessError> {
    let start = Instant::now();
    tracing::info!("running natively (no nested test host)");
    let Some((prog, args)) = opts.command.split_first() else {
        return Err(HarnessError::Native {
            cmd: String::new(),
            source: std::io::ErrorKind::InvalidInput.into(),
        });
    };
    // Map guest paths of includes back to host paths.
    let host_of = |guest: &str| {
        opts.includes.iter().find_map(|i| {
            if guest == i.guest {
                Some(i.host.clone())
            } else {
                guest
                    .strip_prefix(&format!("{}/", i.guest))
                    .map(|rest| i.host.join(rest))
            }
        })
    };
    let bin_dir = opts.work_dir.join("native-bin");
    let _ = std::fs::remove_dir_all(&bin_dir);
    std::fs::create_dir_all(&bin_dir).map_err(io_err(&bin_dir))?;
    let mut cmd_prog = host_of(prog).unwrap_or_else(|| PathBuf::from(prog));
    for inc in &opts.includes {
        if let Some(name) = inc.guest.strip_prefix("/usr/local/bin/") {
            let host = std::path::absolute(&inc.host).map_err(io_err(&inc.host))?;
            let link = bin_dir.join(name);
            std::os::unix::fs::symlink(&host, &link).map_err(io_err(&link))?;
            if prog == name {
                cmd_prog = host.clone();
            }
        }
    }
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut cmd = Command::new(&cmd_prog);
    cmd.args(args)
        .env("PATH", path)
        .env("ENVD_HARNESS", "native");
    if let Some(t) = host_of(GUEST_TEMPLATE_DIR) {
        cmd.env("ENVD_TEMPLATE_DIR", t);
    }
    if let Some(h) = host_of(GUEST_HOST_AGENT) {
        cmd.env("ENVD_HOST_AGENT", h);
    }
    let name = shell_command(&opts.command);
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|source| HarnessError::Native {
            cmd: name.clone(),
            source,
        })?;
    let mut stdout = child.stdout.take();
    let deadline = start + opts.timeout;
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        while let Some(s) = stdout.as_mut() {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.send(buf[..n].to_vec()).is_err() {
                        break;
                    }
                }
            }
        }
    });
    let forward = |out: &mut dyn Write| {
        while let Ok(chunk) = rx.try_recv() {
            let _ = out.write_all(&chunk);
            let _ = out.flush();
        }
    };
    let status = loop {
        forward(out);
        if let Some(st) = child.try_wait().map_err(|source| HarnessError::Native {
            cmd: name.clone(),
            source,
        })? {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(HarnessError::Timeout {
                secs: opts.timeout.as_secs(),
                phase: "native command",
                console: PathBuf::from("-"),
                tail: String::new(),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = reader.join();
    forward(out);
    let code = status.code().unwrap_or(128 + 9);
    let total = start.elapsed().as_secs_f64();
    Ok(RunResult {
        exit_code: code,
        native: true,
        boot_secs: None,
        guest_uptime_at_ready: None,
        command_secs: Some(total),
        prepare_secs: 0.0,
        total_secs: total,
    })
}

/// Removes all but the `keep` newest `run-*` directories under `parent` (old logs and native-mode links).
pub fn prune_runs(parent: &Path, keep: usize) {
    let Ok(rd) = std::fs::read_dir(parent) else {
        return;
    };
    let mut runs: Vec<(std::time::SystemTime, PathBuf)> = rd
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("run-"))
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    runs.sort();
    let n = runs.len().saturating_sub(keep);
    for (_, p) in runs.into_iter().take(n) {
        let _ = std::fs::remove_dir_all(p);
    }
}

/// Reads what was appended to a file since `pos`.
pub fn read_new(path: &Path, pos: &mut u64) -> Vec<u8> {
    let Ok(mut f) = File::open(path) else {
        return Vec::new();
    };
    let mut buf = Vec::new();
    if f.seek(SeekFrom::Start(*pos)).is_ok() && f.read_to_end(&mut buf).is_ok() {
        *pos += buf.len() as u64;
    }
    buf
}

/// The last `lines` lines of a log, for error messages.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn run_nested(
    opts: &RunOptions,
    cache: &DebCache,
    out: &mut dyn Write,
) -> Result<RunResult, HarnessError> {
    let start = Instant::now();
    let qemu = testhost::find_qemu(opts.qemu.as_deref())?;
    let mut host = testhost::prepare(
        cache,
        &TestHostOptions {
            qemu: Some(qemu.clone()),
        },
    )?;
    let mut lib_dirs = host.lib_dirs.clone();
    for inc in &opts.includes {
        let meta = std::fs::metadata(&inc.host).map_err(io_err(&inc.host))?;
        if meta.is_dir() {
            host.tree.host_dir(&inc.guest, &inc.host)?;
        } else {
            testhost::add_executable(&mut host.tree, &inc.guest, &inc.host, &mut lib_dirs)?;
        }
    }
    let has = |g: &str| opts.includes.iter().any(|i| i.guest == g);
    let mut vars = vec![
        ("LD_LIBRARY_PATH", lib_dirs.join(":")),
        ("ENVD_HARNESS", "nested".to_string()),
        ("ENVD_QEMU", testhost::GUEST_QEMU.to_string()),
    ];
    if has(GUEST_TEMPLATE_DIR) {
        vars.push(("ENVD_TEMPLATE_DIR", GUEST_TEMPLATE_DIR.to_string()));
    }
    if has(GUEST_HOST_AGENT) {
        vars.push(("ENVD_HOST_AGENT", GUEST_HOST_AGENT.to_string()));
    }
    host.tree.bytes("/harness/env", 0o644, env_exports(&vars))?;
    host.tree
        .bytes("/harness/cmd", 0o644, shell_command(&opts.command) + "\n")?;

    let dir = &opts.work_dir;
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let initrd = dir.join("initrd");
    let console = dir.join("console.log");
    let output = dir.join("output.log");
    let status = dir.join("status.log");
    for f in [&console, &output, &status] {
        File::create(f).map_err(io_err(f))?;
    }
    let qmp_sock = dir.join("qmp.sock");
    let _ = std::fs::remove_file(&qmp_sock);
    host.tree.write_cpio_file(&initrd)?;
    let prepare_secs = start.elapsed().as_secs_f64();

    let mut cmd = Command::new(&qemu);
    let accel = if opts.single_thread_tcg {
        "tcg,thread=single"
    } else {
        "tcg"
    };
    cmd.args(["-accel", accel, "-cpu", "EPYC,+svm,+npt"])
        .args(["-smp", &opts.smp.max(1).to_string()])
        .args(["-m", &opts.memory_mib.to_string()])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(&host.vmlinuz)
        .arg("-initrd")
        .arg(&initrd)
        .arg("-append")
        .arg(match &opts.extra_cmdline {
            Some(extra) => format!("{OUTER_CMDLINE} {extra}"),
            None => OUTER_CMDLINE.to_string(),
        })
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-serial")
        .arg(format!("file:{}", output.display()))
        .arg("-serial")
        .arg(format!("file:{}", status.display()))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp_sock.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    tracing::debug!(?cmd, "starting test host");
    let boot_start = Instant::now();
    let child = cmd.spawn().map_err(|source| HarnessError::Spawn {
        qemu: qemu.clone(),
        source,
    })?;
    let mut child = KillOnDrop(child);
    let deadline = boot_start + opts.timeout;

    let (mut out_pos, mut st_pos) = (0u64, 0u64);
    let mut status_text = String::new();
    let mut ready: Option<(f64, Option<f64>)> = None;
    let mut exit: Option<(i32, f64)> = None;
    let mut exit_seen_at: Option<Instant> = None;
    let mut watchdog = opts
        .stall_after
        .map(|after| Watchdog::new(after, child.0.id(), qmp_sock.clone(), dir.clone()));
    loop {
        let chunk = read_new(&output, &mut out_pos);
        if !chunk.is_empty() {
            let _ = out.write_all(&chunk);
            let _ = out.flush();
        }
        let status_chunk = read_new(&status, &mut st_pos);
        // The console does not count: the watchdog's own NMI makes the test host's kernel print.
        if let Some(w) = watchdog.as_mut() {
            if !chunk.is_empty() || !status_chunk.is_empty() {
                w.activity();
            }
        }
        status_text.push_str(&String::from_utf8_lossy(&status_chunk));
        for line in status_text.lines() {
            if let Some(up) = line.strip_prefix("READY ") {
                if ready.is_none() {
                    ready = Some((boot_start.elapsed().as_secs_f64(), up.trim().parse().ok()));
                }
            } else if let Some(code) = line.strip_prefix("EXIT ") {
                if exit.is_none() {
                    if let Ok(c) = code.trim().parse() {
                        exit = Some((c, boot_start.elapsed().as_secs_f64()));
                        exit_seen_at = Some(Instant::now());
                    }
                }
            } else if let Some(w) = line.strip_prefix("WARN ") {
                tracing::warn!("test host: {w}");
            }
        }
        if let Some(pos) = status_text.rfind('\n') {
            status_text.drain(..=pos);
        }
        let exited = child.0.try_wait().map_err(io_err(&qemu))?;
        if let Some(st) = exited {
            // Drain what was written just before power-off.
            let _ = out.write_all(&read_new(&output, &mut out_pos));
            let rest = String::from_utf8_lossy(&read_new(&status, &mut st_pos)).into_owned();
            if exit.is_none() {
                if let Some(code) = rest.lines().find_map(|l| l.strip_prefix("EXIT ")) {
                    exit = code
                        .trim()
                        .parse()
                        .ok()
                        .map(|c| (c, boot_start.elapsed().as_secs_f64()));
                }
            }
            let Some((code, at)) = exit else {
                let mut stderr = String::new();
                if let Some(mut e) = child.0.stderr.take() {
                    let _ = e.read_to_string(&mut stderr);
                }
                return Err(HarnessError::Died {
                    status: format!(
                        "{st}{}",
                        if stderr.is_empty() {
                            String::new()
                        } else {
                            format!(": {}", stderr.trim())
                        }
                    ),
                    console: console.clone(),
                    tail: tail(&console, 40),
                });
            };
            return Ok(RunResult {
                exit_code: code,
                native: false,
                boot_secs: ready.map(|r| r.0),
                guest_uptime_at_ready: ready.and_then(|r| r.1),
                command_secs: ready.map(|r| at - r.0),
                prepare_secs,
                total_secs: start.elapsed().as_secs_f64(),
            });
        }
        let now = Instant::now();
        // After EXIT the guest powers off by itself; give it a few seconds, then stop it.
        if exit_seen_at.is_some_and(|t| now > t + Duration::from_secs(10)) {
            tracing::warn!("test host did not power off after the command; killing QEMU");
            let _ = child.0.kill();
            continue;
        }
        if let Some(w) = watchdog.as_mut().filter(|_| exit.is_none()) {
            if let Some(silent_secs) = w.check(now) {
                let _ = child.0.kill();
                let _ = child.0.wait();
                let _ = out.write_all(&read_new(&output, &mut out_pos));
                return Err(HarnessError::Stalled {
                    silent_secs,
                    dumps: w.dumps_list(),
                    console: console.clone(),
                    tail: tail(&console, 40),
                });
            }
        }
        if now > deadline && exit.is_none() {
            let _ = child.0.kill();
            let _ = child.0.wait();
            let _ = out.write_all(&read_new(&output, &mut out_pos));
            return Err(HarnessError::Timeout {
                secs: opts.timeout.as_secs(),
                phase: if ready.is_some() {
                    "command running"
                } else {
                    "test host booting"
                },
                console: console.clone(),
                tail: tail(&console, 40),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Watches a nested run for silence. A test host that prints nothing (command output or status) for
/// `after` gets its state written to `stall-N.txt` in the work dir (QEMU's CPU use while silent, the
/// CPU's registers and the code at its PC, its LAPIC and PIC, read over QMP) and an NMI. If it is
/// still silent `after` that, the run is given up as stalled.
///
/// Why: under QEMU 7.2's TCG the one-CPU test host sometimes stops taking interrupts for good, with
/// its local timer interrupt pending in the LAPIC's IRR and IF set (seen in these dumps; earlier with
/// the CPU halted at 0% QEMU CPU, with `idle=poll` spinning at 100%); neither the NMI nor a pause and
/// resume of the emulated CPU (tried earlier) brought one back, so the NMI stays as a probe whose effect
/// the next dump shows. A check that hangs inside a working test host is caught by that check's own
/// deadline, long before this.
struct Watchdog {
    after: Duration,
    pid: u32,
    qmp_sock: PathBuf,
    dir: PathBuf,
    /// When the current silent period started (last output, or the NMI).
    period_start: Instant,
    cpu_ticks_at_period_start: Option<u64>,
    /// Whether this silence already got its NMI (the next expiry gives the run up).
    nmi_sent: bool,
    dumps: Vec<PathBuf>,
}

impl Watchdog {
    fn new(after: Duration, pid: u32, qmp_sock: PathBuf, dir: PathBuf) -> Watchdog {
        Watchdog {
            after,
            pid,
            qmp_sock,
            dir,
            period_start: Instant::now(),
            cpu_ticks_at_period_start: process_cpu_ticks(pid),
            nmi_sent: false,
            dumps: Vec::new(),
        }
    }

    fn new_period(&mut self, now: Instant) {
        self.period_start = now;
        self.cpu_ticks_at_period_start = process_cpu_ticks(self.pid);
    }

    fn activity(&mut self) {
        self.new_period(Instant::now());
        self.nmi_sent = false;
    }

    /// After a period of silence: dumps the state and sends the NMI the first time; gives up the
    /// second time, returning how long the test host has been silent.
    fn check(&mut self, now: Instant) -> Option<u64> {
        let period = now.saturating_duration_since(self.period_start);
        if period < self.after {
            return None;
        }
        let silent_secs = period.as_secs()
            + if self.nmi_sent {
                self.after.as_secs()
            } else {
                0
            };
        let dump = self.dump(period, silent_secs);
        if self.nmi_sent {
            return Some(silent_secs);
        }
        let nmi = crate::qmp::Qmp::connect(&self.qmp_sock, Duration::from_secs(10))
            .and_then(|mut q| q.execute("inject-nmi", None));
        tracing::warn!(
            "test host silent for {silent_secs}s; its state is in {}; NMI: {}",
            dump.display(),
            match nmi {
                Ok(_) => "sent".to_string(),
                Err(e) => format!("failed ({e})"),
            }
        );
        self.nmi_sent = true;
        self.new_period(now);
        None
    }

    /// Writes what can be learnt about a silent test host; returns the file.
    fn dump(&mut self, period: Duration, silent_secs: u64) -> PathBuf {
        let path = self.dir.join(format!("stall-{}.txt", self.dumps.len() + 1));
        let mut text = format!(
            "silent for {silent_secs}s; NMI sent before: {}\n",
            self.nmi_sent
        );
        // SAFETY: sysconf has no memory-safety preconditions.
        let ticks_per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        if let (Some(before), Some(now)) =
            (self.cpu_ticks_at_period_start, process_cpu_ticks(self.pid))
        {
            let busy = now.saturating_sub(before) as f64 / ticks_per_sec;
            text += &format!(
                "QEMU CPU time in the last {:.0}s: {busy:.1}s ({:.0}% of one core)\n",
                period.as_secs_f64(),
                100.0 * busy / period.as_secs_f64().max(0.001)
            );
        }
        match crate::qmp::Qmp::connect(&self.qmp_sock, Duration::from_secs(10)) {
            Ok(mut qmp) => {
                for cmd in [
                    "info status",
                    "info cpus",
                    "info registers",
                    "x/24i $pc",
                    "info lapic",
                    "info pic",
                ] {
                    let out = qmp.hmp(cmd).unwrap_or_else(|e| format!("({e})\n"));
                    text += &format!("\n== {cmd}\n{out}");
                }
            }
            Err(e) => text += &format!("QMP unavailable: {e}\n"),
        }
        if let Err(e) = std::fs::write(&path, text) {
            tracing::warn!("cannot write {}: {e}", path.display());
        }
        self.dumps.push(path.clone());
        path
    }

    fn dumps_list(&self) -> String {
        self.dumps
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Renames the console log and stall dumps of a stalled attempt (`console.log` →
/// `console.log.attempt-N`), so the next attempt's files do not overwrite them.
fn keep_attempt_logs(dir: &Path, attempt: u32) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == "console.log" || (name.starts_with("stall-") && name.ends_with(".txt")) {
            let _ = std::fs::rename(entry.path(), dir.join(format!("{name}.attempt-{attempt}")));
        }
    }
}

/// utime + stime of a process, in clock ticks (fields 14 and 15 of /proc/PID/stat, after the comm).
fn process_cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): utime is field 14, stime field 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_of_a_busy_process_grow() {
        let me = std::process::id();
        let before = process_cpu_ticks(me).expect("own stat");
        let start = Instant::now();
        let mut x = 0u64;
        // Spin on CPU (not sleep) until the tick counter moves, with a generous bound.
        while process_cpu_ticks(me).expect("own stat") == before {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "no CPU time counted"
            );
        }
        std::hint::black_box(x);
        assert!(process_cpu_ticks(u32::MAX).is_none());
    }

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("abc/d-e_f.g"), "abc/d-e_f.g");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("echo $K"), "'echo $K'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(
            shell_command(&["sh".into(), "-c".into(), "uname -r; ls /dev/kvm".into()]),
            "sh -c 'uname -r; ls /dev/kvm'"
        );
    }

    #[test]
    fn includes() {
        assert_eq!(
            parse_include("target/x:/e2e/x").unwrap(),
            Include {
                host: PathBuf::from("target/x"),
                guest: "/e2e/x".into()
            }
        );
        assert!(parse_include("target/x:rel").is_err());
        assert!(parse_include(":/x").is_err());
        let i = parse_include("/abs/file").unwrap();
        assert_eq!(i.guest, "/abs/file");
    }
}
