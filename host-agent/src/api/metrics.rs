//! Counters the API layer can see: requests, execs and how they ended, envd (vsock) connections,
//! lifecycle operations and the last boot/restore timing breakdown. Never any env value or token.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};

#[derive(Default)]
pub struct Metrics {
    pub requests: AtomicU64,
    pub responses_2xx: AtomicU64,
    pub responses_4xx: AtomicU64,
    pub responses_5xx: AtomicU64,

    pub execs_started: AtomicU64,
    pub execs_refused: AtomicU64,
    pub execs_active: AtomicU64,
    /// Streams whose HTTP client went away before the end event (the process keeps running).
    pub streams_dropped: AtomicU64,
    pub exits: AtomicU64,
    pub exits_zero: AtomicU64,
    pub exits_nonzero: AtomicU64,
    pub exits_signaled: AtomicU64,
    pub exits_timed_out: AtomicU64,

    pub vsock_connects: AtomicU64,
    pub vsock_connect_failures: AtomicU64,
    pub vsock_open: AtomicU64,

    pub boots: AtomicU64,
    pub restores: AtomicU64,
    pub inits: AtomicU64,
    pub pauses: AtomicU64,
    pub resumes: AtomicU64,
    pub snapshots: AtomicU64,

    /// Milliseconds since the start of the last boot or restore, by step, in order.
    pub last_start: Mutex<Option<StartTimings>>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct StartTimings {
    /// "boot" or "restore".
    pub kind: &'static str,
    pub steps_ms: Vec<(String, f64)>,
}

impl StartTimings {
    pub fn as_json(&self) -> Value {
        let steps: serde_json::Map<String, Value> = self
            .steps_ms
            .iter()
            .map(|(k, v)| (k.clone(), json!((v * 10.0).round() / 10.0)))
            .collect();
        json!({"kind": self.kind, "steps_ms": steps})
    }
}

fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

pub fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Decrements a gauge when dropped.
pub struct GaugeGuard {
    metrics: Arc<Metrics>,
    which: fn(&Metrics) -> &AtomicU64,
}

impl GaugeGuard {
    pub fn new(metrics: Arc<Metrics>, which: fn(&Metrics) -> &AtomicU64) -> Self {
        which(&metrics).fetch_add(1, Ordering::Relaxed);
        GaugeGuard { metrics, which }
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        (self.which)(&self.metrics).fetch_sub(1, Ordering::Relaxed);
    }
}

impl Metrics {
    pub fn record_status(&self, status: u16) {
        inc(&self.requests);
        match status {
            200..=299 => inc(&self.responses_2xx),
            400..=499 => inc(&self.responses_4xx),
            500..=599 => inc(&self.responses_5xx),
            _ => {}
        }
    }

    pub fn record_end(&self, end: &envd_protocol::pb::End) {
        use envd_protocol::pb::end::Status;
        inc(&self.exits);
        match end.status {
            Some(Status::ExitCode(0)) => inc(&self.exits_zero),
            Some(Status::ExitCode(_)) => inc(&self.exits_nonzero),
            Some(Status::Signal(_)) => inc(&self.exits_signaled),
            None => {}
        }
        if end.timed_out {
            inc(&self.exits_timed_out);
        }
    }

    pub fn snapshot(&self) -> Value {
        let last = self
            .last_start
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(StartTimings::as_json);
        json!({
            "requests": {
                "total": get(&self.requests),
                "2xx": get(&self.responses_2xx),
                "4xx": get(&self.responses_4xx),
                "5xx": get(&self.responses_5xx),
            },
            "execs": {
                "started": get(&self.execs_started),
                "refused": get(&self.execs_refused),
                "active": get(&self.execs_active),
                "streams_dropped_by_client": get(&self.streams_dropped),
            },
            "exits": {
                "total": get(&self.exits),
                "zero": get(&self.exits_zero),
                "nonzero": get(&self.exits_nonzero),
                "signaled": get(&self.exits_signaled),
                "timed_out": get(&self.exits_timed_out),
            },
            "vsock": {
                "connects": get(&self.vsock_connects),
                "connect_failures": get(&self.vsock_connect_failures),
                "open": get(&self.vsock_open),
            },
            "lifecycle": {
                "boots": get(&self.boots),
                "restores": get(&self.restores),
                "inits": get(&self.inits),
                "pauses": get(&self.pauses),
                "resumes": get(&self.resumes),
                "snapshots": get(&self.snapshots),
            },
            "last_start": last,
        })
    }
}
