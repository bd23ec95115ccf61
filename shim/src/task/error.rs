//! The Task service's error type and its mapping to ttrpc status codes — the one place
//! where that mapping happens.
//!
//! | error | code |
//! |---|---|
//! | unknown container or process, process already finished | NOT_FOUND |
//! | duplicate id | ALREADY_EXISTS |
//! | bad request, bad spec, unsupported stdio URI | INVALID_ARGUMENT |
//! | invalid in the current state, bad configuration | FAILED_PRECONDITION |
//! | not supported | UNIMPLEMENTED |
//! | the agent refused a request (an in-guest image pull too) | the agent's code |
//! | anything else (VM, mounts, transport) | INTERNAL |
//!
//! The message is the whole error chain, so containerd's log says what failed and why.

use ttrpc::Code;

use crate::sandbox::agent::AgentError;
use crate::sandbox::mounts::MountError;
use crate::sandbox::resources::ResourceError;
use crate::sandbox::SandboxError;
use crate::task::container::StateError;
use crate::task::io::IoError;
use crate::task::spec::SpecError;

/// Why an RPC failed.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error("container {0} not found")]
    ContainerNotFound(String),
    #[error("process {exec_id} of container {container_id} not found")]
    ProcessNotFound {
        container_id: String,
        exec_id: String,
    },
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// Kill of a process that already exited (containerd tolerates NOT_FOUND here).
    #[error("process already finished")]
    ProcessFinished,
    #[error("invalid request: {0}")]
    InvalidArgument(String),
    #[error("{0} is not supported")]
    Unimplemented(&'static str),
    #[error("no sandbox is running")]
    NoSandbox,
    /// The sandbox was ended for a fault.
    #[error("sandbox {sandbox_id} is down: {reason}")]
    SandboxDown { sandbox_id: String, reason: String },
    /// A pod container whose pod this shim does not run.
    #[error("container {container} belongs to sandbox {sandbox_id}, which is not running")]
    SandboxNotRunning {
        container: String,
        sandbox_id: String,
    },
    #[error(transparent)]
    State(#[from] StateError),
    #[error("sandbox")]
    Sandbox(#[from] SandboxError),
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error("stdio")]
    Io(#[from] IoError),
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("mount")]
    Mount(#[from] MountError),
    #[error("resources")]
    Resources(#[from] crate::sandbox::resources::ResourceError),
    /// Host files could not be copied into a remote VM.
    #[error("copying into the VM")]
    GuestCopy(#[from] Box<crate::sandbox::guest_files::GuestCopyError>),
    /// The agent refused to pull a container's image in a remote VM.
    #[error("cannot pull image {image} for container {container} in the VM")]
    Pull {
        container: String,
        image: String,
        #[source]
        source: Box<AgentError>,
    },
}

impl TaskError {
    /// The ttrpc code for this error.
    pub fn code(&self) -> Code {
        match self {
            TaskError::ContainerNotFound(_)
            | TaskError::ProcessNotFound { .. }
            | TaskError::ProcessFinished => Code::NOT_FOUND,
            TaskError::AlreadyExists(_) => Code::ALREADY_EXISTS,
            TaskError::InvalidArgument(_)
            | TaskError::Spec(_)
            | TaskError::Mount(MountError::MissingSource { .. }) => Code::INVALID_ARGUMENT,
            TaskError::Io(IoError::UnsupportedScheme { .. } | IoError::RelativePath(_)) => {
                Code::INVALID_ARGUMENT
            }
            TaskError::Unimplemented(_) => Code::UNIMPLEMENTED,
            TaskError::Resources(
                ResourceError::Memory { .. }
                | ResourceError::Slots { .. }
                | ResourceError::Vcpus { .. }
                | ResourceError::NoCpuSlot { .. },
            ) => Code::RESOURCE_EXHAUSTED,
            TaskError::Resources(ResourceError::VmGone(_) | ResourceError::NoHotplug { .. }) => {
                Code::FAILED_PRECONDITION
            }
            TaskError::Resources(_) => Code::INTERNAL,
            TaskError::NoSandbox
            | TaskError::SandboxDown { .. }
            | TaskError::Agent(AgentError::SandboxDown { .. })
            | TaskError::SandboxNotRunning { .. }
            | TaskError::State(_)
            | TaskError::Sandbox(SandboxError::Config(_)) => Code::FAILED_PRECONDITION,
            TaskError::Agent(e) | TaskError::Sandbox(SandboxError::Agent(e)) => {
                e.agent_code().unwrap_or(Code::INTERNAL)
            }
            TaskError::Pull { source, .. } => source.agent_code().unwrap_or(Code::INTERNAL),
            TaskError::Io(_)
            | TaskError::Sandbox(_)
            | TaskError::Mount(_)
            | TaskError::GuestCopy(_) => Code::INTERNAL,
        }
    }
}

impl From<TaskError> for ttrpc::Error {
    fn from(e: TaskError) -> ttrpc::Error {
        let code = e.code();
        let message = crate::report::chain(&e);
        if code == Code::INTERNAL {
            tracing::error!(error = %message, "request failed");
        } else {
            tracing::debug!(error = %message, ?code, "request refused");
        }
        ttrpc::Error::RpcStatus(ttrpc::get_status(code, message))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::container::Status;

    fn status_of(e: TaskError) -> (Code, String) {
        match ttrpc::Error::from(e) {
            ttrpc::Error::RpcStatus(s) => (s.code(), s.message().to_owned()),
            other => panic!("not a status: {other:?}"),
        }
    }

    #[test]
    fn codes_follow_the_table() {
        let cases = [
            (TaskError::ContainerNotFound("c".into()), Code::NOT_FOUND),
            (TaskError::ProcessFinished, Code::NOT_FOUND),
            (TaskError::AlreadyExists("c".into()), Code::ALREADY_EXISTS),
            (
                TaskError::InvalidArgument("x".into()),
                Code::INVALID_ARGUMENT,
            ),
            (TaskError::Unimplemented("checkpoint"), Code::UNIMPLEMENTED),
            (
                StateError::CannotStart("c".into(), Status::Running).into(),
                Code::FAILED_PRECONDITION,
            ),
            (
                IoError::UnsupportedScheme {
                    scheme: "binary".into(),
                    uri: "binary:///x".into(),
                }
                .into(),
                Code::INVALID_ARGUMENT,
            ),
            (
                IoError::RelativePath("x".into()).into(),
                Code::INVALID_ARGUMENT,
            ),
        ];
        for (e, code) in cases {
            assert_eq!(status_of(e).0, code);
        }
    }

    #[test]
    fn agent_codes_pass_through_and_transport_errors_are_internal() {
        let refused = AgentError::Rpc {
            method: "StartContainer",
            source: ttrpc::Error::RpcStatus(ttrpc::get_status(
                Code::NOT_FOUND,
                "no such container",
            )),
        };
        let (code, msg) = status_of(refused.into());
        assert_eq!(code, Code::NOT_FOUND);
        assert!(
            msg.contains("StartContainer") && msg.contains("no such container"),
            "{msg}"
        );
        let broken = AgentError::Rpc {
            method: "WaitProcess",
            source: ttrpc::Error::LocalClosed,
        };
        assert_eq!(status_of(broken.into()).0, Code::INTERNAL);
    }

    #[test]
    fn messages_carry_the_chain() {
        let e = TaskError::Mount(MountError::Dir {
            path: "/x".into(),
            source: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        });
        let (_, msg) = status_of(e);
        assert!(
            msg.starts_with("mount: cannot create or remove /x: "),
            "{msg}"
        );
    }
}
