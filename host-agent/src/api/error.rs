//! API errors: a JSON body `{"code": ..., "message": ...}` with a stable code and an HTTP status.
//! Messages never carry request values (a token or an env value could be among them).

use crate::vmm::builder::ControlError;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use envd_protocol::pb::ErrorCode;
use envd_protocol::ClientError;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    /// Stable, machine-readable: scripts branch on it.
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// 422: the request was well formed but what it names cannot be used (a kernel that does not
    /// boot, a snapshot that does not restore).
    pub fn unprocessable(code: &'static str, message: impl std::fmt::Display) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, code, message.to_string())
    }

    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }

    pub fn no_vm() -> Self {
        Self::conflict(
            "no_vm",
            "no VM in this sandbox yet: POST /boot or POST /restore first",
        )
    }

    pub fn no_envd() -> Self {
        Self::conflict(
            "no_vm",
            "no envd to talk to: POST /boot or POST /restore first",
        )
    }

    pub fn vm_paused() -> Self {
        Self::conflict("vm_paused", "the VM is paused: POST /resume first")
    }

    pub fn vm_stopped() -> Self {
        Self::conflict("vm_stopped", "the VM has stopped")
    }

    pub fn busy() -> Self {
        Self::conflict(
            "busy",
            "another lifecycle operation (boot, restore, pause, resume, snapshot, shutdown) is in progress",
        )
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }

    pub fn vm_error(message: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "vm_error",
            message.to_string(),
        )
    }

    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({"code": self.code, "message": self.message})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

impl From<ControlError> for ApiError {
    fn from(e: ControlError) -> Self {
        match e {
            ControlError::AlreadyPaused => ApiError::conflict("already_paused", e.to_string()),
            ControlError::NotPaused => ApiError::conflict("not_paused", e.to_string()),
            ControlError::InstanceInitialized => {
                ApiError::conflict("instance_initialized", e.to_string())
            }
            other => ApiError::vm_error(other),
        }
    }
}

/// envd's answers mapped to API errors. envd's messages name users, paths and commands, never
/// env values or tokens.
impl From<ClientError> for ApiError {
    fn from(e: ClientError) -> Self {
        let message = e.to_string();
        let Some(code) = e.code() else {
            return ApiError::new(StatusCode::BAD_GATEWAY, "envd_unavailable", message);
        };
        let (status, code) = match code {
            ErrorCode::BadRequest => (StatusCode::BAD_REQUEST, "bad_request"),
            ErrorCode::UnknownUser => (StatusCode::BAD_REQUEST, "unknown_user"),
            ErrorCode::BadCwd => (StatusCode::BAD_REQUEST, "bad_cwd"),
            ErrorCode::SpawnFailed => (StatusCode::UNPROCESSABLE_ENTITY, "spawn_failed"),
            ErrorCode::NotFound => (StatusCode::NOT_FOUND, "not_found"),
            ErrorCode::Conflict => (StatusCode::CONFLICT, "conflict"),
            ErrorCode::NotSupported => (StatusCode::UNPROCESSABLE_ENTITY, "not_supported"),
            ErrorCode::Unauthorized => (StatusCode::BAD_GATEWAY, "envd_unauthorized"),
            _ => (StatusCode::BAD_GATEWAY, "envd_error"),
        };
        ApiError::new(status, code, message)
    }
}

/// Describes a JSON error without quoting the input: serde's "invalid type" messages quote the
/// offending value, which may be a secret.
pub fn json_error(e: &serde_json::Error) -> ApiError {
    use serde_json::error::Category;
    let at = format!("line {} column {}", e.line(), e.column());
    let message = match e.classify() {
        Category::Syntax | Category::Eof => format!("malformed JSON at {at}"),
        Category::Io => format!("cannot read the body: {at}"),
        Category::Data => {
            let text = e.to_string();
            if text.starts_with("unknown field")
                || text.starts_with("missing field")
                || text.starts_with("unknown variant")
                || text.starts_with("duplicate field")
            {
                // These quote field names and the allowed ones, not values.
                text
            } else {
                format!("a field has the wrong type or value at {at}")
            }
        }
    };
    ApiError::bad_request(message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::types::{ExecRequest, InitRequest};

    fn message<T: serde::de::DeserializeOwned + std::fmt::Debug>(text: &str) -> String {
        json_error(&serde_json::from_str::<T>(text).unwrap_err()).message
    }

    #[test]
    fn json_errors_never_quote_values() {
        for text in [
            r#"{"access_token": ["sekrit-1"]}"#,
            r#"{"access_token": 12345678}"#,
            r#"{"env": {"K": ["sekrit-1"]}}"#,
            r#"{"env": {"K": 12345678}}"#,
            r#"{"unset": "sekrit-1"}"#,
        ] {
            let m = message::<InitRequest>(text);
            assert!(!m.contains("sekrit-1") && !m.contains("12345678"), "{m}");
            assert!(m.contains("line 1"), "{m}");
        }
        let m = message::<ExecRequest>(r#"{"cmd": "x", "bogus": "sekrit-1"}"#);
        assert!(
            m.starts_with("unknown field `bogus`") && !m.contains("sekrit-1"),
            "{m}"
        );
        let m = message::<ExecRequest>(r#"{"args": []}"#);
        assert!(m.starts_with("missing field `cmd`"), "{m}");
        assert!(message::<ExecRequest>("{oops").starts_with("malformed JSON"));
    }

    #[test]
    fn vm_conflicts_have_stable_codes() {
        let e = ApiError::from(ControlError::AlreadyPaused);
        assert_eq!((e.status, e.code), (StatusCode::CONFLICT, "already_paused"));
        let e = ApiError::from(ControlError::NotPaused);
        assert_eq!((e.status, e.code), (StatusCode::CONFLICT, "not_paused"));
        let e = ApiError::from(ControlError::InstanceInitialized);
        assert_eq!(
            (e.status, e.code),
            (StatusCode::CONFLICT, "instance_initialized")
        );
    }
}
