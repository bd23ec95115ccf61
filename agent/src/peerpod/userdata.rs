//! The user data of a peer pod VM, read from its config disk: the virtio-blk device whose
//! serial is [`USERDATA_DISK_SERIAL`] (framing in [`kata_proto::network_mode`]).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kata_proto::network_mode::{decode_user_data, MAX_USERDATA, USERDATA_DISK_SERIAL};
use kata_proto::peerpod::UserData;

/// Where the kernel lists block devices.
pub const SYS_BLOCK: &str = "/sys/block";
/// How long the agent waits for the config disk to appear.
pub const DISK_TIMEOUT: Duration = Duration::from_secs(30);

/// The user data cannot be had.
#[derive(Debug, thiserror::Error)]
pub enum UserDataError {
    /// No block device has the serial.
    #[error("no config disk with serial {USERDATA_DISK_SERIAL:?} under {} within {timeout:?}", .sys_block.display())]
    NoDisk {
        sys_block: PathBuf,
        timeout: Duration,
    },
    /// Reading the device failed.
    #[error("read config disk {}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The device does not hold valid user data.
    #[error("config disk {}", .path.display())]
    Decode {
        path: PathBuf,
        #[source]
        source: kata_proto::network_mode::UserDataError,
    },
}

/// The name (e.g. `vdb`) of the block device under `sys_block` whose `serial` is
/// [`USERDATA_DISK_SERIAL`].
pub fn find_disk(sys_block: &Path) -> Option<String> {
    let entries = std::fs::read_dir(sys_block).ok()?;
    entries.flatten().find_map(|e| {
        let serial = std::fs::read_to_string(e.path().join("serial")).ok()?;
        (serial.trim_end_matches(['\n', '\0']) == USERDATA_DISK_SERIAL)
            .then(|| e.file_name().to_string_lossy().into_owned())
    })
}

/// Waits up to `timeout` for the config disk under `sys_block`, then reads and decodes it
/// from `<dev_dir>/<name>`. Blocking.
pub fn read(
    sys_block: &Path,
    dev_dir: &Path,
    timeout: Duration,
) -> Result<UserData, UserDataError> {
    let deadline = Instant::now() + timeout;
    let name = loop {
        if let Some(name) = find_disk(sys_block) {
            break name;
        }
        if Instant::now() >= deadline {
            return Err(UserDataError::NoDisk {
                sys_block: sys_block.to_owned(),
                timeout,
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let path = dev_dir.join(&name);
    let err = |source| UserDataError::Read {
        path: path.clone(),
        source,
    };
    // devtmpfs creates the node with the device; give it the same patience.
    let file = loop {
        match std::fs::File::open(&path) {
            Ok(f) => break f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(err(e)),
        }
    };
    let mut bytes = Vec::new();
    file.take((MAX_USERDATA + 512) as u64)
        .read_to_end(&mut bytes)
        .map_err(err)?;
    decode_user_data(&bytes).map_err(|source| UserDataError::Decode { path, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kata_proto::network_mode::{encode_user_data, USERDATA_VERSION};

    #[test]
    fn finds_the_disk_by_serial_and_decodes_it() {
        let t = tempfile::tempdir().unwrap();
        let sys = t.path().join("sys");
        let dev = t.path().join("dev");
        std::fs::create_dir_all(sys.join("vda")).unwrap();
        std::fs::write(sys.join("vda/serial"), "other\n").unwrap();
        std::fs::create_dir_all(sys.join("vdb")).unwrap();
        std::fs::write(sys.join("vdb/serial"), USERDATA_DISK_SERIAL).unwrap();
        std::fs::create_dir_all(&dev).unwrap();
        let mut ud = UserData::new();
        ud.version = USERDATA_VERSION;
        ud.sandbox_id = "sb".into();
        std::fs::write(dev.join("vdb"), encode_user_data(&ud).unwrap()).unwrap();

        assert_eq!(find_disk(&sys).as_deref(), Some("vdb"));
        assert_eq!(read(&sys, &dev, Duration::ZERO).unwrap(), ud);

        std::fs::write(dev.join("vdb"), b"not user data").unwrap();
        let e = read(&sys, &dev, Duration::ZERO).unwrap_err();
        assert!(matches!(e, UserDataError::Decode { .. }), "{e}");
        std::fs::remove_dir_all(sys.join("vdb")).unwrap();
        let e = read(&sys, &dev, Duration::from_millis(100)).unwrap_err();
        assert!(e.to_string().contains(USERDATA_DISK_SERIAL), "{e}");
    }
}
