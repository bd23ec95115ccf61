//! Sizing a pod VM and the per-node limit.
//!
//! This is where node-level capacity rules plug in (issue 15: advertising
//! `kata.peerpods.io/vm` capacity on the node, sizes filled in by the webhook from the
//! pod's requests): [`size_for`] turns a pod's annotations into an instance size, and
//! [`check_limit`] refuses a pod VM beyond `limit_per_node`.

use crate::annotations::PodAnnotations;
use crate::config::LocalSettings;
use crate::provider::InstanceSize;

/// A pod VM the node may not have.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LimitError {
    #[error("the node already runs {current} peer pod VMs (limit_per_node = {limit})")]
    Reached { current: usize, limit: u32 },
}

/// The instance size for a pod: its `machine_type`'s, else its `default_vcpus` /
/// `default_memory`, else the provider's defaults. (A machine type the provider does not
/// know is refused by [`crate::provider::Provider::check`].)
pub fn size_for(a: &PodAnnotations, local: &LocalSettings) -> InstanceSize {
    let base = a
        .machine_type
        .as_deref()
        .and_then(|t| local.instance_types.get(t))
        .map(|t| InstanceSize {
            vcpus: t.vcpus,
            memory_mib: t.memory_mib,
        });
    match base {
        Some(size) => size,
        None => InstanceSize {
            vcpus: a.vcpus.unwrap_or(local.vcpus),
            memory_mib: a.memory_mib.unwrap_or(local.memory_mib),
        },
    }
}

/// Refuses one more pod VM when `current` already reached `limit` (0: no limit).
pub fn check_limit(current: usize, limit: u32) -> Result<(), LimitError> {
    if limit > 0 && current >= limit as usize {
        Err(LimitError::Reached { current, limit })
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{AdaptorConfig, InstanceType};

    #[test]
    fn machine_type_then_annotations_then_defaults() {
        let mut local = AdaptorConfig::defaults().local;
        local.instance_types.insert(
            "big".into(),
            InstanceType {
                vcpus: 4,
                memory_mib: 4096,
            },
        );
        let mut a = PodAnnotations::default();
        assert_eq!(
            size_for(&a, &local),
            InstanceSize {
                vcpus: 1,
                memory_mib: 1024
            }
        );
        a.memory_mib = Some(512);
        assert_eq!(size_for(&a, &local).memory_mib, 512);
        a.machine_type = Some("big".into());
        assert_eq!(
            size_for(&a, &local),
            InstanceSize {
                vcpus: 4,
                memory_mib: 4096
            }
        );
        assert!(check_limit(9, 10).is_ok());
        assert_eq!(
            check_limit(10, 10),
            Err(LimitError::Reached {
                current: 10,
                limit: 10
            })
        );
        assert!(check_limit(1000, 0).is_ok());
    }
}
