//! Network mode (peer pods): what the adaptor and the agent of a pod VM share.
//!
//! **Connections.** The agent of a peer pod VM listens on TCP [`AGENT_TLS_PORT`] with
//! mutual TLS instead of vsock. Every connection carries one guest port, with the numbers
//! vsock uses: [`crate::AGENT_VSOCK_PORT`] (ttrpc) or [`crate::STDIO_VSOCK_PORT`] (one stdio
//! stream). After the TLS handshake the client writes `CONNECT <port>\n`; the agent answers
//! `OK <port>\n` and the connection is from then on that port's byte stream, or answers
//! `ERR <reason>\n` and closes. It is the hybrid-vsock handshake, so the adaptor can relay a
//! shim's hybrid-vsock connection without translating anything.
//!
//! **User data.** [`encode_user_data`] frames a [`UserData`] for the VM's config disk
//! (a read-only virtio-blk device with serial [`USERDATA_DISK_SERIAL`]):
//! [`USERDATA_MAGIC`], the message length as a little-endian `u32`, the protobuf message,
//! zero padding to a multiple of 512 bytes. [`decode_user_data`] reads it back.

use protobuf::Message;

use crate::peerpod::UserData;

/// The TCP port the agent listens on in network mode (cloud-api-adaptor's).
pub const AGENT_TLS_PORT: u16 = 15150;
/// The serial number of the config disk holding the user data (virtio-blk allows 20 bytes).
pub const USERDATA_DISK_SERIAL: &str = "kata-peerpod-ud";
/// The first bytes of the config disk.
pub const USERDATA_MAGIC: &[u8; 8] = b"KATAPPUD";
/// The user data format version this code writes and reads.
pub const USERDATA_VERSION: u32 = 1;
/// Largest user data message accepted.
pub const MAX_USERDATA: usize = 4 << 20;
/// Longest `CONNECT`/`OK`/`ERR` line accepted, newline excluded.
pub const MAX_HEADER_LINE: usize = 128;
/// Where a peer pod VM's agent is booted into network mode: this kernel parameter.
pub const BOOT_PARAM: &str = "agent.mode=peerpod";

/// A connection header that is not `CONNECT <port>`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeaderError {
    /// Not `CONNECT <port>`.
    #[error("expected \"CONNECT <port>\", got {0:?}")]
    Malformed(String),
    /// A port the agent does not serve.
    #[error("port {0} is not served (expected 1024 or 1026)")]
    Port(u32),
}

/// The line a client sends first: `CONNECT <port>\n`.
pub fn connect_line(port: u32) -> String {
    format!("CONNECT {port}\n")
}

/// The agent's answer when the port is served: `OK <port>\n`.
pub fn ok_line(port: u32) -> String {
    format!("OK {port}\n")
}

/// Parses a `CONNECT <port>` line (without its newline) and checks that the port is one the
/// agent serves.
pub fn parse_connect(line: &str) -> Result<u32, HeaderError> {
    let port = line
        .strip_prefix("CONNECT ")
        .and_then(|p| p.parse::<u32>().ok())
        .ok_or_else(|| HeaderError::Malformed(line.chars().take(MAX_HEADER_LINE).collect()))?;
    const _: () = assert!(crate::AGENT_VSOCK_PORT == 1024 && crate::STDIO_VSOCK_PORT == 1026);
    if port == crate::AGENT_VSOCK_PORT || port == crate::STDIO_VSOCK_PORT {
        Ok(port)
    } else {
        Err(HeaderError::Port(port))
    }
}

/// User data that cannot be framed or read back.
#[derive(Debug, thiserror::Error)]
pub enum UserDataError {
    /// The bytes do not start with [`USERDATA_MAGIC`].
    #[error(
        "no user data magic (expected {:?})",
        String::from_utf8_lossy(USERDATA_MAGIC)
    )]
    Magic,
    /// The length field is larger than the data or than [`MAX_USERDATA`].
    #[error(
        "user data length {len} exceeds the {available} bytes available (at most {MAX_USERDATA})"
    )]
    Length { len: usize, available: usize },
    /// The message does not parse.
    #[error("user data is not a valid message")]
    Parse(#[source] protobuf::Error),
    /// The message could not be serialized.
    #[error("cannot serialize user data")]
    Serialize(#[source] protobuf::Error),
    /// A version this code does not know.
    #[error("user data version {0} (this agent reads version {USERDATA_VERSION})")]
    Version(u32),
}

/// Frames `ud` for the config disk.
pub fn encode_user_data(ud: &UserData) -> Result<Vec<u8>, UserDataError> {
    let body = ud.write_to_bytes().map_err(UserDataError::Serialize)?;
    if body.len() > MAX_USERDATA {
        return Err(UserDataError::Length {
            len: body.len(),
            available: MAX_USERDATA,
        });
    }
    let mut out = Vec::with_capacity(body.len() + 512 + 12);
    out.extend_from_slice(USERDATA_MAGIC);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    out.resize(out.len().div_ceil(512) * 512, 0);
    Ok(out)
}

/// Reads user data framed by [`encode_user_data`] (trailing padding is ignored) and checks
/// its version.
pub fn decode_user_data(bytes: &[u8]) -> Result<UserData, UserDataError> {
    let rest = bytes
        .strip_prefix(USERDATA_MAGIC.as_slice())
        .ok_or(UserDataError::Magic)?;
    let (len, body) = rest.split_first_chunk::<4>().ok_or(UserDataError::Length {
        len: 4,
        available: rest.len(),
    })?;
    let len = u32::from_le_bytes(*len) as usize;
    if len > body.len() || len > MAX_USERDATA {
        return Err(UserDataError::Length {
            len,
            available: body.len(),
        });
    }
    let ud = UserData::parse_from_bytes(&body[..len]).map_err(UserDataError::Parse)?;
    if ud.version != USERDATA_VERSION {
        return Err(UserDataError::Version(ud.version));
    }
    Ok(ud)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines() {
        assert_eq!(connect_line(1024), "CONNECT 1024\n");
        assert_eq!(parse_connect("CONNECT 1024"), Ok(1024));
        assert_eq!(parse_connect("CONNECT 1026"), Ok(1026));
        assert_eq!(parse_connect("CONNECT 22"), Err(HeaderError::Port(22)));
        assert!(matches!(
            parse_connect("CONNECT x"),
            Err(HeaderError::Malformed(_))
        ));
        assert!(matches!(
            parse_connect("GET /"),
            Err(HeaderError::Malformed(_))
        ));
    }

    #[test]
    fn user_data_round_trips_and_is_checked() {
        let mut ud = UserData::new();
        ud.version = USERDATA_VERSION;
        ud.sandbox_id = "abc".into();
        ud.tls.mut_or_insert_default().port = 15150;
        let bytes = encode_user_data(&ud).unwrap();
        assert_eq!(bytes.len() % 512, 0);
        assert_eq!(decode_user_data(&bytes).unwrap(), ud);

        assert!(matches!(
            decode_user_data(b"garbage"),
            Err(UserDataError::Magic)
        ));
        let mut short = bytes.clone();
        short[8..12].copy_from_slice(&100_000u32.to_le_bytes());
        assert!(matches!(
            decode_user_data(&short),
            Err(UserDataError::Length { len: 100_000, .. })
        ));
        ud.version = 7;
        let bytes = encode_user_data(&ud).unwrap();
        assert!(matches!(
            decode_user_data(&bytes),
            Err(UserDataError::Version(7))
        ));
    }
}
