//! A pod VM as a QEMU process that outlives the adaptor, like an instance outlives a
//! cloud API client: QEMU is started with `-daemonize` (its launcher exits once the VM is
//! set up and is reaped here; the VM process is reparented away) and found again through
//! its pidfile. Its devices: a virtio-net NIC on a tap QEMU creates, the user data as a
//! read-only raw virtio-blk disk, virtio-rng (the guest's TLS needs entropy early), the
//! serial console into a file. No vsock, no virtio-fs.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kata_hypervisor::Accel;
use kata_proto::network_mode::{BOOT_PARAM, USERDATA_DISK_SERIAL};

/// How long QEMU gets to exit after SIGTERM, and again after SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// A QEMU that would not start or stop.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error("spawn {}", .0.display())]
    Spawn(PathBuf, #[source] std::io::Error),
    #[error("QEMU exited with {status} before the VM ran: {stderr}")]
    Exited {
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("read pidfile {}", .0.display())]
    Pidfile(PathBuf, #[source] std::io::Error),
    #[error("pidfile {} holds {text:?}, not a pid", .path.display())]
    BadPid { path: PathBuf, text: String },
    #[error("QEMU pid {0} did not exit after SIGKILL")]
    Unkillable(i32),
    #[error("image directory {} has no {what}", .dir.display())]
    Image { dir: PathBuf, what: &'static str },
}

/// The files of a pod VM image directory: `vmlinux` or `vmlinuz`, `initrd.img`, and an
/// optional `cmdline` with extra kernel parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageFiles {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub extra_params: Vec<String>,
}

impl ImageFiles {
    /// Finds the files in `dir`.
    pub fn find(dir: &Path) -> Result<Self, QemuError> {
        let kernel = ["vmlinux", "vmlinuz"]
            .iter()
            .map(|k| dir.join(k))
            .find(|p| p.is_file())
            .ok_or_else(|| QemuError::Image {
                dir: dir.to_owned(),
                what: "kernel (vmlinux or vmlinuz)",
            })?;
        let initrd = dir.join("initrd.img");
        if !initrd.is_file() {
            return Err(QemuError::Image {
                dir: dir.to_owned(),
                what: "initrd.img",
            });
        }
        let extra_params = std::fs::read_to_string(dir.join("cmdline"))
            .map(|s| s.split_whitespace().map(str::to_owned).collect())
            .unwrap_or_default();
        Ok(Self {
            kernel,
            initrd,
            extra_params,
        })
    }
}

/// One pod VM's QEMU.
#[derive(Debug, Clone)]
pub struct Launch<'a> {
    pub qemu: &'a Path,
    /// Resolved: [`Accel::Kvm`] or [`Accel::Tcg`].
    pub accel: Accel,
    pub name: &'a str,
    /// The instance directory (pidfile, console, QMP socket, user data disk).
    pub dir: &'a Path,
    pub image: &'a ImageFiles,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub tap: &'a str,
    pub mac: &'a str,
    pub user_data_disk: &'a Path,
}

/// The pidfile in an instance directory.
pub fn pidfile(dir: &Path) -> PathBuf {
    dir.join("qemu.pid")
}

/// The console log in an instance directory.
pub fn console_log(dir: &Path) -> PathBuf {
    dir.join("console.log")
}

/// A path inside a QEMU `key=value,...` option: commas are doubled.
fn opt(p: &Path) -> String {
    p.display().to_string().replace(',', ",,")
}

/// QEMU's arguments (without the program).
pub fn args(l: &Launch<'_>) -> Vec<OsString> {
    let mut a: Vec<OsString> = Vec::new();
    let mut pair = |k: &str, v: String| {
        a.push(k.into());
        a.push(v.into());
    };
    pair("-name", format!("{},debug-threads=on", l.name));
    pair(
        "-machine",
        match l.accel {
            Accel::Kvm => "q35,accel=kvm,kernel_irqchip=on".into(),
            _ => "q35,accel=tcg".into(),
        },
    );
    pair(
        "-cpu",
        if l.accel == Accel::Kvm { "host" } else { "max" }.into(),
    );
    pair("-m", format!("{}M", l.memory_mib));
    pair("-smp", l.vcpus.to_string());
    pair("-display", "none".into());
    pair("-vga", "none".into());
    pair("-serial", format!("file:{}", opt(&console_log(l.dir))));
    pair(
        "-qmp",
        format!("unix:{},server=on,wait=off", opt(&l.dir.join("qmp.sock"))),
    );
    pair(
        "-netdev",
        format!("tap,id=net0,ifname={},script=no,downscript=no", l.tap),
    );
    pair(
        "-device",
        format!("virtio-net-pci,netdev=net0,mac={}", l.mac),
    );
    pair(
        "-drive",
        format!(
            "file={},if=none,id=userdata,format=raw,readonly=on",
            opt(l.user_data_disk)
        ),
    );
    pair(
        "-device",
        format!("virtio-blk-pci,drive=userdata,serial={USERDATA_DISK_SERIAL}"),
    );
    pair("-device", "virtio-rng-pci".into());
    pair("-device", "pvpanic".into());
    pair("-kernel", l.image.kernel.display().to_string());
    pair("-initrd", l.image.initrd.display().to_string());
    let append: Vec<&str> = kata_hypervisor::cmdline::DEFAULT_KERNEL_PARAMS
        .iter()
        .copied()
        .chain(std::iter::once(BOOT_PARAM))
        .chain(l.image.extra_params.iter().map(String::as_str))
        .collect();
    pair("-append", append.join(" "));
    pair("-pidfile", pidfile(l.dir).display().to_string());
    for flag in ["-nodefaults", "-no-user-config", "-no-reboot", "-daemonize"] {
        a.push(flag.into());
    }
    a
}

/// Starts QEMU daemonized; returns the VM's pid once the launcher exited successfully.
pub async fn launch(l: &Launch<'_>) -> Result<i32, QemuError> {
    let out = tokio::process::Command::new(l.qemu)
        .args(args(l))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| QemuError::Spawn(l.qemu.to_owned(), e))?;
    if !out.status.success() {
        return Err(QemuError::Exited {
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    read_pid(&pidfile(l.dir))
}

/// The pid in a pidfile.
pub fn read_pid(path: &Path) -> Result<i32, QemuError> {
    let text = std::fs::read_to_string(path).map_err(|e| QemuError::Pidfile(path.to_owned(), e))?;
    text.trim()
        .parse::<i32>()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| QemuError::BadPid {
            path: path.to_owned(),
            text: text.trim().to_owned(),
        })
}

/// Whether `pid` is a live (not zombie) QEMU of the instance in `dir` (its command line
/// names the instance's pidfile), so a recycled pid is never mistaken for it.
pub fn is_ours(pid: i32, dir: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let wanted = pidfile(dir).display().to_string();
    let ours = cmdline
        .split(|b| *b == 0)
        .any(|arg| arg == wanted.as_bytes());
    let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(true);
    ours && !zombie
}

/// Stops the instance's QEMU: SIGTERM, then SIGKILL, each with a grace period. Nothing to
/// do when it is not running.
pub async fn stop(pid: i32, dir: &Path) -> Result<(), QemuError> {
    use nix::sys::signal::{kill, Signal};
    let target = nix::unistd::Pid::from_raw(pid);
    for signal in [Signal::SIGTERM, Signal::SIGKILL] {
        if !is_ours(pid, dir) {
            return Ok(());
        }
        let _ = kill(target, signal);
        let deadline = tokio::time::Instant::now() + STOP_GRACE;
        while tokio::time::Instant::now() < deadline {
            if !is_ours(pid, dir) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    if is_ours(pid, dir) {
        Err(QemuError::Unkillable(pid))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_has_no_vsock_and_no_virtiofs() {
        let image = ImageFiles {
            kernel: "/img/vmlinux".into(),
            initrd: "/img/initrd.img".into(),
            extra_params: vec!["agent.log=debug".into()],
        };
        let l = Launch {
            qemu: Path::new("/usr/bin/qemu-system-x86_64"),
            accel: Accel::Tcg,
            name: "podvm-ns-web-0123",
            dir: Path::new("/run/pp/podvm-ns-web-0123"),
            image: &image,
            vcpus: 2,
            memory_mib: 1024,
            tap: "ppc0a8de11",
            mac: "52:54:00:a8:de:11",
            user_data_disk: Path::new("/run/pp/podvm-ns-web-0123/userdata.img"),
        };
        let args: Vec<String> = args(&l)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        let joined = args.join(" ");
        assert!(!joined.contains("vsock"), "{joined}");
        assert!(!joined.contains("vhost-user-fs"), "{joined}");
        assert!(joined.contains("-netdev tap,id=net0,ifname=ppc0a8de11,script=no,downscript=no"));
        assert!(joined.contains(&format!("serial={USERDATA_DISK_SERIAL}")));
        assert!(joined.contains("readonly=on"));
        let append = &args[args.iter().position(|a| a == "-append").unwrap() + 1];
        assert!(append.contains(BOOT_PARAM), "{append}");
        assert!(append.ends_with("agent.log=debug"), "{append}");
        assert!(args.contains(&"-daemonize".to_owned()));
        assert!(joined.contains("-pidfile /run/pp/podvm-ns-web-0123/qemu.pid"));
    }
}
