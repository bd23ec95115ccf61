//! VM configuration and its validation.
//!
//! [`VmConfig`] describes one VM: the QEMU binary, guest kernel and root filesystem (an
//! initrd or a read-only image, [`GuestRoot`]), sizes, the accelerator and its TCG
//! translation cache, the vsock flavour, an optional virtio-fs share and the per-VM run
//! directory. [`VmConfig::validate`] checks it once, before anything is started.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

/// TCG's translation cache by default, in MiB. The cache fills up as the guest runs and
/// stays in QEMU's memory: with QEMU's own default (1 GiB) an idle pod's QEMU held 25 MiB
/// more (README, Performance) and more again as new code ran, while a pod's hot code fits
/// in far less. In one busybox workload run 32 MiB was as fast as 64 MiB or 1 GiB; 16 MiB
/// took ~15% more CPU and 8 MiB 2.5 times as much (retranslating).
pub const DEFAULT_TCG_TB_SIZE_MIB: u32 = 32;

/// Smallest guest memory we accept, in MiB.
pub const MIN_MEMORY_MIB: u32 = 128;

/// A root filesystem image's size must be a non-zero multiple of this (128 MiB, the
/// guest's memory section): the pmem device sits in the memory hotplug area, and DIMMs
/// hot-added after it must stay aligned to the guest's memory blocks.
pub const IMAGE_ALIGN: u64 = 128 << 20;

/// Longest run directory path: the socket paths below it must fit in `sun_path` (108 bytes).
const MAX_RUN_DIR_LEN: usize = 90;

/// Errors found by [`VmConfig::validate`] or when parsing a config value.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// An accelerator name other than `auto`, `kvm` or `tcg`.
    #[error("unknown accelerator {0:?} (expected auto, kvm or tcg)")]
    UnknownAccel(String),
    /// A vsock mode other than `auto`, `vhost` or `hybrid`.
    #[error("unknown vsock mode {0:?} (expected auto, vhost or hybrid)")]
    UnknownVsockMode(String),
    /// The QEMU binary does not exist.
    #[error("QEMU binary {} not found", .path.display())]
    QemuNotFound { path: PathBuf },
    /// The firmware image does not exist.
    #[error("firmware {} not found", .path.display())]
    FirmwareNotFound { path: PathBuf },
    /// The guest kernel does not exist.
    #[error("guest kernel {} not found", .path.display())]
    KernelNotFound { path: PathBuf },
    /// The guest initrd does not exist.
    #[error("guest initrd {} not found", .path.display())]
    InitrdNotFound { path: PathBuf },
    /// The guest root filesystem image does not exist or cannot be read.
    #[error("cannot use {} as the guest image (a regular, readable file)", .path.display())]
    ImageNotFound {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The image's size is zero or not a multiple of [`IMAGE_ALIGN`].
    #[error("guest image {} is {size} bytes (expected a non-zero multiple of {IMAGE_ALIGN}; hack/build-guest.sh pads it)", .path.display())]
    ImageSize { path: PathBuf, size: u64 },
    /// A TCG translation cache size of zero.
    #[error("TCG translation cache size must be at least 1 MiB")]
    ZeroTbSize,
    /// The vsock daemon binary does not exist (hybrid vsock only).
    #[error("vsock daemon {} not found", .path.display())]
    VsockDaemonNotFound { path: PathBuf },
    /// The virtio-fs daemon binary does not exist.
    #[error("virtio-fs daemon {} not found", .path.display())]
    SharedFsDaemonNotFound { path: PathBuf },
    /// The directory to share is missing or not a directory.
    #[error("shared directory {} is not a directory", .path.display())]
    SharedDirNotFound { path: PathBuf },
    /// A virtio-fs cache mode other than `auto`, `always` or `never`.
    #[error("unknown virtio-fs cache mode {0:?} (expected auto, always or never)")]
    UnknownCacheMode(String),
    /// The VM id is empty or has characters unfit for file and device names.
    #[error("invalid VM id {0:?} (expected 1-64 characters from [A-Za-z0-9_.-])")]
    InvalidId(String),
    /// Boot memory below [`MIN_MEMORY_MIB`].
    #[error("memory {0} MiB is below the minimum of {MIN_MEMORY_MIB} MiB")]
    MemoryTooSmall(u32),
    /// Maximum memory below boot memory.
    #[error("max memory {max} MiB is below memory {memory} MiB")]
    MaxMemoryTooSmall { memory: u32, max: u32 },
    /// Hotplug headroom (max > memory) without any memory slot.
    #[error("max memory {max} MiB exceeds memory {memory} MiB but memory slots is 0")]
    NoMemorySlots { memory: u32, max: u32 },
    /// Zero vCPUs.
    #[error("vcpus must be at least 1")]
    NoVcpus,
    /// Maximum vCPUs below boot vCPUs.
    #[error("max vcpus {max} is below vcpus {vcpus}")]
    MaxVcpusTooSmall { vcpus: u32, max: u32 },
    /// The run directory is relative, too long or contains a comma.
    #[error("run directory {} must be an absolute path of at most {MAX_RUN_DIR_LEN} bytes without commas", .path.display())]
    InvalidRunDir { path: PathBuf },
    /// A zero start timeout.
    #[error("start timeout must be greater than zero")]
    ZeroStartTimeout,
}

/// Which accelerator QEMU uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Accel {
    /// KVM when it works and the CPU has vmx/svm, TCG otherwise.
    #[default]
    Auto,
    /// Hardware virtualization through `/dev/kvm`.
    Kvm,
    /// QEMU's software emulator.
    Tcg,
}

impl FromStr for Accel {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Accel::Auto),
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            other => Err(ConfigError::UnknownAccel(other.to_owned())),
        }
    }
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Auto => "auto",
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// How the host reaches the guest's AF_VSOCK sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VsockMode {
    /// `Vhost` when `/dev/vhost-vsock` exists and opens, `Hybrid` otherwise.
    #[default]
    Auto,
    /// Kernel vhost-vsock: `-device vhost-vsock-pci`, host connects with AF_VSOCK.
    Vhost,
    /// `vhost-device-vsock` daemon: host connects to a unix socket and sends `CONNECT <port>`.
    Hybrid,
}

impl FromStr for VsockMode {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(VsockMode::Auto),
            "vhost" => Ok(VsockMode::Vhost),
            "hybrid" => Ok(VsockMode::Hybrid),
            other => Err(ConfigError::UnknownVsockMode(other.to_owned())),
        }
    }
}

/// How the guest gets its root filesystem (where `/init`, the agent, lives).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestRoot {
    /// An initramfs (cpio archive, optionally compressed) that the kernel unpacks into RAM:
    /// every guest holds its own copy.
    Initrd(PathBuf),
    /// A read-only EROFS image mapped into the guest as a persistent-memory device and
    /// mounted in place (DAX): its pages stay in the host's page cache, one copy for all
    /// VMs. Build it with [`GuestRoot::image`], which reads its size.
    Image {
        /// The image file.
        path: PathBuf,
        /// Its size in bytes: a non-zero multiple of [`IMAGE_ALIGN`].
        size: u64,
    },
}

impl GuestRoot {
    /// An image root: reads the file's size and checks it.
    pub fn image(path: PathBuf) -> Result<Self, ConfigError> {
        let size = match std::fs::metadata(&path) {
            Ok(m) if m.is_file() => m.len(),
            Ok(_) => {
                return Err(ConfigError::ImageNotFound {
                    path,
                    source: std::io::Error::other("not a regular file"),
                })
            }
            Err(source) => return Err(ConfigError::ImageNotFound { path, source }),
        };
        let root = GuestRoot::Image { path, size };
        root.check_size()?;
        Ok(root)
    }

    /// The file: the initrd or the image.
    pub fn path(&self) -> &Path {
        match self {
            GuestRoot::Initrd(path) | GuestRoot::Image { path, .. } => path,
        }
    }

    fn check_size(&self) -> Result<(), ConfigError> {
        match self {
            GuestRoot::Image { path, size } if *size == 0 || size % IMAGE_ALIGN != 0 => {
                Err(ConfigError::ImageSize {
                    path: path.clone(),
                    size: *size,
                })
            }
            _ => Ok(()),
        }
    }
}

/// A host directory shared into the guest with virtio-fs (mount tag `kataShared`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedFsConfig {
    /// The virtiofsd binary (Rust virtiofsd or QEMU's C virtiofsd).
    pub daemon: PathBuf,
    /// The directory to export.
    pub shared_dir: PathBuf,
    /// Cache mode: `auto`, `always` or `never`.
    pub cache: String,
    /// Extra arguments appended to the daemon's command line.
    pub extra_args: Vec<String>,
}

/// A network device: a tap the caller opened (in the pod's network namespace) and the MAC
/// the guest's virtio-net gets.
#[derive(Debug, Clone)]
pub struct NetDevice {
    /// The tap's fd; QEMU inherits it.
    pub tap: std::sync::Arc<std::os::fd::OwnedFd>,
    /// `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
}

impl PartialEq for NetDevice {
    fn eq(&self, other: &Self) -> bool {
        use std::os::fd::AsRawFd;
        self.tap.as_raw_fd() == other.tap.as_raw_fd() && self.mac == other.mac
    }
}

impl Eq for NetDevice {}

/// Everything needed to start one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// Identifier used in file names and logs.
    pub id: String,
    /// The QEMU binary.
    pub qemu_path: PathBuf,
    /// The firmware QEMU runs before the kernel (`-bios`); `None`: QEMU's default
    /// (SeaBIOS).
    pub firmware: Option<PathBuf>,
    /// Guest kernel: an uncompressed `vmlinux` with a PVH entry, or a `bzImage`.
    pub kernel: PathBuf,
    /// The guest's root filesystem.
    pub root: GuestRoot,
    /// Kernel parameters appended after ours.
    pub kernel_params: Vec<String>,
    /// Boot memory in MiB.
    pub memory_mib: u32,
    /// Memory hotplug slots.
    pub memory_slots: u32,
    /// Memory ceiling (boot + hotplug) in MiB.
    pub max_memory_mib: u32,
    /// Boot vCPUs.
    pub vcpus: u32,
    /// vCPU ceiling (boot + hotplug).
    pub max_vcpus: u32,
    /// Requested accelerator.
    pub accel: Accel,
    /// TCG's translation cache in MiB (`-accel tcg,tb-size=`); ignored under KVM.
    pub tcg_tb_size_mib: u32,
    /// Requested vsock flavour.
    pub vsock: VsockMode,
    /// The `vhost-device-vsock` binary (hybrid vsock).
    pub vsock_daemon: PathBuf,
    /// Optional virtio-fs share.
    pub shared_fs: Option<SharedFsConfig>,
    /// virtio-net devices on taps.
    pub net: Vec<NetDevice>,
    /// Per-VM directory for sockets; created by start (it must not exist or be empty) and
    /// removed by stop.
    pub run_dir: PathBuf,
    /// How long QEMU and the daemons may take to become ready.
    pub start_timeout: Duration,
    /// QEMU's `-sandbox` value (seccomp filter), e.g. `on,obsolete=deny,spawn=deny`;
    /// empty leaves it off.
    pub seccomp_sandbox: String,
    /// Where the children start: cgroups to join before exec, and QEMU's oom_score_adj.
    pub placement: Placement,
}

/// Host cgroups and OOM priority of the VM's processes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Placement {
    /// `cgroup.procs` files QEMU joins before it execs.
    pub qemu_cgroup_procs: Vec<PathBuf>,
    /// `cgroup.procs` files the daemons (virtiofsd, vsock) join before they exec.
    pub daemon_cgroup_procs: Vec<PathBuf>,
    /// QEMU's `oom_score_adj`, where the host allows it.
    pub qemu_oom_score_adj: Option<i32>,
}

impl VmConfig {
    /// A config with defaults for everything but the id, guest kernel and initrd, and run
    /// directory.
    pub fn new(id: impl Into<String>, kernel: PathBuf, initrd: PathBuf, run_dir: PathBuf) -> Self {
        VmConfig {
            id: id.into(),
            qemu_path: PathBuf::from("/usr/bin/qemu-system-x86_64"),
            firmware: None,
            kernel,
            root: GuestRoot::Initrd(initrd),
            kernel_params: Vec::new(),
            memory_mib: 2048,
            memory_slots: 10,
            max_memory_mib: 2048,
            vcpus: 1,
            max_vcpus: 1,
            accel: Accel::Auto,
            tcg_tb_size_mib: DEFAULT_TCG_TB_SIZE_MIB,
            vsock: VsockMode::Auto,
            net: Vec::new(),
            vsock_daemon: PathBuf::from("/opt/kata-deps/bin/vhost-device-vsock"),
            shared_fs: None,
            run_dir,
            start_timeout: Duration::from_secs(10),
            seccomp_sandbox: String::new(),
            placement: Placement::default(),
        }
    }

    /// Checks sizes, names and that every file the VM needs exists. Touches the file
    /// system (metadata only).
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_values()?;
        require_file(&self.qemu_path, |path| ConfigError::QemuNotFound { path })?;
        if let Some(firmware) = &self.firmware {
            require_file(firmware, |path| ConfigError::FirmwareNotFound { path })?;
        }
        require_file(&self.kernel, |path| ConfigError::KernelNotFound { path })?;
        match &self.root {
            GuestRoot::Initrd(initrd) => {
                require_file(initrd, |path| ConfigError::InitrdNotFound { path })?
            }
            GuestRoot::Image { path, .. } => {
                if !path.is_file() {
                    return Err(ConfigError::ImageNotFound {
                        path: path.clone(),
                        source: std::io::ErrorKind::NotFound.into(),
                    });
                }
            }
        }
        if self.vsock == VsockMode::Hybrid {
            require_file(&self.vsock_daemon, |path| {
                ConfigError::VsockDaemonNotFound { path }
            })?;
        }
        if let Some(fs) = &self.shared_fs {
            require_file(&fs.daemon, |path| ConfigError::SharedFsDaemonNotFound {
                path,
            })?;
            if !fs.shared_dir.is_dir() {
                return Err(ConfigError::SharedDirNotFound {
                    path: fs.shared_dir.clone(),
                });
            }
        }
        Ok(())
    }

    /// The checks that do not touch the file system.
    fn validate_values(&self) -> Result<(), ConfigError> {
        let id_ok = !self.id.is_empty()
            && self.id.len() <= 64
            && self
                .id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
        if !id_ok {
            return Err(ConfigError::InvalidId(self.id.clone()));
        }
        if self.memory_mib < MIN_MEMORY_MIB {
            return Err(ConfigError::MemoryTooSmall(self.memory_mib));
        }
        let (memory, max) = (self.memory_mib, self.max_memory_mib);
        if max < memory {
            return Err(ConfigError::MaxMemoryTooSmall { memory, max });
        }
        if max > memory && self.memory_slots == 0 {
            return Err(ConfigError::NoMemorySlots { memory, max });
        }
        if self.vcpus == 0 {
            return Err(ConfigError::NoVcpus);
        }
        if self.max_vcpus < self.vcpus {
            return Err(ConfigError::MaxVcpusTooSmall {
                vcpus: self.vcpus,
                max: self.max_vcpus,
            });
        }
        let run_dir = self.run_dir.as_os_str().as_encoded_bytes();
        if !self.run_dir.is_absolute() || run_dir.len() > MAX_RUN_DIR_LEN || run_dir.contains(&b',')
        {
            return Err(ConfigError::InvalidRunDir {
                path: self.run_dir.clone(),
            });
        }
        if let Some(fs) = &self.shared_fs {
            if !matches!(fs.cache.as_str(), "auto" | "always" | "never") {
                return Err(ConfigError::UnknownCacheMode(fs.cache.clone()));
            }
        }
        self.root.check_size()?;
        if self.tcg_tb_size_mib == 0 {
            return Err(ConfigError::ZeroTbSize);
        }
        if self.start_timeout.is_zero() {
            return Err(ConfigError::ZeroStartTimeout);
        }
        Ok(())
    }
}

fn require_file(path: &Path, err: impl FnOnce(PathBuf) -> ConfigError) -> Result<(), ConfigError> {
    if path.is_file() {
        Ok(())
    } else {
        Err(err(path.to_path_buf()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path) -> VmConfig {
        let kernel = dir.join("vmlinuz");
        let initrd = dir.join("initrd.img");
        std::fs::write(&kernel, b"k").unwrap();
        std::fs::write(&initrd, b"i").unwrap();
        let mut c = VmConfig::new("vm-1", kernel, initrd, dir.join("run"));
        c.qemu_path = kernel_path(dir);
        c
    }

    fn kernel_path(dir: &Path) -> PathBuf {
        dir.join("vmlinuz")
    }

    #[test]
    fn parses_accel_and_vsock_mode() {
        assert_eq!("kvm".parse::<Accel>().unwrap(), Accel::Kvm);
        assert_eq!("tcg".parse::<Accel>().unwrap(), Accel::Tcg);
        assert_eq!("auto".parse::<Accel>().unwrap(), Accel::Auto);
        let err = "xen".parse::<Accel>().unwrap_err();
        assert!(err.to_string().contains("\"xen\""), "{err}");
        assert_eq!("hybrid".parse::<VsockMode>().unwrap(), VsockMode::Hybrid);
        let err = "tcp".parse::<VsockMode>().unwrap_err();
        assert!(err.to_string().contains("\"tcp\""), "{err}");
    }

    #[test]
    fn valid_config_passes() {
        let dir = tempfile::tempdir().unwrap();
        config(dir.path()).validate().unwrap();
    }

    #[test]
    fn missing_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config(dir.path());
        c.kernel = dir.path().join("nope");
        let err = c.validate().unwrap_err();
        assert!(matches!(err, ConfigError::KernelNotFound { .. }));
        assert!(err.to_string().contains("nope"), "{err}");

        let mut c = config(dir.path());
        c.root = GuestRoot::Initrd(dir.path().join("no-initrd"));
        assert!(c.validate().unwrap_err().to_string().contains("no-initrd"));

        let mut c = config(dir.path());
        c.root = GuestRoot::Image {
            path: dir.path().join("no-image"),
            size: IMAGE_ALIGN,
        };
        assert!(c.validate().unwrap_err().to_string().contains("no-image"));

        let mut c = config(dir.path());
        c.firmware = Some(dir.path().join("no-firmware"));
        let err = c.validate().unwrap_err();
        assert!(matches!(err, ConfigError::FirmwareNotFound { .. }), "{err}");
        assert!(err.to_string().contains("no-firmware"), "{err}");

        let mut c = config(dir.path());
        c.qemu_path = dir.path().join("no-qemu");
        assert!(matches!(
            c.validate().unwrap_err(),
            ConfigError::QemuNotFound { .. }
        ));

        let mut c = config(dir.path());
        c.vsock = VsockMode::Hybrid;
        c.vsock_daemon = dir.path().join("no-vsockd");
        assert!(c.validate().unwrap_err().to_string().contains("no-vsockd"));

        let mut c = config(dir.path());
        c.shared_fs = Some(SharedFsConfig {
            daemon: kernel_path(dir.path()),
            shared_dir: dir.path().join("no-share"),
            cache: "auto".into(),
            extra_args: vec![],
        });
        assert!(c.validate().unwrap_err().to_string().contains("no-share"));
    }

    #[test]
    fn sizes_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let base = config(dir.path());

        let mut c = base.clone();
        c.memory_mib = 64;
        let err = c.validate().unwrap_err();
        assert!(err.to_string().contains("64"), "{err}");

        let mut c = base.clone();
        c.max_memory_mib = 1024;
        let err = c.validate().unwrap_err();
        assert!(matches!(
            err,
            ConfigError::MaxMemoryTooSmall {
                memory: 2048,
                max: 1024
            }
        ));

        let mut c = base.clone();
        c.max_memory_mib = 4096;
        c.memory_slots = 0;
        assert!(matches!(
            c.validate().unwrap_err(),
            ConfigError::NoMemorySlots { .. }
        ));

        let mut c = base.clone();
        c.vcpus = 0;
        assert!(matches!(c.validate().unwrap_err(), ConfigError::NoVcpus));

        let mut c = base.clone();
        c.vcpus = 4;
        c.max_vcpus = 2;
        let err = c.validate().unwrap_err();
        assert!(err.to_string().contains("max vcpus 2"), "{err}");
    }

    #[test]
    fn images_are_sized_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rootfs.img");
        let err = GuestRoot::image(path.clone()).unwrap_err();
        assert!(matches!(err, ConfigError::ImageNotFound { .. }), "{err}");

        let file = std::fs::File::create(&path).unwrap();
        file.set_len(IMAGE_ALIGN + 4096).unwrap();
        let err = GuestRoot::image(path.clone()).unwrap_err();
        assert!(
            matches!(err, ConfigError::ImageSize { size, .. } if size == IMAGE_ALIGN + 4096),
            "{err}"
        );
        assert!(err.to_string().contains("rootfs.img"), "{err}");
        file.set_len(0).unwrap();
        assert!(matches!(
            GuestRoot::image(path.clone()).unwrap_err(),
            ConfigError::ImageSize { size: 0, .. }
        ));
        assert!(matches!(
            GuestRoot::image(dir.path().to_path_buf()).unwrap_err(),
            ConfigError::ImageNotFound { .. }
        ));

        file.set_len(2 * IMAGE_ALIGN).unwrap();
        let root = GuestRoot::image(path.clone()).unwrap();
        assert_eq!(
            root,
            GuestRoot::Image {
                path: path.clone(),
                size: 2 * IMAGE_ALIGN
            }
        );
        let mut c = config(dir.path());
        c.root = root;
        c.validate().unwrap();
        c.root = GuestRoot::Image { path, size: 1 };
        assert!(matches!(
            c.validate().unwrap_err(),
            ConfigError::ImageSize { size: 1, .. }
        ));

        let mut c = config(dir.path());
        c.tcg_tb_size_mib = 0;
        assert!(matches!(c.validate().unwrap_err(), ConfigError::ZeroTbSize));
    }

    #[test]
    fn names_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let base = config(dir.path());

        let mut c = base.clone();
        c.id = "a/b".into();
        assert!(c.validate().unwrap_err().to_string().contains("\"a/b\""));

        let mut c = base.clone();
        c.run_dir = PathBuf::from("relative");
        assert!(matches!(
            c.validate().unwrap_err(),
            ConfigError::InvalidRunDir { .. }
        ));

        let mut c = base.clone();
        c.run_dir = dir.path().join("a,b");
        assert!(matches!(
            c.validate().unwrap_err(),
            ConfigError::InvalidRunDir { .. }
        ));

        let mut c = base.clone();
        c.shared_fs = Some(SharedFsConfig {
            daemon: kernel_path(dir.path()),
            shared_dir: dir.path().to_path_buf(),
            cache: "sometimes".into(),
            extra_args: vec![],
        });
        assert!(c.validate().unwrap_err().to_string().contains("sometimes"));
    }
}
