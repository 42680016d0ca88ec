//! envd-rs images: the template builder, the nested-QEMU test harness and the full-stack e2e runner.
//!
//! Pure pieces (cpio writing, module ordering, env parsing, rootfs layering rules) are unit-tested here;
//! the binaries in `src/bin/` do the I/O: `envd-image` (build a template or the test host image),
//! `envd-harness` (boot the test host under QEMU and run one command inside), `envd-e2e` (inside the test
//! host: boot the template per VMM and check guest-envd end to end).

pub mod components;
pub mod cpio;
pub mod deb;
pub mod e2e;
pub mod harness;
pub mod modinfo;
pub mod paths;
pub mod qmp;
pub mod rootfs;
pub mod snapshot_e2e;
pub mod template;
pub mod template_env;
pub mod testhost;
pub mod tree;
pub mod vmlinux;
