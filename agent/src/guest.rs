//! `GetGuestDetails`: facts about the guest the host needs for sizing and hotplug.

use std::path::{Path, PathBuf};

use std::time::Duration;

use kata_proto::agent::{GuestDetailsResponse, OnlineResourcesRequest, OnlineResourcesResponse};

const OSRELEASE: &str = "/proc/sys/kernel/osrelease";
const MEMINFO: &str = "/proc/meminfo";
const BLOCK_SIZE: &str = "/sys/devices/system/memory/block_size_bytes";
const CPU_ONLINE: &str = "/sys/devices/system/cpu/online";

/// A guest fact that could not be read or parsed.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// A file could not be read.
    #[error("read {path:?}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The hot-added resources did not come online in time.
    #[error("the guest has {memory_blocks} online memory blocks and {cpus} online CPUs after {waited_ms} ms, expected at least {want_blocks} and {want_cpus}")]
    NotOnline {
        /// Online memory blocks seen.
        memory_blocks: u32,
        /// Online CPUs seen.
        cpus: u32,
        /// Asked for.
        want_blocks: u32,
        /// Asked for.
        want_cpus: u32,
        /// How long it waited.
        waited_ms: u64,
    },
    /// A file's contents did not parse.
    #[error("cannot parse {what} from {text:?}")]
    Parse {
        /// What was being parsed.
        what: &'static str,
        /// The offending text (trimmed).
        text: String,
    },
}

fn parse_err(what: &'static str, text: &str) -> GuestError {
    GuestError::Parse {
        what,
        text: text.trim().chars().take(200).collect(),
    }
}

/// Counts the CPUs in a kernel cpu list such as `0-3,5`.
pub fn parse_cpu_list(text: &str) -> Result<u32, GuestError> {
    let err = || parse_err("cpu list", text);
    let text = text.trim();
    if text.is_empty() {
        return Ok(0);
    }
    let mut count = 0u32;
    for part in text.split(',') {
        let n = match part.split_once('-') {
            Some((a, b)) => {
                let a: u32 = a.parse().map_err(|_| err())?;
                let b: u32 = b.parse().map_err(|_| err())?;
                b.checked_sub(a).ok_or_else(err)? + 1
            }
            None => {
                part.parse::<u32>().map_err(|_| err())?;
                1
            }
        };
        count = count.checked_add(n).ok_or_else(err)?;
    }
    Ok(count)
}

/// `MemTotal` from `/proc/meminfo`, in KiB.
pub fn parse_mem_total_kib(meminfo: &str) -> Result<u64, GuestError> {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| parse_err("MemTotal", meminfo.lines().next().unwrap_or_default()))
}

/// The memory block size, which the kernel prints in hex without `0x`.
pub fn parse_block_size(text: &str) -> Result<u64, GuestError> {
    let t = text.trim();
    let t = t.strip_prefix("0x").unwrap_or(t);
    u64::from_str_radix(t, 16).map_err(|_| parse_err("memory block size", text))
}

async fn read(path: &str) -> Result<String, GuestError> {
    tokio::fs::read_to_string(path)
        .await
        .map_err(|source| GuestError::Read {
            path: Path::new(path).to_owned(),
            source,
        })
}

/// Collects the details; `loaded_modules` are the modules loaded at boot.
///
/// A guest without memory hotplug support has no block size file; that reports 0.
pub async fn guest_details(loaded_modules: &[String]) -> Result<GuestDetailsResponse, GuestError> {
    let mut resp = GuestDetailsResponse::new();
    resp.kernel_release = read(OSRELEASE).await?.trim().to_owned();
    resp.mem_total_kib = parse_mem_total_kib(&read(MEMINFO).await?)?;
    resp.mem_block_size_bytes = match tokio::fs::read_to_string(BLOCK_SIZE).await {
        Ok(t) => parse_block_size(&t)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(source) => {
            return Err(GuestError::Read {
                path: BLOCK_SIZE.into(),
                source,
            })
        }
    };
    resp.online_cpus = parse_cpu_list(&read(CPU_ONLINE).await?)?;
    resp.loaded_modules = loaded_modules.to_vec();
    Ok(resp)
}

const MEMORY_DIR: &str = "/sys/devices/system/memory";
const CPU_DIR: &str = "/sys/devices/system/cpu";

/// Writes `value` to every `<dir>/<prefix>N/<file>` whose content is `offline_value`;
/// returns how many are (now) online.
async fn online_all(
    dir: &str,
    prefix: &str,
    file: &str,
    offline_value: &str,
    value: &'static str,
) -> Result<u32, GuestError> {
    let mut online = 0;
    let mut rd = match tokio::fs::read_dir(dir).await {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(source) => {
            return Err(GuestError::Read {
                path: dir.into(),
                source,
            })
        }
    };
    while let Ok(Some(entry)) = rd.next_entry().await {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let Some(n) = name.strip_prefix(prefix) else {
            continue;
        };
        if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let path = entry.path().join(file);
        let state = match tokio::fs::read_to_string(&path).await {
            Ok(s) => s,
            // cpu0 has no `online` file: it is always online.
            Err(_) => {
                online += 1;
                continue;
            }
        };
        if state.trim() == offline_value {
            // A block the kernel onlined meanwhile answers EINVAL: count it by re-reading.
            if let Err(error) = tokio::fs::write(&path, value).await {
                let now = tokio::fs::read_to_string(&path).await.unwrap_or_default();
                if now.trim() == offline_value {
                    // Often transient (EBUSY while the kernel still adds the block): the
                    // caller's loop tries again until its deadline.
                    tracing::debug!(path = %path.display(), %error, "online failed; retrying");
                    continue;
                }
            }
        }
        online += 1;
    }
    Ok(online)
}

/// Onlines offline memory blocks and CPUs until the guest has at least the requested
/// numbers online, or the timeout passes (an error giving both numbers).
pub async fn online_resources(
    req: &OnlineResourcesRequest,
) -> Result<OnlineResourcesResponse, GuestError> {
    let started = std::time::Instant::now();
    let timeout = Duration::from_millis(req.timeout_ms.into());
    loop {
        let memory_blocks = online_all(MEMORY_DIR, "memory", "state", "offline", "online").await?;
        let cpus = online_all(CPU_DIR, "cpu", "online", "0", "1").await?;
        if memory_blocks >= req.min_memory_blocks && cpus >= req.min_cpus {
            let mut resp = OnlineResourcesResponse::new();
            resp.memory_blocks = memory_blocks;
            resp.online_cpus = cpus;
            resp.mem_total_kib = parse_mem_total_kib(&read(MEMINFO).await?)?;
            return Ok(resp);
        }
        if started.elapsed() >= timeout {
            return Err(GuestError::NotOnline {
                memory_blocks,
                cpus,
                want_blocks: req.min_memory_blocks,
                want_cpus: req.min_cpus,
                waited_ms: started.elapsed().as_millis() as u64,
            });
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0\n").unwrap(), 1);
        assert_eq!(parse_cpu_list("0-3\n").unwrap(), 4);
        assert_eq!(parse_cpu_list("0-3,5").unwrap(), 5);
        assert_eq!(parse_cpu_list("0,2,4-7").unwrap(), 6);
        assert_eq!(parse_cpu_list("\n").unwrap(), 0);
        for bad in ["3-1", "a", "0-", "0,,1", "-1"] {
            assert!(parse_cpu_list(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn meminfo_total() {
        let text = "MemTotal:        2030036 kB\nMemFree:         1800000 kB\n";
        assert_eq!(parse_mem_total_kib(text).unwrap(), 2030036);
        assert!(parse_mem_total_kib("MemFree: 1 kB\n").is_err());
        assert!(parse_mem_total_kib("MemTotal: x kB\n").is_err());
    }

    #[test]
    fn block_size_is_hex() {
        assert_eq!(parse_block_size("8000000\n").unwrap(), 128 << 20);
        assert_eq!(parse_block_size("0x8000000").unwrap(), 128 << 20);
        assert!(parse_block_size("zz").is_err());
    }

    #[tokio::test]
    async fn details_of_this_machine() {
        let d = guest_details(&["vsock".into()]).await.unwrap();
        assert!(!d.kernel_release.is_empty());
        assert!(d.mem_total_kib > 0);
        assert!(d.online_cpus >= 1);
        assert_eq!(d.loaded_modules, ["vsock"]);
    }
}
