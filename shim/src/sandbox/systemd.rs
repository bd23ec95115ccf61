//! The systemd cgroup driver: a `linux.cgroupsPath` of the form `slice:prefix:name` names a
//! transient scope `<prefix>-<name>.scope` in `slice`, which systemd creates over D-Bus
//! (`StartTransientUnit` with `Delegate=yes`, as runc does) and removes (`StopUnit`). Its
//! cgroup is `<expanded slice>/<prefix>-<name>.scope`, used from then on like any cgroupfs
//! path. The D-Bus calls sit behind [`Manager`], so they are unit-tested against recorded
//! calls; no test host here runs systemd.

use async_trait::async_trait;

/// The default slice when the path names none (runc's).
const DEFAULT_SLICE: &str = "system.slice";

/// Errors of the systemd driver.
#[derive(Debug, thiserror::Error)]
pub enum SystemdError {
    /// The path is not `slice:prefix:name` with a valid slice.
    #[error("invalid systemd cgroupsPath {path:?}: {reason}")]
    InvalidPath { path: String, reason: &'static str },
    /// The D-Bus call failed.
    #[error("systemd D-Bus call {method} for {unit} failed")]
    Dbus {
        method: &'static str,
        unit: String,
        #[source]
        source: Box<zbus::Error>,
    },
}

/// A transient scope for the sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    /// `<prefix>-<name>.scope`.
    pub unit: String,
    /// The slice it lives in.
    pub slice: String,
    /// Its cgroup path, from each hierarchy's root.
    pub cgroup_path: String,
}

/// Whether `path` is in the systemd driver's form.
pub fn is_systemd_path(path: &str) -> bool {
    !path.starts_with('/') && path.split(':').count() == 3
}

impl Scope {
    /// The scope named by `slice:prefix:name`.
    pub fn parse(path: &str) -> Result<Self, SystemdError> {
        let invalid = |reason| SystemdError::InvalidPath {
            path: path.to_owned(),
            reason,
        };
        let parts: Vec<&str> = path.split(':').collect();
        let [slice, prefix, name] = parts[..] else {
            return Err(invalid("expected slice:prefix:name"));
        };
        if name.is_empty() || name.contains('/') {
            return Err(invalid("the name must be non-empty without '/'"));
        }
        let slice = if slice.is_empty() {
            DEFAULT_SLICE
        } else {
            slice
        };
        let unit = if prefix.is_empty() {
            format!("{name}.scope")
        } else {
            format!("{prefix}-{name}.scope")
        };
        let expanded = expand_slice(slice)
            .ok_or_else(|| invalid("the slice must be <a>-<b>.slice without '/' or '--'"))?;
        Ok(Self {
            cgroup_path: format!("{expanded}/{unit}"),
            unit,
            slice: slice.to_owned(),
        })
    }
}

/// `a-b-c.slice` -> `/a.slice/a-b.slice/a-b-c.slice` (systemd's nesting by dashes);
/// `-.slice` is the root. `None` for a name that is not a valid slice.
pub fn expand_slice(slice: &str) -> Option<String> {
    let base = slice.strip_suffix(".slice")?;
    if base == "-" {
        return Some("/".to_owned());
    }
    if base.is_empty()
        || base.contains('/')
        || base.contains("--")
        || base.starts_with('-')
        || base.ends_with('-')
    {
        return None;
    }
    let mut path = String::new();
    let mut prefix = String::new();
    for part in base.split('-') {
        if !prefix.is_empty() {
            prefix.push('-');
        }
        prefix.push_str(part);
        path.push('/');
        path.push_str(&prefix);
        path.push_str(".slice");
    }
    Some(path)
}

/// The systemd manager's calls the driver makes.
#[async_trait]
pub trait Manager: Send + Sync {
    /// StartTransientUnit(`scope.unit`, "replace", [Description, Slice, Delegate=yes,
    /// DefaultDependencies=no, PIDs=[pid]], []).
    async fn start_scope(&self, scope: &Scope, pid: u32) -> Result<(), SystemdError>;
    /// StopUnit(unit, "replace").
    async fn stop_unit(&self, unit: &str) -> Result<(), SystemdError>;
}

/// The system bus's systemd.
#[derive(Debug, Default)]
pub struct Dbus;

const DEST: &str = "org.freedesktop.systemd1";
const PATH: &str = "/org/freedesktop/systemd1";
const IFACE: &str = "org.freedesktop.systemd1.Manager";

/// The StartTransientUnit properties of a sandbox scope.
pub fn scope_properties(
    scope: &Scope,
    pid: u32,
) -> Vec<(&'static str, zbus::zvariant::Value<'static>)> {
    use zbus::zvariant::Value;
    vec![
        (
            "Description",
            Value::from(format!("kata sandbox {}", scope.unit)),
        ),
        ("Slice", Value::from(scope.slice.clone())),
        ("Delegate", Value::from(true)),
        ("DefaultDependencies", Value::from(false)),
        ("PIDs", Value::from(vec![pid])),
    ]
}

#[async_trait]
impl Manager for Dbus {
    async fn start_scope(&self, scope: &Scope, pid: u32) -> Result<(), SystemdError> {
        let err = |source| SystemdError::Dbus {
            method: "StartTransientUnit",
            unit: scope.unit.clone(),
            source: Box::new(source),
        };
        let conn = zbus::Connection::system().await.map_err(err)?;
        let aux: Vec<(&str, Vec<(&str, zbus::zvariant::Value<'_>)>)> = Vec::new();
        conn.call_method(
            Some(DEST),
            PATH,
            Some(IFACE),
            "StartTransientUnit",
            &(
                scope.unit.as_str(),
                "replace",
                scope_properties(scope, pid),
                aux,
            ),
        )
        .await
        .map_err(err)?;
        Ok(())
    }

    async fn stop_unit(&self, unit: &str) -> Result<(), SystemdError> {
        let err = |source| SystemdError::Dbus {
            method: "StopUnit",
            unit: unit.to_owned(),
            source: Box::new(source),
        };
        let conn = zbus::Connection::system().await.map_err(err)?;
        conn.call_method(
            Some(DEST),
            PATH,
            Some(IFACE),
            "StopUnit",
            &(unit, "replace"),
        )
        .await
        .map_err(err)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn slices_expand_like_systemd() {
        assert_eq!(expand_slice("-.slice").unwrap(), "/");
        assert_eq!(expand_slice("system.slice").unwrap(), "/system.slice");
        assert_eq!(
            expand_slice("kubepods-burstable-pod12.slice").unwrap(),
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod12.slice"
        );
        for bad in ["kubepods", "a--b.slice", "-a.slice", "a/b.slice"] {
            assert!(expand_slice(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn cri_paths_name_their_scope() {
        let s = Scope::parse("kubepods-besteffort-pod9.slice:cri-containerd:abc").unwrap();
        assert_eq!(s.unit, "cri-containerd-abc.scope");
        assert_eq!(s.slice, "kubepods-besteffort-pod9.slice");
        assert_eq!(
            s.cgroup_path,
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod9.slice/cri-containerd-abc.scope"
        );
        let s = Scope::parse(":kata:x").unwrap();
        assert_eq!(s.cgroup_path, "/system.slice/kata-x.scope");
        assert!(is_systemd_path("a.slice:p:n") && !is_systemd_path("/kubepods/x"));
        for bad in ["a:b", "bad:p:", "nodot:p:n"] {
            assert!(Scope::parse(bad).is_err(), "{bad}");
        }
    }

    /// Records the calls instead of making them.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<String>>);

    #[async_trait]
    impl Manager for Recorder {
        async fn start_scope(&self, scope: &Scope, pid: u32) -> Result<(), SystemdError> {
            let props: Vec<String> = scope_properties(scope, pid)
                .into_iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            self.0.lock().unwrap().push(format!(
                "StartTransientUnit {} replace [{}]",
                scope.unit,
                props.join(" ")
            ));
            Ok(())
        }

        async fn stop_unit(&self, unit: &str) -> Result<(), SystemdError> {
            self.0
                .lock()
                .unwrap()
                .push(format!("StopUnit {unit} replace"));
            Ok(())
        }
    }

    #[tokio::test]
    async fn the_scope_is_delegated_and_holds_the_shim() {
        let rec = Recorder::default();
        let s = Scope::parse("kubepods-pod1.slice:cri-containerd:sb").unwrap();
        rec.start_scope(&s, 4242).await.unwrap();
        rec.stop_unit(&s.unit).await.unwrap();
        let calls = rec.0.lock().unwrap().clone();
        assert_eq!(
            calls,
            [
                "StartTransientUnit cri-containerd-sb.scope replace [Description=\"kata sandbox cri-containerd-sb.scope\" Slice=\"kubepods-pod1.slice\" Delegate=true DefaultDependencies=false PIDs=[uint32 4242]]",
                "StopUnit cri-containerd-sb.scope replace",
            ]
        );
    }
}
