//! `gantry-worker --print-config`: checkpoint store options from the config file reach the
//! effective options; an unknown option or a credential in the file is refused by name.

use std::process::Command;

fn print_config(file: &str) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("worker.toml");
    std::fs::write(&path, file).unwrap();
    Command::new(env!("CARGO_BIN_EXE_gantry-worker"))
        .env_clear()
        .arg("--config")
        .arg(&path)
        .arg("--print-config")
        .output()
        .unwrap()
}

#[test]
fn store_options_come_from_the_file_and_never_hold_credentials() {
    let out = print_config(
        "slots = 2\n[object_store]\naws_endpoint = \"http://minio:9000\"\naws_allow_http = true\n",
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let config: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(config["slots"], 2);
    assert_eq!(
        config["store_options"],
        serde_json::json!({"aws_endpoint": "http://minio:9000", "aws_allow_http": "true"})
    );

    for (file, named) in [
        (
            "[object_store]\naws_endpiont = \"x\"\n",
            "object_store.aws_endpiont: not an option",
        ),
        (
            "[object_store]\naws_secret_access_key = \"x\"\n",
            "object_store.aws_secret_access_key: aws_secret_access_key is a credential",
        ),
    ] {
        let out = print_config(file);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(stderr.contains(named), "{stderr}");
    }
}

#[test]
fn declared_gpus_are_offered_and_more_than_cuda_visible_devices_shows_are_refused() {
    let out = print_config("gpus = 2\n");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let config: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let gpus: Vec<(u64, &str)> = config["gpus"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            (
                g["index"].as_u64().unwrap(),
                g["visible_as"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(gpus, [(0, "0"), (1, "1")]);

    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_gantry-worker"))
        .env_clear()
        .env("CUDA_VISIBLE_DEVICES", "3")
        .env("GANTRY_GPUS", "2")
        .env("GANTRY_WORK_DIR", dir.path())
        .arg("--print-config")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("gpus: 2 declared but CUDA_VISIBLE_DEVICES shows 1"),
        "{stderr}"
    );
}
