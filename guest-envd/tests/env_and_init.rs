//! The environment contract and the /init rules, through the real daemon and client.

mod common;

use common::*;
use envd_protocol::pb::{self, ErrorCode};

#[tokio::test]
async fn a_key_in_all_four_layers_resolves_to_the_per_command_value() {
    let envd = Envd::start(&[("K", "template"), ("T_ONLY", "t")]).await;
    let c = envd.client().await;
    let show = "echo K=$K T_ONLY=$T_ONLY I_ONLY=$I_ONLY HOME=$HOME";

    // Template only (and the base layer).
    assert_eq!(
        run_ok(&c, sh(show)).await.trim(),
        format!(
            "K=template T_ONLY=t I_ONLY= HOME={}",
            home_of_current_user()
        )
    );

    c.init(pb::InitRequest {
        env: env(&[("K", "instance"), ("I_ONLY", "i")]),
        timestamp: now(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(
        run_ok(&c, sh(show)).await.trim(),
        format!(
            "K=instance T_ONLY=t I_ONLY=i HOME={}",
            home_of_current_user()
        )
    );

    let mut per_command = sh(show);
    per_command.envs = env(&[("K", "command"), ("HOME", "/tmp")]);
    assert_eq!(
        run_ok(&c, per_command).await.trim(),
        "K=command T_ONLY=t I_ONLY=i HOME=/tmp"
    );
}

fn home_of_current_user() -> String {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    let uid = rustix::process::geteuid().as_raw().to_string();
    passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() >= 7 && f[2] == uid)
        .map(|f| f[5].to_string())
        .unwrap()
}

#[tokio::test]
async fn base_layer_and_template_path() {
    let plain = Envd::start(&[]).await;
    let c = plain.client().await;
    let out = run_ok(&c, sh("echo $PATH; echo $USER $LOGNAME; env | wc -l")).await;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0],
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    );
    let name = run_ok(&c, cmd(&["id", "-un"])).await;
    assert_eq!(lines[1], format!("{0} {0}", name.trim()));

    // A template PATH replaces the base one, and commands are found through it.
    let templated = Envd::start(&[("PATH", "/usr/bin:/bin")]).await;
    let c = templated.client().await;
    assert_eq!(run_ok(&c, sh("echo $PATH")).await.trim(), "/usr/bin:/bin");
    let err = c
        .start(cmd(&["definitely-not-on-path"]))
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Some(ErrorCode::SpawnFailed));
    assert!(err.to_string().contains("PATH=/usr/bin:/bin"), "{err}");
}

#[tokio::test]
async fn init_is_additive_overwrites_and_only_unset_removes() {
    let envd = Envd::start(&[]).await;
    let c = envd.client().await;
    let show = || sh("echo A=$A B=$B C=$C");
    c.init(pb::InitRequest {
        env: env(&[("A", "1"), ("B", "1")]),
        timestamp: at(100),
        ..Default::default()
    })
    .await
    .unwrap();
    c.init(pb::InitRequest {
        env: env(&[("B", "2"), ("C", "2")]),
        timestamp: at(101),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(run_ok(&c, show()).await.trim(), "A=1 B=2 C=2");

    // Omission never clears.
    c.init(pb::InitRequest {
        timestamp: at(102),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(run_ok(&c, show()).await.trim(), "A=1 B=2 C=2");

    c.init(pb::InitRequest {
        unset: vec!["A".into()],
        timestamp: at(103),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(run_ok(&c, show()).await.trim(), "A= B=2 C=2");
}

#[tokio::test]
async fn a_stale_init_is_answered_not_applied_and_a_retry_is_idempotent() {
    let envd = Envd::start(&[]).await;
    let c = envd.client().await;
    let first = pb::InitRequest {
        env: env(&[("V", "new")]),
        timestamp: at(2000),
        ..Default::default()
    };
    assert!(c.init(first.clone()).await.unwrap().applied);
    // The same episode retried: same timestamp, applied again, same result.
    assert!(c.init(first.clone()).await.unwrap().applied);
    assert_eq!(run_ok(&c, sh("echo $V")).await.trim(), "new");

    let stale = c
        .init(pb::InitRequest {
            env: env(&[("V", "old")]),
            unset: vec![],
            timestamp: at(1999),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(!stale.applied);
    assert_eq!(run_ok(&c, sh("echo $V")).await.trim(), "new");
    assert!(c.health().await.unwrap().initialized);
}

#[tokio::test]
async fn init_without_timestamp_is_refused() {
    let envd = Envd::start(&[]).await;
    let c = envd.client().await;
    let err = c
        .init(pb::InitRequest {
            env: env(&[("V", "x")]),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::BadRequest));
    assert!(!c.health().await.unwrap().initialized);
}

#[tokio::test]
async fn on_a_host_envd_never_steps_the_clock() {
    let envd = Envd::start(&[]).await;
    let c = envd.client().await;
    let future = std::time::SystemTime::now() + std::time::Duration::from_secs(86400 * 365);
    let r = c
        .init(pb::InitRequest {
            timestamp: Some(prost_types::Timestamp::from(future)),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(r.applied);
    assert!(!r.clock_stepped);
    assert!(std::time::SystemTime::now() < future);
}

#[tokio::test]
async fn the_token_is_enforced_once_set_and_rotation_needs_the_current_one() {
    let envd = Envd::start(&[]).await;
    let open = envd.client().await;
    // Before a token is set, anyone may start processes.
    run_ok(&open, cmd(&["true"])).await;
    open.init(pb::InitRequest {
        access_token: Some("secret-1".into()),
        timestamp: at(10),
        ..Default::default()
    })
    .await
    .unwrap();

    for bad in ["", "wrong"] {
        let c = envd.client().await.with_token(bad);
        let err = c.start(cmd(&["true"])).await.err().unwrap();
        assert_eq!(err.code(), Some(ErrorCode::Unauthorized), "token {bad:?}");
        assert_eq!(
            c.list().await.unwrap_err().code(),
            Some(ErrorCode::Unauthorized)
        );
        // Health needs no token.
        c.health().await.unwrap();
        // Rotation with a wrong current token is refused.
        let err = c
            .init(pb::InitRequest {
                access_token: Some("mine-now".into()),
                timestamp: at(11),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::Unauthorized));
    }

    let good = envd.client().await.with_token("secret-1");
    run_ok(&good, cmd(&["true"])).await;
    good.init(pb::InitRequest {
        access_token: Some("secret-2".into()),
        timestamp: at(12),
        ..Default::default()
    })
    .await
    .unwrap();
    let err = good.start(cmd(&["true"])).await.err().unwrap();
    assert_eq!(
        err.code(),
        Some(ErrorCode::Unauthorized),
        "old token no longer works"
    );
    let rotated = envd.client().await.with_token("secret-2");
    run_ok(&rotated, cmd(&["true"])).await;
}

#[tokio::test]
async fn default_user_and_workdir_apply_to_processes_that_name_none() {
    if !is_root() {
        eprintln!("skipped: switching users needs root");
        return;
    }
    let envd = Envd::start(&[]).await;
    let c = envd.client().await;
    let workdir = envd.dir.path().join("work");
    std::fs::create_dir(&workdir).unwrap();
    c.init(pb::InitRequest {
        default_user: Some("nobody".into()),
        default_workdir: Some(workdir.display().to_string()),
        timestamp: now(),
        ..Default::default()
    })
    .await
    .unwrap();
    let out = run_ok(&c, sh("id -un; pwd; echo $USER")).await;
    assert_eq!(out, format!("nobody\n{}\nnobody\n", workdir.display()));
    // A process that names its own still gets those.
    let mut own = sh("id -un; pwd");
    own.user = "root".into();
    own.cwd = "/".into();
    assert_eq!(run_ok(&c, own).await, "root\n/\n");
}
