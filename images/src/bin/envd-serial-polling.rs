//! `envd-serial-polling TTY...`: switches 8250 serial ports to polled mode (no IRQ), as
//! `setserial TTY irq 0` does; `envd-serial-polling --drain TTY...` waits until everything written
//! to them has gone out (before the test host powers off). The test host's init runs it on the ports that carry the command's
//! output and status: with interrupts, a lost transmit-empty interrupt of the emulated 16550 leaves
//! a writer blocked forever (the test host then sits idle until the deadline); polled, the driver
//! drains the port from a timer and nothing waits on an interrupt.

use std::os::fd::AsRawFd;

/// `struct serial_struct` from `<linux/serial.h>`.
#[repr(C)]
#[derive(Default)]
struct SerialStruct {
    type_: libc::c_int,
    line: libc::c_int,
    port: libc::c_uint,
    irq: libc::c_int,
    flags: libc::c_int,
    xmit_fifo_size: libc::c_int,
    custom_divisor: libc::c_int,
    baud_base: libc::c_int,
    close_delay: libc::c_ushort,
    io_type: libc::c_char,
    reserved_char: libc::c_char,
    hub6: libc::c_int,
    closing_wait: libc::c_ushort,
    closing_wait2: libc::c_ushort,
    iomem_base: usize,
    iomem_reg_shift: libc::c_ushort,
    port_high: libc::c_uint,
    iomap_base: libc::c_ulong,
}

fn poll_mode(path: &str) -> std::io::Result<i32> {
    let tty = std::fs::OpenOptions::new().write(true).open(path)?;
    let mut info = SerialStruct::default();
    // SAFETY: TIOCGSERIAL fills a `struct serial_struct`, which `SerialStruct` mirrors (repr(C)),
    // through a pointer valid for the call; the fd is open for its duration.
    if unsafe { libc::ioctl(tty.as_raw_fd(), libc::TIOCGSERIAL, &mut info) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let was = info.irq;
    info.irq = 0;
    // SAFETY: as above; TIOCSSERIAL only reads the struct.
    if unsafe { libc::ioctl(tty.as_raw_fd(), libc::TIOCSSERIAL, &info) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(was)
}

/// Waits until the port has sent everything queued on it.
fn drain(path: &str) -> std::io::Result<i32> {
    let tty = std::fs::OpenOptions::new().write(true).open(path)?;
    // SAFETY: tcdrain only takes the fd, open for the call's duration.
    if unsafe { libc::tcdrain(tty.as_raw_fd()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(0)
}

fn main() {
    let mut failed = false;
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let drain_only = args.first().map(String::as_str) == Some("--drain");
    if drain_only {
        args.remove(0);
    }
    for path in args {
        let done = if drain_only {
            drain(&path)
        } else {
            poll_mode(&path)
        };
        match done {
            Ok(_) if drain_only => {}
            Ok(was) => eprintln!("envd-serial-polling: {path}: irq {was} -> polled"),
            Err(e) => {
                eprintln!("envd-serial-polling: {path}: {e}");
                failed = true;
            }
        }
    }
    std::process::exit(i32::from(failed));
}
