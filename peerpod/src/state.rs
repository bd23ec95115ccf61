//! The adaptor's state on disk, so a restarted adaptor finds its pods:
//! `<state_dir>/pods/<sandbox id>/` holds `pod.json` ([`PodRecord`]), `userdata.bin` (the
//! VM's user data, kept between CreateVM and StartVM) and `client.pem`/`client.key` (the
//! adaptor's certificate towards that VM). Directories are 0700, files 0600; records are
//! written to a temporary file and renamed, so a crash leaves the old or the new one.

use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::provider::InstanceSize;
use crate::tls::Pair;

/// The node side of a pod's tunnel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelRecord {
    /// The pod's network namespace on the node.
    pub netns: PathBuf,
    /// The pod interface (CNI's veth) in it.
    pub interface: String,
    /// Its MTU (the VXLAN device gets the same).
    pub mtu: u32,
    pub vni: u32,
}

/// One pod, from CreateVM to StopVM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRecord {
    pub sandbox_id: String,
    pub name: String,
    pub namespace: String,
    /// The pod's network namespace on the node; `None` for a host-network pod.
    pub netns: Option<PathBuf>,
    pub instance_name: String,
    pub image: String,
    /// The instance type chosen at CreateVM, and its size.
    pub instance_type: String,
    pub size: InstanceSize,
    /// StartVM failed: the pod holds no slot under the per-node limit until a StartVM
    /// succeeds.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub start_failed: bool,
    /// The pod's tunnel (with a network namespace).
    pub tunnel: Option<TunnelRecord>,
    /// Set once StartVM created the instance.
    pub address: Option<IpAddr>,
}

/// A state file that could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{what} {}", .path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not a pod record", .0.display())]
    Json(PathBuf, #[source] serde_json::Error),
}

/// The pods directory of the state.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StateError + 'a {
    move |source| StateError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io("create", &tmp))?;
    f.write_all(bytes).map_err(io("write", &tmp))?;
    f.sync_all().map_err(io("sync", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io("rename into", path))
}

impl Store {
    /// The store under `<state_dir>/pods`, created if missing. Blocking.
    pub fn open(state_dir: &Path) -> Result<Self, StateError> {
        let dir = state_dir.join("pods");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io("create", &dir))?;
        Ok(Self { dir })
    }

    fn pod_dir(&self, sandbox_id: &str) -> PathBuf {
        self.dir.join(sandbox_id)
    }

    /// Writes a pod's record, user data and client certificate (a new pod). Blocking.
    pub fn create(
        &self,
        record: &PodRecord,
        user_data: &[u8],
        client: &Pair,
    ) -> Result<(), StateError> {
        let dir = self.pod_dir(&record.sandbox_id);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(io("create", &dir))?;
        let written = (|| {
            write_file(&dir.join("userdata.bin"), user_data)?;
            write_file(&dir.join("client.pem"), client.cert_pem.as_bytes())?;
            write_file(&dir.join("client.key"), client.key_pem.as_bytes())?;
            self.save(record)
        })();
        if written.is_err() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        written
    }

    /// Rewrites a pod's record. Blocking.
    pub fn save(&self, record: &PodRecord) -> Result<(), StateError> {
        let path = self.pod_dir(&record.sandbox_id).join("pod.json");
        let json =
            serde_json::to_vec_pretty(record).map_err(|e| StateError::Json(path.clone(), e))?;
        write_file(&path, &json)
    }

    /// A pod's user data. Blocking.
    pub fn user_data(&self, sandbox_id: &str) -> Result<Vec<u8>, StateError> {
        let path = self.pod_dir(sandbox_id).join("userdata.bin");
        std::fs::read(&path).map_err(io("read", &path))
    }

    /// The adaptor's client certificate for a pod. Blocking.
    pub fn client(&self, sandbox_id: &str) -> Result<Pair, StateError> {
        let dir = self.pod_dir(sandbox_id);
        let read = |name: &str| {
            let p = dir.join(name);
            std::fs::read_to_string(&p).map_err(|source| StateError::Io {
                what: "read",
                path: p,
                source,
            })
        };
        Ok(Pair {
            cert_pem: read("client.pem")?,
            key_pem: read("client.key")?,
        })
    }

    /// Every pod record; unreadable ones are reported with their directory. Blocking.
    pub fn load_all(&self) -> (Vec<PodRecord>, Vec<(PathBuf, StateError)>) {
        let mut pods = Vec::new();
        let mut bad = Vec::new();
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return (pods, bad);
        };
        for e in entries.flatten() {
            let path = e.path().join("pod.json");
            let parsed = std::fs::read(&path)
                .map_err(io("read", &path))
                .and_then(|b| {
                    serde_json::from_slice::<PodRecord>(&b)
                        .map_err(|e| StateError::Json(path.clone(), e))
                });
            match parsed {
                Ok(r) => pods.push(r),
                Err(err) => bad.push((e.path(), err)),
            }
        }
        (pods, bad)
    }

    /// Removes a pod's state; a pod without state is fine. Blocking.
    pub fn remove(&self, sandbox_id: &str) -> Result<(), StateError> {
        self.remove_dir(&self.pod_dir(sandbox_id))
    }

    /// Removes one pod directory (also an unreadable one). Blocking.
    pub fn remove_dir(&self, dir: &Path) -> Result<(), StateError> {
        match std::fs::remove_dir_all(dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io("remove", dir)(e)),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_go() {
        let t = tempfile::tempdir().unwrap();
        let store = Store::open(t.path()).unwrap();
        let mut r = PodRecord {
            sandbox_id: "sb1".into(),
            name: "web".into(),
            namespace: "ns".into(),
            netns: Some("/var/run/netns/cni-1".into()),
            instance_name: "podvm-ns-web-sb1".into(),
            image: "default".into(),
            instance_type: "small".into(),
            size: InstanceSize {
                vcpus: 1,
                memory_mib: 512,
            },
            start_failed: false,
            tunnel: Some(TunnelRecord {
                netns: "/var/run/netns/cni-1".into(),
                interface: "eth0".into(),
                mtu: 1500,
                vni: 555000,
            }),
            address: None,
        };
        let pair = Pair {
            cert_pem: "c".into(),
            key_pem: "k".into(),
        };
        store.create(&r, b"ud", &pair).unwrap();
        r.address = Some("10.0.0.2".parse().unwrap());
        store.save(&r).unwrap();
        std::fs::create_dir(t.path().join("pods/broken")).unwrap();
        let (pods, bad) = store.load_all();
        assert_eq!(pods, [r]);
        assert_eq!(bad.len(), 1);
        assert_eq!(store.user_data("sb1").unwrap(), b"ud");
        assert_eq!(store.client("sb1").unwrap(), pair);
        store.remove("sb1").unwrap();
        store.remove("sb1").unwrap();
        assert!(!t.path().join("pods/sb1").exists());
    }
}
