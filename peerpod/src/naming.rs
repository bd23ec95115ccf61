//! Instance names that trace back to the pod: `podvm-<namespace>-<name>-<sandbox id[..8]>`,
//! lowercase letters, digits and '-', at most 63 characters (a DNS label, which cloud APIs
//! and the agent's TLS certificate both accept); namespace and name are shortened to fit.

/// The longest name (a DNS label).
pub const MAX_NAME: usize = 63;

fn clean(s: &str, max: usize) -> String {
    let mut out: String = s
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    out.truncate(max);
    out.trim_matches('-').to_owned()
}

/// The instance name for a pod.
pub fn instance_name(namespace: &str, name: &str, sandbox_id: &str) -> String {
    let sid = clean(sandbox_id, 8);
    // "podvm-" + ns + "-" + name + "-" + sid
    let room = MAX_NAME - "podvm-".len() - 2 - sid.len();
    let ns = clean(namespace, room / 2);
    let name = clean(name, room - ns.len());
    let parts: Vec<&str> = ["podvm", ns.as_str(), name.as_str(), sid.as_str()]
        .into_iter()
        .filter(|p| !p.is_empty())
        .collect();
    parts.join("-")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_trace_back_and_fit() {
        assert_eq!(
            instance_name("default", "web", "0123456789abcdef"),
            "podvm-default-web-01234567"
        );
        let long = instance_name(&"n".repeat(80), &"Pod_Name.x".repeat(10), &"f".repeat(64));
        assert!(long.len() <= MAX_NAME, "{long}");
        assert!(long.starts_with("podvm-nnn"), "{long}");
        assert!(long.ends_with("-ffffffff"), "{long}");
        assert!(long
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'));
        assert!(!long.contains("--"), "{long}");
    }
}
