//! The full-stack checks against a booted template, and the pure parsers they use.

use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::client::EnvdCli;
use crate::template::{hex, Manifest};

pub const MOUNTS: &[&str] = &["/proc", "/sys", "/dev", "/dev/pts", "/run", "/tmp"];
const CALL: Duration = Duration::from_secs(30);

/// Mount points listed in `/proc/mounts` text.
pub fn mount_points(proc_mounts: &str) -> Vec<String> {
    proc_mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .map(str::to_string)
        .collect()
}

/// Module names listed in `/proc/modules` text.
pub fn loaded_modules(proc_modules: &str) -> Vec<String> {
    proc_modules
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// `(pid, comm, state)` of each `/proc/<pid>/stat` line (comm may contain spaces and parentheses).
pub fn parse_stat_lines(text: &str) -> Vec<(u32, String, char)> {
    text.lines()
        .filter_map(|l| {
            let open = l.find('(')?;
            let close = l.rfind(')')?;
            let pid = l[..open].trim().parse().ok()?;
            let comm = l.get(open + 1..close)?.to_string();
            let state = l.get(close + 1..)?.trim_start().chars().next()?;
            Some((pid, comm, state))
        })
        .collect()
}

pub fn zombies(stat_text: &str) -> Vec<(u32, String)> {
    parse_stat_lines(stat_text)
        .into_iter()
        .filter(|(_, _, s)| *s == 'Z')
        .map(|(p, c, _)| (p, c))
        .collect()
}

fn expect_eq(what: &str, got: &str, want: &str) -> Result<(), String> {
    if got == want {
        Ok(())
    } else {
        Err(format!("{what}: got {got:?}, want {want:?}"))
    }
}

fn out(cli: &EnvdCli, env: &[(&str, &str)], argv: &[&str]) -> Result<String, String> {
    Ok(cli
        .exec(env, argv, CALL)?
        .ok()?
        .stdout_str()
        .trim_end_matches('\n')
        .to_string())
}

pub struct Ctx<'a> {
    pub cli: &'a EnvdCli,
    pub manifest: &'a Manifest,
}

pub type Check = (&'static str, fn(&Ctx<'_>) -> Result<(), String>);

/// A VMM-specific check on the running VM; `Ok` carries a detail for the PASS line.
pub type LiveCheck = (
    &'static str,
    fn(&Ctx<'_>, &super::vmm::Vm) -> Result<String, String>,
);

/// The checks, in the order they run (instance env is set part-way, so order matters).
pub const CHECKS: &[Check] = &[
    ("envd is PID 1", pid1),
    ("filesystems mounted", mounts),
    ("template modules loaded", modules),
    ("exit code propagates", exit_code),
    ("template env reaches commands", template_env),
    ("template PATH reaches commands", template_path),
    ("template WorkingDir is the cwd", workdir),
    ("orphans are reaped", reaping),
    ("instance env via init", instance_env),
    ("per-command env", command_env),
    ("16 MiB of output intact", big_output),
    ("50 concurrent execs", concurrent),
];

fn pid1(c: &Ctx<'_>) -> Result<(), String> {
    expect_eq(
        "readlink /proc/1/exe",
        &out(c.cli, &[], &["readlink", "/proc/1/exe"])?,
        "/init",
    )?;
    expect_eq(
        "/proc/1/comm",
        &out(c.cli, &[], &["cat", "/proc/1/comm"])?,
        "init",
    )
}

fn mounts(c: &Ctx<'_>) -> Result<(), String> {
    let points = mount_points(&out(c.cli, &[], &["cat", "/proc/mounts"])?);
    let missing: Vec<_> = MOUNTS
        .iter()
        .filter(|m| !points.iter().any(|p| p == *m))
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!("not mounted: {missing:?} (mounted: {points:?})"))
    }
}

fn modules(c: &Ctx<'_>) -> Result<(), String> {
    let loaded = loaded_modules(&out(c.cli, &[], &["cat", "/proc/modules"])?);
    let missing: Vec<_> = c
        .manifest
        .modules
        .iter()
        .filter(|m| !loaded.contains(m))
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!("not loaded: {missing:?}"))
    }
}

fn exit_code(c: &Ctx<'_>) -> Result<(), String> {
    let o = c.cli.exec(&[], &["sh", "-c", "exit 7"], CALL)?;
    if o.code == Some(7) {
        Ok(())
    } else {
        Err(format!("`sh -c 'exit 7'` gave exit {:?}", o.code))
    }
}

fn template_env(c: &Ctx<'_>) -> Result<(), String> {
    let env = &c.manifest.template_env.env;
    if env.is_empty() {
        return Err(
            "the template has no env to check (build it with images/testdata/oci-config.json)"
                .into(),
        );
    }
    for (k, v) in env.iter().filter(|(k, _)| *k != "PATH") {
        let script = format!("echo \"${k}\"");
        expect_eq(
            &format!("sh -c '{script}'"),
            &out(c.cli, &[], &["sh", "-c", &script])?,
            v,
        )?;
    }
    Ok(())
}

fn template_path(c: &Ctx<'_>) -> Result<(), String> {
    let Some(want) = c.manifest.template_env.env.get("PATH") else {
        return Err("the template sets no PATH".into());
    };
    expect_eq(
        "sh -c 'echo $PATH'",
        &out(c.cli, &[], &["sh", "-c", "echo $PATH"])?,
        want,
    )
}

fn workdir(c: &Ctx<'_>) -> Result<(), String> {
    let Some(want) = &c.manifest.template_env.workdir else {
        return Err("the template sets no WorkingDir".into());
    };
    expect_eq("pwd", &out(c.cli, &[], &["pwd"])?, want)
}

fn reaping(c: &Ctx<'_>) -> Result<(), String> {
    c.cli
        .exec(&[], &["sh", "-c", "sleep 0.2 & exit 0"], CALL)?
        .ok()?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        // Globbing races with exiting processes; cat's complaints about vanished ones are expected.
        let o = c
            .cli
            .exec(
                &[],
                &["sh", "-c", "cat /proc/[0-9]*/stat 2>/dev/null; true"],
                CALL,
            )?
            .ok()?;
        let text = o.stdout_str();
        let z = zombies(&text);
        let sleeping = parse_stat_lines(&text)
            .iter()
            .any(|(_, comm, _)| comm == "sleep");
        if z.is_empty() && !sleeping {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "after 20 s: zombies {z:?}, sleep still present: {sleeping}"
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn instance_env(c: &Ctx<'_>) -> Result<(), String> {
    c.cli
        .init(
            &[("INSTANCE_ONLY", "from-init"), ("LAYERED", "instance")],
            CALL,
        )?
        .ok()?;
    expect_eq(
        "INSTANCE_ONLY",
        &out(c.cli, &[], &["sh", "-c", "echo $INSTANCE_ONLY"])?,
        "from-init",
    )?;
    expect_eq(
        "LAYERED after init",
        &out(c.cli, &[], &["sh", "-c", "echo $LAYERED"])?,
        "instance",
    )?;
    if let Some(v) = c.manifest.template_env.env.get("TEMPLATE_ONLY") {
        expect_eq(
            "TEMPLATE_ONLY after init",
            &out(c.cli, &[], &["sh", "-c", "echo $TEMPLATE_ONLY"])?,
            v,
        )?;
    }
    Ok(())
}

fn command_env(c: &Ctx<'_>) -> Result<(), String> {
    let got = out(
        c.cli,
        &[("LAYERED", "command"), ("CMD_ONLY", "x y")],
        &["sh", "-c", "echo $LAYERED/$CMD_ONLY"],
    )?;
    expect_eq("per-command env", &got, "command/x y")?;
    // Per-command env does not stick.
    expect_eq(
        "next command",
        &out(c.cli, &[], &["sh", "-c", "echo $LAYERED/$CMD_ONLY"])?,
        "instance/",
    )
}

fn big_output(c: &Ctx<'_>) -> Result<(), String> {
    const LEN: usize = 16 * 1024 * 1024;
    let script = format!("head -c {LEN} /dev/urandom > /tmp/e2e-blob && sha256sum /tmp/e2e-blob");
    let sum = out(c.cli, &[], &["sh", "-c", &script])?;
    let want = sum.split_whitespace().next().unwrap_or("").to_string();
    let o = c
        .cli
        .exec(&[], &["cat", "/tmp/e2e-blob"], Duration::from_secs(120))?
        .ok()?;
    let _ = c.cli.exec(&[], &["rm", "-f", "/tmp/e2e-blob"], CALL);
    if o.stdout.len() != LEN {
        return Err(format!("got {} bytes, want {LEN}", o.stdout.len()));
    }
    expect_eq("sha256", &hex(&Sha256::digest(&o.stdout)), &want)
}

fn concurrent(c: &Ctx<'_>) -> Result<(), String> {
    const N: usize = 50;
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut pending = Vec::new();
    for i in 0..N {
        let n = i.to_string();
        let args = EnvdCli::exec_args(&[("N", &n)], &["sh", "-c", "sleep 0.1; echo out-$N"]);
        pending.push((i, c.cli.start(&args)?));
    }
    let mut failures = Vec::new();
    for (i, p) in pending {
        match p.wait(deadline).and_then(|o| o.ok()) {
            Ok(o) if o.stdout_str().trim() == format!("out-{i}") => {}
            Ok(o) => failures.push((i, format!("output {:?}", o.stdout_str()))),
            Err(e) => failures.push((i, e)),
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} of {N} failed: {}",
            failures.len(),
            group_failures(&failures)
        ))
    }
}

/// `#0 #3 #7: why; #5: other why`: identical reasons once, with the indices that had them.
pub fn group_failures(failures: &[(usize, String)]) -> String {
    let mut groups: Vec<(Vec<usize>, &str)> = Vec::new();
    for (i, why) in failures {
        match groups.iter_mut().find(|(_, w)| *w == why.as_str()) {
            Some((ids, _)) => ids.push(*i),
            None => groups.push((vec![*i], why)),
        }
    }
    groups
        .iter()
        .map(|(ids, why)| {
            let ids: Vec<String> = ids.iter().map(|i| format!("#{i}")).collect();
            format!("{}: {why}", ids.join(" "))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_files() {
        let stat = "1 (init) S 0 1 1 0 -1\n42 (sleep) Z 1 42 42 0\n7 (a b) c)) R 1 7\n";
        assert_eq!(
            parse_stat_lines(stat),
            vec![
                (1, "init".into(), 'S'),
                (42, "sleep".into(), 'Z'),
                (7, "a b) c)".into(), 'R')
            ]
        );
        assert_eq!(zombies(stat), vec![(42, "sleep".to_string())]);
        let mounts = "proc /proc proc rw 0 0\ndevpts /dev/pts devpts rw 0 0\n";
        assert_eq!(mount_points(mounts), vec!["/proc", "/dev/pts"]);
        assert_eq!(
            loaded_modules("vsock 53248 2 vhost_vsock, Live 0x0\n"),
            vec!["vsock"]
        );
    }

    #[test]
    fn groups_identical_failures() {
        let f = vec![
            (0, "closed".to_string()),
            (3, "timeout".to_string()),
            (4, "closed".to_string()),
        ];
        assert_eq!(group_failures(&f), "#0 #4: closed; #3: timeout");
    }
}
