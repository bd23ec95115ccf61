//! Kernel modules loaded at boot.
//!
//! The image build writes `/etc/kata-agent/modules`: one absolute path of an uncompressed
//! `.ko` per line, already in dependency order; `#` comments and blank lines are allowed.
//! Each is loaded with `finit_module(2)`. A module that is already loaded or built in
//! (EEXIST) counts as loaded; a failing module is logged and skipped, never fatal.

use std::fs::File;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::kmod::{finit_module, ModuleInitFlags};

/// Where the image build lists the modules to load.
pub const MODULE_LIST: &str = "/etc/kata-agent/modules";

/// A failure while loading modules.
#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    /// The module list could not be read.
    #[error("read module list {path:?}")]
    ReadList {
        /// The list file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A line of the list is not an absolute path.
    #[error("module list line {line}: {text:?} is not an absolute path")]
    NotAbsolute {
        /// 1-based line number.
        line: usize,
        /// The line.
        text: String,
    },
    /// The kernel refused a module (or it could not be opened).
    #[error("load module {path:?}")]
    Load {
        /// The module file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: Errno,
    },
}

/// The syscall that loads one module; faked in unit tests.
pub trait ModuleLoader {
    /// Loads the module file at `path` with no parameters.
    fn load(&self, path: &Path) -> Result<(), Errno>;
}

/// The real [`ModuleLoader`]: `finit_module(2)`.
#[derive(Debug, Default, Clone, Copy)]
pub struct KernelModuleLoader;

impl ModuleLoader for KernelModuleLoader {
    fn load(&self, path: &Path) -> Result<(), Errno> {
        let file =
            File::open(path).map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
        finit_module(&file, c"", ModuleInitFlags::empty())
    }
}

/// Parses the module list; lines that are not absolute paths come back as errors.
pub fn parse_list(text: &str) -> (Vec<PathBuf>, Vec<ModuleError>) {
    let mut paths = Vec::new();
    let mut errors = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.starts_with('/') {
            paths.push(PathBuf::from(line));
        } else {
            errors.push(ModuleError::NotAbsolute {
                line: i + 1,
                text: line.to_owned(),
            });
        }
    }
    (paths, errors)
}

/// The module name for a path: its file stem with `-` as `_`, as the kernel names it
/// (`/x/virtio-rng.ko` -> `virtio_rng`).
pub fn module_name(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().replace('-', "_"))
        .unwrap_or_default()
}

/// Loads `paths` in order; returns the names loaded (or already present) and the failures.
pub fn load_all(loader: &dyn ModuleLoader, paths: &[PathBuf]) -> (Vec<String>, Vec<ModuleError>) {
    let mut loaded = Vec::new();
    let mut errors = Vec::new();
    for path in paths {
        match loader.load(path) {
            Ok(()) | Err(Errno::EEXIST) => loaded.push(module_name(path)),
            Err(source) => errors.push(ModuleError::Load {
                path: path.clone(),
                source,
            }),
        }
    }
    (loaded, errors)
}

/// Reads the list at `list` and loads every module; a missing list means no modules.
/// Failures are logged; the names loaded are returned.
pub fn load_from_list(loader: &dyn ModuleLoader, list: &Path) -> Vec<String> {
    let text = match std::fs::read_to_string(list) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::info!(list = %list.display(), "no module list; loading no modules");
            return Vec::new();
        }
        Err(source) => {
            log_error(&ModuleError::ReadList {
                path: list.to_owned(),
                source,
            });
            return Vec::new();
        }
    };
    let (paths, parse_errors) = parse_list(&text);
    parse_errors.iter().for_each(log_error);
    let (loaded, load_errors) = load_all(loader, &paths);
    load_errors.iter().for_each(log_error);
    tracing::info!(modules = ?loaded, "kernel modules loaded");
    loaded
}

fn log_error(e: &ModuleError) {
    match e {
        ModuleError::Load { path, source } => {
            tracing::error!(path = %path.display(), errno = %source, "failed to load kernel module")
        }
        other => tracing::error!(error = %crate::logging::chain(other), "module list"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::HashMap;

    #[derive(Default)]
    struct FakeLoader {
        results: HashMap<PathBuf, Errno>,
        calls: RefCell<Vec<PathBuf>>,
    }

    impl ModuleLoader for FakeLoader {
        fn load(&self, path: &Path) -> Result<(), Errno> {
            self.calls.borrow_mut().push(path.to_owned());
            self.results.get(path).map_or(Ok(()), |e| Err(*e))
        }
    }

    const LIST: &str = "\
# written by build-guest.sh
/lib/modules/6.1/virtio_pci.ko

  /lib/modules/6.1/vsock.ko  
relative/thing.ko
/lib/modules/6.1/virtiofs.ko
/lib/modules/6.1/overlay.ko
";

    #[test]
    fn parse_skips_comments_and_blanks_and_flags_relative_paths() {
        let (paths, errors) = parse_list(LIST);
        assert_eq!(paths.len(), 4);
        assert_eq!(paths[1], PathBuf::from("/lib/modules/6.1/vsock.ko"));
        assert_eq!(errors.len(), 1);
        assert!(matches!(
            &errors[0],
            ModuleError::NotAbsolute { line: 5, .. }
        ));
    }

    #[test]
    fn load_all_keeps_order_treats_eexist_as_loaded_and_survives_failures() {
        let (paths, _) = parse_list(LIST);
        let fake = FakeLoader {
            results: HashMap::from([
                (PathBuf::from("/lib/modules/6.1/vsock.ko"), Errno::EEXIST),
                (
                    PathBuf::from("/lib/modules/6.1/virtiofs.ko"),
                    Errno::ENOEXEC,
                ),
            ]),
            ..Default::default()
        };
        let (loaded, errors) = load_all(&fake, &paths);
        assert_eq!(loaded, ["virtio_pci", "vsock", "overlay"]);
        assert_eq!(*fake.calls.borrow(), paths);
        assert_eq!(errors.len(), 1);
        let ModuleError::Load { path, source } = &errors[0] else {
            panic!("{:?}", errors[0])
        };
        assert_eq!(path, Path::new("/lib/modules/6.1/virtiofs.ko"));
        assert_eq!(*source, Errno::ENOEXEC);
    }

    #[test]
    fn module_names_use_underscores() {
        assert_eq!(
            module_name(Path::new("/lib/modules/6.1/virtio-rng.ko")),
            "virtio_rng"
        );
        assert_eq!(
            module_name(Path::new("/lib/modules/6.1/virtio_pci.ko")),
            "virtio_pci"
        );
    }

    #[test]
    fn load_from_list_reads_the_file_and_tolerates_absence() {
        let dir = tempfile::tempdir().unwrap();
        let list = dir.path().join("modules");
        let fake = FakeLoader::default();
        assert!(load_from_list(&fake, &list).is_empty());
        std::fs::write(&list, LIST).unwrap();
        assert_eq!(
            load_from_list(&fake, &list),
            ["virtio_pci", "vsock", "virtiofs", "overlay"]
        );
    }
}
