//! Accelerator detection: KVM when it really works, TCG otherwise.
//!
//! `/dev/kvm` can exist on hosts where KVM is useless (nested paravirtual KVM without
//! vmx/svm: guests barely move). [`Accel::Auto`] therefore picks KVM only when `/dev/kvm`
//! answers `KVM_GET_API_VERSION` with 12, `KVM_CREATE_VM` succeeds, and the CPU flags in
//! `/proc/cpuinfo` contain `vmx` or `svm`. The decision itself ([`choose`]) is pure.

use std::fs::File;
use std::os::fd::AsRawFd;

use crate::config::Accel;

/// The KVM API version every usable kernel reports.
const KVM_API_VERSION: libc::c_int = 12;
/// `_IO(KVMIO, 0x00)`.
const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;
/// `_IO(KVMIO, 0x01)`.
const KVM_CREATE_VM: libc::c_ulong = 0xAE01;

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
    /// `/dev/kvm` answered the API version and VM creation ioctls; `Err` says why not.
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
            kvm: probe_kvm(),
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

/// Opens `/dev/kvm`, checks the API version and creates (and drops) a VM.
fn probe_kvm() -> Result<(), String> {
    let kvm = File::options()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
    // SAFETY: KVM_GET_API_VERSION takes no argument and only returns an int; the fd is a
    // valid open /dev/kvm descriptor for the duration of the call.
    let version = unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_GET_API_VERSION, 0) };
    if version != KVM_API_VERSION {
        return Err(format!(
            "KVM_GET_API_VERSION returned {version}, expected {KVM_API_VERSION}"
        ));
    }
    // SAFETY: KVM_CREATE_VM takes the machine type by value (0 = default) and returns a
    // new fd or -1; no memory is passed to the kernel.
    let vm_fd = unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_CREATE_VM, 0) };
    if vm_fd < 0 {
        return Err(format!(
            "KVM_CREATE_VM failed: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: vm_fd was just returned by the kernel and is owned by nobody else.
    unsafe { libc::close(vm_fd) };
    Ok(())
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

    #[test]
    fn forced_choices() {
        assert_eq!(choose(Accel::Tcg, &caps(true, INTEL)).unwrap(), Accel::Tcg);
        assert_eq!(choose(Accel::Kvm, &caps(true, NESTED)).unwrap(), Accel::Kvm);
        let err = choose(Accel::Kvm, &caps(false, INTEL)).unwrap_err();
        assert!(err.to_string().contains("no /dev/kvm"), "{err}");
    }
}
