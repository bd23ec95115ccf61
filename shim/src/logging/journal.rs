//! The systemd journal's native protocol: one datagram per entry to
//! `/run/systemd/journal/socket`, holding `KEY=value` lines (a value with a newline goes as
//! `KEY\n<64-bit little-endian length><value>\n`). Field names are upper case letters,
//! digits and `_`, not starting with `_` (those are the journal's own, trusted fields).

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The journal's socket.
pub const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";
/// Longest value sent; longer ones are cut (a datagram must fit the socket buffer).
const MAX_VALUE: usize = 48 * 1024;
/// How long the writer thread waits for room in the journal's queue.
const SEND_TIMEOUT: Duration = Duration::from_secs(1);

/// A journal field name for `key`: upper case, other characters as `_`, never starting
/// with `_` or a digit; `None` when nothing is left.
pub fn field_name(key: &str) -> Option<String> {
    let mut name: String = key
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    while name.starts_with('_') {
        name.remove(0);
    }
    if name.is_empty() {
        return None;
    }
    if name.starts_with(|c: char| c.is_ascii_digit()) {
        name.insert_str(0, "F_");
    }
    name.truncate(64);
    Some(name)
}

/// Encodes one entry.
pub fn datagram(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    for (key, value) in fields {
        let mut end = value.len().min(MAX_VALUE);
        while !value.is_char_boundary(end) {
            end -= 1;
        }
        let value = &value.as_bytes()[..end];
        out.extend_from_slice(key.as_bytes());
        if value.contains(&b'\n') {
            out.push(b'\n');
            out.extend_from_slice(&(value.len() as u64).to_le_bytes());
        } else {
            out.push(b'=');
        }
        out.extend_from_slice(value);
        out.push(b'\n');
    }
    out
}

/// Syslog priority of a tracing level.
pub fn priority(level: tracing::Level) -> &'static str {
    match level {
        tracing::Level::ERROR => "3",
        tracing::Level::WARN => "4",
        tracing::Level::INFO => "6",
        _ => "7",
    }
}

/// Whether a journal listens on `socket` now.
pub fn available(socket: &Path) -> bool {
    std::fs::metadata(socket).is_ok()
}

/// A writer for the sink thread: sends each datagram to `socket`, waiting at most
/// [`SEND_TIMEOUT`] for room. A missing journal loses the entry (counted by the sink).
pub fn writer(socket: PathBuf) -> std::io::Result<super::sink::WriteFn> {
    let sock = UnixDatagram::unbound()?;
    sock.set_write_timeout(Some(SEND_TIMEOUT))?;
    Ok(Box::new(move |entry| {
        sock.send_to(entry, &socket).map(drop)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_names_follow_the_journals_rules() {
        assert_eq!(field_name("sandbox").as_deref(), Some("SANDBOX"));
        assert_eq!(field_name("vm-console.x").as_deref(), Some("VM_CONSOLE_X"));
        assert_eq!(field_name("_pid").as_deref(), Some("PID"));
        assert_eq!(field_name("9lives").as_deref(), Some("F_9LIVES"));
        assert_eq!(field_name("__"), None);
    }

    #[test]
    fn values_with_newlines_are_length_prefixed() {
        let d = datagram(&[("MESSAGE", "a=b"), ("X", "l1\nl2")]);
        let mut expected = b"MESSAGE=a=b\nX\n".to_vec();
        expected.extend_from_slice(&5u64.to_le_bytes());
        expected.extend_from_slice(b"l1\nl2\n");
        assert_eq!(d, expected);
    }

    #[test]
    fn long_values_are_cut_on_a_char_boundary() {
        let long = "é".repeat(MAX_VALUE);
        let d = datagram(&[("M", &long)]);
        assert!(d.len() <= MAX_VALUE + 4);
        assert!(std::str::from_utf8(&d[2..d.len() - 1]).is_ok());
    }

    #[test]
    fn entries_reach_a_datagram_listener() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.sock");
        let listener = UnixDatagram::bind(&path).unwrap();
        assert!(available(&path));
        let mut w = writer(path).unwrap();
        w(&datagram(&[
            ("MESSAGE", "hi"),
            ("SYSLOG_IDENTIFIER", "kata"),
        ]))
        .unwrap();
        let mut buf = [0u8; 256];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"MESSAGE=hi\nSYSLOG_IDENTIFIER=kata\n");
        assert!(!available(&dir.path().join("none")));
    }
}
