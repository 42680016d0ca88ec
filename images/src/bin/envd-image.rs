//! `envd-image`: builds a template directory (vmlinuz, initrd, template.json) or the test host image.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use envd_images::deb::DebCache;
use envd_images::template::{self, Compression, EnvSource, TemplateOptions};
use envd_images::{paths, testhost};

#[derive(Parser)]
#[command(about = "Build envd-rs template images and the test host image")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build a template: Debian cloud kernel + initramfs with guest-envd as /init.
    Template {
        /// The static guest-envd binary.
        #[arg(long)]
        envd: PathBuf,
        /// OCI image config JSON whose config.Env / WorkingDir / User become the template env.
        #[arg(long, conflicts_with = "env_file")]
        oci_config: Option<PathBuf>,
        /// Plain KEY=VALUE env file for the template env.
        #[arg(long)]
        env_file: Option<PathBuf>,
        /// Rootfs tarball (`docker export` output or a tar of a debootstrap tree) layered in.
        #[arg(long)]
        rootfs: Option<PathBuf>,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = template::DEFAULT_CMDLINE)]
        cmdline: String,
        /// Extra kernel modules to include and load (with their dependencies).
        #[arg(long = "module")]
        modules: Vec<String>,
        /// HOST_PATH:GUEST_PATH: copy a host file into the initramfs (e.g. a static test tool).
        #[arg(long = "add")]
        adds: Vec<String>,
        #[arg(long, value_enum, default_value = "none")]
        compress: CompressArg,
        /// Version string recorded for envd (default: this workspace's version).
        #[arg(long, default_value = env!("CARGO_PKG_VERSION"))]
        envd_version: String,
    },
    /// Build the test host image (kernel + initramfs with KVM modules, QEMU, busybox) into a directory.
    Testhost {
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum CompressArg {
    None,
    Gzip,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let cache = DebCache::new(&paths::cache_dir());
    match cli.cmd {
        Cmd::Template {
            envd,
            oci_config,
            env_file,
            rootfs,
            out,
            cmdline,
            modules,
            adds,
            compress,
            envd_version,
        } => {
            if !envd.is_file() {
                bail!(
                    "guest-envd binary {} not found (build it first)",
                    envd.display()
                );
            }
            let env = match (oci_config, env_file) {
                (Some(p), _) => EnvSource::OciConfig(p),
                (None, Some(p)) => EnvSource::EnvFile(p),
                (None, None) => EnvSource::None,
            };
            let extra_files = adds
                .iter()
                .map(|a| template::parse_add(a))
                .collect::<Result<Vec<_>, _>>()?;
            for x in &extra_files {
                if !x.host.is_file() {
                    bail!("--add: {} is not a file", x.host.display());
                }
            }
            let opts = TemplateOptions {
                envd,
                env,
                rootfs,
                out: out.clone(),
                cmdline,
                extra_modules: modules,
                extra_files,
                compression: match compress {
                    CompressArg::None => Compression::None,
                    CompressArg::Gzip => Compression::Gzip,
                },
                envd_version,
            };
            let m = template::build_template(&opts, &cache).context("building template")?;
            println!(
                "template {}: kernel {} ({}), {} modules, initrd sha256 {}",
                out.display(),
                m.kernel.release,
                m.kernel.version,
                m.modules.len(),
                m.sha256.get("initrd").map(String::as_str).unwrap_or("?")
            );
        }
        Cmd::Testhost { out } => {
            let img = testhost::build(&cache, &testhost::TestHostOptions::default(), &out)
                .context("building test host image")?;
            println!("test host {}: kernel {}", out.display(), img.kernel_release);
        }
    }
    Ok(())
}
