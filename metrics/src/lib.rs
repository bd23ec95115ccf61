//! What the shim, the agent and kata-monitor share about metrics, so that none of them
//! keeps its own copy:
//! - [`names`]: Kata's family and label names, latency buckets, and where a shim's
//!   management socket lives;
//! - [`family`]: building families and encoding them in the Prometheus text format with
//!   the `prometheus` crate;
//! - [`process`]: one process's families read from `/proc/<pid>` (host and agent styles);
//! - [`text`]: parsing the text format back, filtering, labelling and merging families;
//! - [`client`] (feature `client`): an HTTP/1.1 GET on a management socket.

#[cfg(feature = "client")]
pub mod client;
pub mod family;
pub mod names;
pub mod process;
pub mod text;

pub use family::{encode_into, Families, FamilyError, RpcDurations};
pub use prometheus::proto::MetricFamily;
