//! envd's configuration: command-line flags over the image's `/etc/envd/envd.json`.
//!
//! The image builder writes `envd.json` (listen address, template env, user and workdir, kernel
//! modules to load) so that envd as PID 1 needs no arguments.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use envd_protocol::{Address, DEFAULT_VSOCK_PORT};
use serde::Deserialize;

use crate::env::{self, EnvLayer};

/// Where the image puts envd's configuration.
pub const IMAGE_CONFIG: &str = "/etc/envd/envd.json";

/// The configuration file as the image builder writes it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageConfig {
    pub listen: Option<String>,
    #[serde(default)]
    pub template_env: BTreeMap<String, String>,
    pub template_user: Option<String>,
    pub template_workdir: Option<String>,
    #[serde(default)]
    pub modules: Vec<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: Address,
    pub template_env: EnvLayer,
    pub template_user: Option<String>,
    pub template_workdir: Option<String>,
    pub modules: Vec<PathBuf>,
    /// Where passwd and group are read from.
    pub etc_dir: PathBuf,
    /// Step the clock from init timestamps (only in a VM: never on a host).
    pub set_clock: bool,
    /// envd is the VM's init: it may power the guest off.
    pub pid1: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not valid: {source}")]
    Parse {
        path: String,
        source: serde_json::Error,
    },
    #[error("{path}: {source}")]
    Env { path: String, source: env::EnvError },
    #[error(transparent)]
    Address(#[from] envd_protocol::address::AddressError),
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// Reads an image config file.
pub fn load_image_config(path: &Path) -> Result<ImageConfig, ConfigError> {
    let config: ImageConfig =
        serde_json::from_str(&read(path)?).map_err(|source| ConfigError::Parse {
            path: path.display().to_string(),
            source,
        })?;
    check_env(path, &config.template_env)?;
    Ok(config)
}

/// Reads a template env file: a JSON object of strings.
pub fn load_template_env(path: &Path) -> Result<EnvLayer, ConfigError> {
    let env: EnvLayer =
        serde_json::from_str(&read(path)?).map_err(|source| ConfigError::Parse {
            path: path.display().to_string(),
            source,
        })?;
    check_env(path, &env)?;
    Ok(env)
}

fn check_env(path: &Path, layer: &EnvLayer) -> Result<(), ConfigError> {
    for (k, v) in layer {
        env::validate(k, v).map_err(|source| ConfigError::Env {
            path: path.display().to_string(),
            source,
        })?;
    }
    Ok(())
}

/// The default listen address when neither flag nor image config gives one.
pub fn default_listen() -> Address {
    Address::Vsock {
        cid: None,
        port: DEFAULT_VSOCK_PORT,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_config_parses_and_rejects_unknown_fields() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("envd.json");
        std::fs::write(
            &path,
            r#"{"listen":"vsock:49983","template_env":{"A":"1"},"template_workdir":"/srv","modules":["/lib/x.ko"]}"#,
        )
        .unwrap();
        let c = load_image_config(&path).unwrap();
        assert_eq!(c.listen.as_deref(), Some("vsock:49983"));
        assert_eq!(c.template_env.get("A").map(String::as_str), Some("1"));
        assert_eq!(c.template_workdir.as_deref(), Some("/srv"));
        assert_eq!(c.modules, vec![PathBuf::from("/lib/x.ko")]);

        std::fs::write(&path, r#"{"listne":"vsock:1"}"#).unwrap();
        assert!(matches!(
            load_image_config(&path),
            Err(ConfigError::Parse { .. })
        ));
    }

    #[test]
    fn template_env_must_be_an_object_of_valid_strings() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("env.json");
        std::fs::write(&path, r#"{"A":"1","B":"two words"}"#).unwrap();
        assert_eq!(load_template_env(&path).unwrap().len(), 2);
        std::fs::write(&path, r#"{"A":1}"#).unwrap();
        assert!(matches!(
            load_template_env(&path),
            Err(ConfigError::Parse { .. })
        ));
        std::fs::write(&path, r#"{"A=B":"1"}"#).unwrap();
        assert!(matches!(
            load_template_env(&path),
            Err(ConfigError::Env { .. })
        ));
        assert!(matches!(
            load_template_env(&dir.path().join("missing")),
            Err(ConfigError::Read { .. })
        ));
    }
}
