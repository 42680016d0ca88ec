//! A template directory as `envd-image template` writes it: the kernel (`vmlinux`, the uncompressed
//! ELF, when the builder could extract it; else the `vmlinuz` bzImage), `initrd`, and
//! `template.json` with the kernel command line.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} is not valid JSON")]
    Json(PathBuf),
    #[error("{0} has no cmdline")]
    NoCmdline(PathBuf),
}

/// What a VM boots from a template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateBoot {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub cmdline: String,
}

impl TemplateBoot {
    pub fn read(dir: &Path) -> Result<TemplateBoot, TemplateError> {
        let manifest = dir.join("template.json");
        let text = std::fs::read_to_string(&manifest).map_err(|source| TemplateError::Read {
            path: manifest.clone(),
            source,
        })?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|_| TemplateError::Json(manifest.clone()))?;
        let cmdline = json
            .get("cmdline")
            .and_then(|c| c.as_str())
            .ok_or_else(|| TemplateError::NoCmdline(manifest.clone()))?
            .to_string();
        // The uncompressed kernel boots faster: the guest does not decompress and move itself.
        let vmlinux = dir.join("vmlinux");
        let kernel = if vmlinux.is_file() {
            vmlinux
        } else {
            dir.join("vmlinuz")
        };
        Ok(TemplateBoot {
            kernel,
            initrd: dir.join("initrd"),
            cmdline,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefers_vmlinux_and_reads_the_cmdline() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("template.json"),
            r#"{"cmdline": "console=ttyS0"}"#,
        )
        .unwrap();
        let t = TemplateBoot::read(dir.path()).unwrap();
        assert_eq!(t.kernel, dir.path().join("vmlinuz"));
        assert_eq!(t.cmdline, "console=ttyS0");
        std::fs::write(dir.path().join("vmlinux"), b"\x7fELF").unwrap();
        let t = TemplateBoot::read(dir.path()).unwrap();
        assert_eq!(t.kernel, dir.path().join("vmlinux"));
        assert_eq!(t.initrd, dir.path().join("initrd"));
    }

    #[test]
    fn bad_manifests_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            TemplateBoot::read(dir.path()),
            Err(TemplateError::Read { .. })
        ));
        std::fs::write(dir.path().join("template.json"), "{").unwrap();
        assert!(matches!(
            TemplateBoot::read(dir.path()),
            Err(TemplateError::Json(_))
        ));
        std::fs::write(dir.path().join("template.json"), "{}").unwrap();
        assert!(matches!(
            TemplateBoot::read(dir.path()),
            Err(TemplateError::NoCmdline(_))
        ));
    }
}
