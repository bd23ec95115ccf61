//! The `local` provider: the stand-in for a cloud. A pod VM is a QEMU process on this host
//! ([`qemu`]) on a host bridge ([`network`]), reached over TCP like a cloud instance: no
//! vsock, no virtio-fs.
//!
//! Each instance has a directory `<instances_dir>/<name>/` holding `meta.json` (name,
//! sandbox id, address, MAC, tap, image, instance type and its size, which QEMU boots
//! with: `-smp` vCPUs, `-m` memory), `userdata.img` (the config disk),
//! `qemu.pid`, `qmp.sock` and `console.log`. Addresses come from the configured subnet
//! (the bridge takes the first host address, instances the next free ones); an address is
//! taken while an instance directory records it. Deleting an instance stops its QEMU (the
//! tap goes with it) and removes the directory: nothing else is left.

pub mod network;
pub mod qemu;

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use kata_hypervisor::accel::{choose, HostCaps};
use kata_hypervisor::Accel;
use kata_proto::network_mode::encode_user_data;
use kata_proto::peerpod::ProviderNic;
use serde::{Deserialize, Serialize};

use super::{Instance, InstanceRequest, InstanceSize, Provider, ProviderError, Underlay};
use crate::annotations::GpuRequest;
use crate::config::LocalSettings;

/// What an instance directory records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Meta {
    name: String,
    sandbox_id: String,
    address: Ipv4Addr,
    mac: String,
    tap: String,
    image: String,
    instance_type: String,
    size: InstanceSize,
}

/// The local provider (see the module docs).
#[derive(Debug)]
pub struct LocalProvider {
    settings: LocalSettings,
    accel: Accel,
    /// Serializes address choice and directory creation.
    alloc: tokio::sync::Mutex<()>,
}

fn failed<E: std::error::Error + Send + Sync + 'static>(
    what: String,
) -> impl FnOnce(E) -> ProviderError {
    move |e| ProviderError::failed(what, e)
}

impl LocalProvider {
    /// Resolves the accelerator, creates the instances directory and the bridge, and
    /// re-attaches the taps of instances that survived an adaptor restart.
    pub async fn new(settings: LocalSettings) -> Result<Self, ProviderError> {
        let requested = settings.accel;
        let caps = tokio::task::spawn_blocking(HostCaps::probe)
            .await
            .map_err(failed("probe the accelerator".into()))?;
        let accel = choose(requested, &caps).map_err(failed("choose the accelerator".into()))?;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&settings.instances_dir)
            .map_err(failed(format!(
                "create {}",
                settings.instances_dir.display()
            )))?;
        let s = &settings;
        network::ensure_bridge(&s.bridge, s.subnet.gateway(), s.subnet.prefix, s.mtu)
            .await
            .map_err(failed(format!("set up bridge {}", s.bridge)))?;
        let provider = Self {
            settings,
            accel,
            alloc: tokio::sync::Mutex::new(()),
        };
        for (meta, running) in provider.metas() {
            if running {
                if let Err(e) =
                    network::attach_tap(&meta.tap, &provider.settings.bridge, provider.settings.mtu)
                        .await
                {
                    tracing::warn!(instance = %meta.name, error = %crate::report::chain(&e), "re-attach tap");
                }
            }
        }
        tracing::info!(bridge = %provider.settings.bridge, gateway = %provider.settings.subnet.gateway(), %accel, "local provider ready");
        Ok(provider)
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.settings.instances_dir.join(name)
    }

    /// Every instance directory's record, with whether its QEMU runs.
    fn metas(&self) -> Vec<(Meta, bool)> {
        let Ok(entries) = std::fs::read_dir(&self.settings.instances_dir) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| {
                let dir = e.path();
                let meta: Meta =
                    serde_json::from_slice(&std::fs::read(dir.join("meta.json")).ok()?).ok()?;
                let running = qemu::read_pid(&qemu::pidfile(&dir))
                    .map(|pid| qemu::is_ours(pid, &dir))
                    .unwrap_or(false);
                Some((meta, running))
            })
            .collect()
    }

    fn image_dir(&self, image: &str) -> Result<&Path, ProviderError> {
        self.settings
            .images
            .get(image)
            .map(PathBuf::as_path)
            .ok_or_else(|| {
                ProviderError::Invalid(format!(
                    "image {image:?} is not one of the local provider's images ({})",
                    self.settings
                        .images
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })
    }

    async fn boot(
        &self,
        req: &InstanceRequest,
        meta: &Meta,
        dir: &Path,
    ) -> Result<(), ProviderError> {
        let image = qemu::ImageFiles::find(self.image_dir(&req.image)?)
            .map_err(|e| ProviderError::Invalid(crate::report::chain(&e)))?;
        let mut ud = req.user_data.clone();
        let s = &self.settings;
        ud.nic = Some(ProviderNic {
            mac: meta.mac.clone(),
            address: meta.address.to_string(),
            prefix_len: u32::from(s.subnet.prefix),
            gateway: s.subnet.gateway().to_string(),
            mtu: s.mtu,
            ..Default::default()
        })
        .into();
        let disk = dir.join("userdata.img");
        let bytes = encode_user_data(&ud).map_err(failed("encode user data".into()))?;
        write_private(&disk, &bytes).map_err(failed(format!("write {}", disk.display())))?;
        let launch = qemu::Launch {
            qemu: &s.qemu,
            accel: self.accel,
            name: &meta.name,
            dir,
            image: &image,
            vcpus: meta.size.vcpus,
            memory_mib: meta.size.memory_mib,
            tap: &meta.tap,
            mac: &meta.mac,
            user_data_disk: &disk,
        };
        let pid = qemu::launch(&launch)
            .await
            .map_err(failed(format!("start QEMU for {}", meta.name)))?;
        if let Err(e) = network::attach_tap(&meta.tap, &s.bridge, s.mtu).await {
            let _ = qemu::stop(pid, dir).await;
            return Err(ProviderError::failed(
                format!("attach {} to {}", meta.tap, s.bridge),
                e,
            ));
        }
        tracing::info!(instance = %meta.name, address = %meta.address, pid, instance_type = %meta.instance_type,
            vcpus = meta.size.vcpus, memory_mib = meta.size.memory_mib, "instance started");
        Ok(())
    }
}

/// The refusal of a pod that asks for GPUs: a local pod VM has none.
fn no_gpus(g: &GpuRequest) -> ProviderError {
    ProviderError::Invalid(format!(
        "the local provider has no GPUs; the pod asks for {} ({})",
        match (g.count, &g.model) {
            (0, Some(m)) => format!("GPU model {m}"),
            (n, Some(m)) => format!("{n} GPU(s) of model {m}"),
            (n, None) => format!("{n} GPU(s)"),
        },
        g.annotations.join(", ")
    ))
}

/// Writes a file readable by root only.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Whether `name` is usable as one directory name.
fn plain_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\0'])
}

#[async_trait]
impl Provider for LocalProvider {
    fn name(&self) -> &'static str {
        "local"
    }

    fn underlay(&self) -> Underlay {
        Underlay {
            node_address: IpAddr::V4(self.settings.subnet.gateway()),
            mtu: self.settings.mtu,
        }
    }

    fn default_image(&self) -> &str {
        &self.settings.default_image
    }

    fn check(&self, image: &str, gpus: Option<&GpuRequest>) -> Result<(), ProviderError> {
        self.image_dir(image)?;
        match gpus {
            Some(g) => Err(no_gpus(g)),
            None => Ok(()),
        }
    }

    async fn create_instance(&self, req: InstanceRequest) -> Result<Instance, ProviderError> {
        if !plain_name(&req.name) {
            return Err(ProviderError::Invalid(format!(
                "instance name {:?}",
                req.name
            )));
        }
        self.image_dir(&req.image)?;
        let dir = self.dir(&req.name);
        let meta = {
            let _one_at_a_time = self.alloc.lock().await;
            let used: HashSet<Ipv4Addr> =
                self.metas().into_iter().map(|(m, _)| m.address).collect();
            let address = self
                .settings
                .subnet
                .hosts()
                .find(|a| !used.contains(a))
                .ok_or_else(|| {
                    ProviderError::Exhausted(format!(
                        "no free address in {}/{} for {}",
                        self.settings.subnet.network, self.settings.subnet.prefix, req.name
                    ))
                })?;
            let meta = Meta {
                name: req.name.clone(),
                sandbox_id: req.sandbox_id.clone(),
                address,
                mac: network::mac_for(address),
                tap: network::tap_name(address),
                image: req.image.clone(),
                instance_type: req.instance_type.clone(),
                size: req.size,
            };
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&dir)
                .map_err(failed(format!(
                    "create instance directory {}",
                    dir.display()
                )))?;
            let json =
                serde_json::to_vec_pretty(&meta).map_err(failed("encode meta.json".into()))?;
            if let Err(e) = write_private(&dir.join("meta.json"), &json) {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(ProviderError::failed(
                    format!("write {}/meta.json", dir.display()),
                    e,
                ));
            }
            meta
        };
        if let Err(e) = self.boot(&req, &meta, &dir).await {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        Ok(Instance {
            name: meta.name,
            sandbox_id: meta.sandbox_id,
            address: IpAddr::V4(meta.address),
            running: true,
        })
    }

    async fn delete_instance(&self, name: &str) -> Result<(), ProviderError> {
        if !plain_name(name) {
            return Err(ProviderError::Invalid(format!("instance name {name:?}")));
        }
        let dir = self.dir(name);
        if !dir.exists() {
            return Ok(());
        }
        if let Ok(pid) = qemu::read_pid(&qemu::pidfile(&dir)) {
            qemu::stop(pid, &dir)
                .await
                .map_err(failed(format!("stop instance {name}")))?;
        }
        tokio::fs::remove_dir_all(&dir)
            .await
            .map_err(failed(format!("remove {}", dir.display())))?;
        tracing::info!(instance = name, "instance deleted");
        Ok(())
    }

    async fn list_instances(&self) -> Result<Vec<Instance>, ProviderError> {
        Ok(self
            .metas()
            .into_iter()
            .map(|(m, running)| Instance {
                name: m.name,
                sandbox_id: m.sandbox_id,
                address: IpAddr::V4(m.address),
                running,
            })
            .collect())
    }

    fn diagnostics(&self, name: &str) -> String {
        let console = qemu::console_log(&self.dir(name));
        let tail = std::fs::read_to_string(&console)
            .map(|t| {
                let lines: Vec<&str> = t.lines().collect();
                lines[lines.len().saturating_sub(5)..].join(" | ")
            })
            .unwrap_or_default();
        format!("console {}: {tail}", console.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_requests_are_refused_naming_them() {
        let g = GpuRequest {
            count: 2,
            model: Some("a100".into()),
            annotations: vec![
                "io.katacontainers.config.hypervisor.default_gpus=2".into(),
                "io.katacontainers.config.hypervisor.default_gpu_model=a100".into(),
            ],
        };
        assert_eq!(
            no_gpus(&g).to_string(),
            "the local provider has no GPUs; the pod asks for 2 GPU(s) of model a100 \
             (io.katacontainers.config.hypervisor.default_gpus=2, \
             io.katacontainers.config.hypervisor.default_gpu_model=a100)"
        );
        let model_only = GpuRequest {
            count: 0,
            model: Some("t4".into()),
            annotations: vec!["io.katacontainers.config.hypervisor.gpu_model=t4".into()],
        };
        assert!(no_gpus(&model_only)
            .to_string()
            .contains("GPU model t4 (io.katacontainers.config.hypervisor.gpu_model=t4)"));
    }
}
