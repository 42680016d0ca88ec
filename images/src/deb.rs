//! Debian packages fetched with `apt-get download` into a cache and unpacked with `dpkg-deb -x`.
//!
//! Cache layout (under `$ENVD_CACHE_DIR`, default `<repo>/.cache`):
//! - `debs/<name>_<version>_<arch>.deb`: what `apt-get download` wrote;
//! - `unpacked/<name>_<version>/`: `dpkg-deb -x` of it, complete once it exists (unpacked to a temporary
//!   sibling and renamed).
//!
//! A package whose candidate version is already in `debs/` is not fetched again. When apt's lists cannot be
//! read (no `apt-get update` yet, offline), the newest cached file of that package is used.

use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum DebError {
    #[error(
        "cannot run {tool}: {source} (is it installed? this needs a Debian host with apt and dpkg)"
    )]
    Spawn {
        tool: &'static str,
        source: std::io::Error,
    },
    #[error("`apt-get download {package}` failed and no cached copy exists in {cache}:\n{stderr}\n(hint: run `apt-get update`; the package registry must be reachable)")]
    Download {
        package: String,
        cache: PathBuf,
        stderr: String,
    },
    #[error("`{cmd}` failed: {stderr}")]
    Tool { cmd: String, stderr: String },
    #[error("package {package} not resolvable: {why}")]
    Resolve { package: String, why: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DebError + '_ {
    move |source| DebError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A fetched and unpacked package.
#[derive(Debug, Clone)]
pub struct Package {
    pub name: String,
    pub version: String,
    pub deb: PathBuf,
    pub root: PathBuf,
}

fn run(tool: &'static str, args: &[&str], cwd: Option<&Path>) -> Result<String, DebError> {
    let mut cmd = Command::new(tool);
    cmd.args(args).env("LC_ALL", "C");
    if let Some(cwd) = cwd {
        cmd.current_dir(cwd);
    }
    let out = cmd
        .output()
        .map_err(|source| DebError::Spawn { tool, source })?;
    if !out.status.success() {
        return Err(DebError::Tool {
            cmd: format!("{tool} {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Parses one field of `apt-cache show` / `dpkg-deb -f` style output.
pub fn control_field(text: &str, field: &str) -> Option<String> {
    let prefix = format!("{field}:");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|v| v.trim().to_string())
}

/// From the meta package's `Depends:` field, the first dependency whose name starts with `prefix`
/// (e.g. `linux-image-` in `linux-image-6.1.0-28-cloud-amd64 (= 6.1.119-1)`).
pub fn dependency_with_prefix(depends: &str, prefix: &str) -> Option<String> {
    depends
        .split([',', '|'])
        .map(|d| d.split_whitespace().next().unwrap_or(""))
        .find(|name| name.starts_with(prefix))
        .map(str::to_string)
}

/// The file name `apt-get download` gives a package (`:` of an epoch is escaped as `%3a`).
pub fn deb_file_name(name: &str, version: &str, arch: &str) -> String {
    format!("{name}_{}_{arch}.deb", version.replace(':', "%3a"))
}

pub struct DebCache {
    pub dir: PathBuf,
}

impl DebCache {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
        }
    }

    fn debs(&self) -> PathBuf {
        self.dir.join("debs")
    }

    /// The candidate version apt would install, if apt's lists know the package.
    pub fn candidate(&self, name: &str) -> Option<String> {
        self.show(name).and_then(|t| control_field(&t, "Version"))
    }

    /// `apt-cache show --no-all-versions NAME`, memoized in `<cache>/apt-show.json` for as long as apt's
    /// lists are unchanged (loading apt's cache costs about a second per call).
    fn show(&self, name: &str) -> Option<String> {
        let stamp = std::fs::metadata("/var/lib/apt/lists")
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_nanos().to_string())?;
        let memo_path = self.dir.join("apt-show.json");
        let mut memo: std::collections::BTreeMap<String, String> =
            std::fs::read_to_string(&memo_path)
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok())
                .unwrap_or_default();
        if memo.get("\u{0}stamp") != Some(&stamp) {
            memo.clear();
            memo.insert("\u{0}stamp".to_string(), stamp);
        }
        if let Some(t) = memo.get(name) {
            return Some(t.clone());
        }
        let text = run("apt-cache", &["show", "--no-all-versions", name], None).ok()?;
        control_field(&text, "Version")?;
        memo.insert(name.to_string(), text.clone());
        if std::fs::create_dir_all(&self.dir).is_ok() {
            if let Ok(json) = serde_json::to_string(&memo) {
                let tmp = self.dir.join(format!(".apt-show.{}", std::process::id()));
                if std::fs::write(&tmp, json).is_ok() {
                    let _ = std::fs::rename(&tmp, &memo_path);
                }
            }
        }
        Some(text)
    }

    /// Resolves a meta package (e.g. `linux-image-cloud-amd64`) to the versioned package it depends on.
    /// Offline, falls back to the newest cached `.deb` whose name matches `fallback` (prefix, suffix).
    pub fn resolve_meta(
        &self,
        meta: &str,
        prefix: &str,
        fallback: (&str, &str),
    ) -> Result<String, DebError> {
        if let Some(text) = self.show(meta) {
            if let Some(dep) =
                control_field(&text, "Depends").and_then(|d| dependency_with_prefix(&d, prefix))
            {
                return Ok(dep);
            }
        }
        let mut cached: Vec<String> = self
            .cached_debs()
            .into_iter()
            .filter_map(|f| f.split('_').next().map(str::to_string))
            .filter(|n| n.starts_with(fallback.0) && n.ends_with(fallback.1) && n != meta)
            .collect();
        cached.sort_by(|a, b| natural_cmp(a, b));
        cached.pop().ok_or_else(|| DebError::Resolve {
            package: meta.to_string(),
            why: "apt-cache does not know it (run `apt-get update`) and nothing is cached"
                .to_string(),
        })
    }

    fn cached_debs(&self) -> Vec<String> {
        std::fs::read_dir(self.debs())
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|f| f.ends_with(".deb"))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Returns the cached `.deb` of `name`, downloading it unless its candidate version is already cached.
    pub fn fetch(&self, name: &str) -> Result<PathBuf, DebError> {
        let debs = self.debs();
        std::fs::create_dir_all(&debs).map_err(io_err(&debs))?;
        let candidate = self.candidate(name);
        if let Some(v) = &candidate {
            for arch in ["amd64", "all"] {
                let p = debs.join(deb_file_name(name, v, arch));
                if p.is_file() {
                    tracing::debug!(package = name, version = v.as_str(), "using cached package");
                    return Ok(p);
                }
            }
        }
        let newest_cached = || {
            let mut files: Vec<String> = self
                .cached_debs()
                .into_iter()
                .filter(|f| f.starts_with(&format!("{name}_")))
                .collect();
            files.sort_by(|a, b| natural_cmp(a, b));
            files.pop().map(|f| debs.join(f))
        };
        if candidate.is_some() {
            tracing::info!(package = name, "downloading with apt-get");
            match run("apt-get", &["download", "-q", name], Some(&debs)) {
                Ok(_) => {}
                Err(DebError::Tool { stderr, .. }) => {
                    return newest_cached().ok_or(DebError::Download {
                        package: name.to_string(),
                        cache: debs.clone(),
                        stderr,
                    })
                }
                Err(e) => return Err(e),
            }
            if let Some(v) = &candidate {
                for arch in ["amd64", "all"] {
                    let p = debs.join(deb_file_name(name, v, arch));
                    if p.is_file() {
                        return Ok(p);
                    }
                }
            }
        }
        newest_cached().ok_or(DebError::Download {
            package: name.to_string(),
            cache: debs.clone(),
            stderr: "apt-cache does not know the package (run `apt-get update`)".to_string(),
        })
    }

    /// Fetches (if needed) and unpacks (if needed) a package.
    pub fn unpacked(&self, name: &str) -> Result<Package, DebError> {
        let deb = self.fetch(name)?;
        let deb_str = deb.to_string_lossy().into_owned();
        let control = run("dpkg-deb", &["-f", &deb_str], None)?;
        let version = control_field(&control, "Version").unwrap_or_else(|| "unknown".to_string());
        let unpacked = self.dir.join("unpacked");
        let root = unpacked.join(format!("{name}_{}", version.replace(':', "%3a")));
        if !root.is_dir() {
            let tmp = unpacked.join(format!(".tmp-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&tmp);
            std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
            tracing::info!(package = name, version = version.as_str(), "unpacking");
            run("dpkg-deb", &["-x", &deb_str, &tmp.to_string_lossy()], None)?;
            std::fs::rename(&tmp, &root).map_err(io_err(&root))?;
        }
        Ok(Package {
            name: name.to_string(),
            version,
            deb,
            root,
        })
    }
}

/// Compares strings so that embedded numbers order numerically (`6.1.0-9` < `6.1.0-28`).
pub fn natural_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    fn chunks(s: &str) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let mut start = 0;
        let bytes = s.as_bytes();
        for i in 1..=bytes.len() {
            if i == bytes.len() || bytes[i].is_ascii_digit() != bytes[start].is_ascii_digit() {
                out.push((bytes[start].is_ascii_digit(), &s[start..i]));
                start = i;
            }
        }
        out
    }
    let (ca, cb) = (chunks(a), chunks(b));
    for (x, y) in ca.iter().zip(cb.iter()) {
        let ord = match (x.0 && y.0, x.1.parse::<u128>(), y.1.parse::<u128>()) {
            (true, Ok(m), Ok(n)) => m.cmp(&n),
            _ => x.1.cmp(y.1),
        };
        if ord != std::cmp::Ordering::Equal {
            return ord;
        }
    }
    ca.len().cmp(&cb.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_control_and_depends() {
        let show = "Package: linux-image-cloud-amd64\nVersion: 6.1.140-1\nDepends: linux-image-6.1.0-37-cloud-amd64 (= 6.1.140-1)\n";
        assert_eq!(control_field(show, "Version").as_deref(), Some("6.1.140-1"));
        let dep = control_field(show, "Depends").unwrap();
        assert_eq!(
            dependency_with_prefix(&dep, "linux-image-").as_deref(),
            Some("linux-image-6.1.0-37-cloud-amd64")
        );
        assert_eq!(
            dependency_with_prefix(
                "libc6 (>= 2), linux-image-6.1.0-1-amd64 | foo",
                "linux-image-"
            )
            .as_deref(),
            Some("linux-image-6.1.0-1-amd64")
        );
        assert_eq!(dependency_with_prefix("libc6", "linux-image-"), None);
    }

    #[test]
    fn deb_names_and_natural_order() {
        assert_eq!(
            deb_file_name("busybox-static", "1:1.35.0-4", "amd64"),
            "busybox-static_1%3a1.35.0-4_amd64.deb"
        );
        let mut v = [
            "linux-image-6.1.0-28-cloud-amd64",
            "linux-image-6.1.0-9-cloud-amd64",
        ];
        v.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(v[1], "linux-image-6.1.0-28-cloud-amd64");
    }
}
