//! What the webhook mutates: the target runtime class and the namespaces it leaves alone.
//!
//! Validated once here, at start: a runtime class name must be a DNS subdomain and every
//! namespace a DNS label, as Kubernetes requires of them; a bad value is named.

use std::collections::BTreeSet;

/// The runtime class of peer pods when `TARGET_RUNTIMECLASS` is not set.
pub const DEFAULT_RUNTIME_CLASS: &str = "kata-remote";

/// The namespaces skipped when `SKIP_NAMESPACES` is not set (the webhook's own namespace
/// is always skipped as well).
pub const DEFAULT_SKIP_NAMESPACES: &str = "kube-system,kube-public,kube-node-lease";

/// A configuration value that is not what Kubernetes allows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("runtime class {0:?} is not a valid name (lowercase letters, digits, '-' and '.', at most 253)")]
    RuntimeClass(String),
    #[error("namespace {0:?} in the skipped namespaces is not a valid namespace name (lowercase letters, digits and '-', at most 63)")]
    Namespace(String),
}

/// The webhook's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    target_runtime_class: String,
    skip_namespaces: BTreeSet<String>,
}

impl Config {
    /// `skip_namespaces` is a comma-separated list (spaces around names are ignored, an
    /// empty list skips nothing); `own_namespace`, the namespace the webhook runs in, is
    /// always skipped.
    pub fn new(
        target_runtime_class: &str,
        skip_namespaces: &str,
        own_namespace: Option<&str>,
    ) -> Result<Self, ConfigError> {
        if !is_dns_subdomain(target_runtime_class) {
            return Err(ConfigError::RuntimeClass(target_runtime_class.to_owned()));
        }
        let mut skip = BTreeSet::new();
        let listed = skip_namespaces
            .split(',')
            .map(str::trim)
            .filter(|name| !name.is_empty());
        for name in listed.chain(own_namespace.map(str::trim)) {
            if !is_dns_label(name) {
                return Err(ConfigError::Namespace(name.to_owned()));
            }
            skip.insert(name.to_owned());
        }
        Ok(Self {
            target_runtime_class: target_runtime_class.to_owned(),
            skip_namespaces: skip,
        })
    }

    /// The runtime class whose pods are mutated.
    pub fn target_runtime_class(&self) -> &str {
        &self.target_runtime_class
    }

    /// Whether pods in `namespace` are left alone.
    pub fn skips_namespace(&self, namespace: &str) -> bool {
        self.skip_namespaces.contains(namespace)
    }

    /// The namespaces left alone, sorted.
    pub fn skipped_namespaces(&self) -> impl Iterator<Item = &str> {
        self.skip_namespaces.iter().map(String::as_str)
    }
}

impl Default for Config {
    fn default() -> Self {
        Self::new(DEFAULT_RUNTIME_CLASS, DEFAULT_SKIP_NAMESPACES, None)
            .expect("the defaults are valid")
    }
}

/// An RFC 1123 label: what namespaces are.
fn is_dns_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// An RFC 1123 subdomain: what runtime class names are.
fn is_dns_subdomain(name: &str) -> bool {
    !name.is_empty() && name.len() <= 253 && name.split('.').all(is_dns_label)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let config = Config::default();
        assert_eq!(config.target_runtime_class(), "kata-remote");
        assert_eq!(
            config.skipped_namespaces().collect::<Vec<_>>(),
            ["kube-node-lease", "kube-public", "kube-system"]
        );
        assert!(!config.skips_namespace("default"));
    }

    #[test]
    fn own_namespace_is_always_skipped() {
        let config = Config::new("kata-remote", "", Some("peerpods")).unwrap();
        assert_eq!(
            config.skipped_namespaces().collect::<Vec<_>>(),
            ["peerpods"]
        );
        let config = Config::new("kata-remote", " a , b,, ", Some("c")).unwrap();
        assert_eq!(
            config.skipped_namespaces().collect::<Vec<_>>(),
            ["a", "b", "c"]
        );
    }

    #[test]
    fn bad_values_are_named() {
        assert_eq!(
            Config::new("", "", None).unwrap_err(),
            ConfigError::RuntimeClass(String::new())
        );
        assert_eq!(
            Config::new("Kata_Remote", "", None).unwrap_err(),
            ConfigError::RuntimeClass("Kata_Remote".to_owned())
        );
        assert_eq!(
            Config::new("kata-remote", "kube-system,Kube System", None).unwrap_err(),
            ConfigError::Namespace("Kube System".to_owned())
        );
        assert_eq!(
            Config::new("kata-remote", "", Some("a.b")).unwrap_err(),
            ConfigError::Namespace("a.b".to_owned())
        );
        assert!(Config::new("kata.remote-2", "", None).is_ok());
    }
}
