//! Test support shared by the crates' integration tests: real servers on loopback.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A real S3-protocol server (moto, which `scripts/test` installs) on loopback, stopped on drop.
pub struct Moto {
    child: Child,
    pub url: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Moto {
    /// Starts a server with an empty `bucket`.
    pub fn start(bucket: &str) -> Self {
        let port = free_port();
        let child = Command::new("python3")
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 with moto (scripts/test installs it)");
        let moto = Moto {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        // The port accepts connections before the server answers requests well (moto loads its
        // backends on the first ones): ask until the bucket is made, or the deadline.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let made = Command::new("curl")
                .args([
                    "-sf",
                    "-m",
                    "10",
                    "-X",
                    "PUT",
                    &format!("{}/{bucket}", moto.url),
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .expect("curl");
            if made.success() {
                return moto;
            }
            assert!(
                Instant::now() < deadline,
                "moto on {} could not create bucket {bucket} (is it installed? scripts/test installs it)",
                moto.url
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The object_store options (`aws_*`) of a client of this server.
    pub fn options(&self) -> Vec<(String, String)> {
        [
            ("aws_endpoint", self.url.as_str()),
            ("aws_allow_http", "true"),
            ("aws_region", "us-east-1"),
            ("aws_access_key_id", "test"),
            ("aws_secret_access_key", "test"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    /// The same credentials as environment variables, for processes that read them there.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ACCESS_KEY_ID", "test"),
            ("AWS_SECRET_ACCESS_KEY", "test"),
            ("AWS_REGION", "us-east-1"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    /// The keys under `prefix` in `bucket`, from the server's own listing (its XML).
    pub fn list(&self, bucket: &str, prefix: &str) -> String {
        let out = Command::new("curl")
            .args([
                "-sf",
                &format!("{}/{bucket}?list-type=2&prefix={prefix}", self.url),
            ])
            .output()
            .expect("curl");
        assert!(out.status.success(), "listing {bucket}/{prefix} failed");
        String::from_utf8(out.stdout).unwrap()
    }
}
