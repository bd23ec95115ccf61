//! The sandboxes on this node, found as kata-monitor finds them: one directory per sandbox
//! under the runtime's run directories ([`kata_metrics::names::SANDBOX_ROOTS`]), running
//! while its shim's management socket exists; the shim's state record (`state.json`) names
//! its processes. `kata-ctl collect` lists them, `kata-ctl exec` looks one up by id.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kata_hypervisor::vsock::Endpoint;
use kata_shim::sandbox::state::{dir_key, read_record, StateRecord};

/// How long a request to a management socket may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest answer read from a management socket.
pub const MAX_ANSWER: usize = 16 << 20;

/// Failures looking a sandbox up or asking its shim.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// No sandbox directory of that id under any root.
    #[error("no sandbox {id:?} on this node (looked for {})", .looked.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "))]
    NotFound { id: String, looked: Vec<PathBuf> },
    /// The directory exists but its shim serves no management socket.
    #[error("sandbox {id} is not running (no management socket {})", .socket.display())]
    NotRunning { id: String, socket: PathBuf },
    /// The management socket did not answer.
    #[error("asking the shim of sandbox {id} for {path}")]
    Request {
        id: String,
        path: &'static str,
        #[source]
        source: kata_metrics::client::ClientError,
    },
    /// The shim answered with an error status.
    #[error("the shim of sandbox {id} answered {path} with HTTP {status}: {body}")]
    Status {
        id: String,
        path: &'static str,
        status: u16,
        body: String,
    },
    /// `/agent-url` named no address we know.
    #[error("agent URL {0:?}: expected vsock://<cid>:<port> or hvsock://<path>:<port>")]
    AgentUrl(String),
}

/// One sandbox directory.
#[derive(Debug, Clone)]
pub struct SandboxDir {
    /// The sandbox id (from the state record when there is one, else the directory name).
    pub id: String,
    pub dir: PathBuf,
    /// The shim's record of its processes (absent for other runtimes' directories).
    pub record: Option<StateRecord>,
}

impl SandboxDir {
    fn at(dir: PathBuf, fallback_id: String) -> Self {
        let record = read_record(&dir.join("state.json"));
        let id = record
            .as_ref()
            .map(|r| r.sandbox_id.clone())
            .unwrap_or(fallback_id);
        Self { id, dir, record }
    }

    /// The shim's management socket.
    pub fn socket(&self) -> PathBuf {
        kata_metrics::names::management_socket(&self.dir)
    }

    /// Whether the shim serves its management socket.
    pub fn running(&self) -> bool {
        self.socket().exists()
    }

    /// `GET path` on the management socket, the body as text when the status is 200.
    pub async fn get(&self, path: &'static str) -> Result<String, SandboxError> {
        let answer = kata_metrics::client::get(&self.socket(), path, REQUEST_TIMEOUT, MAX_ANSWER)
            .await
            .map_err(|source| SandboxError::Request {
                id: self.id.clone(),
                path,
                source,
            })?;
        if answer.status != 200 {
            return Err(SandboxError::Status {
                id: self.id.clone(),
                path,
                status: answer.status,
                body: answer.text().trim().to_owned(),
            });
        }
        Ok(answer.text())
    }

    /// Where the host reaches the guest's vsock ports, from the shim's `/agent-url`.
    pub async fn endpoint(&self) -> Result<(String, Endpoint), SandboxError> {
        let url = self.get(kata_metrics::names::AGENT_URL_PATH).await?;
        let url = url.trim().to_owned();
        let endpoint = parse_agent_url(&url).ok_or_else(|| SandboxError::AgentUrl(url.clone()))?;
        Ok((url, endpoint))
    }
}

/// The vsock endpoint of an agent URL as the management server prints it
/// (`vsock://<cid>:<port>`, `hvsock://<uds path>:<port>`); the port is dropped.
pub fn parse_agent_url(url: &str) -> Option<Endpoint> {
    if let Some(rest) = url.strip_prefix("vsock://") {
        let (cid, _port) = rest.rsplit_once(':')?;
        return Some(Endpoint::Vhost {
            cid: cid.parse().ok()?,
        });
    }
    let rest = url.strip_prefix("hvsock://")?;
    let (uds, port) = rest.rsplit_once(':')?;
    port.parse::<u32>().ok()?;
    (uds.starts_with('/')).then(|| Endpoint::Hybrid { uds: uds.into() })
}

/// Every sandbox directory under `roots` (missing roots are skipped), sorted by id.
pub fn list(roots: &[PathBuf]) -> Vec<SandboxDir> {
    let mut out = Vec::new();
    for root in roots {
        let Ok(entries) = std::fs::read_dir(root) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.starts_with('.') || !entry.path().is_dir() {
                continue;
            }
            out.push(SandboxDir::at(entry.path(), name.to_owned()));
        }
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    out
}

/// The sandbox `id` under `roots`.
pub fn find(roots: &[PathBuf], id: &str) -> Result<SandboxDir, SandboxError> {
    let looked: Vec<PathBuf> = roots.iter().map(|r| r.join(dir_key(id))).collect();
    looked
        .iter()
        .find(|dir| dir.is_dir())
        .map(|dir| SandboxDir::at(dir.clone(), id.to_owned()))
        .ok_or_else(|| SandboxError::NotFound {
            id: id.to_owned(),
            looked: looked.clone(),
        })
}

/// The standard roots ([`kata_metrics::names::SANDBOX_ROOTS`]).
pub fn default_roots() -> Vec<PathBuf> {
    kata_metrics::names::SANDBOX_ROOTS
        .iter()
        .map(PathBuf::from)
        .collect()
}

/// Whether `pid` is still the process the record saw (its start time
/// matches, so a recycled pid is never taken for it).
pub fn same_process(pid: u32, start_time: Option<u64>) -> bool {
    if pid == 0 || !Path::new(&format!("/proc/{pid}")).exists() {
        return false;
    }
    match start_time {
        Some(t) => kata_shim::sandbox::state::proc_start_time(pid) == Some(t),
        None => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_urls_parse() {
        assert_eq!(
            parse_agent_url("vsock://3:1024"),
            Some(Endpoint::Vhost { cid: 3 })
        );
        assert_eq!(
            parse_agent_url("hvsock:///run/kata/s/vm/vsock.sock:1024"),
            Some(Endpoint::Hybrid {
                uds: "/run/kata/s/vm/vsock.sock".into()
            })
        );
        assert_eq!(parse_agent_url("vsock://x:1024"), None);
        assert_eq!(parse_agent_url("hvsock://relative:1024"), None);
        assert_eq!(parse_agent_url("tcp://1.2.3.4:1024"), None);
    }

    #[test]
    fn finds_and_lists_directories() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("abc")).unwrap();
        std::fs::create_dir(root.path().join(".hidden")).unwrap();
        std::fs::write(root.path().join("file"), "").unwrap();
        let roots = vec![root.path().to_path_buf(), root.path().join("missing")];
        let all = list(&roots);
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].id, "abc");
        assert!(!all[0].running());
        assert_eq!(find(&roots, "abc").unwrap().dir, root.path().join("abc"));
        let e = find(&roots, "nope").unwrap_err().to_string();
        assert!(e.contains("no sandbox \"nope\""), "{e}");
        assert!(
            e.contains(&root.path().join("nope").display().to_string()),
            "{e}"
        );
    }
}
