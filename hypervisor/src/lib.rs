//! One QEMU virtual machine: command line, process, QMP, virtiofsd, vsock, console and
//! accelerator detection. Knows nothing of containers.
//!
//! The entry point is [`Vm::start`] with a validated [`VmConfig`]; the result offers the
//! guest's vsock ports ([`Vm::connect`]), QMP ([`Vm::qmp`]), the console tail and a
//! graceful [`Vm::stop`]. Every child process is owned, reaped and cleaned up, also when
//! a start fails or a [`Vm`] is dropped.

pub mod accel;
pub mod cmdline;
pub mod config;
pub mod console;
pub mod process;
pub mod qmp;
pub mod virtiofsd;
pub mod vm;
pub mod vsock;

pub use config::{
    Accel, ConfigError, GuestRoot, NetDevice, Placement, SharedFsConfig, VmConfig, VsockMode,
};
pub use process::ExitReport;
pub use qmp::{Qmp, QmpError};
pub use vm::{Error, Vm};
pub use vsock::VsockStream;
