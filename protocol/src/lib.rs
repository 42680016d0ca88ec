//! The envd wire protocol, shared by guest-envd and the host side: the prost messages generated from
//! `proto/envd.proto`, the length-prefixed framing with its limits, endpoint addresses, transports and
//! the async client.

pub mod address;
pub mod client;
pub mod frame;
pub mod transport;

/// Messages generated from `proto/envd.proto`.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/envd.v1.rs"));

    impl ProcessSelector {
        pub fn pid(pid: u32) -> Self {
            ProcessSelector {
                selector: Some(process_selector::Selector::Pid(pid)),
            }
        }

        pub fn tag(tag: impl Into<String>) -> Self {
            ProcessSelector {
                selector: Some(process_selector::Selector::Tag(tag.into())),
            }
        }
    }
}

pub use address::{Address, DEFAULT_VSOCK_PORT};
pub use client::{Client, ClientError, Output, Process, READY_ATTEMPT};
pub use frame::{FrameError, MAX_CHUNK_LEN, MAX_FRAME_LEN};

/// The version of this crate, reported by envd's health answer.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
