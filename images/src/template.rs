//! The template builder: kernel + initramfs with guest-envd as `/init`, the modules virtio/vsock need,
//! busybox, the template env in `/etc/envd/envd.json`, and a `template.json` manifest.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::components::{self, ComponentError, KernelInfo};
use crate::cpio::CpioWriter;
use crate::deb::DebCache;
use crate::rootfs::{self, RootfsError};
use crate::template_env::{self, EnvError, TemplateEnv};
use crate::tree::{Node, Tree, TreeError};

/// Modules for both virtio transports (PCI for QEMU `-M pc`, MMIO for our VMM) and the vsock transport.
pub const TEMPLATE_MODULES: &[&str] = &[
    "virtio",
    "virtio_ring",
    "virtio_mmio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "vsock",
    "vmw_vsock_virtio_transport_common",
    "vmw_vsock_virtio_transport",
];

/// The kernel command line a template boots with unless its builder is given another. Besides the
/// console and panic handling, three options that only skip boot work a sandbox does not need
/// (measured together in the harness, README, Benchmarks): `cryptomgr.notests` skips the crypto
/// self-tests (a few hundred ms of emulated CPU; Kata Containers boots its guests with it too),
/// `no_timer_check` skips probing whether the IO-APIC delivers the PIT's interrupt, and
/// `8250.nr_uarts=1` registers the one serial port either VMM has instead of four.
pub const DEFAULT_CMDLINE: &str =
    "console=ttyS0 panic=-1 reboot=k quiet cryptomgr.notests no_timer_check 8250.nr_uarts=1";
pub const ENVD_PORT: u32 = 49983;
pub const MANIFEST: &str = "template.json";

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Component(#[from] ComponentError),
    #[error(transparent)]
    Tree(#[from] TreeError),
    #[error(transparent)]
    Rootfs(#[from] RootfsError),
    #[error("{path}: {source}")]
    Env { path: PathBuf, source: EnvError },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("template WorkingDir {0:?} must be an absolute path")]
    Workdir(String),
    #[error("bad --add {0:?}: {1}")]
    Add(String, &'static str),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> BuildError + '_ {
    move |source| BuildError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Debug, Clone)]
pub enum EnvSource {
    None,
    OciConfig(PathBuf),
    EnvFile(PathBuf),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    #[default]
    None,
    Gzip,
}

#[derive(Debug, Clone)]
pub struct TemplateOptions {
    /// The static guest-envd binary, installed as `/init`.
    pub envd: PathBuf,
    pub env: EnvSource,
    /// A `docker export` tarball (or a tar of a debootstrap tree), layered under our files.
    pub rootfs: Option<PathBuf>,
    pub out: PathBuf,
    pub cmdline: String,
    pub extra_modules: Vec<String>,
    /// Extra host files copied into the initramfs (e.g. test tools).
    pub extra_files: Vec<ExtraFile>,
    pub compression: Compression,
    pub envd_version: String,
}

/// A host file added to the initramfs at `guest` (keeps its permission bits).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtraFile {
    pub host: PathBuf,
    pub guest: String,
}

/// Paths the builder owns; an extra file may not replace them.
const RESERVED: &[&str] = &["/init", "/etc/envd/envd.json"];

/// Parses `HOST:GUEST` (GUEST absolute, not one of the builder's own files).
pub fn parse_add(spec: &str) -> Result<ExtraFile, BuildError> {
    let bad = |why| BuildError::Add(spec.to_string(), why);
    let (host, guest) = spec
        .rsplit_once(':')
        .ok_or_else(|| bad("expected HOST_PATH:GUEST_PATH"))?;
    if host.is_empty() {
        return Err(bad("empty host path"));
    }
    let clean = crate::tree::clean(guest).map_err(|_| bad("bad guest path"))?;
    if !guest.starts_with('/') {
        return Err(bad("the guest path must be absolute"));
    }
    let guest = format!("/{clean}");
    if RESERVED.contains(&guest.as_str()) {
        return Err(bad("the template builder owns that guest path"));
    }
    Ok(ExtraFile {
        host: PathBuf::from(host),
        guest,
    })
}

/// `/etc/envd/envd.json`: guest-envd's contract with the image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvdConfig {
    pub listen: String,
    pub template_env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template_user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template_workdir: Option<String>,
    /// Absolute paths inside the initramfs, in load order.
    pub modules: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub kernel: KernelInfo,
    pub busybox_version: String,
    pub cmdline: String,
    pub envd_version: String,
    pub envd_port: u32,
    pub template_env: TemplateEnv,
    /// Module names in load order.
    pub modules: Vec<String>,
    pub initrd_compression: Compression,
    /// sha256 of `vmlinuz`, `initrd`, `vmlinux` (when extracted) and the `envd` binary baked in.
    pub sha256: BTreeMap<String, String>,
    /// Digest of everything the build read; equal digests mean the build can be skipped.
    pub inputs_sha256: String,
}

pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn load_env(src: &EnvSource) -> Result<TemplateEnv, BuildError> {
    let (path, oci) = match src {
        EnvSource::None => return Ok(TemplateEnv::default()),
        EnvSource::OciConfig(p) => (p, true),
        EnvSource::EnvFile(p) => (p, false),
    };
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    let parsed = if oci {
        template_env::parse_oci_config(&text)
    } else {
        template_env::parse_env_file(&text)
    };
    parsed.map_err(|source| BuildError::Env {
        path: path.clone(),
        source,
    })
}

pub fn envd_config(env: &TemplateEnv, modules: Vec<String>) -> EnvdConfig {
    EnvdConfig {
        listen: format!("vsock:{ENVD_PORT}"),
        template_env: env.env.clone(),
        template_user: env.user.clone(),
        template_workdir: env.workdir.clone(),
        modules,
    }
}

/// Reads an existing manifest, if any.
pub fn read_manifest(dir: &Path) -> Option<Manifest> {
    let text = std::fs::read_to_string(dir.join(MANIFEST)).ok()?;
    serde_json::from_str(&text).ok()
}

/// Builds (or, when nothing changed, keeps) a template directory.
pub fn build_template(opts: &TemplateOptions, cache: &DebCache) -> Result<Manifest, BuildError> {
    let env = load_env(&opts.env)?;
    if let Some(w) = &env.workdir {
        if !w.starts_with('/') {
            return Err(BuildError::Workdir(w.clone()));
        }
    }
    let kernel = components::fetch_kernel(cache)?;
    let busybox = components::fetch_busybox(cache)?;
    let envd_sha = sha256_file(&opts.envd).map_err(io_err(&opts.envd))?;
    let mut roots: Vec<String> = TEMPLATE_MODULES.iter().map(|s| s.to_string()).collect();
    roots.extend(opts.extra_modules.iter().cloned());

    // Everything the output depends on, for the incremental check.
    let mut inputs = Sha256::new();
    inputs.update(format!(
        "v1\n{}\n{}\n{}\n{}\n{:?}\n{:?}\n{}\n{}\n",
        kernel.package,
        kernel.version,
        busybox.version,
        opts.cmdline,
        roots,
        opts.compression,
        opts.envd_version,
        envd_sha
    ));
    inputs.update(serde_json::to_vec(&env).unwrap_or_default());
    if let Some(r) = &opts.rootfs {
        inputs.update(sha256_file(r).map_err(io_err(r))?);
    }
    for x in &opts.extra_files {
        let sum = sha256_file(&x.host).map_err(io_err(&x.host))?;
        inputs.update(format!("add {} {sum}\n", x.guest));
    }
    // Templates built before vmlinux was extracted must be rebuilt to get one.
    inputs.update(b"with vmlinux\n");
    // ... and those from before its segments' zero tails were trimmed, to get that.
    inputs.update(b"vmlinux zero tails trimmed\n");
    inputs.update(b"no modprobe applet\n");
    let inputs_sha256 = hex(&inputs.finalize());
    if let Some(m) = read_manifest(&opts.out) {
        let unchanged = m.inputs_sha256 == inputs_sha256
            && ["vmlinuz", "initrd", "vmlinux"].iter().all(|f| {
                sha256_file(&opts.out.join(f)).ok().as_deref()
                    == m.sha256.get(*f).map(String::as_str)
            });
        if unchanged {
            tracing::info!(out = %opts.out.display(), "template is up to date");
            return Ok(m);
        }
    }

    let mut tree = Tree::new();
    components::base_layout(&mut tree)?;
    busybox.install(&mut tree)?;
    let modules = kernel.install_modules(&mut tree, &roots)?;
    for x in &opts.extra_files {
        tree.host_file(&x.guest, &x.host, None)?;
    }
    tree.host_file("/init", &opts.envd, Some(0o755))?;
    if let Some(w) = &env.workdir {
        tree.dir(w, 0o755)?;
    }
    let cfg = envd_config(&env, modules.iter().map(|(_, p)| p.clone()).collect());
    let cfg_json = serde_json::to_vec_pretty(&cfg).map_err(|e| io_err(&opts.out)(e.into()))?;
    tree.bytes("/etc/envd/envd.json", 0o644, cfg_json)?;

    std::fs::create_dir_all(&opts.out).map_err(io_err(&opts.out))?;
    let initrd = opts.out.join("initrd");
    let tmp = opts.out.join(".initrd.tmp");
    write_initrd(&tree, opts.rootfs.as_deref(), opts.compression, &tmp)?;
    std::fs::rename(&tmp, &initrd).map_err(io_err(&initrd))?;
    let vmlinuz = opts.out.join("vmlinuz");
    let bz = std::fs::read(&kernel.vmlinuz).map_err(io_err(&kernel.vmlinuz))?;
    std::fs::write(&vmlinuz, &bz).map_err(io_err(&vmlinuz))?;
    // The same kernel uncompressed, for VMMs that boot an ELF (host-agent prefers it: the guest
    // then skips decompressing itself). Without it the template still boots from vmlinuz.
    let vmlinux = opts.out.join("vmlinux");
    let _ = std::fs::remove_file(&vmlinux);
    let mut files = vec![("vmlinuz", &vmlinuz), ("initrd", &initrd)];
    match crate::vmlinux::extract(&bz) {
        Ok(mut elf) => {
            let trimmed = crate::vmlinux::trim_segment_zero_tails(&mut elf);
            tracing::debug!(trimmed, "vmlinux segments' zero tails left to the loader");
            std::fs::write(&vmlinux, elf).map_err(io_err(&vmlinux))?;
            files.push(("vmlinux", &vmlinux));
        }
        Err(e) => tracing::warn!("no vmlinux in the template: {e}"),
    }

    let mut sha256 = BTreeMap::new();
    for (k, p) in files {
        sha256.insert(k.to_string(), sha256_file(p).map_err(io_err(p))?);
    }
    sha256.insert("envd".to_string(), envd_sha);
    let manifest = Manifest {
        format: 1,
        kernel: kernel.info(),
        busybox_version: busybox.version.clone(),
        cmdline: opts.cmdline.clone(),
        envd_version: opts.envd_version.clone(),
        envd_port: ENVD_PORT,
        template_env: env,
        modules: modules.iter().map(|(m, _)| m.name.clone()).collect(),
        initrd_compression: opts.compression,
        sha256,
        inputs_sha256,
    };
    let mpath = opts.out.join(MANIFEST);
    let text = serde_json::to_string_pretty(&manifest).map_err(|e| io_err(&mpath)(e.into()))?;
    std::fs::write(&mpath, text + "\n").map_err(io_err(&mpath))?;
    Ok(manifest)
}

/// Writes the initramfs: the rootfs layer (if any) first, then our tree; one archive, one trailer.
pub fn write_initrd(
    tree: &Tree,
    rootfs: Option<&Path>,
    compression: Compression,
    out: &Path,
) -> Result<(), BuildError> {
    let f = File::create(out).map_err(io_err(out))?;
    let buffered = BufWriter::with_capacity(1 << 20, f);
    let sink = match compression {
        Compression::None => Sink::Plain(buffered),
        Compression::Gzip => Sink::Gzip(flate2::write::GzEncoder::new(
            buffered,
            flate2::Compression::fast(),
        )),
    };
    let mut w = CpioWriter::new(sink);
    match rootfs {
        Some(r) => {
            let layer = rootfs::scan(r)?;
            rootfs::write_layer(r, &layer, tree, &mut w)?;
            let skip = |p: &str, n: &Node| layer.shadows(p, n, tree);
            tree.write_entries(&mut w, &skip)?;
        }
        None => tree.write_entries(&mut w, &|_, _| false)?,
    }
    let sink = w.finish().map_err(io_err(out))?;
    let mut file = match sink {
        Sink::Plain(b) => b,
        Sink::Gzip(g) => g.finish().map_err(io_err(out))?,
    };
    file.flush().map_err(io_err(out))?;
    Ok(())
}

enum Sink {
    Plain(BufWriter<File>),
    Gzip(flate2::write::GzEncoder<BufWriter<File>>),
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Sink::Plain(w) => w.write(buf),
            Sink::Gzip(w) => w.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Sink::Plain(w) => w.flush(),
            Sink::Gzip(w) => w.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envd_json_matches_the_guest_contract() {
        let mut env = TemplateEnv::default();
        env.env.insert("K".into(), "V".into());
        let cfg = envd_config(&env, vec!["/lib/modules/x/kernel/a.ko".into()]);
        let v: serde_json::Value = serde_json::to_value(&cfg).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "listen": "vsock:49983",
                "template_env": {"K": "V"},
                "modules": ["/lib/modules/x/kernel/a.ko"],
            })
        );
        env.user = Some("root".into());
        env.workdir = Some("/srv/app".into());
        let v = serde_json::to_value(envd_config(&env, vec![])).unwrap();
        assert_eq!(v["template_user"], "root");
        assert_eq!(v["template_workdir"], "/srv/app");
    }

    #[test]
    fn env_sources() {
        let dir = tempfile::tempdir().unwrap();
        let oci = dir.path().join("config.json");
        std::fs::write(&oci, r#"{"config":{"Env":["A=1"],"WorkingDir":"/w"}}"#).unwrap();
        let t = load_env(&EnvSource::OciConfig(oci)).unwrap();
        assert_eq!(t.env["A"], "1");
        assert_eq!(t.workdir.as_deref(), Some("/w"));
        let ef = dir.path().join("env");
        std::fs::write(&ef, "B=2\n").unwrap();
        assert_eq!(load_env(&EnvSource::EnvFile(ef)).unwrap().env["B"], "2");
        assert!(matches!(
            load_env(&EnvSource::EnvFile(dir.path().join("missing"))),
            Err(BuildError::Io { .. })
        ));
        let bad = dir.path().join("bad");
        std::fs::write(&bad, "nope\n").unwrap();
        assert!(matches!(
            load_env(&EnvSource::EnvFile(bad)),
            Err(BuildError::Env { .. })
        ));
    }

    #[test]
    fn add_specs() {
        assert_eq!(
            parse_add("target/x/tool:/usr/local/bin/tool").unwrap(),
            ExtraFile {
                host: PathBuf::from("target/x/tool"),
                guest: "/usr/local/bin/tool".into()
            }
        );
        assert_eq!(parse_add("a:/usr//bin/./b").unwrap().guest, "/usr/bin/b");
        for bad in [
            "tool",
            ":/x",
            "a:rel/x",
            "a:/",
            "a:/init",
            "a:/etc/envd/envd.json",
            "a:/x/../y",
        ] {
            assert!(parse_add(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn committed_test_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/oci-config.json");
        let t = load_env(&EnvSource::OciConfig(path)).unwrap();
        assert_eq!(t.env["TEMPLATE_ONLY"], "from-image");
        assert!(t.env["PATH"].split(':').any(|p| p == "/bin"));
        assert!(t.env["PATH"].split(':').any(|p| p == "/usr/bin"));
        assert_eq!(t.workdir.as_deref(), Some("/srv/app"));
    }
}
