//! The adaptor's configuration file (TOML, default [`DEFAULT_CONFIG`]). Unknown keys are
//! refused by name; every value is checked once here.
//!
//! ```toml
//! socket = "/run/peerpod/hypervisor.sock"   # the hypervisor.Hypervisor ttrpc socket
//! pods_dir = "/run/peerpod/pods"             # <pods_dir>/<sandbox id>/agent.ttrpc
//! state_dir = "/var/lib/peerpod"             # CA, pod records
//! proxy_timeout_secs = 300                   # StartVM: how long the agent may take to answer
//! vxlan_port = 4789
//! vxlan_min_vni = 555000
//! limit_per_node = 10                        # live pod VMs per node; negative: no limit
//! provider = "local"
//!
//! [kubernetes]                               # the node's kata.peerpods.io/vm capacity
//! advertise_capacity = true                  # when an API server is configured
//! api_server = ""                            # host:port; "": KUBERNETES_SERVICE_HOST/PORT
//! node_name = ""                             # "": NODE_NAME
//! service_account_dir = "/var/run/secrets/kubernetes.io/serviceaccount"
//! withdraw_capacity_on_shutdown = false
//!
//! [registries]                               # handed to every pod VM
//! insecure = ["192.168.122.1:5000"]          # plain HTTP
//! auth_file = "/etc/peerpod/auth.json"       # docker config.json format
//! ca_file = ""                               # extra CA certificates (PEM)
//!
//! [local]                                    # the local QEMU provider
//! qemu = "/usr/bin/qemu-system-x86_64"
//! accel = "auto"
//! instances_dir = "/run/peerpod/local"
//! bridge = "peerpod0"
//! subnet = "192.168.222.0/24"                # the bridge takes .1, instances .2 and up
//! mtu = 1550                                 # pod MTU + 50 (VXLAN) must fit
//! default_image = "default"
//! images = { default = "/usr/share/kata-containers/podvm" }
//! instance_types = { small = { vcpus = 1, memory_mib = 1024 }, medium = { vcpus = 2, memory_mib = 4096 } }
//! allowed_instance_types = []                # []: every instance type
//! default_instance_type = "small"
//! ```

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kata_hypervisor::Accel;
use serde::Deserialize;

use crate::sizing::Catalogue;

/// Where the adaptor reads its configuration by default.
pub const DEFAULT_CONFIG: &str = "/etc/kata-containers/peerpod-adaptor.toml";

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("read {}", .0.display())]
    Read(PathBuf, #[source] std::io::Error),
    #[error("{}", .0.display())]
    Parse(PathBuf, #[source] toml::de::Error),
    #[error("{key} = {value:?}: {expected}")]
    Invalid {
        key: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("{key}: {value:?} is not an instance type of local.instance_types ({known})")]
    Unknown {
        key: &'static str,
        value: String,
        known: String,
    },
    #[error("provider {0:?} is not known (expected \"local\")")]
    Provider(String),
}

fn invalid(key: &'static str, value: impl ToString, expected: &'static str) -> ConfigError {
    ConfigError::Invalid {
        key,
        value: value.to_string(),
        expected,
    }
}

/// A named instance size (`[local] instance_types`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceType {
    pub vcpus: u32,
    pub memory_mib: u32,
}

/// Registry settings handed to every pod VM.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistriesConfig {
    /// `host` or `host:port` pulled over plain HTTP.
    pub insecure: Vec<String>,
    /// A docker-style auth file; empty: anonymous pulls.
    pub auth_file: PathBuf,
    /// Extra CA certificates (PEM) for registries served over HTTPS; empty: none.
    pub ca_file: PathBuf,
}

/// The local provider: pod VMs as QEMU processes on this host.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LocalConfig {
    pub qemu: PathBuf,
    pub accel: String,
    pub instances_dir: PathBuf,
    pub bridge: String,
    pub subnet: String,
    pub mtu: u32,
    pub default_image: String,
    pub images: BTreeMap<String, PathBuf>,
    pub instance_types: BTreeMap<String, InstanceType>,
    pub allowed_instance_types: Vec<String>,
    pub default_instance_type: String,
}

impl Default for LocalConfig {
    fn default() -> Self {
        Self {
            qemu: PathBuf::from("/usr/bin/qemu-system-x86_64"),
            accel: "auto".into(),
            instances_dir: PathBuf::from("/run/peerpod/local"),
            bridge: "peerpod0".into(),
            subnet: "192.168.222.0/24".into(),
            mtu: 1550,
            default_image: "default".into(),
            images: BTreeMap::from([(
                "default".to_owned(),
                PathBuf::from("/usr/share/kata-containers/podvm"),
            )]),
            instance_types: BTreeMap::from([
                (
                    "small".to_owned(),
                    InstanceType {
                        vcpus: 1,
                        memory_mib: 1024,
                    },
                ),
                (
                    "medium".to_owned(),
                    InstanceType {
                        vcpus: 2,
                        memory_mib: 4096,
                    },
                ),
            ]),
            allowed_instance_types: Vec::new(),
            default_instance_type: "small".into(),
        }
    }
}

/// Where the node's `kata.peerpods.io/vm` capacity is advertised.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KubernetesConfig {
    /// Advertise when an API server is configured (here or in the environment).
    pub advertise_capacity: bool,
    /// `host:port` of the API server; empty: `KUBERNETES_SERVICE_HOST`/`_PORT`.
    pub api_server: String,
    /// The node's name; empty: `NODE_NAME`.
    pub node_name: String,
    /// `token` and `ca.crt` of the service account the adaptor acts as.
    pub service_account_dir: PathBuf,
    /// Remove the capacity when the adaptor stops (it is set again at the next start).
    pub withdraw_capacity_on_shutdown: bool,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        Self {
            advertise_capacity: true,
            api_server: String::new(),
            node_name: String::new(),
            service_account_dir: PathBuf::from(
                kata_peerpods_k8s::node_capacity::SERVICE_ACCOUNT_DIR,
            ),
            withdraw_capacity_on_shutdown: false,
        }
    }
}

/// The file as written.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawConfig {
    socket: PathBuf,
    pods_dir: PathBuf,
    state_dir: PathBuf,
    proxy_timeout_secs: u64,
    vxlan_port: u32,
    vxlan_min_vni: u32,
    limit_per_node: i64,
    provider: String,
    registries: RegistriesConfig,
    kubernetes: KubernetesConfig,
    local: LocalConfig,
}

impl Default for RawConfig {
    fn default() -> Self {
        Self {
            socket: PathBuf::from("/run/peerpod/hypervisor.sock"),
            pods_dir: PathBuf::from("/run/peerpod/pods"),
            state_dir: PathBuf::from("/var/lib/peerpod"),
            proxy_timeout_secs: 300,
            vxlan_port: 4789,
            vxlan_min_vni: 555_000,
            limit_per_node: 10,
            provider: "local".into(),
            registries: RegistriesConfig::default(),
            kubernetes: KubernetesConfig::default(),
            local: LocalConfig::default(),
        }
    }
}

/// A subnet the local provider hands addresses from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet {
    pub network: Ipv4Addr,
    pub prefix: u8,
}

impl Subnet {
    /// The bridge's (the node's) address: the first host address.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1)
    }

    /// Instance addresses: the second host address up to the last before broadcast.
    pub fn hosts(&self) -> impl Iterator<Item = Ipv4Addr> {
        let base = u32::from(self.network);
        let size = 1u32 << (32 - self.prefix);
        (2..size - 1).map(move |i| Ipv4Addr::from(base + i))
    }

    fn parse(s: &str) -> Result<Self, ConfigError> {
        let bad = || {
            invalid(
                "local.subnet",
                s,
                "an IPv4 network a.b.c.d/N with N in 16..=29",
            )
        };
        let (ip, prefix) = s.split_once('/').ok_or_else(bad)?;
        let ip: Ipv4Addr = ip.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        if !(16..=29).contains(&prefix) || u32::from(ip) & ((1u32 << (32 - prefix)) - 1) != 0 {
            return Err(bad());
        }
        Ok(Subnet {
            network: ip,
            prefix,
        })
    }
}

/// The local provider's checked settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalSettings {
    pub qemu: PathBuf,
    pub accel: Accel,
    pub instances_dir: PathBuf,
    pub bridge: String,
    pub subnet: Subnet,
    pub mtu: u32,
    pub default_image: String,
    pub images: BTreeMap<String, PathBuf>,
}

/// The API server named in the configuration (`[kubernetes] api_server`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiServerAddress {
    pub host: String,
    pub port: u16,
}

/// The checked `[kubernetes]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubernetesSettings {
    pub advertise_capacity: bool,
    /// `None`: from the environment.
    pub api_server: Option<ApiServerAddress>,
    /// `None`: from the environment.
    pub node_name: Option<String>,
    pub service_account_dir: PathBuf,
    pub withdraw_capacity_on_shutdown: bool,
}

/// The adaptor's checked configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdaptorConfig {
    pub socket: PathBuf,
    pub pods_dir: PathBuf,
    pub state_dir: PathBuf,
    pub proxy_timeout: Duration,
    pub vxlan_port: u16,
    pub vxlan_min_vni: u32,
    /// Live pod VMs on this node; negative: no limit.
    pub limit_per_node: i64,
    pub registries: RegistriesConfig,
    pub kubernetes: KubernetesSettings,
    pub local: LocalSettings,
    /// The provider's instance types, the allowed ones and the default.
    pub sizing: Catalogue,
}

impl AdaptorConfig {
    /// Reads and checks the file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.to_owned(), e))?;
        Self::parse(path, &text)
    }

    /// Parses and checks `text` (read from `path`, for messages).
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig =
            toml::from_str(text).map_err(|e| ConfigError::Parse(path.to_owned(), e))?;
        Self::check(raw)
    }

    /// The built-in defaults.
    pub fn defaults() -> Self {
        Self::check(RawConfig::default()).expect("the defaults are valid")
    }

    fn check(raw: RawConfig) -> Result<Self, ConfigError> {
        if raw.provider != "local" {
            return Err(ConfigError::Provider(raw.provider));
        }
        for (key, p) in [
            ("socket", &raw.socket),
            ("pods_dir", &raw.pods_dir),
            ("state_dir", &raw.state_dir),
            ("local.instances_dir", &raw.local.instances_dir),
            ("local.qemu", &raw.local.qemu),
        ] {
            if !p.is_absolute() {
                return Err(invalid(key, p.display(), "an absolute path"));
            }
        }
        if raw.proxy_timeout_secs == 0 {
            return Err(invalid("proxy_timeout_secs", 0, "at least 1"));
        }
        let vxlan_port = u16::try_from(raw.vxlan_port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| invalid("vxlan_port", raw.vxlan_port, "a UDP port 1..=65535"))?;
        if raw.vxlan_min_vni == 0 || raw.vxlan_min_vni >= (1 << 24) - 4096 {
            return Err(invalid(
                "vxlan_min_vni",
                raw.vxlan_min_vni,
                "a VNI in 1..16773120 (4096 above it must stay below 2^24)",
            ));
        }
        let l = raw.local;
        let accel = l
            .accel
            .parse::<Accel>()
            .map_err(|_| invalid("local.accel", &l.accel, "auto, kvm or tcg"))?;
        let bridge_ok = !l.bridge.is_empty()
            && l.bridge.len() < 16
            && l.bridge
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !bridge_ok {
            return Err(invalid(
                "local.bridge",
                &l.bridge,
                "an interface name of 1-15 letters, digits, '-' or '_'",
            ));
        }
        let subnet = Subnet::parse(&l.subnet)?;
        if !(1280..=65535).contains(&l.mtu) {
            return Err(invalid("local.mtu", l.mtu, "an MTU in 1280..=65535"));
        }
        if !l.images.contains_key(&l.default_image) {
            return Err(invalid(
                "local.default_image",
                &l.default_image,
                "a name defined in local.images",
            ));
        }
        for dir in l.images.values() {
            if !dir.is_absolute() {
                return Err(invalid(
                    "local.images",
                    dir.display(),
                    "absolute directories",
                ));
            }
        }
        let sizing = check_sizing(&l)?;
        let kubernetes = check_kubernetes(raw.kubernetes)?;
        Ok(Self {
            socket: raw.socket,
            pods_dir: raw.pods_dir,
            state_dir: raw.state_dir,
            proxy_timeout: Duration::from_secs(raw.proxy_timeout_secs),
            vxlan_port,
            vxlan_min_vni: raw.vxlan_min_vni,
            limit_per_node: raw.limit_per_node,
            registries: raw.registries,
            kubernetes,
            sizing,
            local: LocalSettings {
                qemu: l.qemu,
                accel,
                instances_dir: l.instances_dir,
                bridge: l.bridge,
                subnet,
                mtu: l.mtu,
                default_image: l.default_image,
                images: l.images,
            },
        })
    }
}

/// The most vCPUs a local pod VM may have (QEMU's q35 machine without an IOMMU).
const MAX_LOCAL_VCPUS: u32 = 255;

/// Instance type names as clouds spell them (`Standard_B2als_v2`, `t3.medium`, `bx2-2x8`).
fn is_type_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// The local provider's instance types, allow-list and default.
fn check_sizing(l: &LocalConfig) -> Result<Catalogue, ConfigError> {
    if l.instance_types.is_empty() {
        return Err(invalid(
            "local.instance_types",
            "{}",
            "at least one instance type, e.g. { small = { vcpus = 1, memory_mib = 1024 } }",
        ));
    }
    for (name, t) in &l.instance_types {
        if !is_type_name(name) {
            return Err(invalid(
                "local.instance_types",
                name,
                "names of 1-64 letters, digits, '-', '_' or '.'",
            ));
        }
        if t.vcpus == 0 || t.vcpus > MAX_LOCAL_VCPUS {
            return Err(invalid(
                "local.instance_types",
                format!("{name} = {{ vcpus = {} }}", t.vcpus),
                "vcpus in 1..=255",
            ));
        }
        if t.memory_mib < 256 || t.memory_mib > 1 << 20 {
            return Err(invalid(
                "local.instance_types",
                format!("{name} = {{ memory_mib = {} }}", t.memory_mib),
                "memory_mib in 256..=1048576",
            ));
        }
    }
    let known = || {
        l.instance_types
            .keys()
            .cloned()
            .collect::<Vec<_>>()
            .join(", ")
    };
    for name in &l.allowed_instance_types {
        if !l.instance_types.contains_key(name) {
            return Err(ConfigError::Unknown {
                key: "local.allowed_instance_types",
                value: name.clone(),
                known: known(),
            });
        }
    }
    let d = &l.default_instance_type;
    if !l.instance_types.contains_key(d) {
        return Err(ConfigError::Unknown {
            key: "local.default_instance_type",
            value: d.clone(),
            known: known(),
        });
    }
    if !l.allowed_instance_types.is_empty() && !l.allowed_instance_types.contains(d) {
        return Err(invalid(
            "local.default_instance_type",
            d,
            "one of local.allowed_instance_types",
        ));
    }
    Ok(Catalogue::new(
        l.instance_types.clone(),
        &l.allowed_instance_types,
        d,
    ))
}

/// The `[kubernetes]` section.
fn check_kubernetes(k: KubernetesConfig) -> Result<KubernetesSettings, ConfigError> {
    let api_server = if k.api_server.is_empty() {
        None
    } else {
        let bad = || {
            invalid(
                "kubernetes.api_server",
                &k.api_server,
                "host:port (an IPv6 address in brackets), without a scheme",
            )
        };
        let (host, port) = k.api_server.rsplit_once(':').ok_or_else(bad)?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port: u16 = port.parse().ok().filter(|p| *p != 0).ok_or_else(bad)?;
        if host.is_empty() || host.contains(['/', ' ']) {
            return Err(bad());
        }
        Some(ApiServerAddress {
            host: host.to_owned(),
            port,
        })
    };
    if !k.service_account_dir.is_absolute() {
        return Err(invalid(
            "kubernetes.service_account_dir",
            k.service_account_dir.display(),
            "an absolute path",
        ));
    }
    Ok(KubernetesSettings {
        advertise_capacity: k.advertise_capacity,
        api_server,
        node_name: (!k.node_name.is_empty()).then_some(k.node_name),
        service_account_dir: k.service_account_dir,
        withdraw_capacity_on_shutdown: k.withdraw_capacity_on_shutdown,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<AdaptorConfig, ConfigError> {
        AdaptorConfig::parse(Path::new("t.toml"), text)
    }

    #[test]
    fn defaults_and_overrides() {
        let d = parse("").unwrap();
        assert_eq!(d, AdaptorConfig::defaults());
        assert_eq!(d.socket, Path::new("/run/peerpod/hypervisor.sock"));
        assert_eq!(d.local.subnet.gateway(), Ipv4Addr::new(192, 168, 222, 1));
        assert_eq!(
            d.local.subnet.hosts().next(),
            Some(Ipv4Addr::new(192, 168, 222, 2))
        );
        assert_eq!(d.local.subnet.hosts().count(), 253);
        let c = parse(
            r#"
            vxlan_port = 9000
            [registries]
            insecure = ["10.0.0.1:5000"]
            [local]
            subnet = "10.77.0.0/28"
            images = { podvm = "/opt/podvm" }
            default_image = "podvm"
            instance_types = { small = { vcpus = 1, memory_mib = 512 } }
            "#,
        )
        .unwrap();
        assert_eq!(c.vxlan_port, 9000);
        assert_eq!(c.local.subnet.hosts().count(), 13);
        assert_eq!(c.registries.insecure, ["10.0.0.1:5000"]);
        assert_eq!(c.sizing.allowed(), ["small"]);
        assert_eq!(d.limit_per_node, 10);
        assert_eq!(d.sizing.allowed(), ["small", "medium"]);
        assert_eq!(d.sizing.default_type(), "small");
        assert!(d.kubernetes.advertise_capacity && d.kubernetes.api_server.is_none());
    }

    #[test]
    fn sizing_limit_and_kubernetes_settings() {
        let c = parse(
            r#"
            limit_per_node = -1
            [kubernetes]
            api_server = "[fd00::1]:6443"
            node_name = "worker-1"
            withdraw_capacity_on_shutdown = true
            [local]
            instance_types = { a = { vcpus = 1, memory_mib = 512 }, b = { vcpus = 2, memory_mib = 768 }, c = { vcpus = 4, memory_mib = 4096 } }
            allowed_instance_types = ["b", "a"]
            default_instance_type = "b"
            "#,
        )
        .unwrap();
        assert_eq!(c.limit_per_node, -1);
        assert_eq!(c.sizing.allowed(), ["a", "b"]);
        assert_eq!(c.sizing.default_type(), "b");
        assert_eq!(
            c.kubernetes.api_server,
            Some(ApiServerAddress {
                host: "fd00::1".into(),
                port: 6443
            })
        );
        assert_eq!(c.kubernetes.node_name.as_deref(), Some("worker-1"));
        assert!(c.kubernetes.withdraw_capacity_on_shutdown);
    }

    /// The example installed by hack/install-peerpod.sh parses and states the defaults.
    #[test]
    fn the_shipped_example_is_valid() {
        let c = parse(include_str!("../../hack/peerpod/peerpod-adaptor.toml")).unwrap();
        let d = AdaptorConfig::defaults();
        assert_eq!(c.socket, d.socket);
        assert_eq!(c.local.subnet, d.local.subnet);
        assert_eq!(c.sizing.allowed(), ["small", "medium"]);
        assert_eq!(c.limit_per_node, d.limit_per_node);
        assert_eq!(c.kubernetes, d.kubernetes);
    }

    #[test]
    fn bad_values_are_named() {
        for (text, needle) in [
            ("sockets = \"/x\"", "sockets"),
            ("socket = \"rel\"", "socket"),
            ("provider = \"aws\"", "aws"),
            ("vxlan_port = 70000", "vxlan_port"),
            ("[local]\nsubnet = \"10.0.0.1/24\"", "local.subnet"),
            (
                "[local]\nbridge = \"a-very-long-bridge-name\"",
                "local.bridge",
            ),
            ("[local]\ndefault_image = \"nope\"", "local.default_image"),
            ("[local]\naccel = \"xen\"", "local.accel"),
            ("[local]\nmtu = 100", "local.mtu"),
            ("[local]\ninstance_types = {}", "local.instance_types"),
            (
                "[local]\ninstance_types = { \"a b\" = { vcpus = 1, memory_mib = 512 } }",
                "\"a b\"",
            ),
            (
                "[local]\ninstance_types = { zero = { vcpus = 0, memory_mib = 512 } }",
                "zero = { vcpus = 0 }",
            ),
            (
                "[local]\ninstance_types = { wee = { vcpus = 1, memory_mib = 64 } }",
                "wee = { memory_mib = 64 }",
            ),
            (
                "[local]\nallowed_instance_types = [\"small\", \"huge\"]",
                "local.allowed_instance_types: \"huge\" is not an instance type of local.instance_types (medium, small)",
            ),
            (
                "[local]\ndefault_instance_type = \"huge\"",
                "local.default_instance_type: \"huge\"",
            ),
            (
                "[local]\nallowed_instance_types = [\"medium\"]",
                "local.default_instance_type = \"small\": one of local.allowed_instance_types",
            ),
            ("limit_per_node = \"ten\"", "limit_per_node"),
            (
                "[kubernetes]\napi_server = \"https://10.0.0.1\"",
                "kubernetes.api_server",
            ),
            (
                "[kubernetes]\nservice_account_dir = \"sa\"",
                "kubernetes.service_account_dir",
            ),
        ] {
            let e = parse(text).unwrap_err();
            let msg = format!(
                "{e} {:?}",
                std::error::Error::source(&e).map(|s| s.to_string())
            );
            assert!(msg.contains(needle), "{text}: {msg}");
        }
    }
}
