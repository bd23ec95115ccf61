//! The QEMU command line, built as a pure function of the configuration.
//!
//! Guest RAM is always a shared memfd backend (`memory-backend-memfd,share=on`) because
//! vhost-user devices (virtio-fs, hybrid vsock) map guest memory from another process.
//! The guest serial console is QEMU's stdout; QEMU's own messages go to stderr.
//!
//! The accelerator is chosen with `-accel` (never `-machine accel=`: QEMU refuses both
//! together); under TCG it carries the translation cache size. A root filesystem image is
//! a read-only file mapping given to the guest as a virtio-pmem device: the guest mounts it
//! in place (DAX), so every VM reads the same host page-cache pages.

use std::ffi::OsString;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};

use crate::config::{Accel, GuestRoot, VmConfig};

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

/// The machine: q35 without the built-in devices no guest of ours uses (SATA controller,
/// SMBus, PS/2 controller, VMware port) and without SMM; RAM from the `dimm0` backend.
pub const MACHINE: &str =
    "q35,memory-backend=dimm0,sata=off,smbus=off,i8042=off,vmport=off,smm=off";

/// Kernel parameters for a root filesystem image: the first pmem device, read-only
/// EROFS read in place (DAX), the agent as init.
pub const IMAGE_ROOT_PARAMS: &[&str] = &[
    "root=/dev/pmem0",
    "rootfstype=erofs",
    "rootflags=dax=always",
    "ro",
    "init=/init",
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

    args.pair("-machine", MACHINE);
    match a.accel {
        Accel::Kvm => args.pair("-accel", "kvm,kernel-irqchip=on"),
        Accel::Tcg | Accel::Auto => {
            args.pair("-accel", format!("tcg,tb-size={}", c.tcg_tb_size_mib))
        }
    }
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
    // A pmem device takes room in the hotplug area: maxmem grows by its size, and it
    // needs the area to exist even without memory hotplug (which needs one slot).
    let image_mib = match &c.root {
        GuestRoot::Image { size, .. } => size.div_ceil(1 << 20),
        GuestRoot::Initrd(_) => 0,
    };
    let hotplug = c.max_memory_mib > c.memory_mib && c.memory_slots > 0;
    if hotplug || image_mib > 0 {
        let slots = if hotplug { c.memory_slots } else { 1 };
        let maxmem = u64::from(c.max_memory_mib.max(c.memory_mib)) + image_mib;
        let m = format!("{}M,slots={slots},maxmem={maxmem}M", c.memory_mib);
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
    if let Some(firmware) = &c.firmware {
        args.pair("-bios", firmware);
    }
    args.pair("-device", "virtio-rng-pci");
    // Free page reporting: pages the guest frees go back to the host.
    args.pair("-device", "virtio-balloon-pci,free-page-reporting=on");

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
    let root_params: &[&str] = match &c.root {
        GuestRoot::Initrd(initrd) => {
            args.pair("-initrd", initrd);
            &[]
        }
        GuestRoot::Image { path, size } => {
            args.pair(
                "-object",
                format!(
                    "memory-backend-file,id=rootfs,mem-path={},size={size},share=on,readonly=on",
                    opt_path(path)
                ),
            );
            args.pair("-device", "virtio-pmem-pci,memdev=rootfs,id=rootfs0");
            IMAGE_ROOT_PARAMS
        }
    };
    let append: Vec<&str> = DEFAULT_KERNEL_PARAMS
        .iter()
        .chain(root_params)
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
        assert_eq!(value(&args, "-machine"), [MACHINE]);
        assert_eq!(value(&args, "-accel"), ["tcg,tb-size=32"]);
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
                "virtio-balloon-pci,free-page-reporting=on",
                "vhost-user-vsock-pci,chardev=vsock"
            ]
        );
        assert_eq!(value(&args, "-kernel"), ["/img/vmlinuz"]);
        // QEMU's default firmware unless one is configured.
        assert!(value(&args, "-bios").is_empty());
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
        assert_eq!(value(&args, "-machine"), [MACHINE]);
        // No translation cache option under KVM.
        assert_eq!(value(&args, "-accel"), ["kvm,kernel-irqchip=on"]);
        assert_eq!(value(&args, "-cpu"), ["host,pmu=off"]);
        assert_eq!(
            value(&args, "-device"),
            [
                "pvpanic",
                "virtio-rng-pci",
                "virtio-balloon-pci,free-page-reporting=on",
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
            devices[4],
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
    fn firmware_is_passed_as_bios() {
        let mut c = config();
        c.firmware = Some(PathBuf::from("/usr/share/qemu/qboot.rom"));
        let args = build(&c, Accel::Tcg, &hybrid(), None);
        assert_eq!(value(&args, "-bios"), ["/usr/share/qemu/qboot.rom"]);
    }

    #[test]
    fn tb_size_follows_the_config() {
        let mut c = config();
        c.tcg_tb_size_mib = 48;
        let args = build(&c, Accel::Tcg, &hybrid(), None);
        assert_eq!(value(&args, "-accel"), ["tcg,tb-size=48"]);
        assert!(!args.iter().any(|a| a.contains("accel=")), "{args:?}");
    }

    #[test]
    fn image_root_is_a_read_only_pmem_device() {
        let mut c = config();
        c.root = GuestRoot::Image {
            path: PathBuf::from("/img/a,b/rootfs.img"),
            size: 128 << 20,
        };
        let args = build(&c, Accel::Tcg, &hybrid(), None);
        assert!(value(&args, "-initrd").is_empty());
        assert_eq!(
            value(&args, "-object")[1],
            "memory-backend-file,id=rootfs,mem-path=/img/a,,b/rootfs.img,size=134217728,share=on,readonly=on"
        );
        assert_eq!(
            value(&args, "-device").last().copied(),
            Some("virtio-pmem-pci,memdev=rootfs,id=rootfs0")
        );
        // The device's room comes on top of the hotplug headroom.
        assert_eq!(value(&args, "-m"), ["512M,slots=8,maxmem=4224M"]);
        let append = value(&args, "-append")[0];
        assert!(
            append.contains(" root=/dev/pmem0 rootfstype=erofs rootflags=dax=always ro init=/init agent.log=debug"),
            "{append}"
        );

        // Without memory hotplug the device still gets its room (and QEMU its one slot).
        c.max_memory_mib = c.memory_mib;
        let args = build(&c, Accel::Tcg, &hybrid(), None);
        assert_eq!(value(&args, "-m"), ["512M,slots=1,maxmem=640M"]);
    }

    #[test]
    fn commas_in_paths_are_escaped() {
        assert_eq!(opt_path(Path::new("/a,b/c")), "/a,,b/c");
    }
}
