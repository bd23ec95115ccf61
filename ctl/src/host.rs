//! The host facts the node checks read: `/proc/cpuinfo` and `/sys/module`.
//!
//! Both are read under a [`HostRoot`], `/` normally. Tests point it at a fake tree
//! (`<root>/proc/cpuinfo`, `<root>/sys/module/<name>/parameters/<param>`) to show what a
//! capable or an incapable host looks like; `/dev/kvm` is always the real device.
//! Modules are looked up in `/sys/module`, not `/proc/modules`: a module built into the
//! kernel has a `/sys/module` entry but no `/proc/modules` line.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Errors reading host facts.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("cannot read {}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} has no flags line", .path.display())]
    NoFlags { path: PathBuf },
}

/// Where `/proc` and `/sys` are found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRoot {
    root: PathBuf,
}

impl Default for HostRoot {
    fn default() -> Self {
        Self::real()
    }
}

impl HostRoot {
    /// This host.
    pub fn real() -> Self {
        Self {
            root: PathBuf::from("/"),
        }
    }

    /// A fake tree (tests).
    pub fn at(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// Whether this is the real host (`/`).
    pub fn is_real(&self) -> bool {
        self.root == Path::new("/")
    }

    /// `<root>/proc/cpuinfo`.
    pub fn cpuinfo_path(&self) -> PathBuf {
        self.root.join("proc/cpuinfo")
    }

    /// `<root>/sys/module`.
    pub fn modules_dir(&self) -> PathBuf {
        self.root.join("sys/module")
    }

    /// Reads and parses the CPU description.
    pub fn cpuinfo(&self) -> Result<CpuInfo, HostError> {
        let path = self.cpuinfo_path();
        let text = std::fs::read_to_string(&path).map_err(|source| HostError::Read {
            path: path.clone(),
            source,
        })?;
        parse_cpuinfo(&text).ok_or(HostError::NoFlags { path })
    }

    /// The module `name` when the kernel has it (loaded or built in), with the
    /// `parameters` asked for that exist.
    pub fn module(&self, name: &str, parameters: &[&str]) -> Option<Module> {
        let dir = self.modules_dir().join(name);
        if !dir.is_dir() {
            return None;
        }
        let parameters = parameters
            .iter()
            .filter_map(|p| {
                let value = std::fs::read_to_string(dir.join("parameters").join(p)).ok()?;
                Some(((*p).to_owned(), value.trim().to_owned()))
            })
            .collect();
        Some(Module { parameters })
    }
}

/// A kernel module present in `/sys/module`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Module {
    /// The parameters read, by name (e.g. `unrestricted_guest` -> `Y`).
    pub parameters: BTreeMap<String, String>,
}

/// The CPU as `/proc/cpuinfo` describes its first processor.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CpuInfo {
    /// `vendor_id`, e.g. `GenuineIntel`.
    pub vendor_id: String,
    /// `model name`.
    pub model: String,
    pub flags: BTreeSet<String>,
}

/// The CPU vendors the checks know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vendor {
    Intel,
    Amd,
    Other,
}

impl Vendor {
    /// The CPU flag of hardware virtualization (`vmx`, `svm`).
    pub fn virt_flag(self) -> Option<&'static str> {
        match self {
            Vendor::Intel => Some("vmx"),
            Vendor::Amd => Some("svm"),
            Vendor::Other => None,
        }
    }

    /// The vendor's KVM module (`kvm_intel`, `kvm_amd`).
    pub fn kvm_module(self) -> Option<&'static str> {
        match self {
            Vendor::Intel => Some("kvm_intel"),
            Vendor::Amd => Some("kvm_amd"),
            Vendor::Other => None,
        }
    }
}

impl CpuInfo {
    pub fn has(&self, flag: &str) -> bool {
        self.flags.contains(flag)
    }

    pub fn vendor(&self) -> Vendor {
        match self.vendor_id.as_str() {
            "GenuineIntel" => Vendor::Intel,
            "AuthenticAMD" => Vendor::Amd,
            _ => Vendor::Other,
        }
    }

    /// The CPU flags say this host is itself a virtual machine.
    pub fn running_nested(&self) -> bool {
        self.has("hypervisor")
    }
}

/// Parses `/proc/cpuinfo` text: the first processor's vendor, model and flags; `None`
/// without a `flags` line.
pub fn parse_cpuinfo(text: &str) -> Option<CpuInfo> {
    let mut info = CpuInfo::default();
    let mut flags = None;
    for (key, value) in text.lines().filter_map(|l| l.split_once(':')) {
        let value = value.trim();
        match key.trim() {
            "vendor_id" if info.vendor_id.is_empty() => info.vendor_id = value.to_owned(),
            "model name" if info.model.is_empty() => info.model = value.to_owned(),
            "flags" if flags.is_none() => {
                flags = Some(value.split_whitespace().map(str::to_owned).collect());
            }
            _ => {}
        }
    }
    info.flags = flags?;
    Some(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO_CPUS: &str = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R)\n\
        flags\t\t: fpu vmx lm sse4_1\nvmx flags\t: ept vpid\n\n\
        processor\t: 1\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R)\nflags\t\t: fpu\n";

    #[test]
    fn cpuinfo_takes_the_first_processor() {
        let cpu = parse_cpuinfo(TWO_CPUS).unwrap();
        assert_eq!(cpu.vendor_id, "GenuineIntel");
        assert_eq!(cpu.vendor(), Vendor::Intel);
        assert_eq!(cpu.model, "Intel(R) Xeon(R)");
        assert!(cpu.has("vmx") && cpu.has("lm") && cpu.has("sse4_1"));
        assert!(!cpu.has("ept"), "`vmx flags` is not `flags`");
        assert!(!cpu.running_nested());
    }

    #[test]
    fn cpuinfo_vendors_and_nesting() {
        let amd = parse_cpuinfo("vendor_id : AuthenticAMD\nflags : svm hypervisor\n").unwrap();
        assert_eq!(amd.vendor(), Vendor::Amd);
        assert_eq!(amd.vendor().virt_flag(), Some("svm"));
        assert_eq!(amd.vendor().kvm_module(), Some("kvm_amd"));
        assert!(amd.running_nested());
        let other = parse_cpuinfo("vendor_id : HygonGenuine\nflags : svm\n").unwrap();
        assert_eq!(other.vendor(), Vendor::Other);
        assert_eq!(other.vendor().virt_flag(), None);
        assert_eq!(parse_cpuinfo("vendor_id : GenuineIntel\n"), None);
        assert_eq!(parse_cpuinfo(""), None);
    }

    #[test]
    fn modules_and_parameters_come_from_sys_module() {
        let root = tempfile::tempdir().unwrap();
        let params = root.path().join("sys/module/kvm_intel/parameters");
        std::fs::create_dir_all(&params).unwrap();
        std::fs::write(params.join("unrestricted_guest"), "Y\n").unwrap();
        std::fs::create_dir_all(root.path().join("sys/module/kvm")).unwrap();
        let host = HostRoot::at(root.path());
        assert!(!host.is_real());
        let kvm_intel = host
            .module("kvm_intel", &["unrestricted_guest", "nested"])
            .unwrap();
        assert_eq!(
            kvm_intel
                .parameters
                .get("unrestricted_guest")
                .map(String::as_str),
            Some("Y")
        );
        assert!(!kvm_intel.parameters.contains_key("nested"));
        assert_eq!(host.module("kvm", &[]), Some(Module::default()));
        assert_eq!(host.module("vhost", &[]), None);
        let err = host.cpuinfo().unwrap_err();
        assert!(err.to_string().contains("proc/cpuinfo"), "{err}");
    }
}
