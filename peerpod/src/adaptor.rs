//! The adaptor's pods: CreateVM, StartVM, StopVM and the reconciliation after a restart.
//!
//! Each pod has an entry with a per-pod async lock that serializes its operations (the
//! map itself is a plain mutex, never held across an await). Its record on disk
//! ([`crate::state`]) is written at CreateVM and updated at StartVM, so a restarted adaptor
//! ([`Adaptor::reconcile`]) serves the agent sockets of pods that are still there and
//! deletes the instances of pods that are gone ([`crate::liveness`]) and of instances no
//! record knows (orphans).
//!
//! Sizing and the per-node limit are decided at CreateVM ([`crate::sizing`]): the pod's
//! instance type is chosen and recorded, and the pod takes a slot under `limit_per_node`.
//! Only live pod VMs hold a slot: a failed CreateVM never takes one, a failed StartVM gives
//! it back (recorded, so also across a restart) and a retried StartVM takes one again;
//! StopVM removes the pod.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use kata_proto::hypervisor::CreateVMRequest;
use kata_proto::network_mode::AGENT_TLS_PORT;
use kata_proto::peerpod::{Registries, UserData};
use protobuf::Message;

use crate::config::AdaptorConfig;
use crate::error::AdaptorError;
use crate::provider::{InstanceRequest, Provider};
use crate::proxy::{AgentEndpoint, PodProxy};
use crate::state::{PodRecord, Store, TunnelRecord};
use crate::tls::Ca;
use crate::tunnel::VXLAN_OVERHEAD;
use crate::userdata::PodNet;
use crate::{annotations, liveness, naming, sizing, tunnel, userdata};

/// The agent socket's file name in a pod's directory.
pub const AGENT_SOCKET: &str = "agent.ttrpc";

/// One pod's mutable part.
#[derive(Debug)]
struct PodState {
    record: PodRecord,
    proxy: Option<PodProxy>,
}

/// One pod.
#[derive(Debug)]
struct Pod {
    /// Fixed at CreateVM (VNIs are allocated from the map without taking pod locks).
    vni: Option<u32>,
    /// Whether the pod counts under the per-node limit; changed only with the pods map
    /// locked, so counting and taking a slot is one step.
    slot: AtomicBool,
    state: tokio::sync::Mutex<PodState>,
}

/// The pods holding a slot under the limit.
fn live(pods: &HashMap<String, Arc<Pod>>) -> usize {
    pods.values()
        .filter(|p| p.slot.load(Ordering::Relaxed))
        .count()
}

/// The adaptor.
#[derive(Debug)]
pub struct Adaptor {
    cfg: AdaptorConfig,
    provider: Arc<dyn Provider>,
    ca: Ca,
    store: Store,
    registries: Registries,
    pods: Mutex<HashMap<String, Arc<Pod>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn check_id(id: &str) -> Result<(), AdaptorError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    ok.then_some(())
        .ok_or_else(|| AdaptorError::BadId(id.to_owned()))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, AdaptorError> + Send + 'static,
) -> Result<T, AdaptorError> {
    tokio::task::spawn_blocking(f).await?
}

impl Adaptor {
    /// Loads (or creates) the CA and the state, and reads the registry files. Blocking.
    pub fn new(cfg: AdaptorConfig, provider: Arc<dyn Provider>) -> Result<Self, AdaptorError> {
        for dir in [&cfg.state_dir, &cfg.pods_dir] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|source| AdaptorError::Io {
                    what: "create",
                    path: dir.clone(),
                    source,
                })?;
        }
        let ca =
            Ca::load_or_create(&cfg.state_dir).map_err(|e| AdaptorError::Tls("(CA)".into(), e))?;
        let store = Store::open(&cfg.state_dir)?;
        let registries = userdata::registries(&cfg.registries)?;
        Ok(Self {
            cfg,
            provider,
            ca,
            store,
            registries,
            pods: Mutex::default(),
        })
    }

    /// The agent socket of a pod.
    pub fn agent_socket(&self, sandbox_id: &str) -> PathBuf {
        self.cfg.pods_dir.join(sandbox_id).join(AGENT_SOCKET)
    }

    fn pod(&self, id: &str) -> Option<Arc<Pod>> {
        lock(&self.pods).get(id).cloned()
    }

    /// CreateVM: checks the request, plans the pod and records it; returns the agent socket.
    pub async fn create_vm(
        self: &Arc<Self>,
        req: CreateVMRequest,
    ) -> Result<PathBuf, AdaptorError> {
        let id = req.id.clone();
        check_id(&id)?;
        let ann = annotations::parse(&req.annotations)?;
        let image = ann
            .image
            .clone()
            .unwrap_or_else(|| self.provider.default_image().to_owned());
        self.provider
            .check(&image, ann.gpus.as_ref())
            .map_err(|source| AdaptorError::Provider {
                sandbox: id.clone(),
                what: "instance request",
                source,
            })?;
        let chosen = self
            .cfg
            .sizing
            .choose(&ann)
            .map_err(|source| AdaptorError::Sizing {
                sandbox: id.clone(),
                source,
            })?;
        let netns = (!req.networkNamespacePath.is_empty())
            .then(|| PathBuf::from(&req.networkNamespacePath));
        let inspected = match &netns {
            Some(ns) => {
                let ns = ns.clone();
                let (iface, routes) = blocking(move || {
                    tunnel::inspect(&ns).map_err(|e| AdaptorError::Netns(ns.clone(), e))
                })
                .await?;
                let underlay = self.provider.underlay().mtu;
                if iface.mtu + VXLAN_OVERHEAD > underlay {
                    return Err(AdaptorError::Mtu {
                        pod: iface.mtu,
                        underlay,
                    });
                }
                Some((iface, routes))
            }
            None => None,
        };
        // Reserve the id, the VNI and a place under the limit at once.
        let vni = {
            let mut pods = lock(&self.pods);
            if pods.contains_key(&id) {
                return Err(AdaptorError::AlreadyExists(id));
            }
            sizing::check_limit(live(&pods), self.cfg.limit_per_node)?;
            let vni = match &inspected {
                Some(_) => {
                    let used: HashSet<u32> = pods.values().filter_map(|p| p.vni).collect();
                    let min = self.cfg.vxlan_min_vni;
                    Some(
                        (min..min + 4096)
                            .find(|v| !used.contains(v))
                            .ok_or_else(|| AdaptorError::NoVni(id.clone()))?,
                    )
                }
                None => None,
            };
            let instance_name = naming::instance_name(&ann.namespace, &ann.name, &id);
            let record = PodRecord {
                sandbox_id: id.clone(),
                name: ann.name.clone(),
                namespace: ann.namespace.clone(),
                netns: netns.clone(),
                instance_name,
                image,
                instance_type: chosen.name.clone(),
                size: chosen.size,
                start_failed: false,
                tunnel: match (&netns, &inspected, vni) {
                    (Some(ns), Some((iface, _)), Some(vni)) => Some(TunnelRecord {
                        netns: ns.clone(),
                        interface: iface.name.clone(),
                        mtu: iface.mtu,
                        vni,
                    }),
                    _ => None,
                },
                address: None,
            };
            pods.insert(
                id.clone(),
                Arc::new(Pod {
                    vni,
                    slot: AtomicBool::new(true),
                    state: tokio::sync::Mutex::new(PodState {
                        record,
                        proxy: None,
                    }),
                }),
            );
            vni
        };
        let recorded = self.record_new_pod(&id, inspected, vni).await;
        if recorded.is_err() {
            lock(&self.pods).remove(&id);
            let (store, dir) = (self.store.clone(), self.cfg.pods_dir.join(&id));
            let sid = id.clone();
            let _ = tokio::task::spawn_blocking(move || {
                let _ = store.remove(&sid);
                let _ = std::fs::remove_dir_all(dir);
            })
            .await;
        }
        recorded?;
        tracing::info!(sandbox = %id, instance_type = %chosen.name, vcpus = chosen.size.vcpus,
            memory_mib = chosen.size.memory_mib, reason = %chosen.reason, "pod VM created (not started)");
        Ok(self.agent_socket(&id))
    }

    /// Issues the certificates, builds the user data and writes the pod's state.
    async fn record_new_pod(
        self: &Arc<Self>,
        id: &str,
        inspected: Option<(kata_proto::agent::Interface, Vec<kata_proto::agent::Route>)>,
        vni: Option<u32>,
    ) -> Result<(), AdaptorError> {
        let pod = self
            .pod(id)
            .ok_or_else(|| AdaptorError::NotFound(id.to_owned()))?;
        let record = pod.state.lock().await.record.clone();
        let pod_net = match (inspected, vni) {
            (Some((interface, routes)), Some(vni)) => Some(PodNet {
                interface,
                routes,
                vni,
                vxlan_port: self.cfg.vxlan_port,
                node_address: self.provider.underlay().node_address,
            }),
            _ => None,
        };
        let this = self.clone();
        let sid = id.to_owned();
        blocking(move || {
            let tls = |e| AdaptorError::Tls(sid.clone(), e);
            let server = this.ca.issue_server(&record.instance_name).map_err(tls)?;
            let client = this.ca.issue_client(&sid).map_err(tls)?;
            let ud = userdata::build(
                &sid,
                &record.instance_name,
                this.ca.cert_pem(),
                &server,
                pod_net,
                this.registries.clone(),
            );
            let bytes = ud
                .write_to_bytes()
                .map_err(|e| AdaptorError::UserData(sid.clone(), e))?;
            this.store.create(&record, &bytes, &client)?;
            let dir = this.cfg.pods_dir.join(&sid);
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&dir)
                .map_err(|source| AdaptorError::Io {
                    what: "create",
                    path: dir,
                    source,
                })
        })
        .await
    }

    /// The endpoint of a pod's agent.
    async fn endpoint(
        &self,
        record: &PodRecord,
        address: std::net::IpAddr,
    ) -> Result<AgentEndpoint, AdaptorError> {
        let sid = &record.sandbox_id;
        let (store, s) = (self.store.clone(), sid.clone());
        let client = blocking(move || Ok(store.client(&s)?)).await?;
        let tls = |e| AdaptorError::Tls(sid.clone(), e);
        let config = crate::tls::client_config(self.ca.cert_pem(), &client).map_err(tls)?;
        let name = crate::tls::server_name(&record.instance_name).map_err(tls)?;
        Ok(AgentEndpoint::new(address, AGENT_TLS_PORT, name, config))
    }

    /// StartVM: creates the instance, sets up the tunnel, waits for the agent and serves
    /// the agent socket. On failure the instance and tunnel are removed again.
    pub async fn start_vm(self: &Arc<Self>, id: &str) -> Result<(), AdaptorError> {
        let pod = self
            .pod(id)
            .ok_or_else(|| AdaptorError::NotFound(id.to_owned()))?;
        let mut st = pod.state.lock().await;
        if st.proxy.is_some() {
            return Ok(());
        }
        if !pod.slot.load(Ordering::Relaxed) {
            // A retry after a failed StartVM: the pod needs a slot again.
            let pods = lock(&self.pods);
            sizing::check_limit(live(&pods), self.cfg.limit_per_node)?;
            pod.slot.store(true, Ordering::Relaxed);
        }
        let result = self.start_instance(&mut st, id).await;
        if result.is_err() {
            {
                let _pods = lock(&self.pods);
                pod.slot.store(false, Ordering::Relaxed);
            }
            st.record.start_failed = true;
            let (store, rec) = (self.store.clone(), st.record.clone());
            if let Err(e) = blocking(move || Ok(store.save(&rec)?)).await {
                tracing::warn!(sandbox = %id, error = %crate::report::chain(&e), "record the failed start");
            }
        }
        result
    }

    /// StartVM's work on a pod whose lock is held.
    async fn start_instance(&self, st: &mut PodState, id: &str) -> Result<(), AdaptorError> {
        let store = self.store.clone();
        let sid = id.to_owned();
        let ud_bytes = blocking(move || Ok(store.user_data(&sid)?)).await?;
        let user_data = UserData::parse_from_bytes(&ud_bytes)
            .map_err(|e| AdaptorError::UserData(id.to_owned(), e))?;
        let record = st.record.clone();
        let started = std::time::Instant::now();
        let instance = self
            .provider
            .create_instance(InstanceRequest {
                name: record.instance_name.clone(),
                sandbox_id: id.to_owned(),
                image: record.image.clone(),
                instance_type: record.instance_type.clone(),
                size: record.size,
                user_data,
            })
            .await
            .map_err(|source| AdaptorError::Provider {
                sandbox: id.to_owned(),
                what: "create instance",
                source,
            })?;
        let created = started.elapsed();
        match self.connect_pod(&record, instance.address).await {
            Ok(proxy) => {
                st.record.address = Some(instance.address);
                st.record.start_failed = false;
                let (store, rec) = (self.store.clone(), st.record.clone());
                if let Err(e) = blocking(move || Ok(store.save(&rec)?)).await {
                    proxy.stop();
                    self.remove_instance(&st.record).await;
                    st.record.address = None;
                    return Err(e);
                }
                st.proxy = Some(proxy);
                tracing::info!(sandbox = %id, instance = %record.instance_name, address = %instance.address,
                    instance_type = %record.instance_type, vcpus = record.size.vcpus, memory_mib = record.size.memory_mib,
                    create_ms = created.as_millis() as u64, ready_ms = started.elapsed().as_millis() as u64,
                    "pod VM started; agent socket ready");
                Ok(())
            }
            Err(e) => {
                self.remove_instance(&record).await;
                Err(e)
            }
        }
    }

    /// Tunnel, readiness, proxy.
    async fn connect_pod(
        &self,
        record: &PodRecord,
        address: std::net::IpAddr,
    ) -> Result<PodProxy, AdaptorError> {
        let sid = record.sandbox_id.clone();
        if let Some(t) = record.tunnel.clone() {
            let port = self.cfg.vxlan_port;
            let s = sid.clone();
            blocking(move || {
                tunnel::setup(&t, address, port, t.mtu).map_err(|e| AdaptorError::Tunnel(s, e))
            })
            .await?;
        }
        let endpoint = self.endpoint(record, address).await?;
        endpoint
            .wait_ready(self.cfg.proxy_timeout)
            .await
            .map_err(|source| AdaptorError::AgentNotReady {
                sandbox: sid.clone(),
                instance: record.instance_name.clone(),
                diagnostics: self.provider.diagnostics(&record.instance_name),
                source: Box::new(source),
            })?;
        PodProxy::start(&self.agent_socket(&sid), endpoint)
            .map_err(|e| AdaptorError::Proxy(sid, Box::new(e)))
    }

    /// Removes the tunnel and the instance of a pod, logging failures (a cleanup path).
    async fn remove_instance(&self, record: &PodRecord) {
        if let Some(t) = record.tunnel.clone() {
            match tokio::task::spawn_blocking(move || tunnel::teardown(&t)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(sandbox = %record.sandbox_id, error = %crate::report::chain(&e), "tunnel teardown")
                }
                Err(e) => {
                    tracing::warn!(sandbox = %record.sandbox_id, error = %e, "tunnel teardown")
                }
            }
        }
        if let Err(e) = self.provider.delete_instance(&record.instance_name).await {
            tracing::warn!(sandbox = %record.sandbox_id, error = %crate::report::chain(&e), "delete instance");
        }
    }

    /// StopVM: stops the socket and its connections, removes the tunnel, deletes the
    /// instance and the pod's state. An unknown pod succeeds.
    pub async fn stop_vm(self: &Arc<Self>, id: &str) -> Result<(), AdaptorError> {
        let Some(pod) = self.pod(id) else {
            tracing::info!(sandbox = %id, "StopVM for an unknown pod: nothing to do");
            return Ok(());
        };
        let mut st = pod.state.lock().await;
        if let Some(p) = st.proxy.take() {
            p.stop();
        }
        self.teardown(&st.record).await?;
        lock(&self.pods).remove(id);
        tracing::info!(sandbox = %id, instance = %st.record.instance_name, "pod VM stopped and deleted");
        Ok(())
    }

    /// Tunnel, instance, state, pod directory: all of them are tried; the first failure
    /// is returned (the record stays then, so a retry or a restart finishes the job).
    async fn teardown(&self, record: &PodRecord) -> Result<(), AdaptorError> {
        let sid = record.sandbox_id.clone();
        let mut first: Option<AdaptorError> = None;
        if let Some(t) = record.tunnel.clone() {
            let s = sid.clone();
            if let Err(e) =
                blocking(move || tunnel::teardown(&t).map_err(|e| AdaptorError::Tunnel(s, e))).await
            {
                first.get_or_insert(e);
            }
        }
        if let Err(source) = self.provider.delete_instance(&record.instance_name).await {
            first.get_or_insert(AdaptorError::Provider {
                sandbox: sid.clone(),
                what: "delete instance",
                source,
            });
        }
        if let Some(e) = first {
            return Err(e);
        }
        let (store, dir) = (self.store.clone(), self.cfg.pods_dir.join(&sid));
        blocking(move || {
            store.remove(&sid)?;
            match std::fs::remove_dir_all(&dir) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(AdaptorError::Io {
                    what: "remove",
                    path: dir,
                    source: e,
                }),
                _ => Ok(()),
            }
        })
        .await
    }

    /// After a (re)start: serves the agent sockets of pods that are still on the node and
    /// deletes the instances of pods that are gone and of instances no record knows.
    pub async fn reconcile(self: &Arc<Self>) -> Result<(), AdaptorError> {
        let store = self.store.clone();
        let (records, bad) = blocking(move || Ok(store.load_all())).await?;
        for (dir, e) in bad {
            tracing::warn!(dir = %dir.display(), error = %crate::report::chain(&e), "unreadable pod state removed");
            let store = self.store.clone();
            blocking(move || Ok(store.remove_dir(&dir)?)).await?;
        }
        let instances =
            self.provider
                .list_instances()
                .await
                .map_err(|source| AdaptorError::Provider {
                    sandbox: "(all)".into(),
                    what: "list instances",
                    source,
                })?;
        let mut kept: HashSet<String> = HashSet::new();
        for record in records {
            let (sid, ns) = (record.sandbox_id.clone(), record.netns.clone());
            let alive = blocking(move || Ok(liveness::pod_alive(&sid, ns.as_deref()))).await?;
            if !alive {
                tracing::warn!(sandbox = %record.sandbox_id, instance = %record.instance_name,
                    "the pod went away while the adaptor was down: deleting its instance");
                if let Err(e) = self.teardown(&record).await {
                    tracing::error!(sandbox = %record.sandbox_id, error = %crate::report::chain(&e), "cleanup of a vanished pod");
                }
                continue;
            }
            kept.insert(record.instance_name.clone());
            let running = instances
                .iter()
                .any(|i| i.name == record.instance_name && i.running);
            let proxy = match record.address {
                Some(address) => {
                    if !running {
                        tracing::warn!(sandbox = %record.sandbox_id, instance = %record.instance_name,
                            "the pod's instance is not running; its agent socket will refuse connections");
                    }
                    self.resume(&record, address).await
                }
                None => None,
            };
            tracing::info!(sandbox = %record.sandbox_id, instance = %record.instance_name, serving = proxy.is_some(), "pod found again");
            lock(&self.pods).insert(
                record.sandbox_id.clone(),
                Arc::new(Pod {
                    vni: record.tunnel.as_ref().map(|t| t.vni),
                    slot: AtomicBool::new(!record.start_failed),
                    state: tokio::sync::Mutex::new(PodState { record, proxy }),
                }),
            );
        }
        for orphan in instances.iter().filter(|i| !kept.contains(&i.name)) {
            tracing::warn!(instance = %orphan.name, sandbox = %orphan.sandbox_id, "orphan instance (no pod on this node): deleting it");
            if let Err(e) = self.provider.delete_instance(&orphan.name).await {
                tracing::error!(instance = %orphan.name, error = %crate::report::chain(&e), "delete orphan instance");
            }
        }
        Ok(())
    }

    /// Re-establishes a surviving pod's tunnel (if it vanished) and serves its socket.
    async fn resume(&self, record: &PodRecord, address: std::net::IpAddr) -> Option<PodProxy> {
        let sid = record.sandbox_id.clone();
        if let Some(t) = record.tunnel.clone() {
            let port = self.cfg.vxlan_port;
            match tokio::task::spawn_blocking(move || tunnel::setup(&t, address, port, t.mtu)).await
            {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::error!(sandbox = %sid, error = %crate::report::chain(&e), "restore tunnel")
                }
                Err(e) => tracing::error!(sandbox = %sid, error = %e, "restore tunnel"),
            }
        }
        let dir = self.cfg.pods_dir.join(&sid);
        if let Err(e) = tokio::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .await
        {
            tracing::error!(sandbox = %sid, error = %e, "create pod directory");
        }
        match self.endpoint(record, address).await.and_then(|ep| {
            PodProxy::start(&self.agent_socket(&sid), ep)
                .map_err(|e| AdaptorError::Proxy(sid.clone(), Box::new(e)))
        }) {
            Ok(p) => Some(p),
            Err(e) => {
                tracing::error!(sandbox = %sid, error = %crate::report::chain(&e), "serve agent socket");
                None
            }
        }
    }

    /// Stops serving every agent socket (adaptor shutdown; the pods and their VMs stay).
    pub async fn shutdown(&self) {
        let pods: Vec<Arc<Pod>> = lock(&self.pods).values().cloned().collect();
        for pod in pods {
            if let Some(p) = pod.state.lock().await.proxy.take() {
                p.stop();
            }
        }
    }

    /// The pods directory (for the binary's messages).
    pub fn pods_dir(&self) -> &Path {
        &self.cfg.pods_dir
    }
}
