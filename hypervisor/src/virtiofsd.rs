//! The virtio-fs daemon: which one it is and its command line.
//!
//! Two daemons exist: the maintained Rust `virtiofsd` (`--shared-dir`, `--cache`) and the
//! C daemon QEMU shipped until 8.0 (`-o source=`, `-o cache=`). [`detect_flavor`] tells
//! them apart by their `--version` output; [`daemon_args`] builds the matching arguments.
//! Readiness is the socket path appearing (see [`crate::process::ChildProcess::wait_for_path`]).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use crate::config::SharedFsConfig;

/// Errors identifying the virtio-fs daemon.
#[derive(Debug, thiserror::Error)]
pub enum VirtiofsdError {
    /// Running `<daemon> --version` failed.
    #[error("cannot run {} --version", .daemon.display())]
    Version {
        daemon: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `<daemon> --version` did not finish in time.
    #[error("{} --version did not finish in {timeout:?}", .daemon.display())]
    VersionTimeout { daemon: PathBuf, timeout: Duration },
}

/// Which virtio-fs daemon a binary is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// The Rust virtiofsd (gitlab.com/virtio-fs/virtiofsd).
    Rust,
    /// QEMU's legacy C virtiofsd.
    Legacy,
}

/// Classifies `--version` output: the C daemon prints `virtiofsd version 7.2.x`, the Rust
/// one `virtiofsd 1.x`.
pub fn flavor_from_version(output: &str) -> Flavor {
    if output.contains("virtiofsd version") || output.contains("FUSE kernel interface") {
        Flavor::Legacy
    } else {
        Flavor::Rust
    }
}

/// Runs `daemon --version` (with `timeout`) and classifies it.
pub async fn detect_flavor(daemon: &Path, timeout: Duration) -> Result<Flavor, VirtiofsdError> {
    let output = tokio::process::Command::new(daemon)
        .arg("--version")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(timeout, output)
        .await
        .map_err(|_| VirtiofsdError::VersionTimeout {
            daemon: daemon.to_path_buf(),
            timeout,
        })?
        .map_err(|source| VirtiofsdError::Version {
            daemon: daemon.to_path_buf(),
            source,
        })?;
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    Ok(flavor_from_version(&text))
}

/// The daemon's arguments for serving `config.shared_dir` on `socket`.
pub fn daemon_args(flavor: Flavor, socket: &Path, config: &SharedFsConfig) -> Vec<OsString> {
    let mut args: Vec<OsString> = Vec::new();
    match flavor {
        Flavor::Rust => {
            args.push("--socket-path".into());
            args.push(socket.into());
            args.push("--shared-dir".into());
            args.push(config.shared_dir.as_os_str().into());
            args.push("--cache".into());
            args.push(config.cache.as_str().into());
            args.push("--thread-pool-size=1".into());
            args.push("--announce-submounts".into());
        }
        Flavor::Legacy => {
            let mut socket_arg = OsString::from("--socket-path=");
            socket_arg.push(socket);
            args.push(socket_arg);
            let mut source = OsString::from("source=");
            source.push(&config.shared_dir);
            args.push("-o".into());
            args.push(source);
            // The C daemon calls "never" "none".
            let cache = if config.cache == "never" {
                "none"
            } else {
                config.cache.as_str()
            };
            args.push("-o".into());
            args.push(format!("cache={cache}").into());
            args.push("--thread-pool-size=1".into());
            args.push("-o".into());
            args.push("announce_submounts".into());
        }
    }
    args.extend(config.extra_args.iter().map(OsString::from));
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(cache: &str) -> SharedFsConfig {
        SharedFsConfig {
            daemon: PathBuf::from("/usr/libexec/virtiofsd"),
            shared_dir: PathBuf::from("/run/share"),
            cache: cache.into(),
            extra_args: vec!["--sandbox".into(), "none".into()],
        }
    }

    #[test]
    fn version_output() {
        assert_eq!(flavor_from_version("virtiofsd 1.14.0\n"), Flavor::Rust);
        assert_eq!(
            flavor_from_version("virtiofsd version 7.2.22 (Debian 1:7.2+dfsg-7)\n"),
            Flavor::Legacy
        );
    }

    #[test]
    fn rust_args() {
        let args = daemon_args(Flavor::Rust, Path::new("/run/vm/fs.sock"), &config("never"));
        assert_eq!(
            args,
            [
                "--socket-path",
                "/run/vm/fs.sock",
                "--shared-dir",
                "/run/share",
                "--cache",
                "never",
                "--thread-pool-size=1",
                "--announce-submounts",
                "--sandbox",
                "none"
            ]
        );
    }

    #[test]
    fn legacy_args() {
        let args = daemon_args(
            Flavor::Legacy,
            Path::new("/run/vm/fs.sock"),
            &config("never"),
        );
        assert_eq!(
            args,
            [
                "--socket-path=/run/vm/fs.sock",
                "-o",
                "source=/run/share",
                "-o",
                "cache=none",
                "--thread-pool-size=1",
                "-o",
                "announce_submounts",
                "--sandbox",
                "none"
            ]
        );
    }
}
