//! Pod networking, Kata's "tcfilter" model: for every interface CNI put in the pod's
//! network namespace (a veth), a tap is created next to it and traffic is redirected both
//! ways between them with tc (ingress qdisc + u32 match-all + mirred egress redirect). QEMU
//! gets the tap's fd for a virtio-net device with the veth's MAC, and the agent gives the
//! guest interface the veth's addresses, MTU and routes. Everything goes through netlink
//! (`rtnetlink`), in a thread that entered the namespace; only the tap needs an ioctl.

use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::TryStreamExt;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkInfo};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteScope};
use netlink_packet_route::tc::TcHandle;
use rtnetlink::{Handle, IpVersion};

/// ETH_P_ALL, in network byte order as tc wants it.
const ETH_P_ALL_BE: u16 = 0x0003u16.to_be();
/// The ingress qdisc's handle.
const INGRESS: u32 = 0xffff_0000;

/// A failure plumbing the pod network.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("cannot open network namespace {}", .path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot enter network namespace {}", .path.display())]
    Enter {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("netlink in {}: {what}", .netns.display())]
    Netlink {
        netns: PathBuf,
        what: String,
        #[source]
        source: Box<rtnetlink::Error>,
    },
    #[error("netlink socket")]
    Socket(#[source] std::io::Error),
    #[error("tap {name}: {what}")]
    Tap {
        name: String,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("network namespace {} has no interface for the VM (expected the veth CNI creates)", .0.display())]
    NoInterface(PathBuf),
    #[error("the network thread failed")]
    Thread,
}

/// One interface the guest gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    /// The veth's name (the guest interface gets it too).
    pub name: String,
    /// `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    pub mtu: u32,
    /// Addresses with prefix lengths.
    pub addresses: Vec<(IpAddr, u8)>,
    /// The tap next to it.
    pub tap: String,
}

/// One route of the namespace, on one of the interfaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// `None`: the default route.
    pub destination: Option<(IpAddr, u8)>,
    pub gateway: Option<IpAddr>,
    /// The interface's name.
    pub device: String,
    /// Link scope (on-link) rather than universe.
    pub link_scope: bool,
}

/// What [`attach`] set up.
#[derive(Debug, Clone)]
pub struct PodNetwork {
    pub netns: PathBuf,
    pub interfaces: Vec<Interface>,
    pub routes: Vec<Route>,
    /// Tap fds for QEMU, in `interfaces` order.
    pub taps: Vec<Arc<OwnedFd>>,
}

fn mac_string(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Runs `f` in a fresh thread inside the network namespace `netns` (a thread of its own:
/// `setns` changes the calling thread, which must not be one the runtime reuses).
fn in_netns<T: Send + 'static>(
    netns: &Path,
    f: impl FnOnce(&Path) -> Result<T, NetworkError> + Send + 'static,
) -> Result<T, NetworkError> {
    let file = std::fs::File::open(netns).map_err(|source| NetworkError::Open {
        path: netns.to_owned(),
        source,
    })?;
    let path = netns.to_owned();
    std::thread::spawn(move || {
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|source| {
            NetworkError::Enter {
                path: path.clone(),
                source,
            }
        })?;
        f(&path)
    })
    .join()
    .map_err(|_| NetworkError::Thread)?
}

/// Runs an async netlink job on a current-thread runtime (in the namespace's thread).
fn with_netlink<T>(
    f: impl AsyncFnOnce(&Handle) -> Result<T, NetworkError>,
) -> Result<T, NetworkError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(NetworkError::Socket)?;
    rt.block_on(async {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(NetworkError::Socket)?;
        tokio::spawn(conn);
        f(&handle).await
    })
}

fn nl(netns: &Path, what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetworkError {
    let netns = netns.to_owned();
    let what = what.into();
    move |source| NetworkError::Netlink {
        netns,
        what,
        source: Box::new(source),
    }
}

/// Finds the pod's interfaces in `netns`, creates a tap for each with tc redirects both
/// ways, and reads addresses and routes. Blocking: call from `spawn_blocking`.
pub fn attach(netns: &Path) -> Result<PodNetwork, NetworkError> {
    in_netns(netns, |netns| {
        let netns = netns.to_owned();
        with_netlink(async |h| {
            let mut touched: Vec<u32> = Vec::new();
            let result = attach_in(h, &netns, &mut touched).await;
            if result.is_err() {
                // Leave no redirect to a tap that is gone.
                for index in touched {
                    let _ = del_ingress(h, index).await;
                }
            }
            result
        })
    })
}

async fn attach_in(
    h: &Handle,
    netns: &Path,
    touched: &mut Vec<u32>,
) -> Result<PodNetwork, NetworkError> {
    let netns = netns.to_path_buf();
    {
        {
            let links: Vec<_> = h
                .link()
                .get()
                .execute()
                .try_collect()
                .await
                .map_err(nl(&netns, "list links"))?;
            let mut veths = Vec::new();
            for l in &links {
                let mut name = None;
                let mut mac = None;
                let mut mtu = 1500;
                let mut kind = None;
                for a in &l.attributes {
                    match a {
                        LinkAttribute::IfName(n) => name = Some(n.clone()),
                        LinkAttribute::Address(m) => mac = Some(m.clone()),
                        LinkAttribute::Mtu(m) => mtu = *m,
                        LinkAttribute::LinkInfo(infos) => {
                            for i in infos {
                                if let LinkInfo::Kind(k) = i {
                                    kind = Some(k.clone());
                                }
                            }
                        }
                        _ => {}
                    }
                }
                if kind == Some(InfoKind::Veth) {
                    if let (Some(name), Some(mac)) = (name, mac) {
                        veths.push((l.header.index, name, mac, mtu));
                    }
                }
            }
            if veths.is_empty() {
                return Err(NetworkError::NoInterface(netns.clone()));
            }
            let mut interfaces = Vec::new();
            let mut taps = Vec::new();
            let mut names = std::collections::HashMap::new();
            for (i, (index, name, mac, mtu)) in veths.into_iter().enumerate() {
                names.insert(index, name.clone());
                let tap_name = format!("tap{i}_kata");
                let fd = open_tap(&tap_name)?;
                let tap_index = h
                    .link()
                    .get()
                    .match_name(tap_name.clone())
                    .execute()
                    .try_next()
                    .await
                    .map_err(nl(&netns, format!("find {tap_name}")))?
                    .map(|m| m.header.index)
                    .ok_or_else(|| NetworkError::NoInterface(netns.clone()))?;
                h.link()
                    .set(tap_index)
                    .mtu(mtu)
                    .up()
                    .execute()
                    .await
                    .map_err(nl(&netns, format!("set {tap_name} up, mtu {mtu}")))?;
                for (from, to) in [(index, tap_index), (tap_index, index)] {
                    // A leftover of an earlier, failed attach would make the add fail.
                    let _ = del_ingress(h, from).await;
                    touched.push(from);
                    h.qdisc()
                        .add(from as i32)
                        .ingress()
                        .execute()
                        .await
                        .map_err(nl(&netns, format!("add ingress qdisc on link {from}")))?;
                    h.traffic_filter(from as i32)
                        .add()
                        .parent(INGRESS)
                        .protocol(ETH_P_ALL_BE)
                        .redirect(to)
                        .map_err(nl(&netns, "build redirect filter"))?
                        .execute()
                        .await
                        .map_err(nl(&netns, format!("redirect link {from} to {to}")))?;
                }
                let addrs: Vec<_> = h
                    .address()
                    .get()
                    .set_link_index_filter(index)
                    .execute()
                    .try_collect()
                    .await
                    .map_err(nl(&netns, format!("addresses of {name}")))?;
                let mut addresses = Vec::new();
                for a in addrs {
                    let ip = a.attributes.iter().find_map(|at| match at {
                        AddressAttribute::Address(ip) => Some(*ip),
                        _ => None,
                    });
                    // IPv6 link-local addresses are the kernel's own.
                    if let Some(ip) = ip {
                        let link_local =
                            matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80);
                        if !link_local {
                            addresses.push((ip, a.header.prefix_len));
                        }
                    }
                }
                interfaces.push(Interface {
                    name,
                    mac: mac_string(&mac),
                    mtu,
                    addresses,
                    tap: tap_name,
                });
                taps.push(Arc::new(fd));
            }
            let mut routes = Vec::new();
            for version in [IpVersion::V4, IpVersion::V6] {
                let msgs: Vec<_> = h
                    .route()
                    .get(version)
                    .execute()
                    .try_collect()
                    .await
                    .map_err(nl(&netns, "list routes"))?;
                for r in msgs {
                    // The main table only; the kernel's own routes come with addresses.
                    if r.header.table != 254 {
                        continue;
                    }
                    let mut dest = None;
                    let mut gateway = None;
                    let mut oif = None;
                    for a in &r.attributes {
                        match a {
                            RouteAttribute::Destination(d) => dest = route_ip(d),
                            RouteAttribute::Gateway(g) => gateway = route_ip(g),
                            RouteAttribute::Oif(i) => oif = Some(*i),
                            _ => {}
                        }
                    }
                    let Some(device) = oif.and_then(|i| names.get(&i)).cloned() else {
                        continue;
                    };
                    let link_scope = r.header.scope == RouteScope::Link;
                    // Routes the kernel derives from an address are recreated by it.
                    if link_scope && gateway.is_none() && dest.is_some() {
                        let proto_kernel =
                            r.header.protocol == netlink_packet_route::route::RouteProtocol::Kernel;
                        if proto_kernel {
                            continue;
                        }
                    }
                    if matches!(dest, Some(IpAddr::V6(_))) || matches!(gateway, Some(IpAddr::V6(_)))
                    {
                        // Router advertisements give the guest its IPv6 routes.
                        continue;
                    }
                    routes.push(Route {
                        destination: dest.map(|d| (d, r.header.destination_prefix_length)),
                        gateway,
                        device,
                        link_scope,
                    });
                }
            }
            Ok(PodNetwork {
                netns: netns.clone(),
                interfaces,
                routes,
                taps,
            })
        }
    }
}

/// Deletes the ingress qdisc of link `index` (its filters go with it); a link without one
/// is fine.
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

fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

/// Removes what [`attach`] added to the namespace: the veths' ingress qdiscs (their
/// filters go with them). The taps vanish when QEMU closes their fds. A namespace CNI has
/// already deleted is not an error.
pub fn detach(netns: &Path, interfaces: &[Interface]) -> Result<(), NetworkError> {
    if !netns.exists() {
        return Ok(());
    }
    let names: Vec<String> = interfaces.iter().map(|i| i.name.clone()).collect();
    in_netns(netns, move |netns| {
        let netns = netns.to_owned();
        with_netlink(async |h| {
            for name in &names {
                let Ok(Some(link)) = h
                    .link()
                    .get()
                    .match_name(name.clone())
                    .execute()
                    .try_next()
                    .await
                else {
                    continue;
                };
                del_ingress(h, link.header.index)
                    .await
                    .map_err(nl(&netns, format!("remove ingress qdisc of {name}")))?;
            }
            Ok(())
        })
    })
}

/// Opens a (non-persistent) tap named `name` in the calling thread's namespace.
fn open_tap(name: &str) -> Result<OwnedFd, NetworkError> {
    let err = |what, source| NetworkError::Tap {
        name: name.to_owned(),
        what,
        source,
    };
    // SAFETY: a plain open(2) of a constant path.
    let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(err("open /dev/net/tun", std::io::Error::last_os_error()));
    }
    // SAFETY: open returned a new fd we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short,
        _pad: [0; 22],
    };
    let bytes = name.as_bytes();
    req.name[..bytes.len().min(libc::IFNAMSIZ - 1)]
        .copy_from_slice(&bytes[..bytes.len().min(libc::IFNAMSIZ - 1)]);
    // SAFETY: TUNSETIFF reads an ifreq from a valid pointer.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF as _, &mut req) };
    if rc < 0 {
        return Err(err("TUNSETIFF", std::io::Error::last_os_error()));
    }
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_print_like_ip_does() {
        assert_eq!(
            mac_string(&[0x02, 0x42, 0xac, 0x11, 0, 2]),
            "02:42:ac:11:00:02"
        );
    }
}
