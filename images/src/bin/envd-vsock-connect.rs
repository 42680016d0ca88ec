//! `envd-vsock-connect CID PORT MESSAGE`: a tiny guest-side tool for the e2e (built static, baked into the
//! test template). Opens an AF_VSOCK stream to CID:PORT (CID 2 is the host), sends `MESSAGE\n`, reads one
//! reply line (or until EOF, at most 10 s) and prints it on stdout. Exits 0 when the connection and the
//! send worked, 1 on any failure (with the reason on stderr), 2 on bad usage.

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::time::Duration;

fn usage() -> ! {
    eprintln!("usage: envd-vsock-connect CID PORT MESSAGE");
    std::process::exit(2);
}

fn fail(what: &str, e: std::io::Error) -> ! {
    eprintln!("envd-vsock-connect: {what}: {e}");
    std::process::exit(1);
}

fn connect(cid: u32, port: u32) -> std::io::Result<std::fs::File> {
    // SAFETY: plain socket(2); the returned fd is checked and then owned.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, valid descriptor that nothing else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    // SAFETY: addr is a valid sockaddr_vm and the length matches it.
    let rc = unsafe {
        libc::connect(
            fd,
            std::ptr::addr_of!(addr).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(std::fs::File::from(owned))
}

fn set_read_timeout(f: &std::fs::File, d: Duration) {
    use std::os::fd::AsRawFd;
    let tv = libc::timeval {
        tv_sec: d.as_secs() as libc::time_t,
        tv_usec: 0,
    };
    // SAFETY: setsockopt with a valid timeval of the right size on a socket we own.
    unsafe {
        libc::setsockopt(
            f.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            std::ptr::addr_of!(tv).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [cid, port, message] = args.as_slice() else {
        usage()
    };
    let (Ok(cid), Ok(port)) = (cid.parse::<u32>(), port.parse::<u32>()) else {
        usage()
    };
    let mut sock = connect(cid, port).unwrap_or_else(|e| fail(&format!("connect {cid}:{port}"), e));
    sock.write_all(format!("{message}\n").as_bytes())
        .unwrap_or_else(|e| fail("send", e));
    set_read_timeout(&sock, Duration::from_secs(10));
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    while !reply.contains(&b'\n') {
        match sock.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => reply.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // A reset after the reply, or no reply at all: print what arrived; the caller checks it.
            Err(e) => {
                eprintln!("envd-vsock-connect: reading the reply: {e}");
                break;
            }
        }
    }
    let mut out = std::io::stdout();
    let _ = out.write_all(&reply);
    let _ = out.flush();
}
