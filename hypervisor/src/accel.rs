//! Accelerator detection: KVM when it really works, TCG otherwise.
//!
//! `/dev/kvm` can exist on hosts where KVM is useless (nested paravirtual KVM without
//! vmx/svm: guests barely move). [`Accel::Auto`] therefore picks KVM only when
//! [`KvmProbe`] finds `/dev/kvm` usable (API version 12, `KVM_CREATE_VM` succeeds, the
//! capabilities QEMU needs are present) and the CPU flags in `/proc/cpuinfo` contain `vmx`
//! or `svm`. The probe talks to KVM through the `kvm-ioctls` crate; the decision itself
//! ([`choose`]) is pure. `kata-ctl check` reports the same probe step by step.

use kvm_ioctls::{Cap, Kvm};

/// The errno a failed KVM ioctl or open returns.
pub use kvm_ioctls::Error as KvmOsError;

use crate::config::Accel;

/// The KVM API version every usable kernel reports.
pub const KVM_API_VERSION: i32 = 12;

/// The KVM capabilities QEMU needs on x86_64, as (capability, name, what QEMU uses it for).
const REQUIRED_CAPABILITIES: [(Cap, &str, &str); 4] = [
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY", "guest memory slots"),
    (
        Cap::SetTssAddr,
        "KVM_CAP_SET_TSS_ADDR",
        "the TSS address of x86 guests",
    ),
    (
        Cap::ExtCpuid,
        "KVM_CAP_EXT_CPUID",
        "extended CPUID for vCPUs",
    ),
    (
        Cap::Irqchip,
        "KVM_CAP_IRQCHIP",
        "the in-kernel interrupt controller",
    ),
];

/// Why KVM is not usable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KvmError {
    #[error("cannot open /dev/kvm")]
    Open(#[source] KvmOsError),
    #[error("KVM_GET_API_VERSION returned {0}, expected {KVM_API_VERSION}")]
    ApiVersion(i32),
    #[error("KVM_CREATE_VM failed")]
    CreateVm(#[source] KvmOsError),
    #[error("KVM lacks {name} ({what})")]
    MissingCapability {
        name: &'static str,
        what: &'static str,
    },
}

/// One KVM capability QEMU needs, and whether `/dev/kvm` offers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvmCapability {
    /// The kernel's name, e.g. `KVM_CAP_USER_MEMORY`.
    pub name: &'static str,
    /// What QEMU needs it for.
    pub what: &'static str,
    pub present: bool,
}

/// What `/dev/kvm` answered, step by step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvmProbe {
    /// `/dev/kvm` cannot be opened or speaks another API version.
    Unavailable(KvmError),
    /// `/dev/kvm` opened with API version [`KVM_API_VERSION`].
    Opened {
        /// The result of `KVM_CREATE_VM` (the VM is closed again at once).
        create_vm: Result<(), KvmError>,
        /// `KVM_CHECK_EXTENSION` for each capability QEMU needs.
        capabilities: Vec<KvmCapability>,
    },
}

impl KvmProbe {
    /// Asks this host's `/dev/kvm`. Blocking (a few ioctls): call it from a blocking context.
    pub fn run() -> KvmProbe {
        let kvm = match Kvm::new() {
            Ok(kvm) => kvm,
            Err(e) => return KvmProbe::Unavailable(KvmError::Open(e)),
        };
        let version = kvm.get_api_version();
        if version != KVM_API_VERSION {
            return KvmProbe::Unavailable(KvmError::ApiVersion(version));
        }
        // The VM fd is dropped (closed) at once: creating it is the test.
        let create_vm = kvm.create_vm().map(drop).map_err(KvmError::CreateVm);
        let capabilities = REQUIRED_CAPABILITIES
            .iter()
            .map(|&(cap, name, what)| KvmCapability {
                name,
                what,
                present: kvm.check_extension(cap),
            })
            .collect();
        KvmProbe::Opened {
            create_vm,
            capabilities,
        }
    }

    /// `Ok` when QEMU can use KVM; else the first failed step.
    pub fn usable(&self) -> Result<(), KvmError> {
        match self {
            KvmProbe::Unavailable(e) => Err(*e),
            KvmProbe::Opened {
                create_vm,
                capabilities,
            } => {
                create_vm.as_ref().map_err(|e| *e)?;
                match capabilities.iter().find(|c| !c.present) {
                    Some(c) => Err(KvmError::MissingCapability {
                        name: c.name,
                        what: c.what,
                    }),
                    None => Ok(()),
                }
            }
        }
    }
}

/// An error and its causes on one line (`a: b: c`).
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Errors resolving the accelerator.
#[derive(Debug, thiserror::Error)]
pub enum AccelError {
    /// `kvm` was forced but KVM is not usable.
    #[error("accelerator kvm requested but KVM is not usable: {reason}")]
    KvmUnusable { reason: String },
}

/// What the host offers, as far as the accelerator choice goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostCaps {
    /// [`KvmProbe::usable`]; `Err` says why not.
    pub kvm: Result<(), String>,
    /// The CPU flags contain `vmx` or `svm`.
    pub hw_virt: bool,
}

impl HostCaps {
    /// Probes this host. Blocking (opens `/dev/kvm`, reads `/proc/cpuinfo`): call it from
    /// a blocking context.
    pub fn probe() -> HostCaps {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        HostCaps {
            kvm: KvmProbe::run().usable().map_err(|e| chain(&e)),
            hw_virt: cpuinfo_has_hw_virt(&cpuinfo),
        }
    }
}

/// Resolves `requested` to [`Accel::Kvm`] or [`Accel::Tcg`] given the host's capabilities.
pub fn choose(requested: Accel, caps: &HostCaps) -> Result<Accel, AccelError> {
    match requested {
        Accel::Tcg => Ok(Accel::Tcg),
        Accel::Kvm => match &caps.kvm {
            Ok(()) => Ok(Accel::Kvm),
            Err(reason) => Err(AccelError::KvmUnusable {
                reason: reason.clone(),
            }),
        },
        Accel::Auto => match (&caps.kvm, caps.hw_virt) {
            (Ok(()), true) => Ok(Accel::Kvm),
            (Ok(()), false) => {
                tracing::warn!(
                    "/dev/kvm works but the CPU flags show no vmx/svm (nested paravirtual KVM?): \
                     using TCG, guests will be slow"
                );
                Ok(Accel::Tcg)
            }
            (Err(reason), _) => {
                tracing::warn!(%reason, "KVM is not usable: using TCG, guests will be slow");
                Ok(Accel::Tcg)
            }
        },
    }
}

/// Whether any `flags` line of `/proc/cpuinfo` text lists `vmx` or `svm`.
pub fn cpuinfo_has_hw_virt(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter_map(|line| line.split_once(':'))
        .filter(|(key, _)| key.trim() == "flags")
        .any(|(_, flags)| flags.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTEL: &str = "processor\t: 0\nflags\t\t: fpu vme de pse tsc msr vmx sse4_1 lm\n";
    const AMD: &str = "processor\t: 0\nflags\t\t: fpu svm lm\n";
    const NESTED: &str = "processor\t: 0\nflags\t\t: fpu vme hypervisor lm\nvmx flags\t: none\n";

    fn caps(kvm: bool, cpuinfo: &str) -> HostCaps {
        HostCaps {
            kvm: if kvm {
                Ok(())
            } else {
                Err("no /dev/kvm".into())
            },
            hw_virt: cpuinfo_has_hw_virt(cpuinfo),
        }
    }

    #[test]
    fn cpuinfo_flags() {
        assert!(cpuinfo_has_hw_virt(INTEL));
        assert!(cpuinfo_has_hw_virt(AMD));
        assert!(!cpuinfo_has_hw_virt(NESTED));
        assert!(!cpuinfo_has_hw_virt(""));
        assert!(!cpuinfo_has_hw_virt("flags : vmxfoo svmbar\n"));
    }

    #[test]
    fn auto_needs_working_kvm_and_hw_virt() {
        assert_eq!(choose(Accel::Auto, &caps(true, INTEL)).unwrap(), Accel::Kvm);
        assert_eq!(
            choose(Accel::Auto, &caps(true, NESTED)).unwrap(),
            Accel::Tcg
        );
        assert_eq!(
            choose(Accel::Auto, &caps(false, INTEL)).unwrap(),
            Accel::Tcg
        );
    }

    fn opened(create_vm: Result<(), KvmError>, missing: Option<&str>) -> KvmProbe {
        KvmProbe::Opened {
            create_vm,
            capabilities: REQUIRED_CAPABILITIES
                .iter()
                .map(|&(_, name, what)| KvmCapability {
                    name,
                    what,
                    present: Some(name) != missing,
                })
                .collect(),
        }
    }

    #[test]
    fn kvm_is_usable_only_when_every_step_passed() {
        assert_eq!(opened(Ok(()), None).usable(), Ok(()));
        let enoent = kvm_ioctls::Error::new(libc::ENOENT);
        let err = KvmProbe::Unavailable(KvmError::Open(enoent))
            .usable()
            .unwrap_err();
        assert_eq!(
            chain(&err),
            format!("cannot open /dev/kvm: {enoent}"),
            "the cause is kept"
        );
        assert_eq!(
            KvmProbe::Unavailable(KvmError::ApiVersion(11)).usable(),
            Err(KvmError::ApiVersion(11))
        );
        let eperm = kvm_ioctls::Error::new(libc::EPERM);
        assert_eq!(
            opened(Err(KvmError::CreateVm(eperm)), None).usable(),
            Err(KvmError::CreateVm(eperm))
        );
        let err = opened(Ok(()), Some("KVM_CAP_IRQCHIP"))
            .usable()
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "KVM lacks KVM_CAP_IRQCHIP (the in-kernel interrupt controller)"
        );
    }

    #[test]
    fn forced_choices() {
        assert_eq!(choose(Accel::Tcg, &caps(true, INTEL)).unwrap(), Accel::Tcg);
        assert_eq!(choose(Accel::Kvm, &caps(true, NESTED)).unwrap(), Accel::Kvm);
        let err = choose(Accel::Kvm, &caps(false, INTEL)).unwrap_err();
        assert!(err.to_string().contains("no /dev/kvm"), "{err}");
    }
}
