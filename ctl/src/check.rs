//! `kata-ctl check`: can this node run VM sandboxes?
//!
//! The checks Kata's `check` makes on x86_64: CPU vendor and flags (`vmx` or `svm`, `lm`,
//! `sse4_1`), kernel modules (`kvm` and `kvm_intel` or `kvm_amd`, `vhost`, `vhost_net`;
//! `vhost_vsock` only warned about: without it the shim uses hybrid vsock), `/dev/kvm`
//! (API version, `KVM_CREATE_VM`, the capabilities QEMU needs, through
//! [`kata_hypervisor::accel::KvmProbe`]) and whether the host is itself a VM (a warning:
//! nested virtualization is not supported for production). Nothing on the host is changed:
//! a missing module is reported, not loaded.
//!
//! [`Facts::gather`] reads the host; [`evaluate`] is pure and gives every check a verdict
//! and a reason, and which accelerator `accel = "auto"` picks here.

use std::collections::BTreeMap;
use std::path::Path;

use kata_hypervisor::accel::{self, HostCaps, KvmProbe};
use kata_hypervisor::Accel;
use kata_shim::report::chain;
use serde::Serialize;

use crate::host::{CpuInfo, HostError, HostRoot, Module, Vendor};
use crate::nfd;

/// The last line when every required check passed.
pub const CAPABLE: &str = "System is capable of running Kata Containers";
/// The last line when a required check failed.
pub const NOT_CAPABLE: &str = "ERROR: System is not capable of running Kata Containers";

/// The modules the checks look at, with the parameters read for each.
const MODULES: [(&str, &[&str]); 6] = [
    ("kvm", &[]),
    ("kvm_intel", &["unrestricted_guest", "nested"]),
    ("kvm_amd", &["nested"]),
    ("vhost", &[]),
    ("vhost_net", &[]),
    ("vhost_vsock", &[]),
];

/// A check's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    /// Worth knowing, but the node can run sandboxes.
    Warn,
    /// The node cannot run sandboxes (with KVM) until this is fixed.
    Fail,
}

impl Status {
    fn label(self) -> &'static str {
        match self {
            Status::Pass => "PASS",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
        }
    }
}

/// One check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// Stable name, e.g. `cpu.vmx`, `module.vhost_net`, `kvm.create_vm`.
    pub id: String,
    /// What is checked.
    pub description: String,
    pub status: Status,
    /// Why: what was found, and for a failure what to do.
    pub detail: String,
}

/// All checks and the verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    pub capable: bool,
    /// [`CAPABLE`] or [`NOT_CAPABLE`].
    pub verdict: &'static str,
    pub cpu_vendor: String,
    pub cpu_model: String,
    /// What `accel = "auto"` resolves to on this host: `kvm` or `tcg`.
    pub accel_auto: String,
    pub checks: Vec<Check>,
    pub notes: Vec<String>,
    /// What `--nfd` did to the feature file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nfd: Option<nfd::Outcome>,
}

/// Errors of `kata-ctl check` (a failed check is not one: it is in the [`Report`]).
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("cannot read the host's facts")]
    Host(#[source] HostError),
    #[error("cannot update the NFD feature file")]
    Nfd(#[source] nfd::NfdError),
}

/// Checks `host`; with `nfd_dir`, writes or removes the NFD feature file there.
pub fn run(host: &HostRoot, nfd_dir: Option<&Path>) -> Result<Report, CheckError> {
    let facts = Facts::gather(host).map_err(CheckError::Host)?;
    let mut report = evaluate(&facts);
    if let Some(dir) = nfd_dir {
        report.nfd = Some(nfd::apply(dir, report.capable).map_err(CheckError::Nfd)?);
    }
    Ok(report)
}

/// What the checks are decided on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    pub cpu: CpuInfo,
    /// The modules of [`MODULES`] present in `/sys/module`.
    pub modules: BTreeMap<String, Module>,
    pub kvm: KvmProbe,
}

impl Facts {
    /// Reads `host` and probes this host's `/dev/kvm`.
    pub fn gather(host: &HostRoot) -> Result<Facts, HostError> {
        let cpu = host.cpuinfo()?;
        let modules = MODULES
            .iter()
            .filter_map(|(name, params)| Some(((*name).to_owned(), host.module(name, params)?)))
            .collect();
        Ok(Facts {
            cpu,
            modules,
            kvm: KvmProbe::run(),
        })
    }
}

/// Decides every check from `facts`.
pub fn evaluate(facts: &Facts) -> Report {
    let mut checks = Vec::new();
    let cpu = &facts.cpu;
    let vendor = cpu.vendor();
    let nested = cpu.running_nested();

    checks.push(match vendor {
        Vendor::Intel | Vendor::Amd => check(
            "cpu.vendor",
            "x86_64 CPU from Intel or AMD",
            Status::Pass,
            format!("{} ({})", cpu.vendor_id, cpu.model),
        ),
        Vendor::Other => check(
            "cpu.vendor",
            "x86_64 CPU from Intel or AMD",
            Status::Fail,
            format!(
                "vendor {:?} is neither GenuineIntel nor AuthenticAMD",
                cpu.vendor_id
            ),
        ),
    });

    let virt_flag = vendor.virt_flag().unwrap_or("vmx|svm");
    let has_virt = match vendor.virt_flag() {
        Some(flag) => cpu.has(flag),
        None => cpu.has("vmx") || cpu.has("svm"),
    };
    checks.push(flag_check(
        virt_flag,
        match vendor {
            Vendor::Intel => "hardware virtualization (Intel VT-x)",
            Vendor::Amd => "hardware virtualization (AMD-V)",
            Vendor::Other => "hardware virtualization",
        },
        has_virt,
        if nested {
            "this host is a VM whose hypervisor does not pass hardware virtualization \
             through (enable nested virtualization there)"
        } else {
            "enable VT-x / AMD-V in the firmware"
        },
    ));
    checks.push(flag_check(
        "lm",
        "64-bit CPU",
        cpu.has("lm"),
        "a 64-bit CPU is required",
    ));
    checks.push(flag_check(
        "sse4_1",
        "SSE4.1",
        cpu.has("sse4_1"),
        "the guest kernel needs SSE4.1",
    ));

    checks.push(module_check(
        facts,
        "kvm",
        "Kernel-based Virtual Machine",
        true,
    ));
    match vendor.kvm_module() {
        Some(name) => checks.push(vendor_module_check(facts, name, vendor, nested)),
        None => checks.push(check(
            "module.kvm_intel|kvm_amd",
            "the vendor's KVM module",
            Status::Fail,
            "unknown CPU vendor: neither kvm_intel nor kvm_amd applies".to_owned(),
        )),
    }
    checks.push(module_check(
        facts,
        "vhost",
        "host kernel accelerator for virtio",
        true,
    ));
    checks.push(module_check(
        facts,
        "vhost_net",
        "host kernel accelerator for virtio network",
        true,
    ));
    checks.push(module_check(
        facts,
        "vhost_vsock",
        "host support for VM sockets (vhost-vsock)",
        false,
    ));

    kvm_checks(&facts.kvm, &mut checks);

    checks.push(if nested {
        let offered = facts
            .modules
            .iter()
            .filter_map(|(name, m)| Some(format!("{name} nested={}", m.parameters.get("nested")?)))
            .collect::<Vec<_>>();
        let mut detail = "the CPU flag `hypervisor` says this host is itself a VM: nested \
                          virtualization is not supported for production"
            .to_owned();
        if !offered.is_empty() {
            detail.push_str(&format!(" ({})", offered.join(", ")));
        }
        check(
            "host.nested",
            "bare metal, not a nested VM",
            Status::Warn,
            detail,
        )
    } else {
        check(
            "host.nested",
            "bare metal, not a nested VM",
            Status::Pass,
            "no `hypervisor` CPU flag: bare metal".to_owned(),
        )
    });

    let capable = checks.iter().all(|c| c.status != Status::Fail);
    let caps = HostCaps {
        kvm: facts.kvm.usable().map_err(|e| chain(&e)),
        hw_virt: cpu.has("vmx") || cpu.has("svm"),
    };
    let accel_auto = match accel::choose(Accel::Auto, &caps) {
        Ok(a) => a,
        Err(_) => Accel::Tcg,
    };
    let mut notes = Vec::new();
    if accel_auto == Accel::Tcg {
        notes.push(
            "accel = \"auto\" falls back to TCG (software emulation) on this host: guests \
             run, slowly; TCG is for development only, not for production"
                .to_owned(),
        );
    } else {
        notes.push("accel = \"auto\" uses KVM on this host".to_owned());
    }
    Report {
        capable,
        verdict: if capable { CAPABLE } else { NOT_CAPABLE },
        cpu_vendor: cpu.vendor_id.clone(),
        cpu_model: cpu.model.clone(),
        accel_auto: accel_auto.to_string(),
        checks,
        notes,
        nfd: None,
    }
}

fn check(id: &str, description: &str, status: Status, detail: String) -> Check {
    Check {
        id: id.to_owned(),
        description: description.to_owned(),
        status,
        detail,
    }
}

fn flag_check(flag: &str, description: &str, present: bool, remedy: &str) -> Check {
    if present {
        check(
            &format!("cpu.{flag}"),
            description,
            Status::Pass,
            format!("CPU flag {flag} present"),
        )
    } else {
        check(
            &format!("cpu.{flag}"),
            description,
            Status::Fail,
            format!("CPU flag {flag} missing: {remedy}"),
        )
    }
}

fn module_check(facts: &Facts, name: &str, description: &str, required: bool) -> Check {
    let id = format!("module.{name}");
    if facts.modules.contains_key(name) {
        return check(
            &id,
            description,
            Status::Pass,
            format!("/sys/module/{name} present"),
        );
    }
    let (status, consequence) = if required {
        (Status::Fail, "")
    } else {
        (
            Status::Warn,
            "; the shim uses hybrid vsock through vhost-device-vsock instead",
        )
    };
    check(
        &id,
        description,
        status,
        format!("no /sys/module/{name}: not loaded (modprobe {name}){consequence}"),
    )
}

/// `kvm_intel` / `kvm_amd`; on Intel outside a VM also `unrestricted_guest=Y`, Kata's test
/// for a CPU new enough (Westmere or later).
fn vendor_module_check(facts: &Facts, name: &str, vendor: Vendor, nested: bool) -> Check {
    let description = match vendor {
        Vendor::Intel => "Intel KVM",
        _ => "AMD KVM",
    };
    let mut result = module_check(facts, name, description, true);
    if let (Some(module), Vendor::Intel, false) = (facts.modules.get(name), vendor, nested) {
        match module
            .parameters
            .get("unrestricted_guest")
            .map(String::as_str)
        {
            Some("Y") | Some("1") => result.detail.push_str(", unrestricted_guest=Y"),
            Some(other) => {
                result.status = Status::Fail;
                result.detail = format!(
                    "kvm_intel parameter unrestricted_guest={other}: the CPU lacks VMX \
                     unrestricted guest mode (older than Westmere?)"
                );
            }
            None => {}
        }
    }
    result
}

fn kvm_checks(probe: &KvmProbe, checks: &mut Vec<Check>) {
    let open = "/dev/kvm opens and speaks KVM API version 12";
    let create = "KVM_CREATE_VM creates a VM";
    match probe {
        KvmProbe::Unavailable(e) => {
            checks.push(check("kvm.open", open, Status::Fail, chain(e)));
            checks.push(check(
                "kvm.create_vm",
                create,
                Status::Fail,
                "not tried: /dev/kvm is not usable".to_owned(),
            ));
        }
        KvmProbe::Opened {
            create_vm,
            capabilities,
        } => {
            checks.push(check(
                "kvm.open",
                open,
                Status::Pass,
                "KVM_GET_API_VERSION = 12".to_owned(),
            ));
            checks.push(match create_vm {
                Ok(()) => check(
                    "kvm.create_vm",
                    create,
                    Status::Pass,
                    "created and closed a VM".to_owned(),
                ),
                Err(e) => check("kvm.create_vm", create, Status::Fail, chain(e)),
            });
            for cap in capabilities {
                let id = format!(
                    "kvm.{}",
                    cap.name.trim_start_matches("KVM_CAP_").to_ascii_lowercase()
                );
                let (status, detail) = if cap.present {
                    (Status::Pass, format!("{} supported", cap.name))
                } else {
                    (
                        Status::Fail,
                        format!("{} not supported by this kernel", cap.name),
                    )
                };
                checks.push(check(
                    &id,
                    &format!("KVM capability: {}", cap.what),
                    status,
                    detail,
                ));
            }
        }
    }
}

impl Report {
    /// The checks that failed, by id.
    pub fn failed(&self) -> Vec<&str> {
        self.checks
            .iter()
            .filter(|c| c.status == Status::Fail)
            .map(|c| c.id.as_str())
            .collect()
    }

    /// The human-readable report: one line per check, notes, the verdict last.
    pub fn render(&self) -> String {
        let mut out = format!("CPU: {} ({})\n", self.cpu_model, self.cpu_vendor);
        let width = self.checks.iter().map(|c| c.id.len()).max().unwrap_or(0);
        for c in &self.checks {
            out.push_str(&format!(
                "{}  {:width$}  {}: {}\n",
                c.status.label(),
                c.id,
                c.description,
                c.detail
            ));
        }
        for note in &self.notes {
            out.push_str(&format!("note: {note}\n"));
        }
        if let Some(nfd) = &self.nfd {
            out.push_str(&nfd.render());
            out.push('\n');
        }
        let failed = self.failed();
        if !failed.is_empty() {
            out.push_str(&format!("failed: {}\n", failed.join(", ")));
        }
        out.push_str(self.verdict);
        out.push('\n');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::parse_cpuinfo;
    use kata_hypervisor::accel::{KvmCapability, KvmError, KvmOsError};

    fn kvm_ok() -> KvmProbe {
        KvmProbe::Opened {
            create_vm: Ok(()),
            capabilities: ["KVM_CAP_USER_MEMORY", "KVM_CAP_IRQCHIP"]
                .iter()
                .map(|&name| KvmCapability {
                    name,
                    what: "x",
                    present: true,
                })
                .collect(),
        }
    }

    fn facts(cpuinfo: &str, modules: &[(&str, &[(&str, &str)])], kvm: KvmProbe) -> Facts {
        Facts {
            cpu: parse_cpuinfo(cpuinfo).unwrap(),
            modules: modules
                .iter()
                .map(|(name, params)| {
                    let parameters = params
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect();
                    ((*name).to_owned(), Module { parameters })
                })
                .collect(),
            kvm,
        }
    }

    const INTEL: &str = "vendor_id : GenuineIntel\nmodel name : Xeon\nflags : vmx lm sse4_1\n";
    const ALL_INTEL: &[(&str, &[(&str, &str)])] = &[
        ("kvm", &[]),
        ("kvm_intel", &[("unrestricted_guest", "Y")]),
        ("vhost", &[]),
        ("vhost_net", &[]),
        ("vhost_vsock", &[]),
    ];

    fn status(report: &Report, id: &str) -> Status {
        report
            .checks
            .iter()
            .find(|c| c.id == id)
            .unwrap_or_else(|| panic!("no check {id}"))
            .status
    }

    #[test]
    fn a_capable_intel_host_passes_everything() {
        let report = evaluate(&facts(INTEL, ALL_INTEL, kvm_ok()));
        assert!(report.capable, "{}", report.render());
        assert!(report.checks.iter().all(|c| c.status == Status::Pass));
        assert_eq!(report.accel_auto, "kvm");
        assert!(report.render().ends_with(&format!("{CAPABLE}\n")));
        assert_eq!(status(&report, "kvm.user_memory"), Status::Pass);
    }

    #[test]
    fn missing_vhost_vsock_and_nesting_only_warn() {
        let nested = "vendor_id : GenuineIntel\nflags : vmx lm sse4_1 hypervisor\n";
        let modules: Vec<_> = ALL_INTEL
            .iter()
            .filter(|(n, _)| *n != "vhost_vsock")
            .map(|&(n, _)| (n, &[("unrestricted_guest", "N"), ("nested", "1")][..]))
            .collect();
        let report = evaluate(&facts(nested, &modules, kvm_ok()));
        assert!(report.capable, "{}", report.render());
        assert_eq!(status(&report, "module.vhost_vsock"), Status::Warn);
        assert_eq!(status(&report, "host.nested"), Status::Warn);
        assert_eq!(
            status(&report, "module.kvm_intel"),
            Status::Pass,
            "unrestricted_guest is not required when nested"
        );
        let nested_check = report
            .checks
            .iter()
            .find(|c| c.id == "host.nested")
            .unwrap();
        assert!(
            nested_check.detail.contains("kvm_intel nested=1"),
            "{nested_check:?}"
        );
    }

    #[test]
    fn unrestricted_guest_n_fails_on_metal() {
        let modules: Vec<_> = ALL_INTEL
            .iter()
            .map(|&(n, p)| {
                if n == "kvm_intel" {
                    (n, &[("unrestricted_guest", "N")][..])
                } else {
                    (n, p)
                }
            })
            .collect();
        let report = evaluate(&facts(INTEL, &modules, kvm_ok()));
        assert!(!report.capable);
        assert_eq!(report.failed(), ["module.kvm_intel"]);
    }

    #[test]
    fn a_nested_amd_host_without_svm_is_not_capable_and_uses_tcg() {
        // This development host: KVM answers, but no svm, no kvm_amd, no vhost modules.
        let cpu = "vendor_id : AuthenticAMD\nmodel name : AMD EPYC\nflags : lm sse4_1 hypervisor\n";
        let report = evaluate(&facts(cpu, &[("kvm", &[])], kvm_ok()));
        assert!(!report.capable);
        assert_eq!(
            report.failed(),
            [
                "cpu.svm",
                "module.kvm_amd",
                "module.vhost",
                "module.vhost_net"
            ]
        );
        assert_eq!(report.accel_auto, "tcg");
        let text = report.render();
        assert!(text.contains("TCG is for development only"), "{text}");
        assert!(text.contains("failed: cpu.svm, module.kvm_amd"), "{text}");
        assert!(text.ends_with(&format!("{NOT_CAPABLE}\n")), "{text}");
    }

    #[test]
    fn unusable_kvm_fails_its_checks_with_the_reason() {
        let enoent = KvmOsError::new(libc::ENOENT);
        let probe = KvmProbe::Unavailable(KvmError::Open(enoent));
        let report = evaluate(&facts(INTEL, ALL_INTEL, probe));
        assert_eq!(report.failed(), ["kvm.open", "kvm.create_vm"]);
        let open = report.checks.iter().find(|c| c.id == "kvm.open").unwrap();
        assert!(
            open.detail.starts_with("cannot open /dev/kvm: "),
            "{open:?}"
        );
        assert_eq!(report.accel_auto, "tcg");

        let missing = KvmProbe::Opened {
            create_vm: Ok(()),
            capabilities: vec![KvmCapability {
                name: "KVM_CAP_SET_TSS_ADDR",
                what: "the TSS address",
                present: false,
            }],
        };
        let report = evaluate(&facts(INTEL, ALL_INTEL, missing));
        assert_eq!(report.failed(), ["kvm.set_tss_addr"]);
    }

    #[test]
    fn unknown_vendor_fails() {
        let cpu = "vendor_id : HygonGenuine\nflags : svm lm sse4_1\n";
        let report = evaluate(&facts(cpu, ALL_INTEL, kvm_ok()));
        assert_eq!(report.failed(), ["cpu.vendor", "module.kvm_intel|kvm_amd"]);
        assert_eq!(status(&report, "cpu.vmx|svm"), Status::Pass);
    }

    #[test]
    fn json_has_the_checks_and_verdict() {
        let report = evaluate(&facts(INTEL, ALL_INTEL, kvm_ok()));
        let json: serde_json::Value = serde_json::to_value(&report).unwrap();
        assert_eq!(json["capable"], true);
        assert_eq!(json["verdict"], CAPABLE);
        assert_eq!(json["checks"][0]["id"], "cpu.vendor");
        assert_eq!(json["checks"][0]["status"], "pass");
    }
}
