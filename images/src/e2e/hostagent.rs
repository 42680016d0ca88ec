//! Checks only our own VMM gets: a guest-initiated vsock connection through the hybrid-vsock socket, boots
//! with more vCPUs, and bad input (each must end in a non-zero exit with a clear `host-agent: ` message,
//! never a hang).

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::checks::{Ctx, LiveCheck};
use super::vmm::{HostAgent, Vm};
use super::{Runner, Summary};

/// Where the template carries the guest-side vsock tool (`envd-image template --add`).
pub const GUEST_VSOCK_CONNECT: &str = "/usr/local/bin/envd-vsock-connect";
/// The host port the guest connects to; the VMM forwards it to `<uds>_5000`.
pub const GUEST_CONNECT_PORT: u32 = 5000;
const CALL: Duration = Duration::from_secs(30);

pub const LIVE_CHECKS: &[LiveCheck] =
    &[("guest-initiated vsock reaches <uds>_5000", guest_connect)];

/// Reads until `\n` or EOF (at most 4 KiB), bounded by the socket's read timeout.
fn read_line(s: &mut UnixStream) -> std::io::Result<String> {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.contains(&b'\n') && got.len() < 4096 {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if got.is_empty() => return Err(e),
            Err(_) => break,
        }
    }
    Ok(String::from_utf8_lossy(&got).trim_end().to_string())
}

/// Accepts one connection on `listener` (non-blocking, polled until `deadline` or `stop`), reads the
/// guest's line, answers `ack <line>`.
fn serve_one(
    listener: UnixListener,
    deadline: Instant,
    stop: Arc<AtomicBool>,
) -> Result<String, String> {
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("listener: {e}"))?;
    let mut s = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                    return Err("no connection arrived on the listener".into());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(format!("accept: {e}")),
        }
    };
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(Duration::from_secs(20)));
    let line = read_line(&mut s).map_err(|e| format!("reading from the guest: {e}"))?;
    s.write_all(format!("ack {line}\n").as_bytes())
        .map_err(|e| format!("answering the guest: {e}"))?;
    Ok(line)
}

/// The guest connects to host CID 2 port 5000; the bytes must arrive on `<uds>_5000`, and the host's answer
/// must reach the guest.
fn guest_connect(c: &Ctx<'_>, vm: &Vm) -> Result<String, String> {
    let uds = vm
        .vsock_uds
        .as_ref()
        .ok_or("this VM has no hybrid-vsock socket")?;
    let path = PathBuf::from(format!("{}_{GUEST_CONNECT_PORT}", uds.display()));
    let _ = std::fs::remove_file(&path);
    let listener =
        UnixListener::bind(&path).map_err(|e| format!("listening on {}: {e}", path.display()))?;
    let stop = Arc::new(AtomicBool::new(false));
    let server = {
        let stop = Arc::clone(&stop);
        let deadline = Instant::now() + CALL;
        std::thread::spawn(move || serve_one(listener, deadline, stop))
    };
    let message = "hello";
    let port = GUEST_CONNECT_PORT.to_string();
    let exec = c
        .cli
        .exec(&[], &[GUEST_VSOCK_CONNECT, "2", &port, message], CALL);
    if !matches!(&exec, Ok(o) if o.code == Some(0)) {
        stop.store(true, Ordering::Relaxed);
    }
    let served = server
        .join()
        .unwrap_or_else(|_| Err("the listener thread panicked".into()));
    let _ = std::fs::remove_file(&path);
    let o = exec?;
    if o.code != Some(0) {
        let stderr = String::from_utf8_lossy(&o.stderr);
        let hint = if stderr.contains("No such file") || stderr.contains("not found") {
            " (is envd-vsock-connect in the template? envd-image template --add ...)"
        } else {
            ""
        };
        return Err(format!(
            "`{GUEST_VSOCK_CONNECT} 2 {port} {message}` in the guest exited {:?}: {}{hint}; host side: {}",
            o.code,
            stderr.trim(),
            served.err().unwrap_or_else(|| "connection served".into())
        ));
    }
    let got = served?;
    if got != message {
        return Err(format!(
            "{} received {got:?}, want {message:?}",
            path.display()
        ));
    }
    let reply = o.stdout_str().trim_end().to_string();
    if reply != format!("ack {message}") {
        return Err(format!(
            "the guest got {reply:?} back, want \"ack {message}\" (host-to-guest data on a guest-initiated connection)"
        ));
    }
    Ok(format!("{:?} arrived, {:?} went back", got, reply))
}

/// A host connection made while the guest still boots: host-agent holds it until the guest's vsock
/// comes up, and envd, which listens before its vsock transport module brings the device up, takes
/// it then. One attempt, no retry: an envd that listened only after the device came up refused it
/// (the client then had to wait out its retry interval).
fn early_connection(runner: &Runner<'_>, ha: &HostAgent, dir: &Path) -> Result<String, String> {
    use super::vmm::Vmm as _;
    let mut vm = ha.boot(&runner.template(), dir)?;
    let uds = vm
        .vsock_uds
        .clone()
        .ok_or("this VM has no hybrid-vsock socket")?;
    let deadline = vm.started + runner.boot_deadline;
    // The socket exists once the VM is built, well before the guest's kernel is up.
    let mut stream = loop {
        match UnixStream::connect(&uds) {
            Ok(stream) => break stream,
            Err(e) if Instant::now() > deadline => {
                return Err(format!("{} never accepted: {e}", uds.display()))
            }
            Err(_) => {
                vm.alive()?;
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    };
    let connected = vm.started.elapsed();
    let port = runner.manifest.envd_port;
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(|e| format!("CONNECT: {e}"))?;
    let _ = stream.set_read_timeout(Some(deadline.saturating_duration_since(Instant::now())));
    let reply = read_line(&mut stream).map_err(|e| format!("waiting for the guest: {e}"))?;
    let answered = vm.started.elapsed();
    if !reply.starts_with("OK ") {
        return Err(format!(
            "the connection made {connected:?} after launch was refused ({reply:?}) instead of being taken when envd came up\n{}",
            vm.tails("host-agent", 20)
        ));
    }
    drop(stream);
    let cli = runner.cli(&vm.address);
    Runner::shutdown(&cli, &mut vm)?;
    Ok(format!(
        "connected {:.2}s after launch, taken by envd at {:.2}s",
        connected.as_secs_f64(),
        answered.as_secs_f64()
    ))
}

/// host-agent's extra checks that need their own VMs: a connection made during boot, bad input.
pub fn extra_checks(runner: &Runner<'_>, ha: &HostAgent, s: &mut Summary, out: &mut dyn Write) {
    let r = early_connection(
        runner,
        ha,
        &runner.work_dir.join("host-agent-early-connection"),
    );
    s.record(
        out,
        "a host connection made during boot is taken by envd, not refused",
        r,
    );
    for case in bad_input_cases(runner) {
        let what = format!("bad input: {}", case.what);
        let r = case.run();
        s.record(out, &what, r);
    }
}

/// Multi-vCPU boots: for each count, boot the template with that many vCPUs, check `nproc`, power
/// off and expect exit 0.
pub fn vcpu_checks(
    runner: &Runner<'_>,
    ha: &HostAgent,
    counts: &[u32],
    s: &mut Summary,
    out: &mut dyn Write,
) {
    for &n in counts {
        let what = format!("boots with {n} vCPUs (nproc = {n}), VMM exits 0 on shutdown");
        let vmm = HostAgent {
            binary: ha.binary.clone(),
            vcpus: n,
            memory_mib: ha.memory_mib,
        };
        let r = vcpus_boot(
            runner,
            &vmm,
            n,
            &runner.work_dir.join(format!("host-agent-vcpus{n}")),
        );
        s.record(out, &what, r);
    }
}

fn vcpus_boot(runner: &Runner<'_>, vmm: &HostAgent, n: u32, dir: &Path) -> Result<String, String> {
    let mut r = runner.boot_ready(vmm, dir)?;
    let check = r
        .cli
        .exec(&[], &["nproc"], CALL)
        .and_then(|o| o.ok())
        .and_then(|o| {
            let got = o.stdout_str().trim().to_string();
            if got == n.to_string() {
                Ok(())
            } else {
                Err(format!("nproc says {got:?}"))
            }
        });
    let down = Runner::shutdown(&r.cli, &mut r.vm);
    let tails = || r.vm.tails("host-agent", 30);
    check.map_err(|e| format!("{e}\n{}", tails()))?;
    let d = down.map_err(|e| format!("{e}\n{}", tails()))?;
    Ok(format!(
        "envd ready {:.2}s, shutdown {:.2}s",
        r.boot_to_ready.as_secs_f64(),
        d.as_secs_f64()
    ))
}

/// One bad-input run of `host-agent run`.
pub struct BadInput {
    pub what: &'static str,
    pub args: Vec<String>,
    pub deadline: Duration,
    /// The message must contain one of these (case-insensitive).
    pub expect_any: Vec<String>,
    pub binary: PathBuf,
    pub dir: PathBuf,
    /// A live listener that must survive the run (the socket-in-use case).
    pub live_listener: Option<(PathBuf, UnixListener)>,
    pub console_log: Option<PathBuf>,
}

/// Pseudo-random bytes (xorshift), for a corrupt kernel image.
pub fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        v.extend_from_slice(&seed.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Judges a finished bad-input run: a non-zero exit, a `host-agent: ` line, one of the expected words.
pub fn judge(code: Option<i32>, stderr: &str, expect_any: &[String]) -> Result<String, String> {
    let last = stderr
        .lines()
        .rev()
        .find(|l| l.starts_with("host-agent: ") && !l.contains("VM built in"))
        .map(str::to_string);
    match code {
        Some(0) => return Err(format!("exited 0; stderr: {}", stderr.trim())),
        None => return Err(format!("ended by a signal; stderr: {}", stderr.trim())),
        Some(_) => {}
    }
    let Some(msg) = last else {
        return Err(format!(
            "exit {code:?} but no `host-agent: ` message; stderr: {}",
            stderr.trim()
        ));
    };
    let lower = stderr.to_lowercase();
    if !expect_any.iter().any(|w| lower.contains(&w.to_lowercase())) {
        return Err(format!(
            "exit {code:?}, but the message names none of {expect_any:?}: {}",
            stderr.trim()
        ));
    }
    Ok(format!("exit {}: {msg}", code.unwrap_or_default()))
}

impl BadInput {
    pub fn run(self) -> Result<String, String> {
        let _ = std::fs::create_dir_all(&self.dir);
        let stderr_log = self.dir.join(format!("{}.stderr", self.slug()));
        let f = std::fs::File::create(&stderr_log)
            .map_err(|e| format!("{}: {e}", stderr_log.display()))?;
        let t = Instant::now();
        let mut child = Command::new(&self.binary)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(f)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", self.binary.display()))?;
        let status = loop {
            if let Some(st) = child.try_wait().map_err(|e| e.to_string())? {
                break Some(st);
            }
            if t.elapsed() > self.deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let stderr = std::fs::read_to_string(&stderr_log).unwrap_or_default();
        let console = || {
            self.console_log
                .as_ref()
                .map(|c| {
                    format!(
                        "\nconsole tail ({}):\n{}",
                        c.display(),
                        crate::harness::tail(c, 15)
                    )
                })
                .unwrap_or_default()
        };
        let Some(status) = status else {
            let panic = self
                .console_log
                .as_ref()
                .and_then(|c| std::fs::read_to_string(c).ok())
                .and_then(|t| {
                    t.lines()
                        .find(|l| l.contains("Kernel panic"))
                        .map(|l| format!(" (the console shows {:?}, the VMM missed it)", l.trim()))
                })
                .unwrap_or_default();
            return Err(format!(
                "still running after {:?} (killed): a hang{panic}; stderr: {}{}",
                self.deadline,
                stderr.trim(),
                console()
            ));
        };
        let verdict = judge(status.code(), &stderr, &self.expect_any)
            .map(|m| format!("{m} [{:.1}s]", t.elapsed().as_secs_f64()))
            .map_err(|e| format!("{e}{}", console()));
        if let Some((path, listener)) = &self.live_listener {
            // The VMM must leave another process's live socket alone.
            let _ = listener.set_nonblocking(true);
            UnixStream::connect(path).map_err(|e| {
                format!(
                    "{}; and the live listener's socket {} no longer accepts: {e}",
                    verdict.clone().unwrap_or_else(|e| e),
                    path.display()
                )
            })?;
        }
        verdict
    }

    fn slug(&self) -> String {
        self.what
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect()
    }
}

fn strs(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

pub fn bad_input_cases(runner: &Runner<'_>) -> Vec<BadInput> {
    let dir = runner.work_dir.join("host-agent-bad-input");
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::create_dir_all(&dir);
    let template = runner.template_dir.to_string_lossy().into_owned();
    let initrd = runner
        .template_dir
        .join("initrd")
        .to_string_lossy()
        .into_owned();
    let p = |name: &str| dir.join(name).to_string_lossy().into_owned();
    let quick = Duration::from_secs(30);
    // The guest boots to its panic in ~10 s under nested TCG on an idle machine; a busy one is slower.
    let booting = Duration::from_secs(90);
    let case = |what, args: Vec<String>, deadline, expect_any: Vec<String>| BadInput {
        what,
        args,
        deadline,
        expect_any,
        binary: runner.host_agent.clone(),
        dir: dir.clone(),
        live_listener: None,
        console_log: None,
    };
    let mut cases = Vec::new();

    let missing = p("no-such-vmlinuz");
    cases.push(case(
        "missing kernel file",
        strs(&["run", "--kernel", &missing, "--initrd", &initrd]),
        quick,
        vec![missing.clone()],
    ));

    let corrupt = p("corrupt-vmlinuz");
    let _ = std::fs::write(&corrupt, noise(4 << 20, 0x5eed_1234_abcd_0042));
    cases.push(case(
        "corrupt kernel (random bytes)",
        strs(&["run", "--kernel", &corrupt, "--initrd", &initrd]),
        quick,
        vec![corrupt.clone()],
    ));

    let kernel = runner
        .template_dir
        .join("vmlinux")
        .to_string_lossy()
        .into_owned();
    let no_initrd = p("no-such-initrd");
    cases.push(case(
        "missing initrd file",
        strs(&["run", "--kernel", &kernel, "--initrd", &no_initrd]),
        quick,
        vec![no_initrd.clone()],
    ));

    // 16 MiB (sparse) cannot sit next to a ~60 MiB kernel in 64 MiB of guest memory.
    let big_initrd = p("big-initrd");
    if let Err(e) = std::fs::File::create(&big_initrd).and_then(|f| f.set_len(16 << 20)) {
        tracing::warn!("cannot create {big_initrd}: {e}");
    }
    cases.push(case(
        "initrd too large for guest memory",
        strs(&[
            "run",
            "--kernel",
            &kernel,
            "--initrd",
            &big_initrd,
            "--mem-mib",
            "64",
        ]),
        quick,
        strs(&["does not fit"]),
    ));

    cases.push(case(
        "--mem-mib 32",
        strs(&["run", "--template", &template, "--mem-mib", "32"]),
        quick,
        strs(&["memory", "MiB"]),
    ));

    let busy = p("busy.sock");
    let mut c = case(
        "--vsock-uds where a live listener is bound",
        strs(&[
            "run",
            "--template",
            &template,
            "--vsock-uds",
            &busy,
            "--console-log",
            &p("busy-console.log"),
        ]),
        quick,
        vec![busy.clone(), "in use".into()],
    );
    match UnixListener::bind(&busy) {
        Ok(l) => c.live_listener = Some((PathBuf::from(&busy), l)),
        Err(e) => tracing::warn!("cannot bind {busy}: {e}"),
    }
    c.console_log = Some(PathBuf::from(p("busy-console.log")));
    cases.push(c);

    // panic=0: the guest halts after the panic instead of rebooting, so only host-agent noticing the
    // panic on the console ends the run (and the guest never runs the BIOS-reset fallback of a
    // reboot, which lands in empty memory and is very slow under nested emulation).
    let panic_log = p("panic-console.log");
    let mut c = case(
        "guest kernel panic (rdinit=/does-not-exist, panic=0)",
        strs(&[
            "run",
            "--template",
            &template,
            "--cmdline",
            "console=ttyS0 panic=0 rdinit=/does-not-exist",
            "--console-log",
            &panic_log,
        ]),
        booting,
        strs(&["panicked"]),
    );
    c.console_log = Some(PathBuf::from(&panic_log));
    cases.push(c);

    let quiet_log = p("no-envd-console.log");
    let mut c = case(
        "envd never answers (--envd-port 4444 --envd-timeout-ms 5000)",
        strs(&[
            "run",
            "--template",
            &template,
            "--vsock-uds",
            &p("no-envd.sock"),
            "--envd-port",
            "4444",
            "--envd-timeout-ms",
            "5000",
            "--console-log",
            &quiet_log,
        ]),
        booting,
        strs(&["envd did not answer"]),
    );
    c.console_log = Some(PathBuf::from(&quiet_log));
    cases.push(c);
    cases
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn judging_bad_input_runs() {
        let want = vec!["/x/k".to_string()];
        let ok = judge(
            Some(1),
            "host-agent: cannot read the kernel /x/k: No such file or directory\n",
            &want,
        )
        .unwrap();
        assert!(ok.starts_with("exit 1: host-agent: cannot read the kernel /x/k"));
        assert!(judge(Some(0), "host-agent: guest powered off\n", &want).is_err());
        assert!(judge(None, "", &want).is_err());
        assert!(judge(Some(1), "thread main panicked at /x/k\n", &want).is_err());
        let e = judge(Some(1), "host-agent: something else\n", &want).unwrap_err();
        assert!(e.contains("names none of"), "{e}");
        // The VM-built line is not the message.
        assert!(judge(
            Some(1),
            "host-agent: VM built in 3 ms, vCPUs running\nhost-agent: guest kernel panicked: Kernel panic - not syncing: VFS\n",
            &strs(&["PANICKED"]),
        )
        .unwrap()
        .ends_with("not syncing: VFS"));
    }

    #[test]
    fn noise_is_deterministic_and_sized() {
        let a = noise(1001, 7);
        assert_eq!(a.len(), 1001);
        assert_eq!(a, noise(1001, 7));
        assert_ne!(a, noise(1001, 8));
    }

    #[test]
    fn serves_one_connection() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock_5000");
        let l = UnixListener::bind(&path).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let t = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || serve_one(l, Instant::now() + Duration::from_secs(10), stop))
        };
        let mut c = UnixStream::connect(&path).unwrap();
        c.write_all(b"hello\n").unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        assert_eq!(read_line(&mut c).unwrap(), "ack hello");
        assert_eq!(t.join().unwrap().unwrap(), "hello");
        // Stopped without a connection: an error, promptly.
        let l = UnixListener::bind(dir.path().join("other")).unwrap();
        let stop = Arc::new(AtomicBool::new(true));
        let e = serve_one(l, Instant::now() + Duration::from_secs(60), stop).unwrap_err();
        assert!(e.contains("no connection"));
    }
}
