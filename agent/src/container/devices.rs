//! The container's device cgroup. Cgroup v2 has no `devices.allow`: device access is
//! decided by a `BPF_PROG_TYPE_CGROUP_DEVICE` program attached to the container's cgroup
//! (`BPF_CGROUP_DEVICE`), which the kernel runs for every open and mknod of a device node.
//!
//! Rules are the spec's `linux.resources.devices` followed by runc's defaults (mknod of any
//! character or block device; `/dev/null`, `zero`, `full`, `random`, `urandom`, `tty`,
//! `console`'s ptmx, `/dev/pts/*` and `/dev/net/tun`), so a spec cannot take those away. For
//! each access a request asks for (read, write, mknod), the last rule that matches the
//! device and names that access decides; none matching denies. The program is generated
//! here ([`program`]), loaded with `bpf(2)` and attached without `BPF_F_ALLOW_OVERRIDE` or
//! `BPF_F_ALLOW_MULTI`, so nothing in the container can attach another below it.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

/// `BPF_DEVCG_ACC_MKNOD`.
pub const ACC_MKNOD: u8 = 1;
/// `BPF_DEVCG_ACC_READ`.
pub const ACC_READ: u8 = 2;
/// `BPF_DEVCG_ACC_WRITE`.
pub const ACC_WRITE: u8 = 4;
/// `BPF_DEVCG_DEV_BLOCK`.
pub const DEV_BLOCK: u32 = 1;
/// `BPF_DEVCG_DEV_CHAR`.
pub const DEV_CHAR: u32 = 2;

/// Which devices a rule covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `a`: every device.
    All,
    /// `b`.
    Block,
    /// `c`.
    Char,
}

/// One `linux.resources.devices` entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    /// Allow or deny.
    pub allow: bool,
    /// Device type.
    pub kind: Kind,
    /// `None`: any major.
    pub major: Option<u32>,
    /// `None`: any minor.
    pub minor: Option<u32>,
    /// `ACC_*` bits.
    pub access: u8,
}

/// A rule the guest cannot apply, or a program the kernel refused.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// A type other than `a`, `b` or `c`.
    #[error("linux.resources.devices[{index}]: type {typ:?} (expected a, b or c)")]
    Type {
        /// Which rule.
        index: usize,
        /// The type.
        typ: String,
    },
    /// An access other than a combination of `r`, `w` and `m`.
    #[error("linux.resources.devices[{index}]: access {access:?} (expected letters of \"rwm\")")]
    Access {
        /// Which rule.
        index: usize,
        /// The access string.
        access: String,
    },
    /// A major or minor beyond 32 bits.
    #[error("linux.resources.devices[{index}]: device number {number} is out of range")]
    Number {
        /// Which rule.
        index: usize,
        /// The number.
        number: i64,
    },
    /// The resources document does not parse.
    #[error("linux.resources")]
    Json(#[source] serde_json::Error),
    /// `BPF_PROG_LOAD` failed; the verifier's log follows.
    #[error("load the device cgroup program: {log}")]
    Load {
        /// The verifier's log (may be empty).
        log: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The cgroup could not be opened or the program attached.
    #[error("attach the device cgroup program to {path}")]
    Attach {
        /// The cgroup.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl DeviceError {
    /// Whether the spec is at fault.
    pub fn is_invalid(&self) -> bool {
        matches!(
            self,
            Self::Type { .. } | Self::Access { .. } | Self::Number { .. } | Self::Json(_)
        )
    }
}

const fn allow_char(major: Option<u32>, minor: Option<u32>, access: u8) -> Rule {
    Rule {
        allow: true,
        kind: Kind::Char,
        major,
        minor,
        access,
    }
}

const RWM: u8 = ACC_READ | ACC_WRITE | ACC_MKNOD;

/// runc's default allowed devices, appended after the spec's rules.
pub const DEFAULT_RULES: &[Rule] = &[
    allow_char(None, None, ACC_MKNOD),
    Rule {
        allow: true,
        kind: Kind::Block,
        major: None,
        minor: None,
        access: ACC_MKNOD,
    },
    allow_char(Some(1), Some(3), RWM),    // /dev/null
    allow_char(Some(1), Some(8), RWM),    // /dev/random
    allow_char(Some(1), Some(7), RWM),    // /dev/full
    allow_char(Some(5), Some(0), RWM),    // /dev/tty
    allow_char(Some(1), Some(5), RWM),    // /dev/zero
    allow_char(Some(1), Some(9), RWM),    // /dev/urandom
    allow_char(Some(136), None, RWM),     // /dev/pts/*
    allow_char(Some(5), Some(2), RWM),    // /dev/ptmx
    allow_char(Some(10), Some(200), RWM), // /dev/net/tun
];

/// The rules for a container: its spec's `linux.resources.devices`, then [`DEFAULT_RULES`].
pub fn rules(resources: Option<&serde_json::Value>) -> Result<Vec<Rule>, DeviceError> {
    let mut out = Vec::new();
    if let Some(r) = resources {
        let r: oci_spec::runtime::LinuxResources =
            serde_json::from_value(r.clone()).map_err(DeviceError::Json)?;
        for (index, d) in r.devices().iter().flatten().enumerate() {
            let typ = d.typ().map(|t| t.as_str().to_owned());
            let kind = match typ.as_deref() {
                None | Some("a") => Kind::All,
                Some("b") => Kind::Block,
                Some("c") => Kind::Char,
                Some(other) => {
                    return Err(DeviceError::Type {
                        index,
                        typ: other.to_owned(),
                    })
                }
            };
            let number = |n: Option<i64>| match n {
                None => Ok(None),
                Some(n) if n < 0 => Ok(None),
                Some(n) => u32::try_from(n)
                    .map(Some)
                    .map_err(|_| DeviceError::Number { index, number: n }),
            };
            let access_text = d.access().clone().unwrap_or_else(|| "rwm".to_owned());
            let mut access = 0;
            for c in access_text.chars() {
                access |= match c {
                    'r' => ACC_READ,
                    'w' => ACC_WRITE,
                    'm' => ACC_MKNOD,
                    _ => {
                        return Err(DeviceError::Access {
                            index,
                            access: access_text.clone(),
                        })
                    }
                };
            }
            out.push(Rule {
                allow: d.allow(),
                kind,
                major: number(d.major())?,
                minor: number(d.minor())?,
                access,
            });
        }
    }
    out.extend_from_slice(DEFAULT_RULES);
    Ok(out)
}

impl Rule {
    fn matches(&self, kind: u32, major: u32, minor: u32) -> bool {
        let kind_ok = match self.kind {
            Kind::All => true,
            Kind::Block => kind == DEV_BLOCK,
            Kind::Char => kind == DEV_CHAR,
        };
        kind_ok && self.major.is_none_or(|m| m == major) && self.minor.is_none_or(|m| m == minor)
    }

    fn matches_everything(&self) -> bool {
        self.kind == Kind::All && self.major.is_none() && self.minor.is_none()
    }
}

/// Whether `rules` let a request through: `kind` is `DEV_*`, `access` `ACC_*` bits. The
/// reference the generated program is tested against.
pub fn decide(rules: &[Rule], kind: u32, major: u32, minor: u32, access: u8) -> bool {
    [ACC_MKNOD, ACC_READ, ACC_WRITE]
        .into_iter()
        .filter(|bit| access & bit != 0)
        .all(|bit| {
            rules
                .iter()
                .rev()
                .find(|r| r.access & bit != 0 && r.matches(kind, major, minor))
                .is_some_and(|r| r.allow)
        })
}

/// One eBPF instruction (`struct bpf_insn`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    /// Opcode.
    pub code: u8,
    /// dst_reg (low nibble) and src_reg (high nibble).
    pub regs: u8,
    /// Jump or memory offset.
    pub off: i16,
    /// Immediate.
    pub imm: i32,
}

// Opcodes (linux/bpf_common.h, linux/bpf.h).
const LDX_MEM_W: u8 = 0x61;
const ALU32_AND_K: u8 = 0x54;
const ALU32_RSH_K: u8 = 0x74;
const ALU32_MOV_K: u8 = 0xb4;
const ALU64_MOV_X: u8 = 0xbf;
const JMP_JA: u8 = 0x05;
const JMP_EXIT: u8 = 0x95;
const JMP32_JEQ_K: u8 = 0x16;
const JMP32_JNE_K: u8 = 0x56;

/// Registers: r1 = context; r2 type, r3 access, r4 major, r5 minor, r6 scratch.
const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: dst | (src << 4),
        off,
        imm,
    }
}

/// Where a jump goes, resolved once the program is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Label {
    /// Past the end of rule block `n` (the next rule, or the bit's closing deny).
    AfterRule(usize),
    /// The check of the access bit after bit `n` (or the final allow).
    AfterBit(usize),
    /// Return "deny".
    Deny,
}

/// The program for `rules` (see the module docs).
pub fn program(rules: &[Rule]) -> Vec<Insn> {
    let mut code: Vec<(Insn, Option<Label>)> = vec![
        (insn(LDX_MEM_W, 2, 1, 0, 0), None),
        (insn(ALU32_AND_K, 2, 0, 0, 0xffff), None),
        (insn(LDX_MEM_W, 3, 1, 0, 0), None),
        (insn(ALU32_RSH_K, 3, 0, 0, 16), None),
        (insn(LDX_MEM_W, 4, 1, 4, 0), None),
        (insn(LDX_MEM_W, 5, 1, 8, 0), None),
    ];
    // Where each bit's checks end, and where each rule block ends.
    let mut bit_end = Vec::new();
    let mut rule_end = Vec::new();
    for (b, bit) in [ACC_MKNOD, ACC_READ, ACC_WRITE].into_iter().enumerate() {
        // Not asked for: on to the next bit.
        code.push((insn(ALU64_MOV_X, 6, 3, 0, 0), None));
        code.push((insn(ALU32_AND_K, 6, 0, 0, i32::from(bit)), None));
        code.push((insn(JMP32_JEQ_K, 6, 0, 0, 0), Some(Label::AfterBit(b))));
        let mut decided = false;
        for rule in rules.iter().rev().filter(|r| r.access & bit != 0) {
            let skip = Some(Label::AfterRule(rule_end.len()));
            match rule.kind {
                Kind::All => {}
                Kind::Block => code.push((insn(JMP32_JNE_K, 2, 0, 0, DEV_BLOCK as i32), skip)),
                Kind::Char => code.push((insn(JMP32_JNE_K, 2, 0, 0, DEV_CHAR as i32), skip)),
            }
            if let Some(m) = rule.major {
                code.push((insn(JMP32_JNE_K, 4, 0, 0, m as i32), skip));
            }
            if let Some(m) = rule.minor {
                code.push((insn(JMP32_JNE_K, 5, 0, 0, m as i32), skip));
            }
            let verdict = if rule.allow {
                Label::AfterBit(b)
            } else {
                Label::Deny
            };
            code.push((insn(JMP_JA, 0, 0, 0, 0), Some(verdict)));
            rule_end.push(code.len());
            if rule.matches_everything() {
                // Earlier rules can never decide this bit.
                decided = true;
                break;
            }
        }
        if !decided {
            // No rule matched: deny (the verifier refuses unreachable code, so only here).
            code.push((insn(JMP_JA, 0, 0, 0, 0), Some(Label::Deny)));
        }
        bit_end.push(code.len());
    }
    code.push((insn(ALU32_MOV_K, 0, 0, 0, 1), None));
    code.push((insn(JMP_EXIT, 0, 0, 0, 0), None));
    let deny = code.len();
    // Only when something denies: the verifier refuses unreachable code.
    if code.iter().any(|(_, l)| *l == Some(Label::Deny)) {
        code.push((insn(ALU32_MOV_K, 0, 0, 0, 0), None));
        code.push((insn(JMP_EXIT, 0, 0, 0, 0), None));
    }
    code.into_iter()
        .enumerate()
        .map(|(at, (mut i, label))| {
            if let Some(label) = label {
                let target = match label {
                    Label::AfterRule(r) => rule_end[r],
                    Label::AfterBit(b) => bit_end[b],
                    Label::Deny => deny,
                };
                // Programs stay far below 32k instructions (a few per rule).
                i.off = (target as isize - at as isize - 1) as i16;
            }
            i
        })
        .collect()
}

/// `union bpf_attr` for `BPF_PROG_LOAD`, up to `expected_attach_type`.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// `union bpf_attr` for `BPF_PROG_ATTACH`.
#[repr(C)]
#[derive(Default)]
struct ProgAttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_CGROUP_DEVICE: u32 = 6;

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a properly laid out, zero-padded bpf_attr prefix of the size passed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Loads `insns` as a device cgroup program (the verifier's log goes into the error).
pub fn load(insns: &[Insn]) -> Result<OwnedFd, DeviceError> {
    let license = c"Apache-2.0";
    let mut name = [0u8; 16];
    name[..12].copy_from_slice(b"kata_devices");
    let attempt = |log: &mut [u8]| {
        let mut attr = ProgLoadAttr {
            prog_type: BPF_PROG_TYPE_CGROUP_DEVICE,
            insn_cnt: insns.len() as u32,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            log_level: u32::from(!log.is_empty()),
            log_size: log.len() as u32,
            // The kernel refuses a buffer pointer without a size.
            log_buf: if log.is_empty() {
                0
            } else {
                log.as_mut_ptr() as u64
            },
            prog_name: name,
            expected_attach_type: BPF_CGROUP_DEVICE,
            ..Default::default()
        };
        bpf(BPF_PROG_LOAD, &mut attr)
    };
    match attempt(&mut []) {
        // SAFETY: BPF_PROG_LOAD returned a new fd that we own.
        Ok(fd) => Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) }),
        Err(source) => {
            // Again with the verifier's log, for the message.
            let mut log = vec![0u8; 64 * 1024];
            if let Ok(fd) = attempt(&mut log) {
                // SAFETY: as above; closed at once.
                drop(unsafe { OwnedFd::from_raw_fd(fd as i32) });
            }
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            Err(DeviceError::Load {
                log: String::from_utf8_lossy(&log[..end]).trim().to_owned(),
                source,
            })
        }
    }
}

/// Loads the program for `rules` and attaches it to the cgroup directory `cgroup`.
pub fn attach(cgroup: &Path, rules: &[Rule]) -> Result<(), DeviceError> {
    let prog = load(&program(rules))?;
    let attach_err = |source| DeviceError::Attach {
        path: cgroup.display().to_string(),
        source,
    };
    let dir = std::fs::File::open(cgroup).map_err(attach_err)?;
    let mut attr = ProgAttachAttr {
        target_fd: dir.as_raw_fd() as u32,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type: BPF_CGROUP_DEVICE,
        attach_flags: 0,
    };
    bpf(BPF_PROG_ATTACH, &mut attr).map_err(attach_err)?;
    // The attachment holds the program for as long as the cgroup lives.
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An interpreter for the instructions [`program`] emits.
    fn run(prog: &[Insn], kind: u32, access: u8, major: u32, minor: u32) -> u64 {
        let ctx = [kind | (u32::from(access) << 16), major, minor];
        let mut r = [0u64; 11];
        let mut pc = 0usize;
        let mut steps = 0;
        loop {
            steps += 1;
            assert!(steps < 10_000, "runaway program");
            let i = prog[pc];
            let (dst, src) = ((i.regs & 0xf) as usize, (i.regs >> 4) as usize);
            pc += 1;
            let jump = |pc: usize| (pc as isize + isize::from(i.off)) as usize;
            match i.code {
                LDX_MEM_W => {
                    assert_eq!(src, 1);
                    r[dst] = u64::from(ctx[(i.off / 4) as usize]);
                }
                ALU32_AND_K => r[dst] = u64::from((r[dst] as u32) & (i.imm as u32)),
                ALU32_RSH_K => r[dst] = u64::from((r[dst] as u32) >> i.imm),
                ALU32_MOV_K => r[dst] = u64::from(i.imm as u32),
                ALU64_MOV_X => r[dst] = r[src],
                JMP_JA => pc = jump(pc),
                JMP32_JEQ_K => {
                    if r[dst] as u32 == i.imm as u32 {
                        pc = jump(pc)
                    }
                }
                JMP32_JNE_K => {
                    if r[dst] as u32 != i.imm as u32 {
                        pc = jump(pc)
                    }
                }
                JMP_EXIT => return r[0],
                c => panic!("opcode {c:#x}"),
            }
        }
    }

    fn spec_rules(json: &str) -> Vec<Rule> {
        rules(Some(&serde_json::from_str(json).unwrap())).unwrap()
    }

    /// containerd's default: deny everything, then runc's defaults.
    const CONTAINERD: &str = r#"{"devices":[{"allow":false,"access":"rwm"}]}"#;

    #[test]
    fn containerds_default_allows_runcs_devices_and_mknod_only() {
        let r = spec_rules(CONTAINERD);
        let rw = ACC_READ | ACC_WRITE;
        assert!(decide(&r, DEV_CHAR, 1, 3, rw), "/dev/null");
        assert!(decide(&r, DEV_CHAR, 136, 4, rw), "/dev/pts/4");
        assert!(decide(&r, DEV_CHAR, 1, 11, ACC_MKNOD), "mknod kmsg");
        assert!(!decide(&r, DEV_CHAR, 1, 11, ACC_WRITE), "write kmsg");
        assert!(!decide(&r, DEV_BLOCK, 8, 0, ACC_READ), "read sda");
        assert!(
            !decide(&r, DEV_BLOCK, 1, 3, ACC_READ),
            "block 1:3 is not /dev/null"
        );
    }

    #[test]
    fn the_last_matching_rule_decides_each_access() {
        let r = spec_rules(
            r#"{"devices":[{"allow":false,"access":"rwm"},
                {"allow":true,"type":"c","major":1,"minor":11,"access":"rw"},
                {"allow":false,"type":"c","major":1,"minor":11,"access":"w"},
                {"allow":true,"type":"b","major":8,"access":"r"}]}"#,
        );
        assert!(decide(&r, DEV_CHAR, 1, 11, ACC_READ));
        assert!(!decide(&r, DEV_CHAR, 1, 11, ACC_WRITE));
        assert!(!decide(&r, DEV_CHAR, 1, 11, ACC_READ | ACC_WRITE));
        assert!(decide(&r, DEV_BLOCK, 8, 16, ACC_READ));
        assert!(!decide(&r, DEV_BLOCK, 8, 16, ACC_READ | ACC_WRITE));
        // A spec cannot deny runc's defaults: they come last.
        let r = spec_rules(
            r#"{"devices":[{"allow":false,"type":"c","major":1,"minor":3,"access":"rwm"}]}"#,
        );
        assert!(decide(&r, DEV_CHAR, 1, 3, ACC_WRITE));
        // Privileged: everything.
        let r = spec_rules(r#"{"devices":[{"allow":true,"access":"rwm"}]}"#);
        assert!(decide(&r, DEV_BLOCK, 8, 0, ACC_READ | ACC_WRITE));
        // No rules at all: only the defaults.
        assert!(!decide(&rules(None).unwrap(), DEV_CHAR, 1, 11, ACC_WRITE));
    }

    #[test]
    fn the_program_decides_as_the_rules_do() {
        let sets = [
            CONTAINERD,
            r#"{"devices":[{"allow":false,"access":"rwm"},
                {"allow":true,"type":"c","major":1,"minor":11,"access":"rw"},
                {"allow":false,"type":"c","major":1,"minor":11,"access":"w"},
                {"allow":true,"type":"b","major":8,"access":"r"},
                {"allow":true,"major":10,"access":"m"},
                {"allow":false,"type":"c","minor":5,"access":"r"}]}"#,
            r#"{"devices":[{"allow":true,"access":"rwm"}]}"#,
            r#"{"devices":[{"allow":true,"access":"rwm"},{"allow":false,"type":"b","access":"w"}]}"#,
            r#"{}"#,
        ];
        for set in sets {
            let r = spec_rules(set);
            let p = program(&r);
            for kind in [DEV_BLOCK, DEV_CHAR] {
                for major in [0, 1, 5, 8, 10, 136, 254, u32::MAX] {
                    for minor in [0, 1, 2, 3, 5, 7, 8, 9, 11, 16, 200, u32::MAX] {
                        for access in 1..=7u8 {
                            let want = decide(&r, kind, major, minor, access);
                            let got = run(&p, kind, access, major, minor);
                            assert_eq!(
                                got,
                                u64::from(want),
                                "{set}: kind {kind} {major}:{minor} access {access}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn bad_rules_are_refused_by_name() {
        let e = rules(Some(
            &serde_json::json!({"devices":[{"allow":true,"access":"rwx"}]}),
        ))
        .unwrap_err();
        assert!(e.to_string().contains("\"rwx\""), "{e}");
        assert!(e.is_invalid());
        let e = rules(Some(
            &serde_json::json!({"devices":[{"allow":true,"type":"p"}]}),
        ))
        .unwrap_err();
        assert!(e.to_string().contains("\"p\""), "{e}");
        let e = rules(Some(
            &serde_json::json!({"devices":[{"allow":true,"major":1i64 << 40}]}),
        ))
        .unwrap_err();
        assert!(matches!(e, DeviceError::Number { .. }), "{e}");
    }

    #[test]
    fn the_kernel_verifier_accepts_the_programs() {
        // Needs CAP_BPF/CAP_SYS_ADMIN (the tests run as root, like the agent).
        for set in [
            CONTAINERD,
            r#"{"devices":[{"allow":true,"access":"rwm"}]}"#,
            r#"{"devices":[{"allow":true,"access":"rwm"},{"allow":false,"type":"b","access":"w"}]}"#,
            r#"{}"#,
        ] {
            let fd = load(&program(&spec_rules(set))).unwrap_or_else(|e| panic!("{set}: {e}"));
            assert!(fd.as_raw_fd() > 2);
        }
    }
}
