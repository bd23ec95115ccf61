//! The adaptor's request errors and the one place they become ttrpc status codes
//! ([`to_ttrpc`]).

use std::path::PathBuf;

use ttrpc::Code;

use crate::annotations::AnnotationError;
use crate::provider::ProviderError;
use crate::proxy::ProxyError;
use crate::sizing::{LimitError, SizingError};
use crate::state::StateError;
use crate::tls::TlsError;
use crate::tunnel::TunnelError;
use crate::userdata::RegistryFileError;

/// A failed CreateVM, StartVM or StopVM.
#[derive(Debug, thiserror::Error)]
pub enum AdaptorError {
    #[error("invalid sandbox id {0:?} (expected 1-128 letters, digits, '-', '_' or '.')")]
    BadId(String),
    #[error(transparent)]
    Annotations(#[from] AnnotationError),
    #[error("pod {0}: CreateVM was already called")]
    AlreadyExists(String),
    #[error("pod {0} is unknown (StartVM before CreateVM?)")]
    NotFound(String),
    #[error(transparent)]
    Limit(#[from] LimitError),
    #[error("pod {sandbox}: instance size")]
    Sizing {
        sandbox: String,
        #[source]
        source: SizingError,
    },
    #[error("pod network namespace {}", .0.display())]
    Netns(PathBuf, #[source] TunnelError),
    #[error("pod MTU {pod} does not fit the provider network: MTU {underlay} carries at most {} through VXLAN", .underlay - crate::tunnel::VXLAN_OVERHEAD)]
    Mtu { pod: u32, underlay: u32 },
    #[error("no free VNI for pod {0}")]
    NoVni(String),
    #[error("pod {sandbox}: {what}")]
    Provider {
        sandbox: String,
        what: &'static str,
        #[source]
        source: ProviderError,
    },
    #[error("pod {0}: certificates")]
    Tls(String, #[source] TlsError),
    #[error("adaptor state")]
    State(#[from] StateError),
    #[error(transparent)]
    Registries(#[from] RegistryFileError),
    #[error("pod {0}: stored user data")]
    UserData(String, #[source] protobuf::Error),
    #[error("pod {0}: tunnel")]
    Tunnel(String, #[source] TunnelError),
    #[error("pod {sandbox}: the agent of instance {instance} is not reachable ({diagnostics})")]
    AgentNotReady {
        sandbox: String,
        instance: String,
        diagnostics: String,
        #[source]
        source: Box<ProxyError>,
    },
    #[error("pod {0}: agent socket")]
    Proxy(String, #[source] Box<ProxyError>),
    #[error("{what} {}", .path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("blocking task")]
    Join(#[from] tokio::task::JoinError),
}

/// Maps an error to a ttrpc status; the message is the whole error chain.
pub fn to_ttrpc(err: &AdaptorError) -> ttrpc::Error {
    use AdaptorError as E;
    let code = match err {
        E::BadId(_) | E::Annotations(_) | E::Sizing { .. } | E::Netns(..) | E::Mtu { .. } => {
            Code::INVALID_ARGUMENT
        }
        E::Registries(_) => Code::FAILED_PRECONDITION,
        E::AlreadyExists(_) => Code::ALREADY_EXISTS,
        E::NotFound(_) => Code::NOT_FOUND,
        E::Limit(_) | E::NoVni(_) => Code::RESOURCE_EXHAUSTED,
        E::Provider { source, .. } => match source {
            ProviderError::Invalid(_) => Code::INVALID_ARGUMENT,
            ProviderError::Exhausted(_) => Code::RESOURCE_EXHAUSTED,
            ProviderError::Failed { .. } => Code::INTERNAL,
        },
        E::AgentNotReady { .. } => Code::DEADLINE_EXCEEDED,
        E::Tls(..)
        | E::State(_)
        | E::UserData(..)
        | E::Tunnel(..)
        | E::Proxy(..)
        | E::Io { .. }
        | E::Join(_) => Code::INTERNAL,
    };
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, crate::report::chain(err)))
}
