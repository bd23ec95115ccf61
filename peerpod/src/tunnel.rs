//! The node side of a pod's VXLAN tunnel. The pod's network namespace on the node keeps
//! CNI's veth (its address, its routes) but nothing behind it: the adaptor creates a VXLAN
//! device towards the pod VM in its own (the host's) namespace, so its UDP socket stays
//! there, moves it into the pod's namespace, and redirects traffic both ways between the
//! veth and the VXLAN device with tc (ingress qdisc, u32 match-all, mirred egress
//! redirect). Inside the VM the agent gives a VXLAN device the veth's MAC, address and
//! routes (see the agent's network mode), so the host reaches the pod IP and the pod
//! reaches the host as with a local pod. Everything through rtnetlink, in threads that
//! entered the namespace.

use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use futures::TryStreamExt;
use kata_proto::agent::{IPAddress, Interface, Route};
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkInfo};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteProtocol, RouteScope};
use netlink_packet_route::tc::TcHandle;
use rtnetlink::Handle;

use crate::state::TunnelRecord;

/// VXLAN over IPv4 adds 50 bytes (outer Ethernet, IPv4, UDP, VXLAN headers).
pub const VXLAN_OVERHEAD: u32 = 50;
/// ETH_P_ALL in network byte order, as tc wants it.
const ETH_P_ALL_BE: u16 = 0x0003u16.to_be();
/// The ingress qdisc's handle.
const INGRESS: u32 = 0xffff_0000;

/// A tunnel failure.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("open network namespace {}", .0.display())]
    Open(PathBuf, #[source] std::io::Error),
    #[error("enter network namespace {}", .0.display())]
    Enter(PathBuf, #[source] nix::Error),
    #[error("netlink socket")]
    Socket(#[source] std::io::Error),
    #[error("{what}")]
    Netlink {
        what: String,
        #[source]
        source: Box<rtnetlink::Error>,
    },
    #[error("network namespace {} has {found} veth interfaces; peer pods support exactly one (CNI's)", .netns.display())]
    Interfaces { netns: PathBuf, found: usize },
    #[error("no interface {0} in the pod's network namespace")]
    Missing(String),
    #[error("the network thread panicked")]
    Thread,
}

fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> TunnelError {
    let what = what.into();
    move |source| TunnelError::Netlink {
        what,
        source: Box::new(source),
    }
}

/// Runs `f` with a netlink handle on a fresh thread, inside `netns` when given (a thread
/// of its own: `setns` changes only the calling thread).
fn on_thread<T: Send + 'static>(
    netns: Option<&Path>,
    f: impl AsyncFnOnce(&Handle) -> Result<T, TunnelError> + Send + 'static,
) -> Result<T, TunnelError> {
    let file = netns
        .map(|p| std::fs::File::open(p).map_err(|e| TunnelError::Open(p.to_owned(), e)))
        .transpose()?;
    let path = netns.map(Path::to_owned);
    std::thread::spawn(move || {
        if let (Some(file), Some(path)) = (&file, &path) {
            nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| TunnelError::Enter(path.clone(), e))?;
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(TunnelError::Socket)?;
        rt.block_on(async {
            let (conn, h, _) = rtnetlink::new_connection().map_err(TunnelError::Socket)?;
            tokio::spawn(conn);
            f(&h).await
        })
    })
    .join()
    .map_err(|_| TunnelError::Thread)?
}

/// The node-side name of a pod's VXLAN device (unique per VNI, below 16 characters).
pub fn device_name(vni: u32) -> String {
    format!("ppvx{vni:06x}")
}

fn mac_string(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

async fn link_index(h: &Handle, name: &str) -> Result<Option<u32>, TunnelError> {
    crate::netlink::link_index(h, name)
        .await
        .map_err(nl(format!("find {name}")))
}

/// The pod's interface (CNI's veth) in `netns`, with its addresses and IPv4 routes, as the
/// guest will get them. Blocking.
pub fn inspect(netns: &Path) -> Result<(Interface, Vec<Route>), TunnelError> {
    let path = netns.to_owned();
    on_thread(Some(netns), async move |h: &Handle| {
        let links: Vec<_> = h
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(nl("list links"))?;
        let veths: Vec<_> = links
            .iter()
            .filter(|l| {
                l.attributes.iter().any(|a| {
                    matches!(a, LinkAttribute::LinkInfo(i) if i.iter().any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth))))
                })
            })
            .collect();
        let [veth] = veths.as_slice() else {
            return Err(TunnelError::Interfaces {
                netns: path,
                found: veths.len(),
            });
        };
        let mut iface = Interface::new();
        iface.mtu = 1500;
        for a in &veth.attributes {
            match a {
                LinkAttribute::IfName(n) => iface.name = n.clone(),
                LinkAttribute::Address(m) => iface.mac = mac_string(m),
                LinkAttribute::Mtu(m) => iface.mtu = *m,
                _ => {}
            }
        }
        let index = veth.header.index;
        let addrs: Vec<_> = h
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(nl(format!("addresses of {}", iface.name)))?;
        for a in addrs {
            for at in &a.attributes {
                if let AddressAttribute::Address(IpAddr::V4(ip)) = at {
                    let mut addr = IPAddress::new();
                    addr.address = ip.to_string();
                    addr.prefix_len = u32::from(a.header.prefix_len);
                    iface.addresses.push(addr);
                }
            }
        }
        let msgs: Vec<_> = h
            .route()
            .get(rtnetlink::IpVersion::V4)
            .execute()
            .try_collect()
            .await
            .map_err(nl("list routes"))?;
        let mut routes = Vec::new();
        for r in msgs {
            if r.header.table != 254 {
                continue;
            }
            let (mut dest, mut gateway, mut oif) = (None, None, None);
            for a in &r.attributes {
                match a {
                    RouteAttribute::Destination(d) => dest = route_ip(d),
                    RouteAttribute::Gateway(g) => gateway = route_ip(g),
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    _ => {}
                }
            }
            let link_scope = r.header.scope == RouteScope::Link;
            // Routes the kernel derives from an address are recreated by it in the guest.
            if oif != Some(index)
                || (link_scope
                    && gateway.is_none()
                    && dest.is_some()
                    && r.header.protocol == RouteProtocol::Kernel)
            {
                continue;
            }
            let mut route = Route::new();
            if let Some(d) = dest {
                route.destination = d.to_string();
                route.dest_prefix_len = u32::from(r.header.destination_prefix_length);
            }
            if let Some(g) = gateway {
                route.gateway = g.to_string();
            }
            route.device = iface.name.clone();
            route.link_scope = link_scope;
            routes.push(route);
        }
        Ok((iface, routes))
    })
}

async fn del_ingress(h: &Handle, index: u32) -> Result<(), rtnetlink::Error> {
    let mut del = h.qdisc().del(index as i32);
    del.message_mut().header.parent = TcHandle::INGRESS;
    del.message_mut().header.handle = TcHandle {
        major: 0xffff,
        minor: 0,
    };
    match del.execute().await {
        Err(rtnetlink::Error::NetlinkError(e))
            if matches!(-e.raw_code(), libc::ENOENT | libc::EINVAL | libc::ENODEV) =>
        {
            Ok(())
        }
        other => other,
    }
}

async fn redirect(h: &Handle, from: u32, to: u32) -> Result<(), TunnelError> {
    del_ingress(h, from)
        .await
        .map_err(nl(format!("clear ingress of link {from}")))?;
    h.qdisc()
        .add(from as i32)
        .ingress()
        .execute()
        .await
        .map_err(nl(format!("add ingress qdisc on link {from}")))?;
    h.traffic_filter(from as i32)
        .add()
        .parent(INGRESS)
        .protocol(ETH_P_ALL_BE)
        .redirect(to)
        .map_err(nl("build redirect filter"))?
        .execute()
        .await
        .map_err(nl(format!("redirect link {from} to {to}")))
}

/// Sets the tunnel up towards `remote` (the VM) on UDP `port`; the VXLAN device gets
/// `mtu` (the pod interface's). A tunnel already in place is left alone (an adaptor
/// restart). Blocking.
pub fn setup(t: &TunnelRecord, remote: IpAddr, port: u16, mtu: u32) -> Result<(), TunnelError> {
    let dev = device_name(t.vni);
    let d = dev.clone();
    if on_thread(Some(&t.netns), async move |h: &Handle| {
        link_index(h, &d).await
    })?
    .is_some()
    {
        return Ok(());
    }
    let IpAddr::V4(remote) = remote else {
        return Err(TunnelError::Missing(format!(
            "an IPv4 address for the VM (got {remote})"
        )));
    };
    let pod_ns =
        std::fs::File::open(&t.netns).map_err(|e| TunnelError::Open(t.netns.clone(), e))?;
    let (d, vni) = (dev.clone(), t.vni);
    on_thread(None, async move |h: &Handle| {
        // A leftover from a crash between creating and moving the device.
        if let Some(old) = link_index(h, &d).await? {
            h.link()
                .del(old)
                .execute()
                .await
                .map_err(nl(format!("remove leftover {d}")))?;
        }
        h.link()
            .add()
            .vxlan(d.clone(), vni)
            .remote(remote)
            .port(port)
            .learning(false)
            .execute()
            .await
            .map_err(nl(format!(
                "create {d} (vni {vni}, remote {remote}:{port})"
            )))?;
        let index = link_index(h, &d)
            .await?
            .ok_or_else(|| TunnelError::Missing(d.clone()))?;
        h.link()
            .set(index)
            .mtu(mtu)
            .setns_by_fd(pod_ns.as_raw_fd())
            .execute()
            .await
            .map_err(nl(format!("move {d} into the pod's namespace")))
    })?;
    let (d, veth) = (dev, t.interface.clone());
    on_thread(Some(&t.netns), async move |h: &Handle| {
        let vx = link_index(h, &d)
            .await?
            .ok_or_else(|| TunnelError::Missing(d.clone()))?;
        let veth_index = link_index(h, &veth)
            .await?
            .ok_or_else(|| TunnelError::Missing(veth.clone()))?;
        h.link()
            .set(vx)
            .up()
            .execute()
            .await
            .map_err(nl(format!("set {d} up")))?;
        redirect(h, veth_index, vx).await?;
        redirect(h, vx, veth_index).await
    })
}

/// Removes the tunnel: the veth's redirect and the VXLAN device (in the pod's namespace,
/// and a leftover in the host's). A namespace that is already gone is fine. Blocking.
pub fn teardown(t: &TunnelRecord) -> Result<(), TunnelError> {
    let dev = device_name(t.vni);
    if t.netns.exists() {
        let (d, veth) = (dev.clone(), t.interface.clone());
        on_thread(Some(&t.netns), async move |h: &Handle| {
            if let Some(v) = link_index(h, &veth).await? {
                del_ingress(h, v)
                    .await
                    .map_err(nl(format!("remove the redirect of {veth}")))?;
            }
            if let Some(x) = link_index(h, &d).await? {
                h.link()
                    .del(x)
                    .execute()
                    .await
                    .map_err(nl(format!("remove {d}")))?;
            }
            Ok(())
        })?;
    }
    on_thread(None, async move |h: &Handle| {
        if let Some(x) = link_index(h, &dev).await? {
            h.link()
                .del(x)
                .execute()
                .await
                .map_err(nl(format!("remove {dev}")))?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_fit() {
        assert_eq!(device_name(555000), "ppvx0877f8");
        assert!(device_name((1 << 24) - 1).len() < 16);
    }
}
