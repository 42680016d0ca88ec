//! Listening on a Unix socket or AF_VSOCK and serving each connection in its own task.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use envd_protocol::Address;
use tokio::net::UnixListener;
use tokio_vsock::{VsockAddr, VsockListener, VMADDR_CID_ANY};

use super::{serve_connection, Envd};

pub enum Listener {
    Unix(UnixListener),
    Vsock(VsockListener),
}

impl Listener {
    pub fn bind(addr: &Address) -> io::Result<Listener> {
        match addr {
            Address::Unix(path) => Ok(Listener::Unix(bind_unix(path)?)),
            Address::Vsock { cid, port } => Ok(Listener::Vsock(VsockListener::bind(
                VsockAddr::new(cid.unwrap_or(VMADDR_CID_ANY), *port),
            )?)),
            Address::HybridVsock { .. } => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "envd listens on unix:PATH or vsock:PORT; hvsock is a host-side address",
            )),
        }
    }
}

/// Binds a Unix socket, replacing a stale socket file but never one that a live server answers on.
fn bind_unix(path: &Path) -> io::Result<UnixListener> {
    match UnixListener::bind(path) {
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{} is in use by a running server", path.display()),
                ));
            }
            std::fs::remove_file(path)?;
            UnixListener::bind(path)
        }
        other => other,
    }
}

/// Accepts connections forever.
pub async fn serve(listener: Listener, envd: Arc<Envd>) {
    loop {
        let accepted = match &listener {
            Listener::Unix(l) => l.accept().await.map(|(s, _)| {
                tokio::spawn(serve_connection(s, Arc::clone(&envd)));
            }),
            Listener::Vsock(l) => l.accept().await.map(|(s, _)| {
                tokio::spawn(serve_connection(s, Arc::clone(&envd)));
            }),
        };
        if let Err(e) = accepted {
            // EMFILE and friends: keep serving the connections we have and try again shortly.
            tracing::warn!(error = %e, "accept failed");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
