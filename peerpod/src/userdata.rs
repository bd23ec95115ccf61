//! The user data a pod VM boots with (`peerpod.UserData`, see `proto/protos/peerpod.proto`):
//! built at CreateVM from the pod's certificates, its network and the node's registry
//! settings; the provider adds the VM's own NIC.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use kata_proto::agent::{Interface, Route};
use kata_proto::network_mode::{AGENT_TLS_PORT, USERDATA_VERSION};
use kata_proto::peerpod::{AgentTls, PodNetwork, Registries, UserData};

use crate::config::RegistriesConfig;
use crate::tls::Pair;

/// A registry file that cannot be read.
#[derive(Debug, thiserror::Error)]
#[error("read registries.{key} {}", .path.display())]
pub struct RegistryFileError {
    key: &'static str,
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

/// The node's registry settings as the VMs get them. Blocking (reads the files).
pub fn registries(cfg: &RegistriesConfig) -> Result<Registries, RegistryFileError> {
    let read = |key, path: &Path| -> Result<Vec<u8>, RegistryFileError> {
        if path.as_os_str().is_empty() {
            return Ok(Vec::new());
        }
        std::fs::read(path).map_err(|source| RegistryFileError {
            key,
            path: path.to_owned(),
            source,
        })
    };
    let mut r = Registries::new();
    r.insecure = cfg.insecure.clone();
    r.auth_json = read("auth_file", &cfg.auth_file)?;
    r.ca_pem = String::from_utf8_lossy(&read("ca_file", &cfg.ca_file)?).into_owned();
    Ok(r)
}

/// The pod's network as the VM gets it.
#[derive(Debug, Clone)]
pub struct PodNet {
    pub interface: Interface,
    pub routes: Vec<Route>,
    pub vni: u32,
    pub vxlan_port: u16,
    pub node_address: IpAddr,
}

/// Everything but the provider NIC.
pub fn build(
    sandbox_id: &str,
    instance_name: &str,
    ca_pem: &str,
    server: &Pair,
    pod_net: Option<PodNet>,
    registries: Registries,
) -> UserData {
    let mut ud = UserData::new();
    ud.version = USERDATA_VERSION;
    ud.sandbox_id = sandbox_id.to_owned();
    ud.instance_name = instance_name.to_owned();
    let mut tls = AgentTls::new();
    tls.port = u32::from(AGENT_TLS_PORT);
    tls.ca_pem = ca_pem.to_owned();
    tls.cert_pem = server.cert_pem.clone();
    tls.key_pem = server.key_pem.clone();
    ud.tls = Some(tls).into();
    if let Some(p) = pod_net {
        let mut net = PodNetwork::new();
        net.interface = Some(p.interface).into();
        net.routes = p.routes;
        net.vni = p.vni;
        net.vxlan_port = u32::from(p.vxlan_port);
        net.node_address = p.node_address.to_string();
        ud.pod_network = Some(net).into();
    }
    ud.registries = Some(registries).into();
    ud
}
