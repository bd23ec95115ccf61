//! Pure cgroup v2 helpers: resource values to file contents, and stat file parsers.
//! The container module writes/reads `/sys/fs/cgroup/kata/<cid>/` with these.

use std::collections::HashMap;

/// `memory.max` for an OCI memory limit (`None` or negative = unlimited).
pub fn memory_max(limit: Option<i64>) -> String {
    match limit {
        Some(n) if n >= 0 => n.to_string(),
        _ => "max".to_owned(),
    }
}

/// `cpu.max` for an OCI CFS quota/period (quota `None` or negative = unlimited;
/// period defaults to 100000 µs).
pub fn cpu_max(quota: Option<i64>, period: Option<u64>) -> String {
    let period = period.unwrap_or(100_000);
    match quota {
        Some(q) if q > 0 => format!("{q} {period}"),
        _ => format!("max {period}"),
    }
}

/// `cpu.weight` from cgroup v1 `cpu.shares` (the standard conversion).
pub fn cpu_weight(shares: u64) -> u64 {
    let shares = shares.clamp(2, 262_144);
    1 + ((shares - 2) * 9999) / 262_142
}

/// `pids.max` for an OCI pids limit (`<= 0` = unlimited).
pub fn pids_max(limit: i64) -> String {
    if limit > 0 {
        limit.to_string()
    } else {
        "max".to_owned()
    }
}

/// Parses a flat-keyed file (`cpu.stat`, `memory.stat`, `memory.events`): `key value`
/// lines; malformed lines are skipped.
pub fn parse_flat_keyed(text: &str) -> HashMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let k = it.next()?;
            let v = it.next()?.parse().ok()?;
            Some((k.to_owned(), v))
        })
        .collect()
}

/// Parses a single-value file (`memory.max`, `pids.max`, `memory.current`): `max` = 0
/// (unlimited), as the stats protocol wants.
pub fn parse_single(text: &str) -> u64 {
    match text.trim() {
        "max" => 0,
        v => v.parse().unwrap_or(0),
    }
}

/// Parses `cgroup.procs`.
pub fn parse_procs(text: &str) -> Vec<u32> {
    text.lines().filter_map(|l| l.trim().parse().ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_values() {
        assert_eq!(memory_max(None), "max");
        assert_eq!(memory_max(Some(-1)), "max");
        assert_eq!(memory_max(Some(1048576)), "1048576");
        assert_eq!(cpu_max(Some(50000), Some(100000)), "50000 100000");
        assert_eq!(cpu_max(None, None), "max 100000");
        assert_eq!(cpu_weight(2), 1);
        assert_eq!(cpu_weight(1024), 39);
        assert_eq!(cpu_weight(262_144), 10000);
        assert_eq!(pids_max(0), "max");
        assert_eq!(pids_max(42), "42");
    }

    #[test]
    fn parsers() {
        let s = parse_flat_keyed("usage_usec 10\nuser_usec 7\nbad\nnr_periods x\n");
        assert_eq!(s.get("usage_usec"), Some(&10));
        assert_eq!(s.get("user_usec"), Some(&7));
        assert_eq!(s.len(), 2);
        assert_eq!(parse_single("max\n"), 0);
        assert_eq!(parse_single("4096\n"), 4096);
        assert_eq!(parse_procs("1\n23\n"), vec![1, 23]);
    }
}

/// A resources document that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("invalid LinuxResources JSON")]
pub struct ResourcesError(#[from] serde_json::Error);

/// The cgroup v2 files (name, content) an OCI `LinuxResources` document sets, in write
/// order. Fields it does not set are left out.
pub fn resource_files(json: &[u8]) -> Result<Vec<(&'static str, String)>, ResourcesError> {
    let r: oci_spec::runtime::LinuxResources = serde_json::from_slice(json)?;
    Ok(linux_resource_files(&r))
}

/// See [`resource_files`].
pub fn linux_resource_files(r: &oci_spec::runtime::LinuxResources) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    if let Some(m) = r.memory() {
        if m.limit().is_some() {
            out.push(("memory.max", memory_max(m.limit())));
        }
    }
    if let Some(c) = r.cpu() {
        if c.quota().is_some() || c.period().is_some() {
            out.push(("cpu.max", cpu_max(c.quota(), c.period())));
        }
        if let Some(s) = c.shares() {
            out.push(("cpu.weight", cpu_weight(s).to_string()));
        }
    }
    if let Some(p) = r.pids() {
        out.push(("pids.max", pids_max(p.limit())));
    }
    out
}

#[cfg(test)]
mod resource_tests {
    use super::*;

    #[test]
    fn oci_resources_to_files() {
        let f = resource_files(
            br#"{"memory":{"limit":1048576},"cpu":{"shares":1024,"quota":20000,"period":100000},"pids":{"limit":10}}"#,
        )
        .unwrap();
        assert_eq!(
            f,
            vec![
                ("memory.max", "1048576".to_owned()),
                ("cpu.max", "20000 100000".to_owned()),
                ("cpu.weight", "39".to_owned()),
                ("pids.max", "10".to_owned()),
            ]
        );
        assert!(resource_files(b"{}").unwrap().is_empty());
        assert!(resource_files(b"[").is_err());
    }
}
