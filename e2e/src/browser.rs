//! Headless Chromium for the browser tests: chromedriver on a free port, and a session with
//! a fresh profile; whatever a run leaves behind is killed by its profile's path.

use crate::stack::{free_port, wait_port_async};
use fantoccini::{Client, ClientBuilder};
use serde_json::{Value, json};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

/// chromedriver, stopped (and reaped) when dropped, with any Chromium it left running.
pub struct Chromedriver {
    /// The chromedriver process.
    child: Child,
    /// Where it takes WebDriver sessions.
    port: u16,
    /// Chromium's profile directory for this run: what identifies its processes.
    profile: PathBuf,
}

impl Chromedriver {
    /// Starts `binary` on a free port, its logs in `dir`, and waits until it listens.
    pub async fn start(binary: &Path, dir: &Path) -> Result<Chromedriver, String> {
        let port = free_port().map_err(|e| e.to_string())?;
        let log = File::create(dir.join("chromedriver.out")).map_err(|e| e.to_string())?;
        let child = Command::new(binary)
            .arg(format!("--port={port}"))
            .arg(format!(
                "--log-path={}",
                dir.join("chromedriver.log").display()
            ))
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
        let driver = Chromedriver {
            child,
            port,
            profile: dir.join("chromium-profile"),
        };
        wait_port_async(port, Duration::from_secs(20))
            .await
            .map_err(|e| format!("chromedriver: {e}"))?;
        Ok(driver)
    }
}

impl Drop for Chromedriver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A session that was not closed (a failure, Ctrl-C) leaves its Chromium behind: kill
        // the processes started with this run's own profile, by pid.
        let flag = format!("--user-data-dir={}", self.profile.display());
        for pid in pids_with_argument(&flag) {
            let _ = Command::new("kill")
                .arg("-KILL")
                .arg(pid.to_string())
                .status();
        }
    }
}

/// Processes whose command line has `argument` (read from /proc).
fn pids_with_argument(argument: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| {
                cmdline
                    .split(|b| *b == 0)
                    .any(|arg| arg == argument.as_bytes())
            })
        })
        .collect()
}

/// A headless Chromium session with a fresh profile; no network but this machine's.
/// `extra` arguments are added to Chromium's own (`--host-resolver-rules=…`, say).
pub async fn open_browser(
    driver: &Chromedriver,
    chromium: &Path,
    extra: &[&str],
) -> Result<Client, String> {
    let profile = &driver.profile;
    let mut args: Vec<String> = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--no-proxy-server",
        "--no-default-browser-check",
        "--window-size=1400,1000",
    ]
    .iter()
    .chain(extra)
    .map(|a| a.to_string())
    .collect();
    args.push(format!("--user-data-dir={}", profile.display()));
    let capabilities = json!({
        "browserName": "chrome",
        "goog:chromeOptions": {
            "binary": chromium,
            "args": args,
        },
    });
    let Value::Object(capabilities) = capabilities else {
        return Err("capabilities are not an object".into());
    };
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    ClientBuilder::new(connector)
        .capabilities(capabilities)
        .connect(&format!("http://127.0.0.1:{}", driver.port))
        .await
        .map_err(|e| format!("cannot open a Chromium session: {e}"))
}
