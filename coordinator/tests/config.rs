//! `gantry-coordinator --print-config`: a file, then `GANTRY_*` variables, then flags, each
//! layer winning over the ones before; an unknown key is refused with its name.

use std::process::Command;

fn print_config(file: &str, env: &[(&str, &str)], flags: &[&str]) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("coordinator.toml");
    std::fs::write(&path, file).unwrap();
    Command::new(env!("CARGO_BIN_EXE_gantry-coordinator"))
        .env_clear()
        .envs(env.iter().copied())
        .arg("--config")
        .arg(&path)
        .args(flags)
        .arg("--print-config")
        .output()
        .unwrap()
}

#[test]
fn file_then_environment_then_flags() {
    let file = "lease_ttl_ms = 5000\nheartbeat_interval_ms = 200\ndrain_ms = 100\n";
    let out = print_config(
        file,
        &[
            ("GANTRY_HEARTBEAT_INTERVAL_MS", "300"),
            ("GANTRY_DRAIN_MS", "50"),
        ],
        &["--drain-ms", "7"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let config: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        config["lease_ttl_ms"], 5000,
        "the file sets what nothing else does"
    );
    assert_eq!(
        config["heartbeat_interval_ms"], 300,
        "a variable wins over the file"
    );
    assert_eq!(
        config["drain_ms"], 7,
        "a flag wins over a variable and the file"
    );
    assert_eq!(config["listen"], "127.0.0.1:7070", "defaults fill the rest");
}

#[test]
fn an_unknown_key_is_refused_by_name() {
    let out = print_config("lease_ttl_ms = 5000\nlease_tll_ms = 1\n", &[], &[]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("lease_tll_ms"), "{stderr}");
}
