//! Redaction for `kata-ctl collect`: annotation and environment values outside an
//! allow-list never leave the node in a collection.
//!
//! Two passes. [`redact_spec`] rewrites an OCI spec (a bundle's `config.json`): the key of
//! every annotation and environment variable (the process's and the hooks') stays, a value
//! outside the allow-lists becomes [`REDACTED`]; the values it removed are returned. A
//! [`Scrubber`] then cleans every text of the collection (logs, console, command lines,
//! metrics): each value removed from any spec is replaced wherever it appears (values
//! shorter than [`MIN_SECRET_LEN`] would match everywhere and are left to the first
//! pass), and so is the value of anything shaped like an environment assignment
//! (`NAME=value` with an upper-case `NAME` outside [`ENV_ALLOW`]), which catches the
//! variables of containers whose bundle is already gone.

use std::collections::BTreeSet;

use serde_json::Value;

/// What a redacted value becomes.
pub const REDACTED: &str = "<redacted>";
/// Values shorter than this are not searched for in free text.
pub const MIN_SECRET_LEN: usize = 4;

/// Environment variables whose values are kept: the ones every image sets and that carry
/// no user data.
pub const ENV_ALLOW: &[&str] = &[
    "PATH",
    "HOME",
    "HOSTNAME",
    "TERM",
    "LANG",
    "LC_ALL",
    "TZ",
    "PWD",
    "USER",
    "SHELL",
    "container",
];

/// Upper-case names in free text that are not environment variables and keep their values:
/// the journal fields the shim writes and that `journalctl` filters by.
pub const TEXT_NAME_ALLOW: &[&str] = &[
    "SANDBOX_ID",
    "CONTAINER",
    "SOURCE",
    "PRIORITY",
    "SYSLOG_IDENTIFIER",
];

/// Annotation key prefixes whose values are kept: the CRI plugin's identity and sizing
/// annotations and Kata's configuration annotations.
pub const ANNOTATION_ALLOW_PREFIXES: &[&str] = &["io.kubernetes.cri.", "io.katacontainers."];

/// Annotation keys whose values are kept (CRI-O's and kubelet's identity annotations;
/// CRI-O's `io.kubernetes.cri-o.Annotations`/`Labels` carry every pod annotation and label
/// and stay redacted).
pub const ANNOTATION_ALLOW: &[&str] = &[
    "io.kubernetes.cri-o.ContainerType",
    "io.kubernetes.cri-o.ContainerName",
    "io.kubernetes.cri-o.SandboxID",
    "io.kubernetes.cri-o.SandboxName",
    "io.kubernetes.pod.name",
    "io.kubernetes.pod.namespace",
    "io.kubernetes.pod.uid",
    "io.kubernetes.container.name",
];

/// Whether an annotation's value is kept.
pub fn annotation_allowed(key: &str) -> bool {
    ANNOTATION_ALLOW.contains(&key) || ANNOTATION_ALLOW_PREFIXES.iter().any(|p| key.starts_with(p))
}

/// Whether an environment variable's value is kept.
pub fn env_allowed(name: &str) -> bool {
    ENV_ALLOW.contains(&name)
}

/// Redacts the annotations and environment variables of the OCI spec `spec` in place;
/// returns the values removed. Anything that is not shaped as a spec is left alone.
pub fn redact_spec(spec: &mut Value) -> Vec<String> {
    let mut removed = Vec::new();
    if let Some(annotations) = spec.get_mut("annotations").and_then(Value::as_object_mut) {
        for (key, value) in annotations.iter_mut() {
            if !annotation_allowed(key) {
                take(value, &mut removed);
            }
        }
    }
    if let Some(env) = spec.pointer_mut("/process/env") {
        redact_env_list(env, &mut removed);
    }
    if let Some(hooks) = spec.get_mut("hooks").and_then(Value::as_object_mut) {
        for list in hooks.values_mut().filter_map(Value::as_array_mut) {
            for hook in list {
                if let Some(env) = hook.get_mut("env") {
                    redact_env_list(env, &mut removed);
                }
            }
        }
    }
    removed
}

/// Replaces a JSON value by [`REDACTED`], keeping what it held.
fn take(value: &mut Value, removed: &mut Vec<String>) {
    let old = std::mem::replace(value, Value::String(REDACTED.to_owned()));
    match old {
        Value::String(s) => removed.push(s),
        Value::Null => {}
        other => removed.push(other.to_string()),
    }
}

/// `["NAME=value", ...]`: values of names outside [`ENV_ALLOW`] redacted.
fn redact_env_list(env: &mut Value, removed: &mut Vec<String>) {
    let Some(list) = env.as_array_mut() else {
        return;
    };
    for entry in list {
        let Some(s) = entry.as_str() else { continue };
        let (name, value) = s.split_once('=').unwrap_or((s, ""));
        if env_allowed(name) || value.is_empty() {
            continue;
        }
        removed.push(value.to_owned());
        *entry = Value::String(format!("{name}={REDACTED}"));
    }
}

/// Cleans free text of the values removed from specs and of environment assignments.
#[derive(Debug, Default, Clone)]
pub struct Scrubber {
    secrets: BTreeSet<String>,
}

impl Scrubber {
    /// Values to replace wherever they appear (short ones are ignored, see
    /// [`MIN_SECRET_LEN`]).
    pub fn add(&mut self, values: impl IntoIterator<Item = String>) {
        self.secrets.extend(
            values
                .into_iter()
                .filter(|v| v.chars().count() >= MIN_SECRET_LEN && v != REDACTED),
        );
    }

    /// `text` with every known value and every non-allowed environment value replaced by
    /// [`REDACTED`].
    pub fn scrub(&self, text: &str) -> String {
        // Longest first, so a secret that contains another is replaced whole.
        let mut secrets: Vec<&String> = self.secrets.iter().collect();
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        let mut out = text.to_owned();
        for s in secrets {
            if out.contains(s.as_str()) {
                out = out.replace(s.as_str(), REDACTED);
            }
        }
        redact_assignments(&out)
    }
}

/// Whether `c` may come right before an environment assignment.
fn starts_token(c: char) -> bool {
    c.is_whitespace() || "\"'[,({;".contains(c)
}

/// Whether `c` ends an assignment's value.
fn ends_value(c: char) -> bool {
    c.is_whitespace() || "\"'],)};\\".contains(c)
}

/// Whether `name` looks like an environment variable: upper case, digits and `_`, not
/// starting with a digit, at least one letter.
fn env_like(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().any(|c| c.is_ascii_uppercase())
        && name
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
}

/// Replaces the value of every `NAME=value` token whose `NAME` is env-like and not in
/// [`ENV_ALLOW`].
fn redact_assignments(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        let at_token = i == 0 || starts_token(chars[i - 1]);
        if at_token {
            let mut j = i;
            while j < chars.len() && (chars[j].is_ascii_alphanumeric() || chars[j] == '_') {
                j += 1;
            }
            if j < chars.len() && chars[j] == '=' {
                let name: String = chars[i..j].iter().collect();
                let mut k = j + 1;
                while k < chars.len() && !ends_value(chars[k]) {
                    k += 1;
                }
                let value: String = chars[j + 1..k].iter().collect();
                if env_like(&name)
                    && !env_allowed(&name)
                    && !TEXT_NAME_ALLOW.contains(&name.as_str())
                    && !value.is_empty()
                    && value != REDACTED
                {
                    out.push_str(&name);
                    out.push('=');
                    out.push_str(REDACTED);
                    i = k;
                    continue;
                }
            }
        }
        out.push(chars[i]);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn spec_keys_stay_and_values_outside_the_allow_lists_go() {
        let mut spec = json!({
            "ociVersion": "1.1.0",
            "process": {"env": ["PATH=/usr/bin:/bin", "API_TOKEN=hunter2-secret", "EMPTY=", "JUSTNAME"]},
            "annotations": {
                "io.kubernetes.cri.sandbox-id": "abc",
                "io.katacontainers.config.hypervisor.default_memory": "512",
                "io.kubernetes.cri-o.Annotations": "{\"pw\":\"x\"}",
                "example.com/password": "s3cr3t-value",
                "io.kubernetes.pod.name": "web"
            },
            "hooks": {"prestart": [{"path": "/bin/hook", "env": ["HOOK_KEY=hook-secret", "HOME=/root"]}]}
        });
        let mut removed = redact_spec(&mut spec);
        removed.sort();
        assert_eq!(
            removed,
            [
                "hook-secret",
                "hunter2-secret",
                "s3cr3t-value",
                "{\"pw\":\"x\"}"
            ]
        );
        assert_eq!(
            spec["process"]["env"],
            json!([
                "PATH=/usr/bin:/bin",
                "API_TOKEN=<redacted>",
                "EMPTY=",
                "JUSTNAME"
            ])
        );
        let a = &spec["annotations"];
        assert_eq!(a["io.kubernetes.cri.sandbox-id"], "abc");
        assert_eq!(
            a["io.katacontainers.config.hypervisor.default_memory"],
            "512"
        );
        assert_eq!(a["io.kubernetes.pod.name"], "web");
        assert_eq!(a["example.com/password"], REDACTED);
        assert_eq!(a["io.kubernetes.cri-o.Annotations"], REDACTED);
        assert_eq!(
            spec["hooks"]["prestart"][0]["env"],
            json!(["HOOK_KEY=<redacted>", "HOME=/root"])
        );
    }

    #[test]
    fn non_specs_are_left_alone() {
        let mut v = json!(["a", 1]);
        assert!(redact_spec(&mut v).is_empty());
        assert_eq!(v, json!(["a", 1]));
        let mut v = json!({"annotations": "not a map", "process": {"env": "nope"}});
        assert!(redact_spec(&mut v).is_empty());
    }

    #[test]
    fn known_values_are_replaced_everywhere_longest_first() {
        let mut s = Scrubber::default();
        s.add([
            "s3cr3t".to_owned(),
            "s3cr3t-long".to_owned(),
            "ab".to_owned(),
        ]);
        assert_eq!(
            s.scrub("msg=\"x s3cr3t-long y\" other=s3cr3t ab"),
            "msg=\"x <redacted> y\" other=<redacted> ab",
            "values shorter than MIN_SECRET_LEN stay"
        );
    }

    #[test]
    fn env_assignments_in_free_text_are_redacted_unless_allowed() {
        let s = Scrubber::default();
        assert_eq!(
            s.scrub("env=[\"PATH=/bin\", \"DB_PASSWORD=pw1\"] TOKEN=abc,HOME=/root"),
            "env=[\"PATH=/bin\", \"DB_PASSWORD=<redacted>\"] TOKEN=<redacted>,HOME=/root"
        );
        // logfmt keys are lower case and stay; an escaped quote ends a value.
        assert_eq!(
            s.scrub("level=info msg=\"spec\" vmconsole=\"X_1=v\\\" ok\""),
            "level=info msg=\"spec\" vmconsole=\"X_1=<redacted>\\\" ok\""
        );
        // Not at a token start, or not env-like: untouched.
        assert_eq!(s.scrub("aFOO=bar 1A=b Mixed=x"), "aFOO=bar 1A=b Mixed=x");
        assert_eq!(s.scrub("FOO= FOO=<redacted>"), "FOO= FOO=<redacted>");
        // Journal fields are not environment variables.
        assert_eq!(
            s.scrub("journalctl SANDBOX_ID=abc"),
            "journalctl SANDBOX_ID=abc"
        );
    }
}
