//! `ConfigureNetwork`: the guest side of pod networking. Each virtio-net device carries the
//! MAC of a veth in the host's pod namespace; the guest interface with that MAC gets the
//! veth's name, MTU and addresses, then the pod's routes are added. Loopback comes up.

use std::net::IpAddr;
use std::time::Duration;

use futures::TryStreamExt;
use kata_proto::agent::ConfigureNetworkRequest;
use netlink_packet_route::link::LinkAttribute;
use netlink_packet_route::route::RouteScope;
use rtnetlink::Handle;

/// How long the guest may take to show a hot-added or freshly probed NIC.
const NIC_TIMEOUT: Duration = Duration::from_secs(10);

/// A network request the guest cannot carry out.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("netlink socket")]
    Socket(#[source] std::io::Error),
    #[error("{what}")]
    Netlink {
        what: String,
        #[source]
        source: Box<rtnetlink::Error>,
    },
    #[error("no network interface with MAC {mac} for {name} in the guest")]
    NoNic { name: String, mac: String },
    #[error("invalid {what} {value:?}")]
    Invalid { what: &'static str, value: String },
    #[error("route via {device}: no such interface")]
    NoDevice { device: String },
}

impl NetworkError {
    /// Whether the request itself is wrong.
    pub fn is_invalid(&self) -> bool {
        matches!(
            self,
            NetworkError::Invalid { .. } | NetworkError::NoDevice { .. }
        )
    }
}

fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetworkError {
    let what = what.into();
    move |source| NetworkError::Netlink {
        what,
        source: Box::new(source),
    }
}

pub(crate) fn parse_mac(mac: &str) -> Result<Vec<u8>, NetworkError> {
    let bytes: Result<Vec<u8>, _> = mac.split(':').map(|b| u8::from_str_radix(b, 16)).collect();
    match bytes {
        Ok(b) if b.len() == 6 => Ok(b),
        _ => Err(NetworkError::Invalid {
            what: "MAC",
            value: mac.to_owned(),
        }),
    }
}

pub(crate) fn parse_ip(what: &'static str, s: &str) -> Result<IpAddr, NetworkError> {
    s.parse().map_err(|_| NetworkError::Invalid {
        what,
        value: s.to_owned(),
    })
}

pub(crate) async fn link_by_mac(
    h: &Handle,
    mac: &[u8],
) -> Result<Option<(u32, String)>, NetworkError> {
    let links: Vec<_> = h
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(nl("list links"))?;
    Ok(links.into_iter().find_map(|l| {
        let has = l
            .attributes
            .iter()
            .any(|a| matches!(a, LinkAttribute::Address(m) if m.as_slice() == mac));
        let name = l.attributes.iter().find_map(|a| match a {
            LinkAttribute::IfName(n) => Some(n.clone()),
            _ => None,
        });
        has.then(|| (l.header.index, name.unwrap_or_default()))
    }))
}

pub(crate) async fn index_of(h: &Handle, name: &str) -> Result<Option<u32>, NetworkError> {
    let link = h
        .link()
        .get()
        .match_name(name.to_owned())
        .execute()
        .try_next()
        .await;
    match link {
        Ok(l) => Ok(l.map(|l| l.header.index)),
        // No such device.
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
        Err(e) => Err(nl(format!("find {name}"))(e)),
    }
}

/// Applies the request in the agent's (the guest's root) network namespace.
pub async fn configure(req: &ConfigureNetworkRequest) -> Result<(), NetworkError> {
    let (conn, h, _) = rtnetlink::new_connection().map_err(NetworkError::Socket)?;
    tokio::spawn(conn);
    if let Some(lo) = index_of(&h, "lo").await? {
        h.link()
            .set(lo)
            .up()
            .execute()
            .await
            .map_err(nl("set lo up"))?;
    }
    for iface in &req.interfaces {
        let mac = parse_mac(&iface.mac)?;
        let deadline = tokio::time::Instant::now() + NIC_TIMEOUT;
        let (index, current) = loop {
            if let Some(found) = link_by_mac(&h, &mac).await? {
                break found;
            }
            if tokio::time::Instant::now() > deadline {
                return Err(NetworkError::NoNic {
                    name: iface.name.clone(),
                    mac: iface.mac.clone(),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let set = h.link().set(index).down();
        set.execute()
            .await
            .map_err(nl(format!("set {current} down")))?;
        let mut set = h.link().set(index);
        if !iface.name.is_empty() && iface.name != current {
            set = set.name(iface.name.clone());
        }
        if iface.mtu > 0 {
            set = set.mtu(iface.mtu);
        }
        set.up().execute().await.map_err(nl(format!(
            "configure {current} as {} (mtu {})",
            iface.name, iface.mtu
        )))?;
        for a in &iface.addresses {
            let ip = parse_ip("address", &a.address)?;
            let prefix = u8::try_from(a.prefix_len).map_err(|_| NetworkError::Invalid {
                what: "prefix length",
                value: a.prefix_len.to_string(),
            })?;
            match h.address().add(index, ip, prefix).execute().await {
                Ok(()) => {}
                Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => {}
                Err(e) => return Err(nl(format!("add {ip}/{prefix} to {}", iface.name))(e)),
            }
        }
        tracing::info!(name = %iface.name, mac = %iface.mac, mtu = iface.mtu, addresses = ?iface.addresses.iter().map(|a| format!("{}/{}", a.address, a.prefix_len)).collect::<Vec<_>>(), "interface configured");
    }
    // On-link routes first: a gateway (Calico's 169.254.1.1 on a /32) must be reachable
    // before a route through it is accepted.
    let mut routes: Vec<_> = req.routes.iter().collect();
    routes.sort_by_key(|r| !r.gateway.is_empty());
    for r in routes {
        let index = index_of(&h, &r.device)
            .await?
            .ok_or_else(|| NetworkError::NoDevice {
                device: r.device.clone(),
            })?;
        let mut add = h.route().add().v4().output_interface(index);
        if r.link_scope {
            add = add.scope(RouteScope::Link);
        }
        if !r.destination.is_empty() {
            let IpAddr::V4(d) = parse_ip("route destination", &r.destination)? else {
                continue;
            };
            add = add.destination_prefix(d, r.dest_prefix_len as u8);
        }
        if !r.gateway.is_empty() {
            let IpAddr::V4(g) = parse_ip("gateway", &r.gateway)? else {
                continue;
            };
            add = add.gateway(g);
        }
        match add.execute().await {
            Ok(()) => {}
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => {}
            Err(e) => {
                return Err(nl(format!(
                    "add route {}/{} via {:?} dev {}",
                    r.destination, r.dest_prefix_len, r.gateway, r.device
                ))(e))
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_and_ips_are_checked() {
        assert_eq!(
            parse_mac("02:42:AC:11:00:02").unwrap(),
            [2, 0x42, 0xac, 0x11, 0, 2]
        );
        assert!(parse_mac("02:42").is_err());
        assert!(parse_ip("gateway", "10.0.0.x")
            .unwrap_err()
            .to_string()
            .contains("10.0.0.x"));
    }
}
