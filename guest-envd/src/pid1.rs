//! Duties of envd as the VM's init (PID 1): mount the kernel filesystems, load the kernel modules the
//! image lists, keep logging to the console, step the clock, and power off.
//! (Reaping orphans is the reaper's job, which collects every child either way.)

use std::fs::File;
use std::io;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::kmod::{finit_module, ModuleInitFlags};
use nix::mount::{mount, MsFlags};
use nix::sys::stat::Mode;
use nix::sys::time::TimeSpec;
use nix::time::{clock_settime, ClockId};

/// Whether this process is the init of its PID namespace.
pub fn is_pid1() -> bool {
    std::process::id() == 1
}

struct KernelMount {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
    mode: u32,
}

const MOUNTS: &[KernelMount] = &[
    KernelMount {
        source: "proc",
        target: "/proc",
        fstype: "proc",
        flags: MsFlags::MS_NOSUID
            .union(MsFlags::MS_NODEV)
            .union(MsFlags::MS_NOEXEC),
        data: None,
        mode: 0o555,
    },
    KernelMount {
        source: "sysfs",
        target: "/sys",
        fstype: "sysfs",
        flags: MsFlags::MS_NOSUID
            .union(MsFlags::MS_NODEV)
            .union(MsFlags::MS_NOEXEC),
        data: None,
        mode: 0o555,
    },
    KernelMount {
        source: "devtmpfs",
        target: "/dev",
        fstype: "devtmpfs",
        flags: MsFlags::MS_NOSUID,
        data: Some("mode=0755"),
        mode: 0o755,
    },
    KernelMount {
        source: "devpts",
        target: "/dev/pts",
        fstype: "devpts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        data: Some("gid=5,mode=620,ptmxmode=666"),
        mode: 0o755,
    },
    KernelMount {
        source: "tmpfs",
        target: "/dev/shm",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=1777"),
        mode: 0o1777,
    },
    KernelMount {
        source: "tmpfs",
        target: "/run",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=0755"),
        mode: 0o755,
    },
    KernelMount {
        source: "tmpfs",
        target: "/tmp",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=1777"),
        mode: 0o1777,
    },
];

/// Mounts /proc, /sys, /dev, /dev/pts, /dev/shm, /run and /tmp. A filesystem already mounted there
/// (EBUSY) is fine; any other failure is logged and the rest still mounted.
pub fn mount_kernel_filesystems() {
    for m in MOUNTS {
        if let Err(e) = std::fs::create_dir_all(m.target) {
            tracing::warn!(target = m.target, error = %e, "cannot create mount point");
        }
        match mount(Some(m.source), m.target, Some(m.fstype), m.flags, m.data) {
            Ok(()) | Err(Errno::EBUSY) => {}
            Err(e) => tracing::warn!(target = m.target, error = %e, "mount failed"),
        }
        let _ = nix::sys::stat::fchmodat(
            None,
            m.target,
            Mode::from_bits_truncate(m.mode),
            nix::sys::stat::FchmodatFlags::FollowSymlink,
        );
    }
    // Programs open /dev/ptmx; with a private devpts instance it must point into it.
    if !Path::new("/dev/ptmx").exists() {
        let _ = std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx");
    }
}

/// When the kernel started init without a console on fds 0-2 (no /dev/console in the initramfs),
/// reopens them on /dev/console once devtmpfs provides it, so logs reach the serial console.
pub fn ensure_console() {
    if rustix::io::fcntl_getfd(io::stderr()).is_ok() {
        return;
    }
    if let Ok(console) = File::options().read(true).write(true).open("/dev/console") {
        let _ = rustix::stdio::dup2_stdin(&console);
        let _ = rustix::stdio::dup2_stdout(&console);
        let _ = rustix::stdio::dup2_stderr(&console);
    }
}

/// Loads a kernel module; one already loaded (or built in) is fine. A failure is logged.
pub fn load_module(path: &Path) -> io::Result<()> {
    let result = File::open(path).and_then(|file| {
        finit_module(&file, c"", ModuleInitFlags::empty()).map_err(io::Error::from)
    });
    match result {
        Ok(()) => {
            tracing::debug!(module = %path.display(), "module loaded");
            Ok(())
        }
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        Err(e) => {
            tracing::warn!(module = %path.display(), error = %e, "cannot load module");
            Err(e)
        }
    }
}

/// Whether the vsock core module is loaded (AF_VSOCK sockets can be made without the kernel
/// asking for a module first).
pub fn vsock_family_loaded() -> bool {
    Path::new("/sys/module/vsock").exists()
}

/// Steps the realtime clock to `at`.
pub fn set_clock(at: SystemTime) -> io::Result<()> {
    let since = at
        .duration_since(UNIX_EPOCH)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "time before 1970"))?;
    clock_settime(ClockId::CLOCK_REALTIME, TimeSpec::from_duration(since))?;
    Ok(())
}

/// Kills every process, syncs, and powers off (or reboots). Does not return on success.
pub fn power_off(reboot: bool) {
    tracing::info!(reboot, "shutting down");
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(-1),
        nix::sys::signal::Signal::SIGKILL,
    );
    nix::unistd::sync();
    let how = if reboot {
        nix::sys::reboot::RebootMode::RB_AUTOBOOT
    } else {
        nix::sys::reboot::RebootMode::RB_POWER_OFF
    };
    let Err(e) = nix::sys::reboot::reboot(how);
    tracing::error!(error = %e, "reboot syscall failed");
}
