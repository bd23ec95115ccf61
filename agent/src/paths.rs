//! Validation of guest paths that arrive in requests.
//!
//! Requests may only name paths strictly below the agent's base directory
//! (`/run/kata-containers` in the guest). A path must be absolute and normalized: no
//! empty, `.` or `..` components, so the check is purely lexical and cannot be fooled
//! by `/run/kata-containers/../etc/passwd`.

use std::path::{Path, PathBuf};

/// The directory below which requests may name paths.
pub const DEFAULT_BASE_DIR: &str = "/run/kata-containers";

/// Where container roots live, relative to the base directory (the shim's
/// `<share>/containers/<id>/rootfs`, seen through the virtio-fs mount).
pub const SHARED_CONTAINERS: &str = "shared/containers";

/// A path from a request that the agent refuses.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PathError {
    /// The path is empty.
    #[error("path is empty")]
    Empty,
    /// The path contains a NUL byte.
    #[error("path {0:?} contains a NUL byte")]
    Nul(String),
    /// The path is relative.
    #[error("path {0:?} is not absolute")]
    NotAbsolute(String),
    /// The path has an empty, `.` or `..` component.
    #[error("path {0:?} is not normalized")]
    NotNormalized(String),
    /// The path does not lie strictly below the base directory.
    #[error("path {path:?} is not under {base:?}")]
    Outside {
        /// The path from the request.
        path: String,
        /// The base directory.
        base: PathBuf,
    },
}

/// Checks that `path` is absolute, normalized and strictly below `base`.
pub fn check_under(base: &Path, path: &str) -> Result<PathBuf, PathError> {
    if path.is_empty() {
        return Err(PathError::Empty);
    }
    if path.contains('\0') {
        return Err(PathError::Nul(path.to_owned()));
    }
    let Some(rest) = path.strip_prefix('/') else {
        return Err(PathError::NotAbsolute(path.to_owned()));
    };
    if rest
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(PathError::NotNormalized(path.to_owned()));
    }
    let p = Path::new(path);
    if p == base || !p.starts_with(base) {
        return Err(PathError::Outside {
            path: path.to_owned(),
            base: base.to_owned(),
        });
    }
    Ok(p.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(path: &str) -> Result<PathBuf, PathError> {
        check_under(Path::new(DEFAULT_BASE_DIR), path)
    }

    #[test]
    fn accepts_paths_below_base() {
        assert_eq!(
            check("/run/kata-containers/shared/containers").unwrap(),
            PathBuf::from("/run/kata-containers/shared/containers")
        );
        assert!(check("/run/kata-containers/a.txt").is_ok());
    }

    #[test]
    fn rejects_traversal_and_odd_forms() {
        for p in [
            "/run/kata-containers/../etc/passwd",
            "/run/kata-containers/./x",
            "/run/kata-containers//x",
            "/run/kata-containers/x/",
            "/run/kata-containers/x/..",
        ] {
            assert_eq!(check(p), Err(PathError::NotNormalized(p.into())), "{p}");
        }
    }

    #[test]
    fn rejects_relative_empty_nul() {
        assert_eq!(check(""), Err(PathError::Empty));
        assert!(matches!(
            check("run/kata-containers/x"),
            Err(PathError::NotAbsolute(_))
        ));
        assert!(matches!(
            check("/run/kata-containers/a\0b"),
            Err(PathError::Nul(_))
        ));
    }

    #[test]
    fn rejects_outside_and_base_itself() {
        for p in [
            "/etc/passwd",
            "/run/kata-containers",
            "/run/kata-containersX/y",
            "/run",
        ] {
            assert!(matches!(check(p), Err(PathError::Outside { .. })), "{p}");
        }
    }
}
