//! Child processes a benchmark starts itself (peer servers, a label-joiner of
//! its own): each runs in its own process group, logs to a file, and is
//! stopped (group SIGTERM, then SIGKILL) when its guard drops.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::{Context, bail};

/// A running child; stopped on drop.
#[derive(Debug)]
pub struct Child {
    /// What it is, for messages.
    pub name: String,
    /// Its log file.
    pub log: PathBuf,
    child: std::process::Child,
}

impl Child {
    /// Starts `cmd` with `envs` in its own process group, output to `log`.
    pub fn spawn(name: &str, cmd: &[&str], envs: &[(&str, String)], cwd: &Path, log: PathBuf) -> anyhow::Result<Self> {
        use std::os::unix::process::CommandExt as _;
        let (program, args) = cmd.split_first().context("empty command")?;
        if let Some(dir) = log.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let out = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = std::process::Command::new(program)
            .args(args)
            .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
            .current_dir(cwd)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {name} ({program})"))?;
        Ok(Self { name: name.into(), log, child })
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until `GET url` answers 200 (a server may accept connections
    /// before it can serve); fails early, naming the log, if the child exits.
    pub async fn wait_ready(&mut self, url: &str, patience: Duration) -> anyhow::Result<()> {
        let deadline = std::time::Instant::now() + patience;
        let http = crate::http_builder().timeout(Duration::from_secs(2)).build()?;
        loop {
            if http.get(url).send().await.is_ok_and(|r| r.status().is_success()) {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("{} exited ({status}) before {url} answered; see {}", self.name, self.log.display());
            }
            if std::time::Instant::now() > deadline {
                bail!("{}: {url} did not answer 200 within {patience:?}; see {}", self.name, self.log.display());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Stops the child's whole process group: SIGTERM, up to 10 s, SIGKILL.
    pub fn stop(&mut self) {
        let pgid = self.child.id() as i32;
        // SAFETY: plain syscalls on a process group this guard created.
        unsafe {
            libc::kill(-pgid, libc::SIGTERM);
        }
        for _ in 0..100 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs a command to completion (setup steps), failing with its log tail.
pub fn run(name: &str, cmd: &[&str], cwd: &Path, log: &Path) -> anyhow::Result<()> {
    let (program, args) = cmd.split_first().context("empty command")?;
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let out = std::fs::File::create(log)?;
    let status = std::process::Command::new(program)
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .status()
        .with_context(|| format!("running {name} ({program})"))?;
    if !status.success() {
        let tail = std::fs::read_to_string(log).unwrap_or_default();
        let tail: Vec<&str> = tail.lines().rev().take(15).collect();
        bail!(
            "{name} failed ({status}); last lines of {}:\n{}",
            log.display(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    Ok(())
}
