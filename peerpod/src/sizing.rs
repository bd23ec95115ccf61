//! Sizing a pod VM and the per-node limit.
//!
//! [`Catalogue`]: the instance types a provider offers (name, vCPUs, memory), the subset a
//! pod may get (the allow-list) and the default. [`Catalogue::choose`] picks a pod's type,
//! as upstream's adaptor does:
//! 1. the pod names one (`io.katacontainers.config.hypervisor.machine_type`): that type,
//!    when it is allowed, else the pod is refused naming it and the allowed ones;
//! 2. the pod asks for vCPUs and/or memory (`default_vcpus` / `default_memory`, which the
//!    admission webhook sums from the pod's resources, or the runtime from the pod's
//!    limits): the smallest allowed type that has at least that much, types ordered by
//!    memory, then vCPUs, then name; a pod larger than every allowed type is refused naming
//!    its request and the largest type;
//! 3. otherwise the default type.
//!
//! [`check_limit`] refuses a pod VM beyond `limit_per_node` (negative: no limit).

use std::collections::BTreeMap;

use crate::annotations::PodAnnotations;
use crate::config::InstanceType;
use crate::provider::InstanceSize;

/// A pod VM the node may not have.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LimitError {
    #[error("the node's pod VM limit is reached: {current} pod VMs are live and limit_per_node = {limit}")]
    Reached { current: usize, limit: i64 },
}

/// A pod no allowed instance type fits.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SizingError {
    #[error("annotation io.katacontainers.config.hypervisor.machine_type={name:?}: not an allowed instance type (allowed: {})", .allowed.join(", "))]
    NotAllowed { name: String, allowed: Vec<String> },
    #[error("the pod asks for {} (io.katacontainers.config.hypervisor.default_vcpus / default_memory), more than the largest allowed instance type {largest} ({} vCPUs, {} MiB)", describe(*.vcpus, *.memory_mib), .size.vcpus, .size.memory_mib)]
    TooLarge {
        vcpus: Option<u32>,
        memory_mib: Option<u32>,
        largest: String,
        size: InstanceSize,
    },
}

fn describe(vcpus: Option<u32>, memory_mib: Option<u32>) -> String {
    match (vcpus, memory_mib) {
        (Some(c), Some(m)) => format!("{c} vCPUs and {m} MiB of memory"),
        (Some(c), None) => format!("{c} vCPUs"),
        (None, Some(m)) => format!("{m} MiB of memory"),
        (None, None) => "nothing".to_owned(),
    }
}

/// Why a type was chosen (logged).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The pod named it (`machine_type`).
    MachineType,
    /// The smallest allowed type fitting the pod's vCPUs/memory.
    Fits,
    /// The pod asked for nothing: the default type.
    Default,
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Reason::MachineType => "named by the pod's machine_type",
            Reason::Fits => "the smallest allowed type fitting the pod's vCPUs/memory",
            Reason::Default => "the default instance type (no sizing annotations)",
        })
    }
}

/// The instance type chosen for a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chosen {
    pub name: String,
    pub size: InstanceSize,
    pub reason: Reason,
}

/// The instance types, the allowed ones (smallest first) and the default. Built from a
/// checked configuration ([`crate::config`] validates names and sizes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Catalogue {
    types: BTreeMap<String, InstanceType>,
    /// Allowed type names, ordered by memory, vCPUs, name.
    allowed: Vec<String>,
    default: String,
}

fn size_of(t: &InstanceType) -> InstanceSize {
    InstanceSize {
        vcpus: t.vcpus,
        memory_mib: t.memory_mib,
    }
}

impl Catalogue {
    /// `allowed` empty: every type. `allowed` and `default` must name types of `types`
    /// (the configuration checks this).
    pub fn new(types: BTreeMap<String, InstanceType>, allowed: &[String], default: &str) -> Self {
        let mut names: Vec<String> = if allowed.is_empty() {
            types.keys().cloned().collect()
        } else {
            allowed.to_vec()
        };
        names.sort_by_key(|n| {
            let t = types[n];
            (t.memory_mib, t.vcpus, n.clone())
        });
        names.dedup();
        Self {
            types,
            allowed: names,
            default: default.to_owned(),
        }
    }

    /// The allowed type names, smallest first.
    pub fn allowed(&self) -> &[String] {
        &self.allowed
    }

    /// The default type's name.
    pub fn default_type(&self) -> &str {
        &self.default
    }

    /// The instance type for a pod (see the module docs).
    pub fn choose(&self, a: &PodAnnotations) -> Result<Chosen, SizingError> {
        if let Some(name) = &a.machine_type {
            return match self.types.get(name) {
                Some(t) if self.allowed.contains(name) => Ok(Chosen {
                    name: name.clone(),
                    size: size_of(t),
                    reason: Reason::MachineType,
                }),
                _ => Err(SizingError::NotAllowed {
                    name: name.clone(),
                    allowed: self.allowed.clone(),
                }),
            };
        }
        if a.vcpus.is_none() && a.memory_mib.is_none() {
            return Ok(Chosen {
                name: self.default.clone(),
                size: size_of(&self.types[&self.default]),
                reason: Reason::Default,
            });
        }
        let (vcpus, memory) = (a.vcpus.unwrap_or(0), a.memory_mib.unwrap_or(0));
        if let Some(name) = self.allowed.iter().find(|n| {
            let t = &self.types[*n];
            t.vcpus >= vcpus && t.memory_mib >= memory
        }) {
            return Ok(Chosen {
                name: name.clone(),
                size: size_of(&self.types[name]),
                reason: Reason::Fits,
            });
        }
        let largest = self
            .allowed
            .last()
            .expect("the configuration allows at least one type");
        Err(SizingError::TooLarge {
            vcpus: a.vcpus,
            memory_mib: a.memory_mib,
            largest: largest.clone(),
            size: size_of(&self.types[largest]),
        })
    }
}

/// Refuses one more pod VM when `current` live ones already reached `limit` (negative: no
/// limit; 0: no pod VMs at all).
pub fn check_limit(current: usize, limit: i64) -> Result<(), LimitError> {
    match usize::try_from(limit) {
        Ok(max) if current >= max => Err(LimitError::Reached { current, limit }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalogue(allowed: &[&str], default: &str) -> Catalogue {
        let t = |vcpus, memory_mib| InstanceType { vcpus, memory_mib };
        let types = BTreeMap::from([
            ("small".to_owned(), t(1, 1024)),
            ("medium".to_owned(), t(2, 4096)),
            ("cpu-heavy".to_owned(), t(8, 4096)),
            ("large".to_owned(), t(4, 8192)),
        ]);
        let allowed: Vec<String> = allowed.iter().map(|s| s.to_string()).collect();
        Catalogue::new(types, &allowed, default)
    }

    fn pod(
        machine_type: Option<&str>,
        vcpus: Option<u32>,
        memory_mib: Option<u32>,
    ) -> PodAnnotations {
        PodAnnotations {
            machine_type: machine_type.map(str::to_owned),
            vcpus,
            memory_mib,
            ..Default::default()
        }
    }

    fn chosen(c: &Catalogue, a: &PodAnnotations) -> (String, Reason) {
        let ch = c.choose(a).unwrap();
        (ch.name, ch.reason)
    }

    #[test]
    fn allowed_types_are_ordered_by_memory_then_vcpus() {
        assert_eq!(
            catalogue(&[], "small").allowed(),
            ["small", "medium", "cpu-heavy", "large"]
        );
        assert_eq!(
            catalogue(&["large", "small"], "small").allowed(),
            ["small", "large"]
        );
    }

    #[test]
    fn an_allowed_machine_type_is_taken_as_is() {
        let c = catalogue(&["small", "large"], "small");
        let ch = c.choose(&pod(Some("large"), Some(1), Some(64))).unwrap();
        assert_eq!(
            ch,
            Chosen {
                name: "large".into(),
                size: InstanceSize {
                    vcpus: 4,
                    memory_mib: 8192
                },
                reason: Reason::MachineType
            }
        );
    }

    #[test]
    fn a_machine_type_outside_the_allow_list_is_refused_by_name() {
        let c = catalogue(&["small", "large"], "small");
        for name in ["medium", "m5.xlarge"] {
            let e = c.choose(&pod(Some(name), None, None)).unwrap_err();
            assert_eq!(
                e,
                SizingError::NotAllowed {
                    name: name.into(),
                    allowed: vec!["small".into(), "large".into()]
                }
            );
            let msg = e.to_string();
            assert!(
                msg.contains(&format!("{name:?}")) && msg.contains("allowed: small, large"),
                "{msg}"
            );
        }
    }

    #[test]
    fn the_smallest_allowed_type_that_fits_is_derived() {
        let c = catalogue(&[], "small");
        assert_eq!(
            chosen(&c, &pod(None, Some(1), Some(512))),
            ("small".into(), Reason::Fits)
        );
        assert_eq!(
            chosen(&c, &pod(None, Some(2), None)),
            ("medium".into(), Reason::Fits)
        );
        assert_eq!(
            chosen(&c, &pod(None, None, Some(1025))),
            ("medium".into(), Reason::Fits)
        );
        // 3 vCPUs: medium has 2; cpu-heavy (4096 MiB) is smaller than large (8192 MiB).
        assert_eq!(
            chosen(&c, &pod(None, Some(3), Some(2048))),
            ("cpu-heavy".into(), Reason::Fits)
        );
        assert_eq!(
            chosen(&c, &pod(None, Some(4), Some(5000))),
            ("large".into(), Reason::Fits)
        );
        // Only allowed types are candidates.
        let c = catalogue(&["small", "large"], "small");
        assert_eq!(
            chosen(&c, &pod(None, Some(2), Some(2048))),
            ("large".into(), Reason::Fits)
        );
    }

    #[test]
    fn without_sizing_annotations_the_default_is_taken() {
        let c = catalogue(&["small", "medium"], "medium");
        let ch = c.choose(&pod(None, None, None)).unwrap();
        assert_eq!((ch.name.as_str(), ch.reason), ("medium", Reason::Default));
        assert_eq!(
            ch.size,
            InstanceSize {
                vcpus: 2,
                memory_mib: 4096
            }
        );
    }

    #[test]
    fn a_pod_larger_than_every_allowed_type_is_refused_naming_both() {
        let c = catalogue(&["small", "medium"], "small");
        let e = c.choose(&pod(None, Some(16), Some(2048))).unwrap_err();
        assert_eq!(
            e,
            SizingError::TooLarge {
                vcpus: Some(16),
                memory_mib: Some(2048),
                largest: "medium".into(),
                size: InstanceSize {
                    vcpus: 2,
                    memory_mib: 4096
                }
            }
        );
        let msg = e.to_string();
        assert!(
            msg.contains("16 vCPUs and 2048 MiB") && msg.contains("medium (2 vCPUs, 4096 MiB)"),
            "{msg}"
        );
        let msg = c
            .choose(&pod(None, None, Some(9000)))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("asks for 9000 MiB of memory"), "{msg}");
    }

    #[test]
    fn the_limit_counts_live_pod_vms() {
        assert!(check_limit(9, 10).is_ok());
        assert_eq!(
            check_limit(10, 10),
            Err(LimitError::Reached {
                current: 10,
                limit: 10
            })
        );
        assert!(check_limit(10, 10)
            .unwrap_err()
            .to_string()
            .contains("limit_per_node = 10"));
        assert!(check_limit(0, 0).is_err(), "0 allows no pod VM");
        assert!(check_limit(1000, -1).is_ok(), "negative: no limit");
    }
}
