//! Kata's log line format (logrus' logfmt): `time="..." level=info msg="..." key=value ...`,
//! values quoted when they hold anything but plain characters.

use std::fmt::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};

/// The fields of one event, in the order they were recorded; `message` is kept apart.
#[derive(Debug, Default)]
pub struct Fields {
    pub message: String,
    pub fields: Vec<(&'static str, String)>,
}

impl Fields {
    /// The value of field `name`, if recorded.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message = value.to_owned();
        } else {
            self.fields.push((field.name(), value.to_owned()));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let text = format!("{value:?}");
        if field.name() == "message" {
            self.message = text;
        } else {
            self.fields.push((field.name(), text));
        }
    }
}

/// Whether `v` can go unquoted (logrus' rule: letters, digits and `-._/@^+`).
fn plain(v: &str) -> bool {
    !v.is_empty()
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._/@^+".contains(c))
}

/// Appends ` key=value` (the value quoted and escaped when needed).
pub fn push_pair(out: &mut String, key: &str, value: &str) {
    if !out.is_empty() {
        out.push(' ');
    }
    out.push_str(key);
    out.push('=');
    if plain(value) {
        out.push_str(value);
        return;
    }
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// One logfmt line (no newline): `time` first when given, then level and msg, then the
/// event's fields and the `common` ones, sorted by key as logrus does; a key set by the
/// event hides the common one of the same name.
pub fn line(
    time: Option<&str>,
    level: &str,
    msg: &str,
    fields: &[(&str, String)],
    common: &[(&str, &str)],
) -> String {
    let mut out = String::with_capacity(128);
    if let Some(t) = time {
        push_pair(&mut out, "time", t);
    }
    push_pair(&mut out, "level", level);
    push_pair(&mut out, "msg", msg);
    let mut all: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
    for (k, v) in common {
        if !all.iter().any(|(key, _)| key == k) {
            all.push((k, v));
        }
    }
    all.sort_by(|a, b| a.0.cmp(b.0));
    for (k, v) in all {
        push_pair(&mut out, k, v);
    }
    out
}

/// `now` as RFC 3339 in UTC with nanoseconds, e.g. `2024-05-01T12:00:00.123456789Z`.
pub fn rfc3339(now: SystemTime) -> String {
    let d = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, day) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_nanos()
    )
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar.
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn logfmt_quotes_only_when_needed_and_sorts_keys() {
        let l = line(
            Some("2024-01-01T00:00:00.000000001Z"),
            "info",
            "reading guest console",
            &[
                ("vmconsole", "kata-agent: a \"b\"\\c".to_owned()),
                ("container", "c1".to_owned()),
            ],
            &[
                ("sandbox", "s1"),
                ("container", "hidden"),
                ("name", "containerd-shim-v2"),
            ],
        );
        assert_eq!(
            l,
            r#"time="2024-01-01T00:00:00.000000001Z" level=info msg="reading guest console" container=c1 name=containerd-shim-v2 sandbox=s1 vmconsole="kata-agent: a \"b\"\\c""#
        );
        let l = line(None, "warning", "x", &[("empty", String::new())], &[]);
        assert_eq!(l, r#"level=warning msg=x empty="""#);
        let l = line(None, "info", "multi\nline\x07", &[], &[]);
        assert_eq!(l, r#"level=info msg="multi\nline\u{7}""#);
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000000000Z");
        let t = UNIX_EPOCH + Duration::new(1_709_210_096, 42);
        assert_eq!(rfc3339(t), "2024-02-29T12:34:56.000000042Z");
        let t = UNIX_EPOCH + Duration::from_secs(4_102_444_799);
        assert_eq!(rfc3339(t), "2099-12-31T23:59:59.000000000Z");
    }
}
