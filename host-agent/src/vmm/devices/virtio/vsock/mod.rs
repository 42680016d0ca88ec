//! virtio-vsock (virtio spec 5.10) with the Firecracker-compatible hybrid backend: guest
//! connections end on host Unix sockets.
//!
//! Split by concern, as Firecracker's device is: `packet` (the header in guest memory), `csm`
//! (one connection's state machine and credit accounting), `muxer` (connections to Unix sockets),
//! `device` (the virtqueues and the worker thread).

mod csm;
mod device;
mod muxer;
mod packet;

use std::io;
use std::path::PathBuf;

pub use device::{Vsock, VsockHandle};

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("invalid guest CID {0}: CIDs 0-2 and 0xffffffff are reserved")]
    InvalidCid(u64),
    #[error("vsock socket {0} is in use by a live listener")]
    SocketInUse(PathBuf),
    #[error("vsock socket path {0} exists and is not a socket")]
    NotASocket(PathBuf),
    #[error("cannot listen on vsock socket {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
    #[error("vsock device: {0}")]
    Io(#[from] io::Error),
}
