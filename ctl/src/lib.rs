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
//!   (`kata-ctl boot-check`);
//! - [`sandboxes`]: the sandboxes on this node and their shims' management servers;
//! - [`redact`]: annotation and environment values kept out of collections;
//! - [`collect`]: the must-gather archive (`kata-ctl collect`);
//! - [`exec`]: the guest's debug console (`kata-ctl exec`).

pub mod boot_check;
pub mod check;
pub mod collect;
pub mod env;
pub mod exec;
pub mod host;
pub mod nfd;
pub mod redact;
pub mod sandboxes;
