//! The template env layer: read from an OCI image config (`config.Env`, `config.WorkingDir`, `config.User`)
//! or from a plain env file (`KEY=VALUE` lines). Pure parsing, no I/O beyond the caller's read.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvError {
    #[error("OCI config is not valid JSON: {0}")]
    Json(String),
    #[error("OCI config has no `config` (or `Config`) object")]
    NoConfig,
    #[error("line {line}: expected KEY=VALUE, got {text:?}")]
    BadLine { line: usize, text: String },
    #[error("bad env key {0:?}: must be non-empty and contain no '=', NUL or whitespace")]
    BadKey(String),
    #[error("value of {0} contains a NUL byte")]
    BadValue(String),
}

/// What a template bakes in from its image.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateEnv {
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
}

#[derive(Deserialize)]
struct OciImageConfig {
    #[serde(alias = "Config")]
    config: Option<OciConfig>,
}

#[derive(Deserialize, Default)]
struct OciConfig {
    #[serde(rename = "Env", default)]
    env: Option<Vec<String>>,
    #[serde(rename = "WorkingDir", default)]
    working_dir: Option<String>,
    #[serde(rename = "User", default)]
    user: Option<String>,
}

fn check_pair(key: &str, value: &str) -> Result<(), EnvError> {
    if key.is_empty() || key.contains(['\0', '=']) || key.contains(char::is_whitespace) {
        return Err(EnvError::BadKey(key.to_string()));
    }
    if value.contains('\0') {
        return Err(EnvError::BadValue(key.to_string()));
    }
    Ok(())
}

/// Parses an OCI image config (as in an image layout's config blob, or `docker inspect` output, which is an
/// array of objects with `Config`). Later duplicates of a key win, as in Docker.
pub fn parse_oci_config(json: &str) -> Result<TemplateEnv, EnvError> {
    let value: serde_json::Value =
        serde_json::from_str(json).map_err(|e| EnvError::Json(e.to_string()))?;
    let value = match value {
        serde_json::Value::Array(mut items) if !items.is_empty() => items.swap_remove(0),
        v => v,
    };
    let cfg: OciImageConfig =
        serde_json::from_value(value).map_err(|e| EnvError::Json(e.to_string()))?;
    let cfg = cfg.config.ok_or(EnvError::NoConfig)?;
    let mut out = TemplateEnv::default();
    for (i, kv) in cfg.env.unwrap_or_default().iter().enumerate() {
        let (k, v) = kv.split_once('=').ok_or_else(|| EnvError::BadLine {
            line: i + 1,
            text: kv.clone(),
        })?;
        check_pair(k, v)?;
        out.env.insert(k.to_string(), v.to_string());
    }
    out.workdir = cfg.working_dir.filter(|s| !s.is_empty());
    out.user = cfg.user.filter(|s| !s.is_empty());
    Ok(out)
}

/// Parses an env file: one `KEY=VALUE` per line, values taken literally (no quote processing, like
/// `docker run --env-file`). Blank lines and lines starting with `#` are skipped; an `export ` prefix is
/// accepted.
pub fn parse_env_file(text: &str) -> Result<TemplateEnv, EnvError> {
    let mut out = TemplateEnv::default();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim_start();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line
            .strip_prefix("export ")
            .map(str::trim_start)
            .unwrap_or(line);
        let (k, v) = line.split_once('=').ok_or_else(|| EnvError::BadLine {
            line: i + 1,
            text: raw.to_string(),
        })?;
        check_pair(k, v)?;
        out.env.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oci_image_config() {
        let json = r#"{"architecture":"amd64","os":"linux","config":{
            "Env":["PATH=/opt/x/bin:/usr/bin:/bin","A=1=2","EMPTY=","A2=x"],
            "WorkingDir":"/srv/app","User":"1000:1000","Cmd":["sh"]},"rootfs":{"type":"layers","diff_ids":[]}}"#;
        let t = parse_oci_config(json).unwrap();
        assert_eq!(t.env["PATH"], "/opt/x/bin:/usr/bin:/bin");
        assert_eq!(t.env["A"], "1=2");
        assert_eq!(t.env["EMPTY"], "");
        assert_eq!(t.workdir.as_deref(), Some("/srv/app"));
        assert_eq!(t.user.as_deref(), Some("1000:1000"));
    }

    #[test]
    fn docker_inspect_shape_and_duplicates() {
        let json =
            r#"[{"Id":"sha256:x","Config":{"Env":["K=1","K=2"],"WorkingDir":"","User":""}}]"#;
        let t = parse_oci_config(json).unwrap();
        assert_eq!(t.env["K"], "2");
        assert_eq!(t.workdir, None);
        assert_eq!(t.user, None);
    }

    #[test]
    fn oci_errors() {
        assert!(matches!(parse_oci_config("{"), Err(EnvError::Json(_))));
        assert_eq!(
            parse_oci_config(r#"{"rootfs":{}}"#),
            Err(EnvError::NoConfig)
        );
        assert!(matches!(
            parse_oci_config(r#"{"config":{"Env":["NOEQUALS"]}}"#),
            Err(EnvError::BadLine { .. })
        ));
        assert_eq!(
            parse_oci_config(r#"{"config":{"Env":["=v"]}}"#),
            Err(EnvError::BadKey(String::new()))
        );
        // A config with no Env is fine.
        assert_eq!(
            parse_oci_config(r#"{"config":{}}"#).unwrap(),
            TemplateEnv::default()
        );
    }

    #[test]
    fn env_file() {
        let t = parse_env_file("# comment\n\nA=1\n  export B=x y \nC=\"quoted\"\nA=3\n").unwrap();
        assert_eq!(t.env["A"], "3");
        assert_eq!(t.env["B"], "x y ");
        assert_eq!(parse_env_file("B = x"), Err(EnvError::BadKey("B ".into())));
        assert_eq!(t.env["C"], "\"quoted\"");
        let err = parse_env_file("A=1\nbroken\n").unwrap_err();
        assert_eq!(
            err,
            EnvError::BadLine {
                line: 2,
                text: "broken".into()
            }
        );
    }
}
