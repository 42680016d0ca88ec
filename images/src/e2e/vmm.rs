//! The VMMs the e2e checks run under. Each boots a template and says how to reach its envd: QEMU with
//! vhost-vsock (`vsock:CID:PORT`), and our own `host-agent` VMM with its hybrid-vsock Unix socket
//! (`hvsock:PATH:PORT`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::template::Manifest;

/// A booted VM.
pub struct Vm {
    pub child: Child,
    /// The address `host-agent envd --connect` takes.
    pub address: String,
    pub console_log: PathBuf,
    /// Where the VMM's own stderr goes.
    pub stderr_log: PathBuf,
    /// The hybrid-vsock Unix socket (host-agent only): guest-initiated connections to port P land on
    /// `<path>_P`.
    pub vsock_uds: Option<PathBuf>,
    pub started: Instant,
}

impl Vm {
    /// `Err` if the VMM process has already exited.
    pub fn alive(&mut self) -> Result<(), String> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(st)) => Err(format!("the VMM exited early ({st})")),
            Err(e) => Err(e.to_string()),
        }
    }

    /// The last lines of the console log and of the VMM's stderr, for failure reports.
    pub fn tails(&self, who: &str, lines: usize) -> String {
        let t = |p: &Path| {
            let t = crate::harness::tail(p, lines);
            if t.trim().is_empty() {
                "(empty)".to_string()
            } else {
                t
            }
        };
        format!(
            "{who}: console tail ({}):\n{}\n{who}: VMM stderr ({}):\n{}",
            self.console_log.display(),
            t(&self.console_log),
            self.stderr_log.display(),
            t(&self.stderr_log)
        )
    }

    /// Waits for the VMM to exit; kills it and errs at the deadline.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus, String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().map_err(|e| e.to_string())? {
                return Ok(st);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return Err(format!("the VMM did not exit within {timeout:?} (killed)"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub struct Template<'a> {
    pub dir: &'a Path,
    pub manifest: &'a Manifest,
}

pub trait Vmm {
    /// `qemu` or `host-agent`: the prefix of every output line.
    fn name(&self) -> &'static str;
    /// Why this VMM cannot run here, if it cannot.
    fn unavailable(&self) -> Option<String>;
    /// Boots in `work_dir` (created fresh; console log, VMM stderr, sockets go there).
    fn boot(&self, template: &Template<'_>, work_dir: &Path) -> Result<Vm, String>;
    /// Checks only this VMM runs, on the booted VM, after the common ones.
    fn live_checks(&self) -> &'static [super::checks::LiveCheck] {
        &[]
    }
}

/// QEMU with KVM, `-M pc` (virtio-pci) and vhost-vsock.
pub struct Qemu {
    pub binary: PathBuf,
    pub cid: u32,
    pub memory_mib: u32,
}

impl Qemu {
    pub fn args(&self, template: &Template<'_>, console: &Path) -> Vec<String> {
        let t = template.dir;
        let mut a: Vec<String> = [
            "-enable-kvm",
            "-M",
            "pc",
            "-cpu",
            "host",
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(["-m".into(), self.memory_mib.to_string()]);
        a.extend([
            "-kernel".into(),
            t.join("vmlinuz").to_string_lossy().into_owned(),
        ]);
        a.extend([
            "-initrd".into(),
            t.join("initrd").to_string_lossy().into_owned(),
        ]);
        a.extend(["-append".into(), template.manifest.cmdline.clone()]);
        a.extend(["-serial".into(), format!("file:{}", console.display())]);
        a.extend([
            "-device".into(),
            format!("vhost-vsock-pci,guest-cid={}", self.cid),
        ]);
        a
    }
}

impl Vmm for Qemu {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn unavailable(&self) -> Option<String> {
        if !self.binary.is_file() {
            return Some(format!("{} not found", self.binary.display()));
        }
        for dev in ["/dev/kvm", "/dev/vhost-vsock"] {
            if !Path::new(dev).exists() {
                return Some(format!("{dev} missing (load kvm and vhost_vsock)"));
            }
        }
        None
    }

    fn boot(&self, template: &Template<'_>, work_dir: &Path) -> Result<Vm, String> {
        let (console, stderr_log, stderr) = prepare_dir(work_dir)?;
        let child = Command::new(&self.binary)
            .args(self.args(template, &console))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", self.binary.display()))?;
        Ok(Vm {
            child,
            address: format!("vsock:{}:{}", self.cid, template.manifest.envd_port),
            console_log: console,
            stderr_log,
            vsock_uds: None,
            started: Instant::now(),
        })
    }
}

/// A fresh per-boot directory: the console log path, the stderr log path and its open file.
fn prepare_dir(work_dir: &Path) -> Result<(PathBuf, PathBuf, std::fs::File), String> {
    let _ = std::fs::remove_dir_all(work_dir);
    std::fs::create_dir_all(work_dir).map_err(|e| format!("{}: {e}", work_dir.display()))?;
    let stderr_log = work_dir.join("vmm.stderr");
    let f =
        std::fs::File::create(&stderr_log).map_err(|e| format!("{}: {e}", stderr_log.display()))?;
    Ok((work_dir.join("console.log"), stderr_log, f))
}

/// Our KVM VMM: `host-agent run --template DIR --vsock-uds PATH --console-log LOG`, virtio-mmio vsock
/// described through ACPI, Firecracker-style hybrid vsock on the host side.
pub struct HostAgent {
    pub binary: PathBuf,
    pub vcpus: u32,
    pub memory_mib: u32,
}

impl HostAgent {
    pub const UDS: &'static str = "v.sock";

    pub fn args(&self, template: &Template<'_>, uds: &Path, console: &Path) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "run".into(),
            "--template".into(),
            template.dir.to_string_lossy().into_owned(),
            "--vsock-uds".into(),
            uds.to_string_lossy().into_owned(),
            "--console-log".into(),
            console.to_string_lossy().into_owned(),
        ];
        if self.vcpus != 1 {
            a.extend(["--vcpus".into(), self.vcpus.to_string()]);
        }
        if self.memory_mib != 256 {
            a.extend(["--mem-mib".into(), self.memory_mib.to_string()]);
        }
        a
    }
}

impl Vmm for HostAgent {
    fn name(&self) -> &'static str {
        "host-agent"
    }

    fn unavailable(&self) -> Option<String> {
        if !self.binary.is_file() {
            return Some(format!("{} not found", self.binary.display()));
        }
        if !Path::new("/dev/kvm").exists() {
            return Some("/dev/kvm missing (load kvm)".into());
        }
        None
    }

    fn boot(&self, template: &Template<'_>, work_dir: &Path) -> Result<Vm, String> {
        let (console, stderr_log, stderr) = prepare_dir(work_dir)?;
        let uds = work_dir.join(Self::UDS);
        let child = Command::new(&self.binary)
            .args(self.args(template, &uds, &console))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", self.binary.display()))?;
        Ok(Vm {
            child,
            address: format!("hvsock:{}:{}", uds.display(), template.manifest.envd_port),
            console_log: console,
            stderr_log,
            vsock_uds: Some(uds),
            started: Instant::now(),
        })
    }

    fn live_checks(&self) -> &'static [super::checks::LiveCheck] {
        super::hostagent::LIVE_CHECKS
    }
}
