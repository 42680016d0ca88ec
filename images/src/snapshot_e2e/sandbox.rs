//! One host-agent sandbox (`run` or `restore`) driven through the host-agent CLI: its own vsock,
//! API socket (`--api-sock`, driven with `host-agent ctl`), console log and timings file in its own
//! directory.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::procs::{self, Bg, Out};

/// envd's vsock port in the template.
pub const ENVD_PORT: u32 = 49983;

/// What every check needs: the host-agent CLI, the template, a work directory, the run's deadline.
pub struct Env {
    pub host_agent: PathBuf,
    pub template: PathBuf,
    pub work: PathBuf,
    pub deadline: Instant,
}

impl Env {
    /// `want`, cut to what is left of the run's deadline.
    pub fn budget(&self, want: Duration) -> Duration {
        want.min(self.deadline.saturating_duration_since(Instant::now()))
    }

    pub fn until(&self, want: Duration) -> Instant {
        Instant::now() + self.budget(want)
    }

    /// Runs `host-agent ARGS` to its end (bounded).
    pub fn host_agent(&self, name: &str, args: &[String], timeout: Duration) -> Out {
        procs::run(name, &self.host_agent, args, self.budget(timeout))
    }
}

pub fn strings(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

pub struct Sandbox {
    pub name: String,
    pub dir: PathBuf,
    pub uds: PathBuf,
    /// The agent's API socket.
    pub api: PathBuf,
    pub console: PathBuf,
    pub timings: PathBuf,
    pub proc: Bg,
    host_agent: PathBuf,
}

impl Sandbox {
    fn paths(
        env: &Env,
        name: &str,
    ) -> Result<(PathBuf, PathBuf, PathBuf, PathBuf, PathBuf), String> {
        let dir = env.work.join(name);
        std::fs::create_dir_all(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
        Ok((
            dir.join("v.sock"),
            dir.join("api.sock"),
            dir.join("console.log"),
            dir.join("timings.json"),
            dir,
        ))
    }

    /// `host-agent run --template T ...` (does not wait for envd).
    pub fn boot(env: &Env, name: &str) -> Result<Sandbox, String> {
        let (uds, api, console, timings, dir) = Self::paths(env, name)?;
        let args = vec![
            "run".to_string(),
            "--template".into(),
            env.template.display().to_string(),
            "--vsock-uds".into(),
            uds.display().to_string(),
            "--console-log".into(),
            console.display().to_string(),
            "--api-sock".into(),
            api.display().to_string(),
        ];
        let proc = Bg::spawn(name, &env.host_agent, &args)?;
        Ok(Sandbox {
            name: name.into(),
            dir,
            uds,
            api,
            console,
            timings,
            proc,
            host_agent: env.host_agent.clone(),
        })
    }

    /// `host-agent restore --snapshot D ... [EXTRA]... [--env K=V]... [-- FIRST]` (does not wait
    /// for it); `extra` holds more of restore's options.
    pub fn restore(
        env: &Env,
        name: &str,
        snapshot: &Path,
        envs: &[(String, String)],
        first: &[&str],
        log_filter: Option<&str>,
        extra: &[&str],
    ) -> Result<Sandbox, String> {
        let (uds, api, console, timings, dir) = Self::paths(env, name)?;
        let mut args = vec![
            "restore".to_string(),
            "--snapshot".into(),
            snapshot.display().to_string(),
            "--vsock-uds".into(),
            uds.display().to_string(),
            "--console-log".into(),
            console.display().to_string(),
            "--api-sock".into(),
            api.display().to_string(),
            "--timings-json".into(),
            timings.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        for (k, v) in envs {
            args.push("--env".into());
            args.push(format!("{k}={v}"));
        }
        if !first.is_empty() {
            args.push("--".into());
            args.extend(first.iter().map(|s| s.to_string()));
        }
        let log: Vec<(&str, &str)> = log_filter
            .map(|f| ("HOST_AGENT_LOG", f))
            .into_iter()
            .collect();
        let proc = Bg::spawn_env(name, &env.host_agent, &args, &log)?;
        Ok(Sandbox {
            name: name.into(),
            dir,
            uds,
            api,
            console,
            timings,
            proc,
            host_agent: env.host_agent.clone(),
        })
    }

    /// Waits for restore's `host-agent: sandbox ready`.
    pub fn wait_ready(&mut self, deadline: Instant) -> Result<Duration, String> {
        self.proc.wait_until("'sandbox ready'", deadline, |p| {
            p.stderr().contains("host-agent: sandbox ready")
        })
    }

    pub fn addr(&self) -> String {
        format!("hvsock:{}:{ENVD_PORT}", self.uds.display())
    }

    fn envd_args(&self, rest: &[&str]) -> Vec<String> {
        let mut a = vec!["envd".to_string(), "--connect".into(), self.addr()];
        a.extend(rest.iter().map(|s| s.to_string()));
        a
    }

    /// `host-agent envd --connect ADDR REST...`, to its end.
    pub fn envd(&self, env: &Env, rest: &[&str], timeout: Duration) -> Out {
        procs::run(
            &format!("{} envd", self.name),
            &self.host_agent,
            &self.envd_args(rest),
            env.budget(timeout),
        )
    }

    /// `host-agent envd --connect ADDR REST...` in the background.
    pub fn envd_bg(&self, what: &str, rest: &[&str]) -> Result<Bg, String> {
        Bg::spawn(
            &format!("{} {what}", self.name),
            &self.host_agent,
            &self.envd_args(rest),
        )
    }

    /// `sh -c SCRIPT` in the guest.
    pub fn sh(&self, env: &Env, script: &str, timeout: Duration) -> Out {
        self.envd(env, &["exec", "--", "sh", "-c", script], timeout)
    }

    /// `host-agent ctl --api-sock A REST...` (the API this sandbox's host-agent serves).
    pub fn ctl(&self, env: &Env, rest: &[&str], timeout: Duration) -> Out {
        let mut a = vec![
            "ctl".to_string(),
            "--api-sock".into(),
            self.api.display().to_string(),
        ];
        a.extend(rest.iter().map(|s| s.to_string()));
        procs::run(
            &format!("{} ctl", self.name),
            &self.host_agent,
            &a,
            env.budget(timeout),
        )
    }

    /// Powers the guest off through envd and waits for host-agent to exit 0.
    pub fn shutdown(&mut self, env: &Env, timeout: Duration) -> Result<String, String> {
        let started = Instant::now();
        let out = self.envd(env, &["shutdown"], Duration::from_secs(30));
        if !out.ok() {
            return Err(format!("envd shutdown failed: {}", out.why()));
        }
        match self.proc.wait_exit(env.until(timeout)) {
            None => Err(format!(
                "host-agent still running {:.1} s after shutdown; {}",
                started.elapsed().as_secs_f64(),
                self.tails()
            )),
            Some(st) if st.success() => Ok(format!(
                "exited 0 {:.1} s after shutdown",
                started.elapsed().as_secs_f64()
            )),
            Some(st) => Err(format!("host-agent exited {st}; {}", self.tails())),
        }
    }

    pub fn console_text(&self) -> String {
        std::fs::read(&self.console)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// host-agent's stderr tail and the console tail, for failure messages.
    pub fn tails(&self) -> String {
        format!(
            "[{} stderr] {} [console tail] {}",
            self.name,
            procs::tail(&self.proc.stderr(), 6),
            procs::tail(&self.console_text(), 12)
        )
    }

    /// The timings JSON restore wrote.
    pub fn timings_json(&self) -> Result<serde_json::Map<String, serde_json::Value>, String> {
        let text = std::fs::read_to_string(&self.timings)
            .map_err(|e| format!("{}: {e}", self.timings.display()))?;
        match serde_json::from_str::<serde_json::Value>(&text) {
            Ok(serde_json::Value::Object(m)) => Ok(m),
            Ok(_) => Err(format!("{} is not a JSON object", self.timings.display())),
            Err(e) => Err(format!("{}: {e}", self.timings.display())),
        }
    }
}
