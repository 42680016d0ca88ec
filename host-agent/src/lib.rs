//! host-agent: the host side of envd-rs, a rust-vmm KVM VMM for sandboxes and the envd client CLI.

pub mod api;
pub mod template;
pub mod vmm;
