//! The QEMU command line, built as a pure function of the configuration.
//!
//! Guest RAM is always a shared memfd backend (`memory-backend-memfd,share=on`) because
//! vhost-user devices (virtio-fs, hybrid vsock) map guest memory from another process.
//! The guest serial console is QEMU's stdout; QEMU's own messages go to stderr.

use std::ffi::OsString;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};

use crate::config::{Accel, VmConfig};

/// Kernel parameters that always come first; the config's parameters follow (and win, so
/// e.g. `loglevel=7` after `quiet` brings the boot log back).
///
/// `quiet` matters under TCG: every console byte is an emulated UART write, and a full boot
/// log costs hundreds of milliseconds. The others skip probes a VM does not need (TSC
/// calibration checks, the PS/2 controller, crypto self-tests) and expedite RCU grace periods.
pub const DEFAULT_KERNEL_PARAMS: &[&str] = &[
    "console=ttyS0",
    "panic=1",
    "quiet",
    "tsc=reliable",
    "no_timer_check",
    "rcupdate.rcu_expedited=1",
    "i8042.direct=1",
    "i8042.dumbkbd=1",
    "i8042.nopnp=1",
    "i8042.noaux=1",
    // Hot-added memory comes online in the kernel at once (the agent checks and onlines
    // anything left offline).
    "memhp_default_state=online",
    "cryptomgr.notests",
];

/// Mount tag of the virtio-fs share.
pub const SHARED_FS_TAG: &str = "kataShared";

/// The vsock device given to the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VsockDevice {
    /// Kernel vhost-vsock: an open `/dev/vhost-vsock` fd inherited by QEMU, with its CID set.
    Vhost {
        /// The fd number as seen by QEMU.
        fd: RawFd,
        /// The guest CID set on that fd.
        cid: u32,
    },
    /// vhost-user-vsock backed by `vhost-device-vsock` listening on `socket`.
    Hybrid {
        /// The daemon's vhost-user socket.
        socket: PathBuf,
    },
}

/// Inputs of [`qemu_args`] besides the config.
#[derive(Debug, Clone, Copy)]
pub struct QemuArgs<'a> {
    /// The VM configuration (validated).
    pub config: &'a VmConfig,
    /// The resolved accelerator, [`Accel::Kvm`] or [`Accel::Tcg`].
    pub accel: Accel,
    /// Where QEMU listens for QMP (the owner's session).
    pub qmp_socket: &'a Path,
    /// A second QMP monitor for operators and diagnostics.
    pub qmp_debug_socket: &'a Path,
    /// The vsock device.
    pub vsock: &'a VsockDevice,
    /// The virtiofsd vhost-user socket, when a share is configured.
    pub virtiofs_socket: Option<&'a Path>,
}

/// Builds QEMU's argument vector (without the program name).
pub fn qemu_args(a: &QemuArgs<'_>) -> Vec<OsString> {
    let c = a.config;
    let mut args = Args::default();

    let machine = match a.accel {
        Accel::Kvm => "q35,accel=kvm,kernel_irqchip=on,memory-backend=dimm0",
        Accel::Tcg | Accel::Auto => "q35,accel=tcg,memory-backend=dimm0",
    };
    args.pair("-machine", machine);
    args.pair(
        "-cpu",
        if a.accel == Accel::Kvm {
            "host,pmu=off"
        } else {
            "max"
        },
    );
    args.pair(
        "-object",
        format!(
            "memory-backend-memfd,id=dimm0,size={}M,share=on",
            c.memory_mib
        ),
    );
    if c.max_memory_mib > c.memory_mib && c.memory_slots > 0 {
        let m = format!(
            "{}M,slots={},maxmem={}M",
            c.memory_mib, c.memory_slots, c.max_memory_mib
        );
        args.pair("-m", m);
    } else {
        args.pair("-m", format!("{}M", c.memory_mib));
    }
    args.pair(
        "-smp",
        format!("{},maxcpus={}", c.vcpus, c.max_vcpus.max(c.vcpus)),
    );

    // Named threads ("CPU 0/TCG", "CPU 0/KVM"), so operators and the host cgroup code can
    // tell vCPU threads apart.
    args.pair("-name", format!("{},debug-threads=on", c.id));
    for flag in ["-nodefaults", "-no-reboot", "-nographic", "-no-user-config"] {
        args.flag(flag);
    }
    args.pair("-vga", "none");
    for socket in [a.qmp_socket, a.qmp_debug_socket] {
        args.pair(
            "-qmp",
            format!("unix:{},server=on,wait=off", opt_path(socket)),
        );
    }
    // A guest kernel panic raises QMP GUEST_PANICKED through pvpanic; the guest is then
    // paused (not rebooted) so its owner can fence it and keep the console.
    args.pair("-device", "pvpanic");
    args.pair("-action", "panic=pause");
    if !c.seccomp_sandbox.is_empty() {
        args.pair("-sandbox", &c.seccomp_sandbox);
    }
    args.pair("-chardev", "stdio,id=console,signal=off");
    args.pair("-serial", "chardev:console");
    args.pair("-device", "virtio-rng-pci");

    match a.vsock {
        VsockDevice::Vhost { fd, cid } => {
            args.pair(
                "-device",
                format!("vhost-vsock-pci,vhostfd={fd},guest-cid={cid}"),
            );
        }
        VsockDevice::Hybrid { socket } => {
            args.pair(
                "-chardev",
                format!("socket,id=vsock,path={}", opt_path(socket)),
            );
            args.pair("-device", "vhost-user-vsock-pci,chardev=vsock");
        }
    }
    if let Some(socket) = a.virtiofs_socket {
        args.pair(
            "-chardev",
            format!("socket,id=fs0,path={}", opt_path(socket)),
        );
        args.pair(
            "-device",
            format!("vhost-user-fs-pci,chardev=fs0,tag={SHARED_FS_TAG},queue-size=1024"),
        );
    }

    for (i, net) in c.net.iter().enumerate() {
        use std::os::fd::AsRawFd;
        args.pair(
            "-netdev",
            format!("tap,id=net{i},fd={},vhost=off", net.tap.as_raw_fd()),
        );
        args.pair(
            "-device",
            format!("virtio-net-pci,netdev=net{i},mac={}", net.mac),
        );
    }

    args.pair("-kernel", &c.kernel);
    args.pair("-initrd", &c.initrd);
    let append: Vec<&str> = DEFAULT_KERNEL_PARAMS
        .iter()
        .copied()
        .chain(c.kernel_params.iter().map(String::as_str))
        .collect();
    args.pair("-append", append.join(" "));
    args.0
}

/// A path inside a QEMU `key=value,...` option: commas are doubled.
fn opt_path(path: &Path) -> String {
    path.to_string_lossy().replace(',', ",,")
}

#[derive(Default)]
struct Args(Vec<OsString>);

impl Args {
    fn flag(&mut self, flag: &str) {
        self.0.push(flag.into());
    }

    fn pair(&mut self, flag: &str, value: impl Into<OsString>) {
        self.0.push(flag.into());
        self.0.push(value.into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn config() -> VmConfig {
        let mut c = VmConfig::new(
            "vm1",
            PathBuf::from("/img/vmlinuz"),
            PathBuf::from("/img/initrd.img"),
            PathBuf::from("/run/vm1"),
        );
        c.memory_mib = 512;
        c.max_memory_mib = 4096;
        c.memory_slots = 8;
        c.vcpus = 2;
        c.max_vcpus = 4;
        c.kernel_params = vec!["agent.log=debug".into(), "quiet".into()];
        c.start_timeout = Duration::from_secs(5);
        c
    }

    fn build(c: &VmConfig, accel: Accel, vsock: &VsockDevice, fs: Option<&Path>) -> Vec<String> {
        let args = QemuArgs {
            config: c,
            accel,
            qmp_socket: Path::new("/run/vm1/qmp.sock"),
            qmp_debug_socket: Path::new("/run/vm1/qmp-debug.sock"),
            vsock,
            virtiofs_socket: fs,
        };
        qemu_args(&args)
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect()
    }

    fn value<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    fn hybrid() -> VsockDevice {
        VsockDevice::Hybrid {
            socket: PathBuf::from("/run/vm1/vhost-vsock.sock"),
        }
    }

    #[test]
    fn tcg_hybrid() {
        let args = build(&config(), Accel::Tcg, &hybrid(), None);
        assert_eq!(
            value(&args, "-machine"),
            ["q35,accel=tcg,memory-backend=dimm0"]
        );
        assert_eq!(value(&args, "-cpu"), ["max"]);
        assert_eq!(
            value(&args, "-object"),
            ["memory-backend-memfd,id=dimm0,size=512M,share=on"]
        );
        assert_eq!(value(&args, "-m"), ["512M,slots=8,maxmem=4096M"]);
        assert_eq!(value(&args, "-smp"), ["2,maxcpus=4"]);
        for flag in ["-nodefaults", "-no-reboot", "-nographic", "-no-user-config"] {
            assert!(args.iter().any(|a| a == flag), "missing {flag}");
        }
        assert!(!args.iter().any(|a| a == "-daemonize"));
        assert_eq!(value(&args, "-vga"), ["none"]);
        assert_eq!(
            value(&args, "-qmp"),
            [
                "unix:/run/vm1/qmp.sock,server=on,wait=off",
                "unix:/run/vm1/qmp-debug.sock,server=on,wait=off"
            ]
        );
        assert_eq!(value(&args, "-action"), ["panic=pause"]);
        assert_eq!(value(&args, "-name"), ["vm1,debug-threads=on"]);
        assert!(value(&args, "-sandbox").is_empty(), "off unless configured");
        assert_eq!(
            value(&args, "-chardev"),
            [
                "stdio,id=console,signal=off",
                "socket,id=vsock,path=/run/vm1/vhost-vsock.sock"
            ]
        );
        assert_eq!(value(&args, "-serial"), ["chardev:console"]);
        assert_eq!(
            value(&args, "-device"),
            [
                "pvpanic",
                "virtio-rng-pci",
                "vhost-user-vsock-pci,chardev=vsock"
            ]
        );
        assert_eq!(value(&args, "-kernel"), ["/img/vmlinuz"]);
        assert_eq!(value(&args, "-initrd"), ["/img/initrd.img"]);
        let append = value(&args, "-append");
        let append = append[0];
        assert!(
            append.starts_with("console=ttyS0 panic=1 quiet "),
            "{append}"
        );
        assert!(
            append.ends_with(" cryptomgr.notests agent.log=debug quiet"),
            "{append}"
        );
    }

    #[test]
    fn kvm_vhost() {
        let vsock = VsockDevice::Vhost { fd: 7, cid: 42 };
        let args = build(&config(), Accel::Kvm, &vsock, None);
        assert_eq!(
            value(&args, "-machine"),
            ["q35,accel=kvm,kernel_irqchip=on,memory-backend=dimm0"]
        );
        assert_eq!(value(&args, "-cpu"), ["host,pmu=off"]);
        assert_eq!(
            value(&args, "-device"),
            [
                "pvpanic",
                "virtio-rng-pci",
                "vhost-vsock-pci,vhostfd=7,guest-cid=42"
            ]
        );
        assert_eq!(value(&args, "-chardev"), ["stdio,id=console,signal=off"]);
    }

    #[test]
    fn virtiofs() {
        let sock = Path::new("/run/vm1/virtiofsd.sock");
        let args = build(&config(), Accel::Tcg, &hybrid(), Some(sock));
        let chardevs = value(&args, "-chardev");
        assert_eq!(chardevs[2], "socket,id=fs0,path=/run/vm1/virtiofsd.sock");
        let devices = value(&args, "-device");
        assert_eq!(
            devices[3],
            "vhost-user-fs-pci,chardev=fs0,tag=kataShared,queue-size=1024"
        );
    }

    #[test]
    fn seccomp_sandbox_when_configured() {
        let mut c = config();
        c.seccomp_sandbox = "on,obsolete=deny,spawn=deny".into();
        let args = build(&c, Accel::Tcg, &hybrid(), None);
        assert_eq!(value(&args, "-sandbox"), ["on,obsolete=deny,spawn=deny"]);
    }

    #[test]
    fn memory_without_hotplug_headroom() {
        let mut c = config();
        c.max_memory_mib = c.memory_mib;
        let args = build(&c, Accel::Tcg, &hybrid(), None);
        assert_eq!(value(&args, "-m"), ["512M"]);
    }

    #[test]
    fn commas_in_paths_are_escaped() {
        assert_eq!(opt_path(Path::new("/a,b/c")), "/a,,b/c");
    }
}
