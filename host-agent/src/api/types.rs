//! Request bodies (unknown fields refused) and the JSON body extractor that answers bad input with
//! a 400 JSON error.

use std::collections::HashMap;
use std::path::PathBuf;

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use serde::de::DeserializeOwned;
use serde::Deserialize;

use super::error::{json_error, ApiError};
use crate::vmm::snapshot::SnapshotKind;

/// A string that is never printed: `Debug` shows `<redacted>`.
#[derive(Clone, Deserialize, Default, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Env values are secrets too: only keys are ever shown.
pub type SecretEnv = HashMap<String, Secret>;

pub fn reveal_env(env: &SecretEnv) -> HashMap<String, String> {
    env.iter().map(|(k, v)| (k.clone(), v.0.clone())).collect()
}

/// A JSON body of type `T`. An empty body counts as `{}`, so operations whose fields are all
/// optional can be called with no body at all.
pub struct JsonBody<T>(pub T);

impl<T, S> FromRequest<S> for JsonBody<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            ApiError::bad_request(format!("cannot read the body: {}", e.body_text()))
        })?;
        let text: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
            b"{}"
        } else {
            &bytes
        };
        serde_json::from_slice(text)
            .map(JsonBody)
            .map_err(|e| json_error(&e))
    }
}

fn default_mem_mib() -> u64 {
    256
}
fn default_vcpus() -> u8 {
    1
}
fn default_guest_cid() -> u64 {
    3
}
fn default_boot_timeout() -> u64 {
    120_000
}
fn default_restore_timeout() -> u64 {
    60_000
}
fn default_signal() -> i32 {
    15
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootRequest {
    /// A template directory (vmlinuz, initrd, template.json with the cmdline).
    pub template_dir: Option<PathBuf>,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub cmdline: Option<String>,
    #[serde(default = "default_mem_mib")]
    pub mem_mib: u64,
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    #[serde(default = "default_guest_cid")]
    pub guest_cid: u64,
    /// How long to wait for envd to answer (0: do not wait).
    #[serde(default = "default_boot_timeout")]
    pub envd_timeout_ms: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreRequest {
    pub snapshot_dir: PathBuf,
    #[serde(default)]
    pub env: SecretEnv,
    pub access_token: Option<Secret>,
    pub default_user: Option<String>,
    pub default_workdir: Option<String>,
    #[serde(default = "default_restore_timeout")]
    pub envd_timeout_ms: u64,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct InitRequest {
    #[serde(default)]
    pub env: SecretEnv,
    #[serde(default)]
    pub unset: Vec<String>,
    pub access_token: Option<Secret>,
    pub default_user: Option<String>,
    pub default_workdir: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    pub cmd: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: SecretEnv,
    #[serde(default)]
    pub cwd: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub timeout_ms: u64,
    #[serde(default)]
    pub tag: Option<String>,
    /// Written to the process's stdin, which is then closed (no stdin at all when absent).
    #[serde(default)]
    pub stdin: Option<Secret>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignalRequest {
    #[serde(default = "default_signal")]
    pub signal: i32,
    #[serde(default)]
    pub group: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    pub dir: PathBuf,
    pub kind: SnapshotKind,
}

/// For operations without parameters: only `{}` (or no body) is accepted.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Empty {}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ShutdownRequest {
    /// How long to wait for the guest to power off before the agent exits anyway.
    pub timeout_ms: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted_in_debug() {
        let req: RestoreRequest = serde_json::from_str(
            r#"{"snapshot_dir": "/s", "env": {"KEY": "value-1"}, "access_token": "token-1"}"#,
        )
        .unwrap();
        let shown = format!("{req:?}");
        assert!(shown.contains("KEY") && shown.contains("/s"));
        assert!(
            !shown.contains("value-1") && !shown.contains("token-1"),
            "{shown}"
        );
        let req: ExecRequest =
            serde_json::from_str(r#"{"cmd": "cat", "stdin": "input-1", "env": {"A": "v-2"}}"#)
                .unwrap();
        let shown = format!("{req:?}");
        assert!(
            !shown.contains("input-1") && !shown.contains("v-2"),
            "{shown}"
        );
    }

    #[test]
    fn unknown_fields_and_bad_kinds_are_refused() {
        assert!(serde_json::from_str::<ExecRequest>(r#"{"cmd": "x", "cwdd": "/"}"#).is_err());
        assert!(
            serde_json::from_str::<SnapshotRequest>(r#"{"dir": "/d", "kind": "half"}"#).is_err()
        );
        assert!(serde_json::from_str::<Empty>(r#"{"a": 1}"#).is_err());
        let s: SnapshotRequest =
            serde_json::from_str(r#"{"dir": "/d", "kind": "template"}"#).unwrap();
        assert_eq!(s.kind, SnapshotKind::Template);
        let b: BootRequest = serde_json::from_str(r#"{"template_dir": "/t"}"#).unwrap();
        assert_eq!((b.mem_mib, b.vcpus, b.envd_timeout_ms), (256, 1, 120_000));
    }
}
