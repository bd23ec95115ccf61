//! The guest kernel has what the agent, containers and the rest of the runtime rely on.
//!
//! Our kernel (`hack/build-guest.sh`, the default) is checked through the configuration
//! embedded in the built `vmlinux` itself (CONFIG_IKCONFIG), so the test speaks for the
//! binary the VMs boot, not for a file next to it; every option must be built in (`=y`:
//! the kernel has no modules). With `--kernel debian` the package's configuration is
//! checked, where a module (`=m`) is enough since the initrd carries modules.

use std::path::Path;
use std::process::{Command, Stdio};

use kata_tests::{GuestImage, KernelFlavour};

/// Every option the guest needs, with who needs it.
const REQUIRED: &[(&str, &str)] = &[
    // Booting and the VM's devices.
    ("PVH", "QEMU boots the uncompressed vmlinux directly"),
    ("SERIAL_8250_CONSOLE", "the console the shim reads"),
    ("VIRTIO_PCI", "every virtio device"),
    ("VIRTIO_VSOCKETS", "the agent's ttrpc and stdio over vsock"),
    ("VIRTIO_FS", "the shared directory (kataShared)"),
    ("VIRTIO_NET", "pod network interfaces"),
    ("VIRTIO_BLK", "block devices"),
    ("VIRTIO_PMEM", "the root filesystem image"),
    ("FS_DAX", "the root image read in place"),
    ("EROFS_FS", "the root image's filesystem"),
    ("BLK_DEV_INITRD", "the initrd boot path"),
    ("HW_RANDOM_VIRTIO", "entropy for TLS"),
    ("VIRTIO_BALLOON", "free page reporting"),
    ("PAGE_REPORTING", "free page reporting"),
    ("VIRTIO_MEM", "virtio-mem memory hotplug"),
    ("ACPI_HOTPLUG_MEMORY", "hot-added pc-DIMMs"),
    ("MEMORY_HOTPLUG", "hot-added pc-DIMMs"),
    ("ACPI_HOTPLUG_CPU", "hot-added vCPUs"),
    ("HOTPLUG_CPU", "hot-added vCPUs"),
    ("RTC_DRV_CMOS", "wall clock for peer pods and TLS"),
    ("PVPANIC", "guest panics reported to QEMU"),
    ("PVPANIC_MMIO", "QEMU's ISA pvpanic device (ACPI QEMU0001)"),
    ("MAGIC_SYSRQ", "panic and dump on request"),
    ("KVM_GUEST", "production KVM hosts"),
    ("PARAVIRT", "production KVM hosts"),
    ("PARAVIRT_CLOCK", "kvm-clock"),
    ("NO_HZ_IDLE", "no timer ticks on idle vCPUs"),
    // Containers.
    ("CGROUPS", "container cgroups (v2)"),
    ("MEMCG", "memory controller, memory.events, OOM"),
    ("CGROUP_SCHED", "cpu controller"),
    ("CFS_BANDWIDTH", "cpu.max"),
    ("CGROUP_PIDS", "pids controller"),
    ("BLK_CGROUP", "io controller"),
    ("CPUSETS", "cpuset controller"),
    ("CGROUP_BPF", "the device cgroup program"),
    ("BPF_SYSCALL", "the device cgroup program"),
    ("INOTIFY_USER", "OOM events (inotify on memory.events)"),
    (
        "MEMFD_CREATE",
        "the container helper's plan in a sealed memfd",
    ),
    (
        "TASK_IO_ACCOUNTING",
        "/proc/<pid>/io for the agent's metrics",
    ),
    ("NAMESPACES", "container namespaces"),
    ("USER_NS", "user namespaces"),
    ("PID_NS", "pid namespaces"),
    ("NET_NS", "network namespaces"),
    ("IPC_NS", "ipc namespaces"),
    ("UTS_NS", "uts namespaces"),
    ("SECCOMP", "container seccomp profiles"),
    ("SECCOMP_FILTER", "container seccomp profiles"),
    ("OVERLAY_FS", "container root filesystems"),
    ("TMPFS", "/run, /dev/shm, tmpfs volumes"),
    ("DEVTMPFS", "/dev"),
    ("UNIX98_PTYS", "terminals (devpts)"),
    ("POSIX_MQUEUE", "POSIX message queues"),
    ("SYSVIPC", "System V IPC"),
    ("UNIX", "unix sockets"),
    ("INET", "IPv4"),
    ("IPV6", "IPv6"),
    // Networking in the pod.
    ("VXLAN", "peer pods' tunnel"),
    ("BRIDGE", "bridges in the guest"),
    ("VETH", "veth pairs in the guest"),
    ("TUN", "tun devices in the guest"),
    ("NF_TABLES", "nftables"),
    ("NFT_COMPAT", "iptables-nft with xt matches"),
    ("NF_CONNTRACK", "conntrack"),
    ("NF_NAT", "NAT"),
    ("IP_NF_IPTABLES", "iptables (legacy)"),
    ("IP_NF_NAT", "the iptables nat table"),
    ("NETFILTER_XT_TARGET_REDIRECT", "service-mesh REDIRECT"),
    ("NETFILTER_XT_MATCH_OWNER", "service-mesh owner match"),
    ("NETFILTER_XT_MATCH_CONNTRACK", "conntrack match"),
    ("IP6_NF_IPTABLES", "ip6tables"),
    ("IP6_NF_NAT", "the ip6tables nat table"),
];

/// Options that must stay out of our kernel.
const EXCLUDED: &[(&str, &str)] = &[
    ("MODULES", "everything is built in"),
    ("DEBUG_INFO_BTF", "no BTF"),
    ("DEBUG_INFO_DWARF5", "no debug info"),
    ("DEBUG_INFO_DWARF4", "no debug info"),
];

/// The configuration embedded in a vmlinux between the IKCFG_ST and IKCFG_ED markers,
/// gzip-compressed.
fn embedded_config(vmlinux: &Path) -> String {
    let bytes = std::fs::read(vmlinux).unwrap();
    let find = |needle: &[u8]| {
        bytes
            .windows(needle.len())
            .position(|w| w == needle)
            .unwrap_or_else(|| {
                panic!(
                    "{} has no {} marker (CONFIG_IKCONFIG off?)",
                    vmlinux.display(),
                    String::from_utf8_lossy(needle)
                )
            })
    };
    let start = find(b"IKCFG_ST") + 8;
    let end = find(b"IKCFG_ED");
    assert!(start < end, "IKCFG markers out of order");
    let mut gzip = Command::new("gzip")
        .arg("-dc")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("gzip runs");
    let mut stdin = gzip.stdin.take().unwrap();
    let data = bytes[start..end].to_vec();
    let writer = std::thread::spawn(move || std::io::Write::write_all(&mut stdin, &data));
    let out = gzip.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(
        out.status.success(),
        "gzip -dc of the embedded config failed"
    );
    String::from_utf8(out.stdout).unwrap()
}

fn value<'a>(config: &'a str, option: &str) -> Option<&'a str> {
    let prefix = format!("CONFIG_{option}=");
    config.lines().find_map(|l| l.strip_prefix(prefix.as_str()))
}

#[test]
fn guest_kernel_has_the_required_options() {
    let image = GuestImage::find();
    let (config, allowed): (String, &[&str]) = match image.flavour {
        KernelFlavour::Kata => {
            let config = embedded_config(&image.kernel);
            // The copy next to it is the same configuration.
            let file = std::fs::read_to_string(image.kernel_config.as_ref().unwrap()).unwrap();
            let lines = |t: &str| -> Vec<String> {
                t.lines()
                    .filter(|l| l.starts_with("CONFIG_"))
                    .map(str::to_owned)
                    .collect()
            };
            assert_eq!(
                lines(&config),
                lines(&file),
                "kernel.config differs from vmlinux"
            );
            (config, &["y"])
        }
        KernelFlavour::Debian => {
            let path = image.kernel.with_file_name("kernel.config");
            let config = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            (config, &["y", "m"])
        }
    };
    let has = |option: &str| value(&config, option).is_some_and(|v| allowed.contains(&v));
    let missing: Vec<String> = REQUIRED
        .iter()
        // Debian's kernel stops the tick on idle CPUs with NO_HZ_FULL, a superset.
        .filter(|(option, _)| {
            !(has(option)
                || (image.flavour == KernelFlavour::Debian
                    && *option == "NO_HZ_IDLE"
                    && has("NO_HZ_FULL")))
        })
        .map(|(option, why)| {
            let got = value(&config, option).unwrap_or("unset");
            format!("CONFIG_{option} ({why}): {got}")
        })
        .collect();
    assert!(
        missing.is_empty(),
        "{:?} kernel {} lacks:\n  {}",
        image.flavour,
        image.kernel_release,
        missing.join("\n  ")
    );
    if image.flavour == KernelFlavour::Kata {
        let present: Vec<String> = EXCLUDED
            .iter()
            .filter(|(option, _)| value(&config, option).is_some())
            .map(|(option, why)| format!("CONFIG_{option} ({why})"))
            .collect();
        assert!(present.is_empty(), "must be off: {present:?}");
        assert!(
            image.kernel_release.ends_with("-kata-rs"),
            "{}",
            image.kernel_release
        );
    }
}
