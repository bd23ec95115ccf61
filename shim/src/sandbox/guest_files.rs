//! Host files into a VM that shares no file system with the host (peer pods): a host tree
//! (a file, or a directory walked without following symlinks) is listed on a blocking
//! thread ([`scan`]) and recreated below the guest's shared containers directory with the
//! agent's CopyFile ([`copy`]): directories and files first, in 1 MiB chunks (the agent
//! renames a file over its target with the last chunk), symlinks last, so a Kubernetes
//! volume's `..data` link swaps to a complete new generation. Sockets, fifos and device
//! nodes are skipped. What one copy may carry is bounded; the error names the path.
//!
//! [`diff`] tells which entries of a rescan changed, so a watcher re-copies only those.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use kata_proto::agent::{CopyFileRequest, FileKind};

use super::agent::{AgentClient, AgentError};

/// The largest chunk one CopyFile carries (the agent's limit).
pub const CHUNK: usize = 1 << 20;
/// The largest file the agent accepts.
pub const MAX_FILE: u64 = 64 << 20;

/// What an entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    File { size: u64 },
    Dir,
    Symlink { target: String },
}

/// One host file system entry below a copied root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Relative to the root; empty for the root itself.
    pub rel: PathBuf,
    pub kind: EntryKind,
    /// Permission bits (07777).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Modification time in ns (a rescan tells a rewritten file by it).
    pub mtime_ns: i128,
}

/// Errors copying host files into the guest.
#[derive(Debug, thiserror::Error)]
pub enum GuestCopyError {
    /// The host path (or an entry below it) could not be read.
    #[error("cannot read {}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file beyond what the agent accepts.
    #[error("{} is {size} bytes: a file copied into a remote VM may have at most {MAX_FILE}", .path.display())]
    FileTooLarge { path: PathBuf, size: u64 },
    /// A tree beyond what one copy may carry.
    #[error("{} holds more than {limit} bytes (the most copied into a remote VM for one mount)", .path.display())]
    TreeTooLarge { path: PathBuf, limit: u64 },
    /// A name or symlink target that is not UTF-8 (CopyFile carries strings).
    #[error("{} is not valid UTF-8 (CopyFile carries UTF-8 paths)", .path.display())]
    NotUtf8 { path: PathBuf },
    /// The agent refused or failed a CopyFile.
    #[error("cannot copy {} into the guest at {guest}", .path.display())]
    Agent {
        path: PathBuf,
        guest: String,
        #[source]
        source: Box<AgentError>,
    },
    /// The blocking scan task failed.
    #[error("host file scan task failed")]
    Join(#[source] tokio::task::JoinError),
}

impl GuestCopyError {
    /// Whether the request is at fault (a missing or oversized host path) rather than the
    /// guest.
    pub fn is_invalid_input(&self) -> bool {
        matches!(
            self,
            GuestCopyError::FileTooLarge { .. }
                | GuestCopyError::TreeTooLarge { .. }
                | GuestCopyError::NotUtf8 { .. }
        ) || matches!(self, GuestCopyError::Read { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

fn read_err(path: &Path) -> impl FnOnce(std::io::Error) -> GuestCopyError + '_ {
    move |source| GuestCopyError::Read {
        path: path.to_path_buf(),
        source,
    }
}

/// Lists `root` and everything below it (the root is followed if it is a symlink, nothing
/// below it is), parents before children, names sorted. Refuses a file larger than
/// [`MAX_FILE`] or a tree holding more than `limit` bytes of files.
pub fn scan(root: &Path, limit: u64) -> Result<Vec<Entry>, GuestCopyError> {
    let meta = std::fs::metadata(root).map_err(read_err(root))?;
    let mut out = Vec::new();
    let mut total = 0u64;
    push(root, PathBuf::new(), &meta, &mut out, &mut total, limit)?;
    Ok(out)
}

fn push(
    path: &Path,
    rel: PathBuf,
    meta: &std::fs::Metadata,
    out: &mut Vec<Entry>,
    total: &mut u64,
    limit: u64,
) -> Result<(), GuestCopyError> {
    if rel.to_str().is_none() {
        return Err(GuestCopyError::NotUtf8 {
            path: path.to_path_buf(),
        });
    }
    let ft = meta.file_type();
    let kind = if ft.is_dir() {
        EntryKind::Dir
    } else if ft.is_file() {
        let size = meta.len();
        if size > MAX_FILE {
            return Err(GuestCopyError::FileTooLarge {
                path: path.to_path_buf(),
                size,
            });
        }
        *total = total.saturating_add(size);
        if *total > limit {
            return Err(GuestCopyError::TreeTooLarge {
                path: path.to_path_buf(),
                limit,
            });
        }
        EntryKind::File { size }
    } else if ft.is_symlink() {
        let target = std::fs::read_link(path).map_err(read_err(path))?;
        let target =
            target
                .into_os_string()
                .into_string()
                .map_err(|_| GuestCopyError::NotUtf8 {
                    path: path.to_path_buf(),
                })?;
        EntryKind::Symlink { target }
    } else {
        tracing::debug!(path = %path.display(), "not copied into the guest: not a file, directory or symlink");
        return Ok(());
    };
    out.push(Entry {
        rel: rel.clone(),
        kind: kind.clone(),
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
        mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
    });
    if kind == EntryKind::Dir {
        let mut children: Vec<_> = std::fs::read_dir(path)
            .map_err(read_err(path))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(read_err(path))?;
        children.sort();
        for name in children {
            let child = path.join(&name);
            let meta = std::fs::symlink_metadata(&child).map_err(read_err(&child))?;
            push(&child, rel.join(&name), &meta, out, total, limit)?;
        }
    }
    Ok(())
}

/// The entry of directory `root` alone (its content is not listed), on the blocking pool.
pub async fn scan_dir_root(root: PathBuf) -> Result<Entry, GuestCopyError> {
    tokio::task::spawn_blocking(move || {
        let meta = std::fs::metadata(&root).map_err(read_err(&root))?;
        Ok(Entry {
            rel: PathBuf::new(),
            kind: EntryKind::Dir,
            mode: meta.mode() & 0o7777,
            uid: meta.uid(),
            gid: meta.gid(),
            mtime_ns: 0,
        })
    })
    .await
    .map_err(GuestCopyError::Join)?
}

/// [`scan`] on the blocking pool.
pub async fn scan_async(root: PathBuf, limit: u64) -> Result<Vec<Entry>, GuestCopyError> {
    tokio::task::spawn_blocking(move || scan(&root, limit))
        .await
        .map_err(GuestCopyError::Join)?
}

/// The entries of `new` that `old` does not have as they are now.
pub fn diff(old: &[Entry], new: &[Entry]) -> Vec<Entry> {
    new.iter().filter(|e| !old.contains(e)).cloned().collect()
}

/// The guest path of `entry` below `guest_root`.
pub fn guest_path(guest_root: &str, entry: &Entry) -> String {
    if entry.rel.as_os_str().is_empty() {
        guest_root.to_owned()
    } else {
        format!(
            "{}/{}",
            guest_root.trim_end_matches('/'),
            entry.rel.display()
        )
    }
}

/// Recreates `entries` (from [`scan`] of `host_root`) below `guest_root`: directories and
/// files first, symlinks last. Returns the bytes of file data sent.
pub async fn copy(
    agent: &AgentClient,
    host_root: &Path,
    guest_root: &str,
    entries: &[Entry],
) -> Result<u64, GuestCopyError> {
    let mut sent = 0;
    let (links, rest): (Vec<&Entry>, Vec<&Entry>) = entries
        .iter()
        .partition(|e| matches!(e.kind, EntryKind::Symlink { .. }));
    for entry in rest.into_iter().chain(links) {
        let host = if entry.rel.as_os_str().is_empty() {
            host_root.to_path_buf()
        } else {
            host_root.join(&entry.rel)
        };
        let guest = guest_path(guest_root, entry);
        let failed = |source| GuestCopyError::Agent {
            path: host.clone(),
            guest: guest.clone(),
            source: Box::new(source),
        };
        let mut req = CopyFileRequest {
            path: guest.clone(),
            mode: entry.mode,
            uid: entry.uid,
            gid: entry.gid,
            ..Default::default()
        };
        match &entry.kind {
            EntryKind::Dir => {
                req.kind = FileKind::DIRECTORY.into();
                agent.copy_file(&req).await.map_err(failed)?;
            }
            EntryKind::Symlink { target } => {
                req.kind = FileKind::SYMLINK.into();
                req.symlink_target = target.clone();
                agent.copy_file(&req).await.map_err(failed)?;
            }
            EntryKind::File { .. } => {
                req.kind = FileKind::REGULAR.into();
                sent += copy_file_data(agent, &host, req).await?;
            }
        }
    }
    Ok(sent)
}

/// Sends a host file's content in chunks; the chunk that reaches its end carries `last`.
async fn copy_file_data(
    agent: &AgentClient,
    host: &Path,
    mut req: CopyFileRequest,
) -> Result<u64, GuestCopyError> {
    use tokio::io::AsyncReadExt;
    let mut file = tokio::fs::File::open(host).await.map_err(read_err(host))?;
    let mut offset = 0u64;
    loop {
        let mut buf = Vec::with_capacity(CHUNK);
        let n = (&mut file)
            .take(CHUNK as u64)
            .read_to_end(&mut buf)
            .await
            .map_err(read_err(host))?;
        if offset + n as u64 > MAX_FILE {
            return Err(GuestCopyError::FileTooLarge {
                path: host.to_path_buf(),
                size: offset + n as u64,
            });
        }
        req.data = buf;
        req.offset = offset;
        // A short chunk is the end (a full one may be too: the next read then sends an
        // empty last chunk).
        req.last = n < CHUNK;
        agent
            .copy_file(&req)
            .await
            .map_err(|source| GuestCopyError::Agent {
                path: host.to_path_buf(),
                guest: req.path.clone(),
                source: Box::new(source),
            })?;
        offset += n as u64;
        if req.last {
            return Ok(offset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn a_tree_is_listed_parents_first_without_following_links() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("cm");
        std::fs::create_dir_all(root.join("..2024_01")).unwrap();
        std::fs::write(root.join("..2024_01/key"), b"value").unwrap();
        symlink("..2024_01", root.join("..data")).unwrap();
        symlink("..data/key", root.join("key")).unwrap();
        nix::unistd::mkfifo(&root.join("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        let entries = scan(&root, 1 << 20).unwrap();
        let listed: Vec<(String, EntryKind)> = entries
            .iter()
            .map(|e| (e.rel.display().to_string(), e.kind.clone()))
            .collect();
        assert_eq!(
            listed,
            [
                ("".into(), EntryKind::Dir),
                ("..2024_01".into(), EntryKind::Dir),
                ("..2024_01/key".into(), EntryKind::File { size: 5 }),
                (
                    "..data".into(),
                    EntryKind::Symlink {
                        target: "..2024_01".into()
                    }
                ),
                (
                    "key".into(),
                    EntryKind::Symlink {
                        target: "..data/key".into()
                    }
                ),
            ]
        );
        assert_eq!(guest_path("/g/c1/mounts/0", &entries[0]), "/g/c1/mounts/0");
        assert_eq!(
            guest_path("/g/c1/mounts/0/", &entries[2]),
            "/g/c1/mounts/0/..2024_01/key"
        );
    }

    #[test]
    fn a_file_root_is_one_entry_and_limits_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("resolv.conf");
        std::fs::write(&file, b"nameserver 10.0.0.1\n").unwrap();
        let link = dir.path().join("link");
        symlink(&file, &link).unwrap();
        let entries = scan(&link, 100).unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].kind, EntryKind::File { size: 20 });
        let e = scan(&file, 10).unwrap_err();
        assert!(matches!(e, GuestCopyError::TreeTooLarge { limit: 10, .. }));
        assert!(e.to_string().contains("resolv.conf") && e.is_invalid_input());
        let e = scan(&dir.path().join("missing"), 10).unwrap_err();
        assert!(
            e.is_invalid_input() && e.to_string().contains("missing"),
            "{e}"
        );
    }

    #[test]
    fn a_rescan_tells_what_changed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), b"1").unwrap();
        std::fs::write(dir.path().join("b"), b"2").unwrap();
        let before = scan(dir.path(), 100).unwrap();
        assert!(diff(&before, &before).is_empty());
        std::fs::write(dir.path().join("b"), b"22").unwrap();
        std::fs::write(dir.path().join("c"), b"3").unwrap();
        let after = scan(dir.path(), 100).unwrap();
        let changed: Vec<String> = diff(&before, &after)
            .iter()
            .map(|e| e.rel.display().to_string())
            .collect();
        // The root directory's mtime moved with the new entry.
        assert_eq!(changed, ["", "b", "c"]);
    }

    /// One recorded CopyFile: (path, kind, offset, bytes, last, symlink target).
    type Call = (String, i32, u64, usize, bool, String);

    /// Records every CopyFile.
    #[derive(Default)]
    struct Recorder(std::sync::Mutex<Vec<Call>>);

    #[async_trait::async_trait]
    impl kata_proto::agent_ttrpc::AgentService for Recorder {
        async fn copy_file(
            &self,
            _: &ttrpc::asynchronous::TtrpcContext,
            req: CopyFileRequest,
        ) -> ttrpc::Result<kata_proto::agent::Empty> {
            self.0.lock().unwrap().push((
                req.path,
                req.kind.value(),
                req.offset,
                req.data.len(),
                req.last,
                req.symlink_target,
            ));
            Ok(Default::default())
        }
    }

    #[tokio::test]
    async fn files_go_in_chunks_and_links_last() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("vol");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(root.join("big"), vec![7u8; CHUNK + 10]).unwrap();
        std::fs::write(root.join("exact"), vec![1u8; CHUNK]).unwrap();
        std::fs::write(root.join("empty"), b"").unwrap();
        symlink("big", root.join("a-link")).unwrap();
        let socket = dir.path().join("agent.sock");
        let recorder = std::sync::Arc::new(Recorder::default());
        let mut server = ttrpc::asynchronous::Server::new()
            .add_listener(ttrpc::asynchronous::transport::Listener::from(
                tokio::net::UnixListener::bind(&socket).unwrap(),
            ))
            .register_service(kata_proto::agent_ttrpc::create_agent_service(
                recorder.clone(),
            ));
        server.start().await.unwrap();
        let stream = tokio::net::UnixStream::connect(&socket).await.unwrap();
        let agent = AgentClient::over_stream(stream, std::time::Duration::from_secs(10));
        let entries = scan(&root, 10 << 20).unwrap();
        let sent = copy(&agent, &root, "/g/c/mounts/0", &entries)
            .await
            .unwrap();
        assert_eq!(sent, 2 * CHUNK as u64 + 10);
        let (dir_k, file_k, link_k) = (
            FileKind::DIRECTORY as i32,
            FileKind::REGULAR as i32,
            FileKind::SYMLINK as i32,
        );
        let calls = recorder.0.lock().unwrap().clone();
        let s = |p: &str| format!("/g/c/mounts/0{p}");
        assert_eq!(
            calls,
            [
                (s(""), dir_k, 0, 0, false, String::new()),
                (s("/big"), file_k, 0, CHUNK, false, String::new()),
                (s("/big"), file_k, CHUNK as u64, 10, true, String::new()),
                (s("/empty"), file_k, 0, 0, true, String::new()),
                (s("/exact"), file_k, 0, CHUNK, false, String::new()),
                (s("/exact"), file_k, CHUNK as u64, 0, true, String::new()),
                (s("/a-link"), link_k, 0, 0, false, "big".to_owned()),
            ]
        );
    }
}
