//! Network mode: the agent of a peer pod VM, reached over the network instead of vsock.
//!
//! Chosen by the kernel parameter [`BOOT_PARAM`] (`agent.mode=peerpod`); without it the
//! agent serves vsock exactly as before. At boot, before the runtime starts, [`boot`]:
//! 1. reads the user data from the config disk ([`userdata`]) and builds the TLS server
//!    configuration from it ([`tls`]);
//! 2. starts the *uplink* runtime, a thread of its own that stays in the VM's network
//!    namespace: network I/O that must leave through the provider NIC (image pulls) runs
//!    there;
//! 3. configures the provider NIC, binds the TLS listener on it and creates the VXLAN
//!    device towards the node ([`podnet`]);
//! 4. moves the calling thread (PID 1's main thread, which builds the agent's runtime) into
//!    a new network namespace, the pod's, moves the VXLAN device there and gives it the pod
//!    interface's name, MAC, addresses and routes. Every thread and process the agent
//!    creates from then on, containers included, is in the pod's namespace; the listener
//!    and the VXLAN's UDP socket stay in the VM's.
//!
//! The agent then serves ttrpc on a unix socket ([`TTRPC_SOCKET`]) and [`front`] relays
//! authenticated TLS connections to it (port 1024) or to the stdio service (port 1026,
//! [`stdio`]: streams survive an adaptor restart and are attached again).

pub mod front;
pub mod podnet;
pub mod stdio;
pub mod tls;
pub mod userdata;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use kata_proto::network_mode::BOOT_PARAM;
use kata_proto::peerpod::{Registries, UserData};

/// Where the agent serves ttrpc in network mode (the front relays to it).
pub const TTRPC_SOCKET: &str = "/run/kata-agent/ttrpc.sock";
/// A bind mount of the VM's own network namespace (diagnostics: `nsenter --net=`).
pub const VM_NETNS: &str = "/run/kata-containers/peerpod/vm-netns";

/// Whether the kernel command line asks for network mode.
pub fn requested(cmdline: &str) -> bool {
    cmdline.split_whitespace().any(|w| w == BOOT_PARAM)
}

/// A failure of the network-mode boot.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("user data")]
    UserData(#[from] userdata::UserDataError),
    #[error("agent TLS")]
    Tls(#[from] tls::TlsError),
    #[error("user data has no {0} section")]
    Missing(&'static str),
    #[error("start the uplink runtime")]
    Uplink(#[source] std::io::Error),
    #[error("build the boot runtime")]
    Runtime(#[source] std::io::Error),
    #[error("network")]
    Net(#[from] podnet::PodNetError),
    #[error("bind the agent's TLS port {port}")]
    Listen {
        port: u32,
        #[source]
        source: std::io::Error,
    },
}

/// What network mode hands to the agent's runtime.
#[derive(Debug)]
pub struct NetworkMode {
    /// The TLS listener, bound in the VM's network namespace.
    pub listener: std::net::TcpListener,
    /// Its TLS configuration.
    pub tls: Arc<rustls::ServerConfig>,
    /// A runtime whose threads live in the VM's network namespace.
    pub uplink: tokio::runtime::Handle,
    /// Registry settings for image pulls.
    pub registries: Registries,
    /// The pod's sandbox id, as the adaptor named it.
    pub sandbox_id: String,
}

/// The network-mode boot (see the module docs). Blocking; call on the thread that will
/// build the agent's runtime, before any other runtime exists.
pub fn boot() -> Result<NetworkMode, BootError> {
    let ud = userdata::read(
        Path::new(userdata::SYS_BLOCK),
        Path::new("/dev"),
        userdata::DISK_TIMEOUT,
    )?;
    let UserData {
        sandbox_id,
        tls: agent_tls,
        nic,
        pod_network,
        registries,
        ..
    } = ud;
    let agent_tls = agent_tls.into_option().ok_or(BootError::Missing("tls"))?;
    let nic = nic.into_option().ok_or(BootError::Missing("nic"))?;
    let tls = tls::server_config(&agent_tls)?;
    let uplink = start_uplink().map_err(BootError::Uplink)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(BootError::Runtime)?;
    let listener = rt.block_on(async {
        let (conn, h, _) = rtnetlink::new_connection().map_err(podnet::PodNetError::Socket)?;
        tokio::spawn(conn);
        let nic_index = podnet::configure_nic(&h, &nic).await?;
        podnet::write_resolv_conf(Path::new("/etc/resolv.conf"), &nic.nameservers)?;
        let port = agent_tls.port;
        let listener = u16::try_from(port)
            .map_err(std::io::Error::other)
            .and_then(|p| std::net::TcpListener::bind(("0.0.0.0", p)))
            .map_err(|source| BootError::Listen { port, source })?;
        let pod = pod_network.as_ref();
        let vxlan = match pod {
            Some(pod) => Some(podnet::create_vxlan(&h, pod, nic_index).await?),
            None => None,
        };
        keep_vm_netns()?;
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(podnet::PodNetError::Unshare)?;
        // From here on this thread is in the pod's namespace; `h` still talks to the VM's.
        match (pod, vxlan) {
            (Some(pod), Some(index)) => {
                let pod_ns = open("/proc/thread-self/ns/net")?;
                podnet::move_link(&h, index, &pod_ns).await?;
                podnet::configure_pod(pod).await?;
            }
            _ => podnet::loopback_up().await?,
        }
        Ok::<_, BootError>(listener)
    })?;
    tracing::info!(
        sandbox = %sandbox_id,
        port = agent_tls.port,
        pod_network = pod_network.is_some(),
        "network mode: pod network namespace ready, TLS listener bound"
    );
    Ok(NetworkMode {
        listener,
        tls,
        uplink,
        registries: registries.into_option().unwrap_or_default(),
        sandbox_id,
    })
}

fn open(path: &str) -> Result<std::fs::File, podnet::PodNetError> {
    std::fs::File::open(path).map_err(|source| podnet::PodNetError::Io {
        what: "open",
        path: PathBuf::from(path),
        source,
    })
}

/// Bind-mounts the calling thread's (the VM's) network namespace at [`VM_NETNS`].
fn keep_vm_netns() -> Result<(), podnet::PodNetError> {
    let target = Path::new(VM_NETNS);
    let io = |what, source| podnet::PodNetError::Io {
        what,
        path: target.to_owned(),
        source,
    };
    if let Some(dir) = target.parent() {
        std::fs::create_dir_all(dir).map_err(|e| io("create", e))?;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
    }
    std::fs::File::create(target).map_err(|e| io("create", e))?;
    nix::mount::mount(
        Some("/proc/thread-self/ns/net"),
        target,
        None::<&str>,
        nix::mount::MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| io("bind-mount the VM's network namespace at", e.into()))
}

/// Starts the uplink runtime on a thread of its own (created here, so in the caller's
/// namespace, and so are the threads it creates).
fn start_uplink() -> std::io::Result<tokio::runtime::Handle> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("uplink".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            let _ = tx.send(Ok(rt.handle().clone()));
            rt.block_on(std::future::pending::<()>());
        })?;
    rx.recv()
        .map_err(|_| std::io::Error::other("uplink thread ended"))?
}

/// Runs [`boot`]; a VM that cannot boot into network mode is unreachable, so on failure
/// the error is logged on the console and the VM powers off (the adaptor sees the instance
/// stop and reports the console).
pub fn boot_or_power_off() -> NetworkMode {
    match boot() {
        Ok(n) => n,
        Err(e) => {
            tracing::error!(error = %crate::logging::chain(&e), "network mode boot failed; powering off");
            nix::unistd::sync();
            let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
            // PID 1 must not return; power-off failing leaves nothing better to do.
            loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            }
        }
    }
}

/// Gives the image store the user data's registry settings and the uplink runtime.
pub fn configure_images(n: &NetworkMode, images: &crate::image::ImageStore) {
    let registry = match crate::image::registry::RegistryConfig::from_user_data(&n.registries) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %crate::logging::chain(&e), "registry settings unusable; pulls are anonymous");
            crate::image::registry::RegistryConfig {
                insecure: n.registries.insecure.clone(),
                ca_pem: n.registries.ca_pem.clone(),
                ..Default::default()
            }
        }
    };
    if let Err(e) = crate::image::registry::write_system_roots(
        Path::new(crate::image::registry::SYSTEM_ROOTS),
        &registry.ca_pem,
    ) {
        tracing::error!(error = %e, path = crate::image::registry::SYSTEM_ROOTS, "cannot write the CA bundle; pulls will fail");
    }
    images.configure(registry, Some(n.uplink.clone()));
}

/// Serves the TLS front for as long as the runtime lives; a failure is logged and the
/// front restarted after a second. Removes a stale ttrpc socket first.
pub fn spawn_front(n: &NetworkMode, stdio: crate::stdio::Registry) {
    if let Err(e) = prepare_ttrpc_socket() {
        tracing::error!(error = %e, path = TTRPC_SOCKET, "cannot prepare the ttrpc socket");
    }
    let acceptor = tokio_rustls::TlsAcceptor::from(n.tls.clone());
    let listener = n.listener.try_clone();
    tokio::spawn(async move {
        let listener = match listener {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "cannot use the TLS listener");
                return;
            }
        };
        loop {
            let l = match listener.try_clone() {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(error = %e, "cannot use the TLS listener");
                    return;
                }
            };
            if let Err(e) = front::serve(
                l,
                acceptor.clone(),
                PathBuf::from(TTRPC_SOCKET),
                stdio.clone(),
            )
            .await
            {
                tracing::error!(error = %e, "TLS front failed; restarting in 1s");
            }
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
    });
}

/// Removes a stale ttrpc socket (from a runtime restarted after a panic) and creates its
/// directory.
pub fn prepare_ttrpc_socket() -> std::io::Result<()> {
    let path = Path::new(TTRPC_SOCKET);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_param_selects_network_mode() {
        assert!(requested("console=ttyS0 agent.mode=peerpod quiet"));
        assert!(!requested("console=ttyS0 agent.log=debug"));
        assert!(!requested("agent.mode=peerpods"));
    }
}
