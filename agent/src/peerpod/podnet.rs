//! The pod VM's two networks, set up at boot from the user data:
//! - the VM's own namespace: the provider NIC (found by MAC) with its address, MTU and
//!   optional default route; the agent's TLS listener and the image pulls use it;
//! - the pod's namespace (created by the boot thread, which stays in it, so every container
//!   lands there): a VXLAN device towards the node, created in the VM's namespace (its UDP
//!   socket stays there) and then moved into the pod's, where it takes the pod interface's
//!   name, MAC, MTU and addresses and the pod's routes ([`crate::network::configure`]).

use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kata_proto::agent::ConfigureNetworkRequest;
use kata_proto::peerpod::{PodNetwork, ProviderNic};
use rtnetlink::Handle;

use crate::network::{index_of, link_by_mac, parse_ip, parse_mac, NetworkError};

/// How long the provider NIC may take to appear.
const NIC_TIMEOUT: Duration = Duration::from_secs(20);
/// The VXLAN device's name while it is still in the VM's namespace.
pub const VXLAN_TMP_NAME: &str = "vxlan-pod";
/// VXLAN over IPv4 adds 50 bytes (outer Ethernet 14, IPv4 20, UDP 8, VXLAN 8).
pub const VXLAN_OVERHEAD: u32 = 50;

/// A failure setting up the VM's networks.
#[derive(Debug, thiserror::Error)]
pub enum PodNetError {
    #[error("netlink socket")]
    Socket(#[source] std::io::Error),
    #[error("{what}")]
    Netlink {
        what: String,
        #[source]
        source: Box<rtnetlink::Error>,
    },
    #[error("no interface with MAC {mac} (the provider NIC) within {NIC_TIMEOUT:?}")]
    NoNic { mac: String },
    #[error("user data {what} {value:?} is invalid")]
    Invalid { what: &'static str, value: String },
    #[error("provider NIC")]
    Nic(#[source] NetworkError),
    #[error("create the pod's network namespace")]
    Unshare(#[source] nix::Error),
    #[error("{what} {}", .path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("configure the pod interface in the pod's namespace")]
    Pod(#[source] NetworkError),
}

fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> PodNetError {
    let what = what.into();
    move |source| PodNetError::Netlink {
        what,
        source: Box::new(source),
    }
}

fn ignore_exists(r: Result<(), rtnetlink::Error>) -> Result<(), rtnetlink::Error> {
    match r {
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => Ok(()),
        other => other,
    }
}

/// Configures the provider NIC in the calling thread's namespace (the VM's); returns its
/// link index.
pub async fn configure_nic(h: &Handle, nic: &ProviderNic) -> Result<u32, PodNetError> {
    let mac = parse_mac(&nic.mac).map_err(PodNetError::Nic)?;
    let deadline = tokio::time::Instant::now() + NIC_TIMEOUT;
    let (index, name) = loop {
        if let Some(found) = link_by_mac(h, &mac).await.map_err(PodNetError::Nic)? {
            break found;
        }
        if tokio::time::Instant::now() > deadline {
            return Err(PodNetError::NoNic {
                mac: nic.mac.clone(),
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    if let Some(lo) = index_of(h, "lo").await.map_err(PodNetError::Nic)? {
        h.link()
            .set(lo)
            .up()
            .execute()
            .await
            .map_err(nl("set lo up"))?;
    }
    let mut set = h.link().set(index).up();
    if nic.mtu > 0 {
        set = set.mtu(nic.mtu);
    }
    set.execute()
        .await
        .map_err(nl(format!("set {name} up with mtu {}", nic.mtu)))?;
    let ip = parse_ip("address", &nic.address).map_err(PodNetError::Nic)?;
    let prefix = u8::try_from(nic.prefix_len)
        .ok()
        .filter(|p| *p <= 32)
        .ok_or_else(|| PodNetError::Invalid {
            what: "nic.prefix_len",
            value: nic.prefix_len.to_string(),
        })?;
    ignore_exists(h.address().add(index, ip, prefix).execute().await)
        .map_err(nl(format!("add {ip}/{prefix} to {name}")))?;
    if !nic.gateway.is_empty() {
        let IpAddr::V4(gw) = parse_ip("gateway", &nic.gateway).map_err(PodNetError::Nic)? else {
            return Err(PodNetError::Invalid {
                what: "nic.gateway",
                value: nic.gateway.clone(),
            });
        };
        ignore_exists(
            h.route()
                .add()
                .v4()
                .output_interface(index)
                .gateway(gw)
                .execute()
                .await,
        )
        .map_err(nl(format!("add default route via {gw}")))?;
    }
    tracing::info!(%name, address = %format!("{ip}/{prefix}"), mtu = nic.mtu, "provider NIC configured");
    Ok(index)
}

/// Writes `nameservers` as a resolv.conf at `path` (nothing when there are none).
pub fn write_resolv_conf(path: &Path, nameservers: &[String]) -> Result<(), PodNetError> {
    if nameservers.is_empty() {
        return Ok(());
    }
    let text: String = nameservers
        .iter()
        .map(|n| format!("nameserver {n}\n"))
        .collect();
    std::fs::write(path, text).map_err(|source| PodNetError::Io {
        what: "write",
        path: path.to_owned(),
        source,
    })
}

/// Creates the VXLAN device towards the node in the calling thread's namespace (the VM's),
/// with the pod interface's MAC and MTU; returns its index.
pub async fn create_vxlan(
    h: &Handle,
    pod: &PodNetwork,
    nic_index: u32,
) -> Result<u32, PodNetError> {
    let iface = pod.interface.as_ref().ok_or(PodNetError::Invalid {
        what: "pod_network.interface",
        value: "absent".into(),
    })?;
    let remote = match parse_ip("node address", &pod.node_address).map_err(PodNetError::Nic)? {
        IpAddr::V4(v4) => v4,
        IpAddr::V6(_) => {
            return Err(PodNetError::Invalid {
                what: "pod_network.node_address (IPv4 only)",
                value: pod.node_address.clone(),
            })
        }
    };
    let port = u16::try_from(pod.vxlan_port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| PodNetError::Invalid {
            what: "pod_network.vxlan_port",
            value: pod.vxlan_port.to_string(),
        })?;
    if pod.vni == 0 || pod.vni >= 1 << 24 {
        return Err(PodNetError::Invalid {
            what: "pod_network.vni",
            value: pod.vni.to_string(),
        });
    }
    let mac = parse_mac(&iface.mac).map_err(PodNetError::Nic)?;
    h.link()
        .add()
        .vxlan(VXLAN_TMP_NAME.to_owned(), pod.vni)
        .remote(remote)
        .port(port)
        .link(nic_index)
        .learning(false)
        .execute()
        .await
        .map_err(nl(format!(
            "create vxlan {VXLAN_TMP_NAME} (vni {}, remote {remote}:{port})",
            pod.vni
        )))?;
    let index = index_of(h, VXLAN_TMP_NAME)
        .await
        .map_err(PodNetError::Nic)?
        .ok_or_else(|| PodNetError::NoNic {
            mac: VXLAN_TMP_NAME.to_owned(),
        })?;
    let mut set = h.link().set(index).address(mac);
    if iface.mtu > 0 {
        set = set.mtu(iface.mtu);
    }
    set.execute().await.map_err(nl(format!(
        "set MAC {} and MTU {} on {VXLAN_TMP_NAME}",
        iface.mac, iface.mtu
    )))?;
    Ok(index)
}

/// Moves link `index` (in the namespace of `h`) into the namespace open as `netns`.
pub async fn move_link(h: &Handle, index: u32, netns: &std::fs::File) -> Result<(), PodNetError> {
    h.link()
        .set(index)
        .setns_by_fd(netns.as_raw_fd())
        .execute()
        .await
        .map_err(nl(format!("move link {index} into the pod's namespace")))
}

/// Gives the VXLAN device (now in the calling thread's namespace, the pod's) the pod
/// interface's name and addresses and adds the pod's routes.
pub async fn configure_pod(pod: &PodNetwork) -> Result<(), PodNetError> {
    let mut req = ConfigureNetworkRequest::new();
    req.interfaces = pod.interface.clone().into_option().into_iter().collect();
    req.routes = pod.routes.clone();
    crate::network::configure(&req)
        .await
        .map_err(PodNetError::Pod)
}

/// Brings loopback up in the calling thread's namespace (a pod without a pod network).
pub async fn loopback_up() -> Result<(), PodNetError> {
    crate::network::configure(&ConfigureNetworkRequest::new())
        .await
        .map_err(PodNetError::Pod)
}
