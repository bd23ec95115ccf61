//! `kata-ctl`, the operator's tool for the kata runtime, as a library; the binary only
//! parses arguments and prints.
//!
//! Modules by job:
//! - [`host`]: the host facts the checks read (`/proc/cpuinfo`, `/sys/module`), under a
//!   root that tests can replace with a fake tree;
//! - [`check`]: can this node run VM sandboxes (`kata-ctl check`), each check with a
//!   verdict and its reason;
//! - [`nfd`]: the Node Feature Discovery label file `check --nfd` writes or removes;
//! - [`env`]: versions, paths, the configuration in effect and host facts
//!   (`kata-ctl env`);
//! - [`boot_check`]: boot a VM with the installed guest image and ask its agent
//!   (`kata-ctl boot-check`).

pub mod boot_check;
pub mod check;
pub mod env;
pub mod host;
pub mod nfd;
