//! The `/init` rules, as a pure state machine (the I/O around it lives in `rpc.rs`).
//!
//! - env is additive: keys merge into the instance layer, a repeated key overwrites, keys go away only
//!   through the explicit unset list; an omitted field never clears anything;
//! - every init carries a timestamp; one older than the newest applied is answered but not applied,
//!   and the same timestamp again (a retry) applies again, which is idempotent;
//! - once an access token is set, every request but health must carry it, and changing it needs the
//!   current one.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use envd_protocol::pb;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use crate::env::{self, EnvError, SecretEnvLayer};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InitError {
    #[error("init needs a timestamp")]
    MissingTimestamp,
    #[error("init timestamp is out of range")]
    BadTimestamp,
    #[error("access token is missing or wrong")]
    Unauthorized,
    #[error("an access token cannot be empty")]
    EmptyToken,
    #[error(transparent)]
    Env(#[from] EnvError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitOutcome {
    Applied,
    /// Older than the newest applied init: answered, not applied.
    Stale,
}

/// What `/init` has set. Secrets (token, instance env values) are wiped when dropped or replaced.
#[derive(Default)]
pub struct InitState {
    instance_env: SecretEnvLayer,
    token: Option<Zeroizing<String>>,
    default_user: Option<String>,
    default_workdir: Option<String>,
    newest: Option<SystemTime>,
}

/// Converts a protobuf timestamp to a `SystemTime`, refusing values out of range.
pub fn to_system_time(ts: &prost_types::Timestamp) -> Result<SystemTime, InitError> {
    if !(0..1_000_000_000).contains(&ts.nanos) {
        return Err(InitError::BadTimestamp);
    }
    let nanos = Duration::from_nanos(ts.nanos as u64);
    let t = if ts.seconds >= 0 {
        UNIX_EPOCH.checked_add(Duration::from_secs(ts.seconds as u64))
    } else {
        UNIX_EPOCH.checked_sub(Duration::from_secs(ts.seconds.unsigned_abs()))
    };
    t.and_then(|t| t.checked_add(nanos))
        .ok_or(InitError::BadTimestamp)
}

impl InitState {
    /// Whether `presented` may make requests that need authorization.
    pub fn authorize(&self, presented: &str) -> Result<(), InitError> {
        match &self.token {
            None => Ok(()),
            Some(token) if bool::from(token.as_bytes().ct_eq(presented.as_bytes())) => Ok(()),
            Some(_) => Err(InitError::Unauthorized),
        }
    }

    /// Applies one init request made with the token `presented`. Validates everything before
    /// changing anything, so a bad request leaves the state as it was.
    pub fn apply(
        &mut self,
        req: &pb::InitRequest,
        presented: &str,
    ) -> Result<(InitOutcome, SystemTime), InitError> {
        self.authorize(presented)?;
        let at = to_system_time(req.timestamp.as_ref().ok_or(InitError::MissingTimestamp)?)?;
        for (k, v) in &req.env {
            env::validate(k, v)?;
        }
        if req.access_token.as_deref() == Some("") {
            return Err(InitError::EmptyToken);
        }
        if self.newest.is_some_and(|newest| at < newest) {
            return Ok((InitOutcome::Stale, at));
        }
        self.newest = Some(at);
        for key in &req.unset {
            self.instance_env.remove(key);
        }
        for (k, v) in &req.env {
            self.instance_env
                .insert(k.clone(), Zeroizing::new(v.clone()));
        }
        if let Some(token) = &req.access_token {
            self.token = Some(Zeroizing::new(token.clone()));
        }
        if let Some(user) = &req.default_user {
            self.default_user = Some(user.clone());
        }
        if let Some(dir) = &req.default_workdir {
            self.default_workdir = Some(dir.clone());
        }
        Ok((InitOutcome::Applied, at))
    }

    pub fn instance_env(&self) -> &SecretEnvLayer {
        &self.instance_env
    }

    pub fn default_user(&self) -> Option<&str> {
        self.default_user.as_deref()
    }

    pub fn default_workdir(&self) -> Option<&str> {
        self.default_workdir.as_deref()
    }

    /// Whether any init has been applied.
    pub fn initialized(&self) -> bool {
        self.newest.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn ts(seconds: i64) -> Option<prost_types::Timestamp> {
        Some(prost_types::Timestamp { seconds, nanos: 0 })
    }

    fn init(seconds: i64, env: &[(&str, &str)]) -> pb::InitRequest {
        pb::InitRequest {
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<HashMap<_, _>>(),
            timestamp: ts(seconds),
            ..Default::default()
        }
    }

    fn env_of(state: &InitState) -> Vec<(String, String)> {
        state
            .instance_env()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().to_owned()))
            .collect()
    }

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn env_is_additive_and_a_repeated_key_overwrites() {
        let mut s = InitState::default();
        s.apply(&init(10, &[("A", "1"), ("B", "1")]), "").unwrap();
        s.apply(&init(11, &[("B", "2"), ("C", "2")]), "").unwrap();
        assert_eq!(env_of(&s), pairs(&[("A", "1"), ("B", "2"), ("C", "2")]));
    }

    #[test]
    fn only_an_explicit_unset_removes() {
        let mut s = InitState::default();
        s.apply(&init(10, &[("A", "1"), ("B", "1")]), "").unwrap();
        s.apply(&init(11, &[]), "").unwrap();
        assert_eq!(env_of(&s).len(), 2, "omission never clears");
        let mut req = init(12, &[]);
        req.unset = vec!["A".into(), "NOT_THERE".into()];
        s.apply(&req, "").unwrap();
        assert_eq!(env_of(&s), pairs(&[("B", "1")]));
    }

    #[test]
    fn unset_then_set_in_one_request_sets() {
        let mut s = InitState::default();
        s.apply(&init(10, &[("A", "1")]), "").unwrap();
        let mut req = init(11, &[("A", "2")]);
        req.unset = vec!["A".into()];
        s.apply(&req, "").unwrap();
        assert_eq!(env_of(&s), pairs(&[("A", "2")]));
    }

    #[test]
    fn a_stale_init_is_answered_and_not_applied() {
        let mut s = InitState::default();
        s.apply(&init(20, &[("A", "new")]), "").unwrap();
        let (outcome, _) = s.apply(&init(19, &[("A", "old")]), "").unwrap();
        assert_eq!(outcome, InitOutcome::Stale);
        assert_eq!(env_of(&s), pairs(&[("A", "new")]));
    }

    #[test]
    fn a_retry_with_the_same_timestamp_is_idempotent() {
        let mut s = InitState::default();
        let req = init(20, &[("A", "1")]);
        assert_eq!(s.apply(&req, "").unwrap().0, InitOutcome::Applied);
        assert_eq!(s.apply(&req, "").unwrap().0, InitOutcome::Applied);
        assert_eq!(env_of(&s), pairs(&[("A", "1")]));
    }

    #[test]
    fn omitted_fields_never_clear_token_user_or_workdir() {
        let mut s = InitState::default();
        let mut req = init(1, &[]);
        req.access_token = Some("t1".into());
        req.default_user = Some("alice".into());
        req.default_workdir = Some("/work".into());
        s.apply(&req, "").unwrap();
        s.apply(&init(2, &[]), "t1").unwrap();
        assert_eq!(s.default_user(), Some("alice"));
        assert_eq!(s.default_workdir(), Some("/work"));
        assert_eq!(s.authorize("t1"), Ok(()));
        assert_eq!(s.authorize(""), Err(InitError::Unauthorized));
    }

    #[test]
    fn token_rotation_needs_the_current_token() {
        let mut s = InitState::default();
        let mut req = init(1, &[]);
        req.access_token = Some("t1".into());
        s.apply(&req, "").unwrap();

        let mut rotate = init(2, &[("X", "1")]);
        rotate.access_token = Some("t2".into());
        assert_eq!(s.apply(&rotate, "wrong"), Err(InitError::Unauthorized));
        assert_eq!(s.apply(&rotate, ""), Err(InitError::Unauthorized));
        assert!(env_of(&s).is_empty(), "a refused init changes nothing");
        s.apply(&rotate, "t1").unwrap();
        assert_eq!(s.authorize("t1"), Err(InitError::Unauthorized));
        assert_eq!(s.authorize("t2"), Ok(()));
    }

    #[test]
    fn bad_requests_change_nothing() {
        let mut s = InitState::default();
        let mut no_ts = init(1, &[("A", "1")]);
        no_ts.timestamp = None;
        assert_eq!(s.apply(&no_ts, ""), Err(InitError::MissingTimestamp));
        assert_eq!(
            s.apply(&init(1, &[("A", "1"), ("B=C", "x")]), ""),
            Err(InitError::Env(EnvError::BadKey("B=C".into())))
        );
        let mut empty_token = init(1, &[]);
        empty_token.access_token = Some(String::new());
        assert_eq!(s.apply(&empty_token, ""), Err(InitError::EmptyToken));
        let mut bad_nanos = init(1, &[]);
        bad_nanos.timestamp = Some(prost_types::Timestamp {
            seconds: 1,
            nanos: -1,
        });
        assert_eq!(s.apply(&bad_nanos, ""), Err(InitError::BadTimestamp));
        assert!(!s.initialized());
        assert!(env_of(&s).is_empty());
    }

    #[test]
    fn timestamps_convert_exactly() {
        let t = to_system_time(&prost_types::Timestamp {
            seconds: 5,
            nanos: 7,
        })
        .unwrap();
        assert_eq!(t.duration_since(UNIX_EPOCH).unwrap(), Duration::new(5, 7));
    }
}
