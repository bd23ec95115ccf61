//! The local provider's network: a host bridge (default `peerpod0`) holding the node's
//! address (the subnet's first host address), one tap per instance attached to it, all
//! with the configured MTU. QEMU creates each tap (`-netdev tap,ifname=...`) and it
//! vanishes with QEMU; the bridge is node infrastructure, created when missing and kept.
//! All through rtnetlink.

use std::net::Ipv4Addr;
use std::time::Duration;

use rtnetlink::Handle;

/// How long a tap QEMU created may take to show up.
const TAP_TIMEOUT: Duration = Duration::from_secs(5);

/// A netlink failure.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("netlink socket")]
    Socket(#[source] std::io::Error),
    #[error("{what}")]
    Netlink {
        what: String,
        #[source]
        source: Box<rtnetlink::Error>,
    },
    #[error("no interface {0}")]
    Missing(String),
}

fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetError {
    let what = what.into();
    move |source| NetError::Netlink {
        what,
        source: Box::new(source),
    }
}

fn handle() -> Result<Handle, NetError> {
    let (conn, h, _) = rtnetlink::new_connection().map_err(NetError::Socket)?;
    tokio::spawn(conn);
    Ok(h)
}

/// The index of the link `name`, if it exists.
pub async fn link_index(h: &Handle, name: &str) -> Result<Option<u32>, NetError> {
    crate::netlink::link_index(h, name)
        .await
        .map_err(nl(format!("find {name}")))
}

/// Creates the bridge when missing and gives it `gateway/prefix`, `mtu` and up. Returns
/// its index.
pub async fn ensure_bridge(
    name: &str,
    gateway: Ipv4Addr,
    prefix: u8,
    mtu: u32,
) -> Result<u32, NetError> {
    let h = handle()?;
    let index = match link_index(&h, name).await? {
        Some(i) => i,
        None => {
            h.link()
                .add()
                .bridge(name.to_owned())
                .execute()
                .await
                .map_err(nl(format!("create bridge {name}")))?;
            link_index(&h, name)
                .await?
                .ok_or_else(|| NetError::Missing(name.to_owned()))?
        }
    };
    h.link()
        .set(index)
        .mtu(mtu)
        .up()
        .execute()
        .await
        .map_err(nl(format!("set {name} up with mtu {mtu}")))?;
    match h
        .address()
        .add(index, gateway.into(), prefix)
        .execute()
        .await
    {
        Ok(()) => {}
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => {}
        Err(e) => return Err(nl(format!("add {gateway}/{prefix} to {name}"))(e)),
    }
    Ok(index)
}

/// Attaches the tap `tap` (created by QEMU) to the bridge, with `mtu`, up.
pub async fn attach_tap(tap: &str, bridge: &str, mtu: u32) -> Result<(), NetError> {
    let h = handle()?;
    let bridge_index = link_index(&h, bridge)
        .await?
        .ok_or_else(|| NetError::Missing(bridge.to_owned()))?;
    let deadline = tokio::time::Instant::now() + TAP_TIMEOUT;
    let index = loop {
        if let Some(i) = link_index(&h, tap).await? {
            break i;
        }
        if tokio::time::Instant::now() > deadline {
            return Err(NetError::Missing(tap.to_owned()));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    h.link()
        .set(index)
        .controller(bridge_index)
        .mtu(mtu)
        .up()
        .execute()
        .await
        .map_err(nl(format!("attach {tap} to {bridge} with mtu {mtu}")))
}

/// The tap name of the instance at `address`: `pp` and the address in hex (unique per
/// address, 10 characters).
pub fn tap_name(address: Ipv4Addr) -> String {
    format!("pp{:08x}", u32::from(address))
}

/// The MAC of the instance at `address`: QEMU's prefix and the address's last 3 bytes.
pub fn mac_for(address: Ipv4Addr) -> String {
    let o = address.octets();
    format!("52:54:00:{:02x}:{:02x}:{:02x}", o[1], o[2], o[3])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_from_addresses() {
        let a = Ipv4Addr::new(192, 168, 222, 17);
        assert_eq!(tap_name(a), "ppc0a8de11");
        assert!(tap_name(a).len() < 16);
        assert_eq!(mac_for(a), "52:54:00:a8:de:11");
    }
}
