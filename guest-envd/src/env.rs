//! The environment contract: how a child's environment is built from layers.
//!
//! 1. base: `PATH` (a default) and the `HOME`, `USER`, `LOGNAME`, `SHELL` of the user it runs as;
//! 2. template: the image's `ENV`, baked into the template (a template `PATH` replaces the base one);
//! 3. instance: the sandbox's env, delivered by `/init`;
//! 4. per-command: the `envs` of one process start.
//!
//! Later layers win on the same key. This module is pure: no I/O, so every rule is unit-tested.

use std::collections::{BTreeMap, HashMap};

use zeroize::Zeroizing;

use crate::users::User;

/// The base `PATH` when the template sets none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A layer of environment variables.
pub type EnvLayer = BTreeMap<String, String>;

/// The instance layer holds values that may be secrets: they are wiped from memory when replaced,
/// removed or dropped.
pub type SecretEnvLayer = BTreeMap<String, Zeroizing<String>>;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvError {
    #[error("environment variable name is empty")]
    EmptyKey,
    #[error("environment variable name {0:?} contains '=' or a NUL byte")]
    BadKey(String),
    #[error("value of environment variable {0:?} contains a NUL byte")]
    BadValue(String),
}

/// Checks that a key/value pair can be passed to `execve`.
pub fn validate(key: &str, value: &str) -> Result<(), EnvError> {
    if key.is_empty() {
        return Err(EnvError::EmptyKey);
    }
    if key.contains('=') || key.contains('\0') {
        return Err(EnvError::BadKey(key.to_string()));
    }
    if value.contains('\0') {
        return Err(EnvError::BadValue(key.to_string()));
    }
    Ok(())
}

/// The base layer for `user`.
pub fn base_layer(user: &User) -> EnvLayer {
    let mut base = EnvLayer::new();
    base.insert("PATH".into(), DEFAULT_PATH.into());
    base.insert("HOME".into(), user.home.clone());
    base.insert("USER".into(), user.name.clone());
    base.insert("LOGNAME".into(), user.name.clone());
    base.insert("SHELL".into(), user.shell.clone());
    base
}

/// Builds a child's environment from the four layers.
pub fn layered(
    user: &User,
    template: &EnvLayer,
    instance: &SecretEnvLayer,
    per_command: &HashMap<String, String>,
) -> Vec<(String, String)> {
    let mut env = base_layer(user);
    for (k, v) in template {
        env.insert(k.clone(), v.clone());
    }
    for (k, v) in instance {
        env.insert(k.clone(), v.as_str().to_owned());
    }
    for (k, v) in per_command {
        env.insert(k.clone(), v.clone());
    }
    env.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user() -> User {
        User {
            name: "alice".into(),
            uid: 1000,
            gid: 1000,
            home: "/home/alice".into(),
            shell: "/bin/bash".into(),
            groups: vec![1000],
        }
    }

    fn layer(pairs: &[(&str, &str)]) -> EnvLayer {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn secret_layer(pairs: &[(&str, &str)]) -> SecretEnvLayer {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), Zeroizing::new(v.to_string())))
            .collect()
    }

    fn get<'a>(env: &'a [(String, String)], key: &str) -> Option<&'a str> {
        env.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    #[test]
    fn base_layer_describes_the_user() {
        let env = layered(
            &user(),
            &EnvLayer::new(),
            &SecretEnvLayer::new(),
            &HashMap::new(),
        );
        assert_eq!(get(&env, "PATH"), Some(DEFAULT_PATH));
        assert_eq!(get(&env, "HOME"), Some("/home/alice"));
        assert_eq!(get(&env, "USER"), Some("alice"));
        assert_eq!(get(&env, "LOGNAME"), Some("alice"));
        assert_eq!(get(&env, "SHELL"), Some("/bin/bash"));
        assert_eq!(env.len(), 5);
    }

    #[test]
    fn each_layer_wins_over_the_ones_below_and_lower_ones_show_through() {
        let template = layer(&[("K", "template"), ("T", "t"), ("PATH", "/opt/bin:/bin")]);
        let instance = secret_layer(&[("K", "instance"), ("I", "i")]);
        let per_command: HashMap<_, _> = [("K".to_string(), "command".to_string())].into();

        let env = layered(&user(), &template, &instance, &per_command);
        assert_eq!(get(&env, "K"), Some("command"));
        assert_eq!(get(&env, "T"), Some("t"));
        assert_eq!(get(&env, "I"), Some("i"));
        assert_eq!(
            get(&env, "PATH"),
            Some("/opt/bin:/bin"),
            "template PATH replaces the base"
        );

        let env = layered(&user(), &template, &instance, &HashMap::new());
        assert_eq!(get(&env, "K"), Some("instance"));
        let env = layered(&user(), &template, &SecretEnvLayer::new(), &HashMap::new());
        assert_eq!(get(&env, "K"), Some("template"));
        let env = layered(
            &user(),
            &EnvLayer::new(),
            &SecretEnvLayer::new(),
            &HashMap::new(),
        );
        assert_eq!(get(&env, "K"), None);
    }

    #[test]
    fn higher_layers_can_override_base_keys() {
        let per_command: HashMap<_, _> = [("HOME".to_string(), "/tmp".to_string())].into();
        let env = layered(
            &user(),
            &EnvLayer::new(),
            &SecretEnvLayer::new(),
            &per_command,
        );
        assert_eq!(get(&env, "HOME"), Some("/tmp"));
    }

    #[test]
    fn keys_are_unique_in_the_result() {
        let template = layer(&[("A", "1")]);
        let instance = secret_layer(&[("A", "2")]);
        let per_command: HashMap<_, _> = [("A".to_string(), "3".to_string())].into();
        let env = layered(&user(), &template, &instance, &per_command);
        assert_eq!(env.iter().filter(|(k, _)| k == "A").count(), 1);
    }

    #[test]
    fn validation_rejects_what_execve_cannot_carry() {
        assert_eq!(validate("", "x"), Err(EnvError::EmptyKey));
        assert_eq!(validate("A=B", "x"), Err(EnvError::BadKey("A=B".into())));
        assert_eq!(validate("A\0", "x"), Err(EnvError::BadKey("A\0".into())));
        assert_eq!(validate("A", "x\0y"), Err(EnvError::BadValue("A".into())));
        assert_eq!(validate("A", ""), Ok(()));
        assert_eq!(validate("A_1", "with = sign"), Ok(()));
    }
}
