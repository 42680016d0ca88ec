//! Where things live: the repository root and the package cache. Never machine-specific constants.

use std::path::{Path, PathBuf};

/// The workspace root: `$ENVD_REPO_ROOT`, else the nearest ancestor of the current directory whose
/// `Cargo.toml` declares a `[workspace]`, else the current directory.
pub fn repo_root() -> PathBuf {
    if let Some(p) = std::env::var_os("ENVD_REPO_ROOT") {
        return PathBuf::from(p);
    }
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    let mut dir: Option<&Path> = Some(&cwd);
    while let Some(d) = dir {
        if std::fs::read_to_string(d.join("Cargo.toml")).is_ok_and(|s| s.contains("[workspace]")) {
            return d.to_path_buf();
        }
        dir = d.parent();
    }
    cwd
}

/// The download/unpack cache: `$ENVD_CACHE_DIR`, default `<repo>/.cache`.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("ENVD_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".cache"))
}

/// Finds an executable by name on `$PATH`.
pub fn which(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}
