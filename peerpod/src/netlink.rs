//! Netlink lookups the tunnel and the local provider share.

use futures::TryStreamExt;
use rtnetlink::Handle;

/// The index of the link `name`, or `None` when there is no such link.
pub async fn link_index(h: &Handle, name: &str) -> Result<Option<u32>, rtnetlink::Error> {
    match h
        .link()
        .get()
        .match_name(name.to_owned())
        .execute()
        .try_next()
        .await
    {
        Ok(l) => Ok(l.map(|l| l.header.index)),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
        Err(e) => Err(e),
    }
}
