//! Runtime options containerd passes with Create (and on `start`'s stdin): the only field
//! we use is the configuration file path.
//!
//! CRI sends `runtimeoptions.v1.Options { string type_url = 1; string config_path = 2; }`
//! for runtimes with `options.ConfigPath` set. The message is not in containerd-shim's
//! protos, so its one field is decoded here from the wire format.

use std::path::PathBuf;

use containerd_shim::protos::protobuf::rt::WireType;
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::CodedInputStream;

/// Type of CRI's runtime options.
pub const CRI_RUNTIME_OPTIONS: &str = "runtimeoptions.v1.Options";

/// The configuration path in CRI runtime options, if these are such and it is set.
pub fn config_path(any: &Any) -> Option<PathBuf> {
    let type_name = any.type_url.rsplit('/').next().unwrap_or_default();
    if type_name != CRI_RUNTIME_OPTIONS {
        return None;
    }
    let mut input = CodedInputStream::from_bytes(&any.value);
    while let Ok(Some(tag)) = input.read_raw_tag_or_eof() {
        let (field, wire) = (tag >> 3, WireType::new(tag & 7)?);
        if field == 2 && wire == WireType::LengthDelimited {
            let path = input.read_string().ok()?;
            return (!path.is_empty()).then(|| PathBuf::from(path));
        }
        input.skip_field(wire).ok()?;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(type_url: &str, config_path: &str) -> Vec<u8> {
        let mut out = Vec::new();
        for (field, s) in [(1u8, type_url), (2u8, config_path)] {
            out.push((field << 3) | 2);
            out.push(u8::try_from(s.len()).unwrap());
            out.extend_from_slice(s.as_bytes());
        }
        out
    }

    #[test]
    fn config_path_is_read_from_cri_options() {
        let any = Any {
            type_url: "runtimeoptions.v1.Options".into(),
            value: options("io.containerd.kata.v2", "/etc/kata/custom.toml"),
            ..Default::default()
        };
        assert_eq!(
            config_path(&any),
            Some(PathBuf::from("/etc/kata/custom.toml"))
        );
        let prefixed = Any {
            type_url: "type.googleapis.com/runtimeoptions.v1.Options".into(),
            ..any.clone()
        };
        assert!(config_path(&prefixed).is_some());
    }

    #[test]
    fn other_or_empty_options_give_none() {
        let runc = Any {
            type_url: "containerd.runc.v1.Options".into(),
            value: options("x", "/y"),
            ..Default::default()
        };
        assert_eq!(config_path(&runc), None);
        let empty = Any {
            type_url: CRI_RUNTIME_OPTIONS.into(),
            value: options("x", ""),
            ..Default::default()
        };
        assert_eq!(config_path(&empty), None);
        let garbage = Any {
            type_url: CRI_RUNTIME_OPTIONS.into(),
            value: vec![0xff, 0xff],
            ..Default::default()
        };
        assert_eq!(config_path(&garbage), None);
    }
}
