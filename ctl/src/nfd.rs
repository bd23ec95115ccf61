//! The Node Feature Discovery label file: `kata-ctl check --nfd [DIR]`.
//!
//! NFD's worker reads "local" feature files from
//! `/etc/kubernetes/node-feature-discovery/features.d/`, one `name=value` per line, and
//! labels the node with `feature.node.kubernetes.io/<name>=<value>` (the default prefix
//! for names without one, unless NFD's alpha `DisableAutoPrefix` gate is on). A capable
//! node gets the file `kata` with `runtime.kata=true`, so the RuntimeClass's nodeSelector
//! (`feature.node.kubernetes.io/runtime.kata: "true"`) schedules kata pods only there; an
//! incapable node has the file removed, so a node that lost KVM loses the label. The file
//! is written to a dot-file first (NFD skips those) and renamed, so NFD never reads half.

use std::path::{Path, PathBuf};

use serde::Serialize;

/// NFD's default directory of local feature files.
pub const DEFAULT_FEATURES_DIR: &str = "/etc/kubernetes/node-feature-discovery/features.d";
/// The file name in that directory.
pub const FILE_NAME: &str = "kata";
/// The node label the file produces.
pub const LABEL: &str = "feature.node.kubernetes.io/runtime.kata";
/// The file's content.
pub const CONTENT: &str = "runtime.kata=true\n";

/// Errors writing or removing the feature file.
#[derive(Debug, thiserror::Error)]
pub enum NfdError {
    #[error("cannot create {}", .path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {}", .path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot remove {}", .path.display())]
    Remove {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What happened to the feature file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Written (the node is capable).
    Written,
    /// Removed (the node is not capable).
    Removed,
    /// Not there, and the node is not capable: nothing to do.
    Absent,
}

/// The outcome, for the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Outcome {
    pub file: PathBuf,
    pub label: &'static str,
    pub action: Action,
}

impl Outcome {
    /// One line for the human-readable report.
    pub fn render(&self) -> String {
        let file = self.file.display();
        match self.action {
            Action::Written => format!("nfd: wrote {file} ({LABEL}=true)"),
            Action::Removed => format!("nfd: removed {file} (no {LABEL} label)"),
            Action::Absent => format!("nfd: {file} absent (no {LABEL} label)"),
        }
    }
}

/// Writes `<dir>/kata` when `capable`, removes it otherwise.
pub fn apply(dir: &Path, capable: bool) -> Result<Outcome, NfdError> {
    let file = dir.join(FILE_NAME);
    let action = if capable {
        std::fs::create_dir_all(dir).map_err(|source| NfdError::CreateDir {
            path: dir.to_path_buf(),
            source,
        })?;
        let tmp = dir.join(format!(".{FILE_NAME}.tmp"));
        std::fs::write(&tmp, CONTENT)
            .and_then(|()| std::fs::rename(&tmp, &file))
            .map_err(|source| {
                let _ = std::fs::remove_file(&tmp);
                NfdError::Write {
                    path: file.clone(),
                    source,
                }
            })?;
        Action::Written
    } else {
        match std::fs::remove_file(&file) {
            Ok(()) => Action::Removed,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Action::Absent,
            Err(source) => {
                return Err(NfdError::Remove {
                    path: file.clone(),
                    source,
                })
            }
        }
    };
    Ok(Outcome {
        file,
        label: LABEL,
        action,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_when_capable_removed_when_not() {
        let dir = tempfile::tempdir().unwrap();
        let features = dir.path().join("features.d");
        let out = apply(&features, true).unwrap();
        assert_eq!(out.action, Action::Written);
        assert_eq!(
            std::fs::read_to_string(features.join("kata")).unwrap(),
            CONTENT
        );
        assert_eq!(apply(&features, true).unwrap().action, Action::Written);
        let names: Vec<_> = std::fs::read_dir(&features)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["kata"], "no temporary file left");

        let out = apply(&features, false).unwrap();
        assert_eq!(out.action, Action::Removed);
        assert!(!features.join("kata").exists());
        assert!(out.render().contains("removed"), "{}", out.render());
        assert_eq!(apply(&features, false).unwrap().action, Action::Absent);
    }

    #[test]
    fn an_unwritable_directory_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("file");
        std::fs::write(&blocker, "").unwrap();
        let err = apply(&blocker.join("features.d"), true).unwrap_err();
        assert!(err.to_string().contains("features.d"), "{err}");
    }
}
