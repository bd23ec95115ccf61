//! The container helper: `kata-agent __kata-container-init`, a fresh single-threaded
//! process the agent spawns for every container init and exec (forking the multi-threaded
//! agent itself would be unsafe).
//!
//! The helper reads its [`Plan`] from the control channel (fd 3), joins the container's
//! cgroup, creates (init) or joins (exec) the namespaces and forks. It reports the child's
//! pid and exits, so the child is reparented to the agent, whose reaper collects its exit.
//! The child sets up the container (rootfs, mounts, pivot_root, pty, identity,
//! capabilities), reports `Ready`, waits for `Start` and execs. Nothing here returns: the
//! process exits or becomes the container's program.

use std::ffi::CString;
use std::fmt::Display;
use std::fs;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};
use nix::unistd::{chdir, fork, pivot_root, sethostname, ForkResult, Gid, Uid};
use serde::{Deserialize, Serialize};

use super::caps;
use super::channel::{self, FromChild, ToChild};
use super::fs::{default_devices, device_node, make_node, parse_options, propagation, secure_join};
use super::mountfd;
use super::seccomp::Compiled;
use super::spec::{namespace_file, namespace_flag, rlimit_resource, Process, Spec};
use crate::resolve::IN_ROOT;

/// The argument that turns the agent binary into the helper.
pub const HELPER_ARG: &str = "__kata-container-init";
/// The control channel's fd in the helper.
pub const CHANNEL_FD: RawFd = 3;
/// Longest error message sent to the agent (JSON escaping may grow it; a packet holds
/// [`channel::MAX_MESSAGE`]).
const MAX_ERROR: usize = 8 * 1024;
/// `PATH` when the process sets none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What the helper must do.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    /// The container (for messages).
    pub container_id: String,
    /// The container's cgroup directory, joined before forking.
    pub cgroup: PathBuf,
    /// The process to run.
    pub process: Process,
    /// The container's seccomp filters, installed before `execve` (see [`child`]'s order).
    #[serde(default)]
    pub seccomp: Option<Compiled>,
    /// Init or exec.
    pub mode: Mode,
}

/// Init creates the container; exec joins it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Mode {
    /// The container's first process, from the whole spec.
    Init(Box<Spec>),
    /// A process in the namespaces of the container's init.
    Exec {
        /// The init's pid (agent's view).
        init_pid: i32,
        /// Namespace types to join (`pid`, `mount`, ...).
        namespaces: Vec<String>,
    },
}

type Result<T> = std::result::Result<T, String>;

fn ctx<T, E: Display>(r: std::result::Result<T, E>, what: impl FnOnce() -> String) -> Result<T> {
    r.map_err(|e| format!("{}: {e}", what()))
}

/// Runs the helper. Never returns.
pub fn helper_main() -> ! {
    // SAFETY: the agent put the channel at fd 3 for us and nothing else owns it.
    let sock = unsafe { OwnedFd::from_raw_fd(CHANNEL_FD) };
    set_cloexec(sock.as_raw_fd());
    let plan: Plan = match channel::recv_large::<Plan>(sock.as_raw_fd()) {
        Ok(Some(p)) => p,
        Ok(None) => std::process::exit(1),
        Err(e) => fail(&sock, format!("read plan: {e}")),
    };
    // Not ptrace-able or dumpable by the container while it still holds the agent's
    // privileges (execve of the container's program resets this).
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    if let Err(e) = prepare(&plan) {
        fail(&sock, e);
    }
    // The child waits until its pid is reported, so `Pid` always precedes its messages.
    let (go_r, go_w) = match nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC) {
        Ok(p) => p,
        Err(e) => fail(&sock, format!("pipe: {e}")),
    };
    // SAFETY: the helper is single-threaded, so the child may do anything after fork.
    match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            drop(go_w);
            let mut byte = [0u8; 1];
            // EOF (the helper died) or the byte: either way the pid went out first.
            let _ = nix::unistd::read(go_r.as_raw_fd(), &mut byte);
            drop(go_r);
            let e = match child(&plan, &sock) {
                Ok(never) => match never {},
                Err(e) => e,
            };
            fail(&sock, e)
        }
        Ok(ForkResult::Parent { child }) => {
            drop(go_r);
            let sent = channel::send(sock.as_raw_fd(), &FromChild::Pid(child.as_raw()), None);
            if sent.is_err() {
                let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
                std::process::exit(1);
            }
            let _ = nix::unistd::write(&go_w, b"g");
            std::process::exit(0)
        }
        Err(e) => fail(&sock, format!("fork: {e}")),
    }
}

fn fail(sock: &OwnedFd, mut message: String) -> ! {
    // A message naming a huge argument must still fit one packet.
    if message.len() > MAX_ERROR {
        let mut end = MAX_ERROR;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push_str("...");
    }
    let _ = channel::send(sock.as_raw_fd(), &FromChild::Error(message), None);
    std::process::exit(1)
}

fn set_cloexec(fd: RawFd) {
    let _ = nix::fcntl::fcntl(
        fd,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    );
}

/// OOM priority, cgroup and namespaces, in the helper before forking.
fn prepare(plan: &Plan) -> Result<()> {
    // While the helper is still root with every capability (lowering it takes
    // CAP_SYS_RESOURCE) and /proc is the guest's; the forked child and its program inherit it.
    if let Some(adj) = plan.process.oom_score_adj {
        ctx(
            fs::write("/proc/self/oom_score_adj", adj.to_string()),
            || format!("set oom_score_adj {adj}"),
        )?;
    }
    let procs = plan.cgroup.join("cgroup.procs");
    ctx(fs::write(&procs, "0"), || {
        format!("join cgroup {}", plan.cgroup.display())
    })?;
    match &plan.mode {
        Mode::Init(spec) => {
            // The pod's namespaces first (a pid namespace applies to the forked child),
            // then new ones for the rest.
            let mut flags = 0;
            for ns in &spec.linux.namespaces {
                match &ns.path {
                    Some(path) => {
                        let f = ctx(fs::File::open(path), || {
                            format!("open pod namespace {path} (is the pod's sandbox running?)")
                        })?;
                        ctx(setns(&f, CloneFlags::empty()), || format!("setns {path}"))?;
                    }
                    None => flags |= ctx(namespace_flag(&ns.typ), || "namespace".into())?,
                }
            }
            ctx(unshare(CloneFlags::from_bits_retain(flags)), || {
                format!("unshare namespaces {:?}", ns_types(spec))
            })
        }
        Mode::Exec {
            init_pid,
            namespaces,
        } => {
            // Open all first (the mount namespace changes what /proc is), mount last.
            let mut files = Vec::new();
            for typ in namespaces {
                let Some(name) = namespace_file(typ) else {
                    continue;
                };
                let path = format!("/proc/{init_pid}/ns/{name}");
                let f = ctx(fs::File::open(&path), || format!("open {path}"))?;
                files.push((typ.clone(), path, OwnedFd::from(f)));
            }
            files.sort_by_key(|(t, _, _)| t == "mount");
            for (_, path, fd) in &files {
                ctx(setns(fd, CloneFlags::empty()), || format!("setns {path}"))?;
            }
            Ok(())
        }
    }
}

fn ns_types(spec: &Spec) -> Vec<&str> {
    spec.linux
        .namespaces
        .iter()
        .filter(|n| n.path.is_none())
        .map(|n| n.typ.as_str())
        .collect()
}

/// The forked child: set up, report Ready, wait for Start, exec.
fn child(plan: &Plan, sock: &OwnedFd) -> Result<std::convert::Infallible> {
    let p = &plan.process;
    match &plan.mode {
        Mode::Init(spec) => {
            let root = PathBuf::from(&spec.root.as_ref().ok_or("no root")?.path);
            setup_rootfs(spec, &root, &plan.cgroup, &p.cwd)?;
            pivot(&root)?;
            let prop = root_propagation(spec)?;
            if prop.contains(MsFlags::MS_SHARED) {
                ctx(
                    mount(None::<&str>, "/", None::<&str>, prop, None::<&str>),
                    || format!("set / propagation to {prop:?}"),
                )?;
            }
            for (k, v) in &spec.linux.sysctl {
                let path = format!("/proc/sys/{}", k.replace('.', "/"));
                ctx(fs::write(&path, v), || format!("sysctl {k}={v}"))?;
            }
            // Only a UTS namespace of its own: a pod container must not rename the pod.
            if spec
                .linux
                .namespaces
                .iter()
                .any(|n| n.typ == "uts" && n.path.is_none())
            {
                if !spec.hostname.is_empty() {
                    ctx(sethostname(&spec.hostname), || {
                        format!("sethostname {:?}", spec.hostname)
                    })?;
                }
                if !spec.domainname.is_empty() {
                    set_domainname(&spec.domainname)?;
                }
            }
            for path in &spec.linux.readonly_paths {
                readonly_path(path)?;
            }
            for path in &spec.linux.masked_paths {
                mask_path(path)?;
            }
            if spec.root.as_ref().is_some_and(|r| r.readonly) {
                ctx(
                    mount(
                        None::<&str>,
                        "/",
                        None::<&str>,
                        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                        None::<&str>,
                    ),
                    || "remount / read-only".into(),
                )?;
            }
            ctx(nix::unistd::setsid(), || "setsid".into())?;
        }
        Mode::Exec { .. } => {
            // Its own session and process group: `kill 0` in one container must not reach
            // processes of others (they would share the agent's group otherwise).
            ctx(nix::unistd::setsid(), || "setsid".into())?;
        }
    }
    if p.terminal {
        open_terminal(sock, p)?;
    }
    for r in &p.rlimits {
        let res = ctx(rlimit_resource(&r.typ), || "rlimit".into())?;
        let lim = libc::rlimit {
            rlim_cur: r.soft,
            rlim_max: r.hard,
        };
        // SAFETY: plain struct argument.
        if unsafe { libc::setrlimit(res, &lim) } != 0 {
            return Err(format!(
                "setrlimit {} soft={} hard={}: {}",
                r.typ,
                r.soft,
                r.hard,
                std::io::Error::last_os_error()
            ));
        }
    }
    // Installing a filter takes no_new_privs or CAP_SYS_ADMIN. With either at exec time it
    // goes in last, just before execve; otherwise, as runc does, before the identity change
    // drops CAP_SYS_ADMIN (the profile then also applies to the remaining setup calls).
    let seccomp_last = p.no_new_privileges
        || p.capabilities
            .as_ref()
            .is_some_and(|c| c.effective.iter().any(|n| n == "CAP_SYS_ADMIN"));
    if let (Some(filters), false) = (&plan.seccomp, seccomp_last) {
        ctx(super::seccomp::install(filters), || {
            "install the seccomp profile".into()
        })?;
    }
    let env = identity(p)?;
    if p.no_new_privileges {
        // SAFETY: prctl with integer arguments only.
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
            return Err(format!(
                "no_new_privileges: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    if let Some(mask) = p.user.umask {
        // SAFETY: umask cannot fail.
        unsafe { libc::umask(mask as libc::mode_t) };
    }
    let cwd = if p.cwd.is_empty() { "/" } else { &p.cwd };
    ctx(chdir(cwd), || format!("chdir to cwd {cwd:?}"))?;
    let program = find_program(&p.args[0], &env)?;
    let (argv, envp) = exec_strings(&p.args, &env)?;
    reset_signals();
    channel::send(sock.as_raw_fd(), &FromChild::Ready, None).map_err(|e| e.to_string())?;
    match channel::recv::<ToChild>(sock.as_raw_fd()) {
        Ok(Some((ToChild::Start, _))) => {}
        // The agent gave up on this process.
        _ => std::process::exit(1),
    }
    if let (Some(filters), true) = (&plan.seccomp, seccomp_last) {
        ctx(super::seccomp::install(filters), || {
            "install the seccomp profile".into()
        })?;
    }
    let e = nix::unistd::execve(&program, &argv, &envp).unwrap_err();
    Err(format!("exec {program:?}: {e}"))
}

fn set_domainname(name: &str) -> Result<()> {
    // SAFETY: pointer and length describe `name`.
    let rc = unsafe { libc::setdomainname(name.as_ptr().cast(), name.len()) };
    if rc != 0 {
        return Err(format!(
            "setdomainname {name:?}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Mounts everything the spec asks for under `root`, before pivot_root.
fn setup_rootfs(spec: &Spec, root: &Path, cgroup: &Path, cwd: &str) -> Result<()> {
    // pivot_root refuses shared mounts: a shared propagation is applied after it.
    let prop = match root_propagation(spec)? {
        p if p.contains(MsFlags::MS_SHARED) => MsFlags::MS_PRIVATE | MsFlags::MS_REC,
        p => p,
    };
    ctx(
        mount(None::<&str>, "/", None::<&str>, prop, None::<&str>),
        || format!("set / propagation to {prop:?}"),
    )?;
    ctx(
        mount(
            Some(root),
            root,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        ),
        || format!("bind rootfs {}", root.display()),
    )?;
    // Everything below is resolved from this fd: symlinks in the rootfs resolve inside it.
    let root_fd = ctx(crate::resolve::open_dir(root), || {
        format!("open rootfs {}", root.display())
    })?;
    let mut dev_mounted = false;
    for m in &spec.mounts {
        mount_one(m, root, &root_fd, cgroup)?;
        dev_mounted |= Path::new(&m.destination) == Path::new("/dev");
    }
    if dev_mounted {
        let devices = default_devices()
            .into_iter()
            .chain(spec.linux.devices.iter().filter_map(device_node));
        for d in devices {
            let (dir, name) = parent_in_root(root, &root_fd, &d.path)?;
            ctx(make_node(&dir, &name, &d), || format!("mknod {}", d.path))?;
        }
        let dev = ctx(
            crate::resolve::mkdir_all(&root_fd, Path::new("dev"), 0o755, IN_ROOT),
            || "open /dev in the container".into(),
        )?;
        for (link, target) in [
            ("fd", "/proc/self/fd"),
            ("stdin", "/proc/self/fd/0"),
            ("stdout", "/proc/self/fd/1"),
            ("stderr", "/proc/self/fd/2"),
            ("ptmx", "pts/ptmx"),
        ] {
            ctx(symlink_at(target, &dev, link), || {
                format!("symlink /dev/{link}")
            })?;
        }
    }
    if !cwd.is_empty() {
        let rel = in_root(root, cwd)?;
        ctx(
            crate::resolve::mkdir_all(&root_fd, &rel, 0o755, IN_ROOT),
            || format!("create cwd {cwd:?}"),
        )?;
    }
    Ok(())
}

/// `path` (absolute in the container) resolved as runc's securejoin does, relative to the
/// root: the directories to open or create with [`crate::resolve::mkdir_all`].
fn in_root(root: &Path, path: &str) -> Result<PathBuf> {
    let joined = ctx(secure_join(root, Path::new(path)), || {
        format!("resolve {path:?} in the container")
    })?;
    Ok(joined
        .strip_prefix(root)
        .unwrap_or(Path::new(""))
        .to_owned())
}

/// The directory holding `path` (created if missing), open, and the last component.
fn parent_in_root(root: &Path, root_fd: &OwnedFd, path: &str) -> Result<(OwnedFd, PathBuf)> {
    let rel = in_root(root, path)?;
    let name = PathBuf::from(
        rel.file_name()
            .ok_or_else(|| format!("{path:?} names no file"))?,
    );
    let parent = rel.parent().unwrap_or(Path::new(""));
    let dir = ctx(
        crate::resolve::mkdir_all(root_fd, parent, 0o755, IN_ROOT),
        || format!("create the directory of {path:?}"),
    )?;
    Ok((dir, name))
}

/// `symlinkat(target, dir, name)`; an existing entry is left alone.
fn symlink_at(target: &str, dir: &OwnedFd, name: &str) -> std::io::Result<()> {
    let t = CString::new(target).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    let n = CString::new(name).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: valid C strings and an open directory fd.
    if unsafe { libc::symlinkat(t.as_ptr(), dir.as_raw_fd(), n.as_ptr()) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EEXIST) {
            return Err(e);
        }
    }
    Ok(())
}

/// One spec mount, built detached and attached onto the destination's fd (see
/// [`super::mountfd`]): neither a symlink in the rootfs nor one swapped in meanwhile can
/// move it out of the root.
fn mount_one(m: &super::spec::Mount, root: &Path, root_fd: &OwnedFd, cgroup: &Path) -> Result<()> {
    let opts = parse_options(&m.options);
    let typ = m
        .typ
        .clone()
        .unwrap_or_else(|| if opts.is_bind() { "bind" } else { "none" }.to_owned());
    let what = || {
        format!(
            "mount {typ} {:?} on {} with {:?}",
            m.source.as_deref().unwrap_or(""),
            m.destination,
            m.options
        )
    };
    let bind_source: Option<PathBuf> = if typ == "cgroup" || typ == "cgroup2" {
        Some(cgroup.to_path_buf())
    } else if typ == "bind" || opts.is_bind() {
        Some(PathBuf::from(m.source.as_deref().ok_or_else(|| {
            format!("bind mount on {} has no source", m.destination)
        })?))
    } else {
        None
    };
    let mnt = match bind_source {
        Some(src) => {
            let is_dir = ctx(fs::metadata(&src), || {
                format!("bind source {} for {}", src.display(), m.destination)
            })?
            .is_dir();
            let target = if is_dir {
                let rel = in_root(root, &m.destination)?;
                ctx(
                    crate::resolve::mkdir_all(root_fd, &rel, 0o755, IN_ROOT),
                    what,
                )?
            } else {
                let (dir, name) = parent_in_root(root, root_fd, &m.destination)?;
                ctx(crate::resolve::touch(&dir, &name, 0o644), what)?
            };
            let mnt = ctx(
                mountfd::bind(&src, opts.flags.contains(MsFlags::MS_REC)),
                what,
            )?;
            ctx(mnt.set_flags(opts.remount_flags()), || {
                format!("set {:?} on the bind for {}", m.options, m.destination)
            })?;
            ctx(mnt.attach(&target), what)?;
            mnt
        }
        None => {
            let rel = in_root(root, &m.destination)?;
            let target = ctx(
                crate::resolve::mkdir_all(root_fd, &rel, 0o755, IN_ROOT),
                what,
            )?;
            let source = m.source.clone().unwrap_or_else(|| typ.clone());
            let mnt = ctx(
                mountfd::filesystem(&typ, &source, &opts.data, opts.flags - MsFlags::MS_REMOUNT),
                what,
            )?;
            ctx(mnt.attach(&target), what)?;
            mnt
        }
    };
    for p in &opts.propagation {
        ctx(mnt.set_propagation(*p), || {
            format!("propagation of {}", m.destination)
        })?;
    }
    Ok(())
}

/// The rootfs propagation the spec asks for (`rslave` when it says nothing, as runc).
fn root_propagation(spec: &Spec) -> Result<MsFlags> {
    match spec.linux.rootfs_propagation.as_deref() {
        None | Some("") => Ok(MsFlags::MS_SLAVE | MsFlags::MS_REC),
        Some(w) => propagation(w).ok_or_else(|| {
            format!("unknown linux.rootfsPropagation {w:?} (expected private, rslave, shared, ...)")
        }),
    }
}

/// Makes `root` the process's `/` and detaches the old root.
fn pivot(root: &Path) -> Result<()> {
    ctx(chdir(root), || format!("chdir {}", root.display()))?;
    ctx(pivot_root(".", "."), || {
        format!("pivot_root {}", root.display())
    })?;
    // The old root is now stacked under "."; keep its unmount from propagating anywhere.
    ctx(
        mount(
            None::<&str>,
            ".",
            None::<&str>,
            MsFlags::MS_SLAVE | MsFlags::MS_REC,
            None::<&str>,
        ),
        || "make old root a slave".into(),
    )?;
    ctx(umount2(".", MntFlags::MNT_DETACH), || {
        "detach old root".into()
    })?;
    ctx(chdir("/"), || "chdir /".into())
}

fn readonly_path(path: &str) -> Result<()> {
    match mount(
        Some(path),
        path,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    ) {
        Err(nix::errno::Errno::ENOENT) => return Ok(()),
        r => ctx(r, || format!("readonly path {path}"))?,
    }
    ctx(
        mount(
            None::<&str>,
            path,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_REC,
            None::<&str>,
        ),
        || format!("remount readonly path {path}"),
    )
}

fn mask_path(path: &str) -> Result<()> {
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(_) => return Ok(()),
    };
    let r = if meta.is_dir() {
        mount(
            Some("tmpfs"),
            path,
            Some("tmpfs"),
            MsFlags::MS_RDONLY,
            None::<&str>,
        )
    } else {
        mount(
            Some("/dev/null"),
            path,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
    };
    ctx(r, || format!("mask path {path}"))
}

/// Opens a pty in the container's devpts, hands the master to the agent and makes the
/// slave the controlling terminal and stdio.
fn open_terminal(sock: &OwnedFd, p: &Process) -> Result<()> {
    use nix::fcntl::OFlag;
    let master = ctx(
        nix::pty::posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC),
        || "open /dev/ptmx".into(),
    )?;
    ctx(nix::pty::grantpt(&master), || "grantpt".into())?;
    ctx(nix::pty::unlockpt(&master), || "unlockpt".into())?;
    let name = ctx(nix::pty::ptsname_r(&master), || "ptsname".into())?;
    if let Some(size) = p.console_size {
        let ws = libc::winsize {
            ws_row: size.height as u16,
            ws_col: size.width as u16,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads a winsize.
        unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    }
    let slave = ctx(
        fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags_noctty()
            .open(&name),
        || format!("open {name}"),
    )?;
    channel::send(sock.as_raw_fd(), &FromChild::Tty, Some(master.as_raw_fd()))
        .map_err(|e| e.to_string())?;
    drop(master);
    // SAFETY: TIOCSCTTY takes an integer argument.
    if unsafe { libc::ioctl(slave.as_raw_fd(), libc::TIOCSCTTY, 0) } != 0 {
        return Err(format!(
            "set controlling terminal: {}",
            std::io::Error::last_os_error()
        ));
    }
    for fd in 0..=2 {
        ctx(nix::unistd::dup2(slave.as_raw_fd(), fd), || {
            format!("dup2 pty to {fd}")
        })?;
    }
    Ok(())
}

trait NoCtty {
    fn custom_flags_noctty(&mut self) -> &mut Self;
}

impl NoCtty for fs::OpenOptions {
    fn custom_flags_noctty(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
    }
}

/// Groups, gid, uid and capabilities; returns the environment with HOME filled in.
fn identity(p: &Process) -> Result<Vec<String>> {
    let uid = p.user.uid;
    let gid = p.user.gid;
    let passwd = fs::read_to_string("/etc/passwd").unwrap_or_default();
    let entry = crate::passwd::parse_passwd(&passwd)
        .into_iter()
        .find(|e| e.uid == uid);
    let mut groups = p.user.additional_gids.clone();
    if groups.is_empty() {
        if let Some(e) = &entry {
            let group = fs::read_to_string("/etc/group").unwrap_or_default();
            groups = crate::passwd::supplementary_gids(&group, &e.name);
        }
    }
    let mut env = p.env.clone();
    if !env.iter().any(|e| e.starts_with("HOME=")) {
        let home = entry.as_ref().map_or("/", |e| e.home.as_str());
        env.push(format!("HOME={home}"));
    }
    let sets = p.capabilities.clone().unwrap_or_default();
    ctx(caps::drop_bounding(caps::mask(&sets.bounding)), || {
        format!("limit the bounding set to {:?}", sets.bounding)
    })?;
    // Keep permitted capabilities across the uid change; capset below sets them exactly.
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) };
    let gids: Vec<Gid> = groups.iter().map(|g| Gid::from_raw(*g)).collect();
    ctx(nix::unistd::setgroups(&gids), || {
        format!("setgroups {groups:?}")
    })?;
    let g = Gid::from_raw(gid);
    ctx(nix::unistd::setresgid(g, g, g), || format!("setgid {gid}"))?;
    let u = Uid::from_raw(uid);
    ctx(nix::unistd::setresuid(u, u, u), || format!("setuid {uid}"))?;
    // SAFETY: as above.
    unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0) };
    ctx(
        caps::set(
            caps::mask(&sets.effective),
            caps::mask(&sets.permitted),
            caps::mask(&sets.inheritable),
        ),
        || {
            format!(
                "set capabilities effective={:?} permitted={:?} inheritable={:?}",
                sets.effective, sets.permitted, sets.inheritable
            )
        },
    )?;
    ctx(caps::raise_ambient(caps::mask(&sets.ambient)), || {
        format!(
            "raise ambient capabilities {:?} (each must also be permitted and inheritable)",
            sets.ambient
        )
    })?;
    Ok(env)
}

/// Resolves `arg0` like `execvp` with the container's PATH, naming it when it cannot.
fn find_program(arg0: &str, env: &[String]) -> Result<CString> {
    let path = env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH);
    resolve_program(arg0, path, |p| {
        let c = CString::new(p.as_os_str().as_bytes()).ok()?;
        // SAFETY: `c` is a valid NUL-terminated path.
        let ok = unsafe { libc::access(c.as_ptr(), libc::X_OK) } == 0;
        let regular = fs::metadata(p).map(|m| m.is_file()).unwrap_or(false);
        (ok && regular).then_some(c)
    })
}

/// The lookup behind [`find_program`], with the executable check injected.
pub fn resolve_program(
    arg0: &str,
    path: &str,
    executable: impl Fn(&Path) -> Option<CString>,
) -> Result<CString> {
    if arg0.contains('/') {
        return executable(Path::new(arg0))
            .ok_or_else(|| format!("exec: {arg0:?}: no such executable file"));
    }
    path.split(':')
        .filter(|d| !d.is_empty())
        .find_map(|d| executable(&Path::new(d).join(arg0)))
        .ok_or_else(|| format!("exec: {arg0:?}: executable file not found in $PATH"))
}

/// Restores default dispositions (the helper is a Rust program: SIGPIPE is ignored) and
/// unblocks everything, so the program starts as it would from a shell.
fn reset_signals() {
    for sig in 1..32 {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: setting SIG_DFL is always valid.
        unsafe { libc::signal(sig, libc::SIG_DFL) };
    }
    let _ = nix::sys::signal::sigprocmask(
        nix::sys::signal::SigmaskHow::SIG_SETMASK,
        Some(&nix::sys::signal::SigSet::empty()),
        None,
    );
}

/// `argv` and `envp` for execve, made before the seccomp profile may forbid allocating.
fn exec_strings(args: &[String], env: &[String]) -> Result<(Vec<CString>, Vec<CString>)> {
    let argv: Vec<CString> = args
        .iter()
        .map(|a| CString::new(a.as_bytes()))
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| "process.args contains a NUL byte".to_owned())?;
    let envp: Vec<CString> = env
        .iter()
        .map(|a| CString::new(a.as_bytes()))
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| "process.env contains a NUL byte".to_owned())?;
    Ok((argv, envp))
}

/// Whether a path is an executable regular file (used by tests of the lookup).
pub fn is_executable_file(p: &Path) -> bool {
    fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_lookup_follows_path_and_names_failures() {
        let t = tempfile::tempdir().unwrap();
        let bin = t.path().join("bin");
        fs::create_dir(&bin).unwrap();
        let prog = bin.join("tool");
        fs::write(&prog, "#!/bin/sh\n").unwrap();
        fs::set_permissions(&prog, fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(bin.join("data"), "").unwrap();
        let check = |p: &Path| {
            is_executable_file(p).then(|| CString::new(p.as_os_str().as_bytes()).unwrap())
        };
        let path = format!("/nonexistent:{}", bin.display());
        let got = resolve_program("tool", &path, check).unwrap();
        assert_eq!(got.to_str().unwrap(), prog.to_str().unwrap());
        let e = resolve_program("data", &path, check).unwrap_err();
        assert_eq!(e, "exec: \"data\": executable file not found in $PATH");
        let abs = resolve_program(prog.to_str().unwrap(), "", check).unwrap();
        assert_eq!(abs.to_str().unwrap(), prog.to_str().unwrap());
        assert!(resolve_program("/no/such", "", check)
            .unwrap_err()
            .contains("/no/such"));
    }

    #[test]
    fn plans_round_trip_as_json() {
        let plan = Plan {
            container_id: "c".into(),
            cgroup: "/sys/fs/cgroup/kata/c".into(),
            process: Process {
                args: vec!["sh".into()],
                ..Default::default()
            },
            seccomp: None,
            mode: Mode::Exec {
                init_pid: 7,
                namespaces: vec!["pid".into(), "mount".into()],
            },
        };
        let bytes = serde_json::to_vec(&plan).unwrap();
        let back: Plan = serde_json::from_slice(&bytes).unwrap();
        assert!(matches!(back.mode, Mode::Exec { init_pid: 7, .. }));
    }
}
