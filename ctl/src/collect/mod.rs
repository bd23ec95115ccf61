//! `kata-ctl collect`: a must-gather style archive (tar.gz) of what a bug report about this
//! node needs.
//!
//! Layout, under one top directory `kata-collect-<UTC time>/`:
//! - `versions.txt`: kata-ctl, the shim, QEMU, virtiofsd, the host kernel, containerd,
//!   and each running sandbox's agent;
//! - `env.json`: `kata-ctl env` as data (paths, the configuration in effect, host facts);
//!   `config/<file name>`: the configuration file itself;
//! - `host/check.json`, `host/check.txt`: `kata-ctl check` as data and as printed;
//! - `sandboxes.txt`: every sandbox directory found and whether its shim runs;
//! - `sandboxes/<id>/...`: per running sandbox ([`sandbox`]);
//! - `errors.txt`: every item that could not be gathered, with the reason (the collection
//!   goes on without it).
//!
//! Everything passes through [`crate::redact`] before it is written: the bundles' OCI
//! specs are redacted by structure, then every text is scrubbed of the values removed and
//! of environment assignments outside the allow-list.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kata_shim::report::chain;

use crate::host::HostRoot;
use crate::redact::Scrubber;

pub mod sandbox;

/// How long one external command (journalctl, containerd --version) may run.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// Failures that stop a collection (gathering failures are recorded in it instead).
#[derive(Debug, thiserror::Error)]
pub enum CollectError {
    /// `--output` names a file that cannot be written.
    #[error("--output {}: {reason}", .path.display())]
    Output { path: PathBuf, reason: String },
    /// The archive could not be written.
    #[error("cannot write {}", .path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The current directory is unknown (for the default output name).
    #[error("cannot find the current directory for the default output file")]
    Cwd(#[source] std::io::Error),
}

/// What to collect and where to.
#[derive(Debug, Clone)]
pub struct Options {
    /// The archive (default: `kata-collect-<UTC time>.tar.gz` in the current directory).
    pub output: Option<PathBuf>,
    /// The configuration file (default: the shim's lookup).
    pub config: Option<PathBuf>,
    /// Where sandbox directories are looked for.
    pub roots: Vec<PathBuf>,
    /// The host facts' root (tests).
    pub host: HostRoot,
}

/// What a collection wrote.
#[derive(Debug, Clone)]
pub struct Summary {
    pub path: PathBuf,
    pub sandboxes: usize,
    pub errors: usize,
}

/// The archive being assembled: files by path, and the failures.
#[derive(Debug, Default)]
pub struct Collection {
    files: Vec<(String, Vec<u8>)>,
    errors: Vec<String>,
    scrubber: Scrubber,
}

impl Collection {
    /// Adds a file (relative to the top directory).
    pub fn add(&mut self, path: impl Into<String>, data: impl Into<Vec<u8>>) {
        self.files.push((path.into(), data.into()));
    }

    /// Records that `item` could not be gathered.
    pub fn error(&mut self, item: impl AsRef<str>, reason: impl AsRef<str>) {
        self.errors
            .push(format!("{}: {}", item.as_ref(), reason.as_ref()));
    }

    /// Adds `result`'s text as `path`, or records its error under `path`.
    pub fn add_or_error<E: std::error::Error + 'static>(
        &mut self,
        path: &str,
        result: Result<String, E>,
    ) {
        match result {
            Ok(text) => self.add(path, text),
            Err(e) => self.error(path, chain(&e)),
        }
    }

    /// Values to scrub from every text of the collection.
    pub fn secrets(&mut self, values: Vec<String>) {
        self.scrubber.add(values);
    }

    /// The files, scrubbed, with `errors.txt`, in the order added.
    fn finish(mut self) -> (Vec<(String, Vec<u8>)>, usize) {
        let errors = self.errors.len();
        let text = if self.errors.is_empty() {
            "no errors\n".to_owned()
        } else {
            self.errors.iter().map(|e| format!("{e}\n")).collect()
        };
        self.files.push(("errors.txt".into(), text.into_bytes()));
        let scrubber = self.scrubber;
        let files = self
            .files
            .into_iter()
            .map(|(p, data)| match String::from_utf8(data) {
                Ok(text) => (p, scrubber.scrub(&text).into_bytes()),
                // Binary data is not expected; keep only what is valid text of it.
                Err(e) => (
                    p,
                    scrubber
                        .scrub(&String::from_utf8_lossy(e.as_bytes()))
                        .into_bytes(),
                ),
            })
            .collect();
        (files, errors)
    }
}

/// `YYYYMMDDTHHMMSSZ` for `t`.
pub fn utc_stamp(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = kata_shim::logging::format::civil_from_days(days as i64);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The archive's path: `--output` checked (its directory exists, the file does not), or
/// the default name in the current directory.
pub fn output_path(output: Option<&Path>, stamp: &str) -> Result<PathBuf, CollectError> {
    let path = match output {
        Some(p) => p.to_path_buf(),
        None => std::env::current_dir()
            .map_err(CollectError::Cwd)?
            .join(format!("kata-collect-{stamp}.tar.gz")),
    };
    let bad = |reason: String| CollectError::Output {
        path: path.clone(),
        reason,
    };
    if path.as_os_str().is_empty() {
        return Err(bad("expected a file path".into()));
    }
    if path.is_dir() {
        return Err(bad("is a directory (expected a file path)".into()));
    }
    if path.symlink_metadata().is_ok() {
        return Err(bad("already exists (collect never overwrites)".into()));
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !parent.is_dir() {
        return Err(bad(format!(
            "directory {} does not exist",
            parent.display()
        )));
    }
    Ok(path)
}

/// Runs `program args` with a time bound; its stdout, or why not.
pub async fn command_output(program: &str, args: &[&str]) -> Result<String, std::io::Error> {
    let run = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(COMMAND_TIMEOUT, run)
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("{program} did not finish within {COMMAND_TIMEOUT:?}"),
            )
        })?
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot run {program}: {e}")))?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Collects everything and writes the archive.
pub async fn run(opts: Options) -> Result<Summary, CollectError> {
    let stamp = utc_stamp(SystemTime::now());
    let path = output_path(opts.output.as_deref(), &stamp)?;
    let top = format!("kata-collect-{stamp}");
    let mut c = Collection::default();

    // The node: configuration in effect, host checks, versions.
    let (config, host) = (opts.config.clone(), opts.host.clone());
    let env = tokio::task::spawn_blocking(move || {
        crate::env::EnvReport::gather(config.as_deref(), &host)
    })
    .await;
    let mut versions = vec![format!("kata-ctl {}", env!("CARGO_PKG_VERSION"))];
    match env {
        Ok(report) => {
            let v = |b: &crate::env::Binary| {
                b.version.clone().unwrap_or_else(|| {
                    format!("{} (no version: missing or not runnable)", b.path.display())
                })
            };
            versions.push(format!("shim: {}", v(&report.runtime.shim)));
            if let Some(h) = &report.hypervisor {
                versions.push(format!("qemu: {}", v(&h.binary)));
                versions.push(format!("virtiofsd: {}", v(&h.virtio_fs_daemon)));
                versions.push(format!("vsock daemon: {}", v(&h.vsock_daemon)));
            }
            versions.push(format!("host kernel: {}", report.host.kernel));
            versions.push(format!("host os: {}", report.host.os));
            match serde_json::to_string_pretty(&report) {
                Ok(j) => c.add("env.json", j + "\n"),
                Err(e) => c.error("env.json", e.to_string()),
            }
            let config_path = report.runtime.config_path.clone();
            add_config_file(&mut c, "config", &config_path).await;
        }
        Err(e) => c.error("env.json", e.to_string()),
    }
    match command_output("containerd", &["--version"]).await {
        Ok(v) => versions.push(format!("containerd: {}", v.trim())),
        Err(e) => c.error("versions.txt: containerd", e.to_string()),
    }
    let host = opts.host.clone();
    match tokio::task::spawn_blocking(move || crate::check::run(&host, None)).await {
        Ok(Ok(report)) => {
            match serde_json::to_string_pretty(&report) {
                Ok(j) => c.add("host/check.json", j + "\n"),
                Err(e) => c.error("host/check.json", e.to_string()),
            }
            c.add("host/check.txt", report.render());
        }
        Ok(Err(e)) => c.error("host/check.json", chain(&e)),
        Err(e) => c.error("host/check.json", e.to_string()),
    }

    // The sandboxes.
    let dirs = crate::sandboxes::list(&opts.roots);
    let mut listing = String::new();
    let mut running = 0;
    for d in &dirs {
        let up = d.running();
        listing.push_str(&format!(
            "{} {} {}\n",
            d.id,
            if up { "running" } else { "not-running" },
            d.dir.display()
        ));
        if up {
            running += 1;
            if let Some(v) = sandbox::collect(&mut c, d).await {
                versions.push(format!("agent of sandbox {}: {v}", d.id));
            }
        }
    }
    if dirs.is_empty() {
        listing.push_str("no sandbox directories\n");
    }
    c.add("sandboxes.txt", listing);
    c.add(
        "versions.txt",
        versions
            .iter()
            .map(|v| format!("{v}\n"))
            .collect::<String>(),
    );

    let (files, errors) = c.finish();
    let out = path.clone();
    tokio::task::spawn_blocking(move || write_archive(&out, &top, &files))
        .await
        .map_err(|e| CollectError::Write {
            path: path.clone(),
            source: std::io::Error::other(e.to_string()),
        })??;
    Ok(Summary {
        path,
        sandboxes: running,
        errors,
    })
}

/// Adds a configuration file as `<dir>/<its name>`, or records why not.
pub async fn add_config_file(c: &mut Collection, dir: &str, path: &Path) {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "configuration.toml".into());
    let item = format!("{dir}/{name}");
    match tokio::fs::read_to_string(path).await {
        Ok(text) => c.add(item, format!("# {}\n{text}", path.display())),
        Err(e) => c.error(item, format!("cannot read {}: {e}", path.display())),
    }
}

/// Writes `files` under `top/` as a gzip-compressed tar at `path` (mode 0600), through a
/// temporary file renamed into place.
fn write_archive(path: &Path, top: &str, files: &[(String, Vec<u8>)]) -> Result<(), CollectError> {
    use std::os::unix::fs::OpenOptionsExt;
    let write = |source| CollectError::Write {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_file_name(format!(
        ".{}.tmp",
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    ));
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(write)?;
    let result = (|| {
        let gz = flate2::write::GzEncoder::new(file, flate2::Compression::default());
        let mut tar = tar::Builder::new(gz);
        let mtime = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        for (name, data) in files {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o600);
            header.set_mtime(mtime);
            header.set_entry_type(tar::EntryType::Regular);
            header.set_cksum();
            tar.append_data(&mut header, format!("{top}/{name}"), data.as_slice())?;
        }
        let mut gz = tar.into_inner()?;
        gz.flush()?;
        gz.finish()?.sync_all()
    })();
    if let Err(e) = result.and_then(|()| std::fs::rename(&tmp, path)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(write(e));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_are_utc() {
        assert_eq!(utc_stamp(UNIX_EPOCH), "19700101T000000Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_709_210_096); // 2024-02-29 12:34:56
        assert_eq!(utc_stamp(t), "20240229T123456Z");
    }

    #[test]
    fn bad_outputs_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let e = output_path(Some(dir.path()), "x").unwrap_err().to_string();
        assert!(e.contains("is a directory"), "{e}");
        let existing = dir.path().join("a.tar.gz");
        std::fs::write(&existing, "").unwrap();
        let e = output_path(Some(&existing), "x").unwrap_err().to_string();
        assert!(e.contains("already exists"), "{e}");
        let e = output_path(Some(&dir.path().join("no/such/f.tgz")), "x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not exist"), "{e}");
        let ok = dir.path().join("new.tar.gz");
        assert_eq!(output_path(Some(&ok), "x").unwrap(), ok);
    }

    #[test]
    fn the_archive_holds_scrubbed_files_and_the_errors() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Collection::default();
        c.secrets(vec!["topsecret".into()]);
        c.add("a/log.txt", "line with topsecret and API_KEY=abc\n");
        c.error("b/metrics.txt", "no answer");
        let (files, errors) = c.finish();
        assert_eq!(errors, 1);
        let path = dir.path().join("out.tar.gz");
        write_archive(&path, "top", &files).unwrap();
        let gz = flate2::read::GzDecoder::new(std::fs::File::open(&path).unwrap());
        let mut archive = tar::Archive::new(gz);
        let mut seen = Vec::new();
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let name = entry.path().unwrap().display().to_string();
            let mut text = String::new();
            std::io::Read::read_to_string(&mut entry, &mut text).unwrap();
            seen.push((name, text));
        }
        assert_eq!(
            seen,
            [
                (
                    "top/a/log.txt".to_owned(),
                    "line with <redacted> and API_KEY=<redacted>\n".to_owned()
                ),
                (
                    "top/errors.txt".to_owned(),
                    "b/metrics.txt: no answer\n".to_owned()
                ),
            ]
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
