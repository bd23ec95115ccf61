//! The container's seccomp profile (OCI `linux.seccomp`): compiled to classic BPF with
//! `seccompiler` when the container is created (a profile the guest cannot apply fails
//! Create naming what), installed by the container's process just before `execve`.
//!
//! seccompiler builds filters with one action for the calls its rules match and one for the
//! rest, while a profile gives every rule its own action. A profile therefore becomes
//! several filters; the kernel runs them all and takes the most severe answer (kill process
//! > kill thread > trap > errno > user notification > trace > log > allow):
//! - unless the default action is "allow": one filter that allows what any rule matches and
//!   answers everything else with the default action;
//! - for each other action of the rules (errno values apart): one filter that answers with
//!   it what the rules with that action match and allows the rest.
//!
//! A call one rule matches gets that rule's action, a call no rule matches the default, as
//! with libseccomp; where rules with different actions match the same call, the most
//! severe wins. As in runc: a rule whose action is the default is dropped, conditions on
//! the same argument become separate rules (either may match), `SCMP_ACT_ERRNO` without
//! `errnoRet` is `EPERM`, and syscall names the guest's architecture does not know are
//! skipped (profiles name calls of other architectures and newer kernels).
//!
//! Differences: only the native ABI is filtered; a call through another ABI (x86's `int
//! 0x80`, x32) kills the process whatever `architectures` lists. runc's `ENOSYS` answer for
//! calls newer than the profile is not added. `SCMP_ACT_NOTIFY` (it needs a seccomp agent
//! on the host) and unknown actions, operators, architectures or flags are refused.

use std::collections::BTreeMap;
use std::str::FromStr;

use seccompiler::{
    sock_filter, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};
use serde::{Deserialize, Serialize};

use super::spec::null_default;

/// OCI `linux.seccomp`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Profile {
    /// Action for calls no rule matches (`SCMP_ACT_ERRNO`, ...).
    pub default_action: String,
    /// errno of an `SCMP_ACT_ERRNO` (or data of `SCMP_ACT_TRACE`) default action.
    #[serde(default)]
    pub default_errno_ret: Option<u32>,
    /// `SCMP_ARCH_X86_64`, ...: checked, only the native one is filtered.
    #[serde(default, deserialize_with = "null_default")]
    pub architectures: Vec<String>,
    /// `SECCOMP_FILTER_FLAG_*`.
    #[serde(default, deserialize_with = "null_default")]
    pub flags: Vec<String>,
    /// The rules.
    #[serde(default, deserialize_with = "null_default")]
    pub syscalls: Vec<Rule>,
}

/// One rule: calls by name, conditions on their arguments, an action.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    /// Syscall names.
    #[serde(default, deserialize_with = "null_default")]
    pub names: Vec<String>,
    /// `SCMP_ACT_*`.
    pub action: String,
    /// errno of `SCMP_ACT_ERRNO` (data of `SCMP_ACT_TRACE`).
    #[serde(default)]
    pub errno_ret: Option<u32>,
    /// Conditions, all of which must hold.
    #[serde(default, deserialize_with = "null_default")]
    pub args: Vec<Arg>,
}

/// A condition on one argument.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Arg {
    /// Argument number, 0 to 5.
    pub index: u32,
    /// The value compared (the mask for `SCMP_CMP_MASKED_EQ`).
    #[serde(default)]
    pub value: u64,
    /// The masked value `SCMP_CMP_MASKED_EQ` expects.
    #[serde(default)]
    pub value_two: u64,
    /// `SCMP_CMP_EQ`, ...
    pub op: String,
}

/// One BPF instruction (`struct sock_filter`): code, jt, jf, k.
pub type Insn = (u16, u8, u8, u32);

/// A compiled profile: the filters to install, in order, and the `seccomp(2)` flags.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compiled {
    /// Each filter's instructions.
    pub filters: Vec<Vec<Insn>>,
    /// `SECCOMP_FILTER_FLAG_*` bits for every filter.
    pub flags: u32,
}

/// A profile the guest cannot apply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SeccompError {
    /// An action the spec does not define.
    #[error("linux.seccomp: unknown action {0:?}")]
    Action(String),
    /// `SCMP_ACT_NOTIFY`: it needs a seccomp agent listening on the host.
    #[error("linux.seccomp: SCMP_ACT_NOTIFY (for {0}) is not supported in the guest: the seccomp agent would have to run in the VM")]
    Notify(String),
    /// An unknown comparison operator.
    #[error("linux.seccomp: unknown operator {op:?} in the rule for {names}")]
    Op {
        /// The operator.
        op: String,
        /// The rule's syscalls.
        names: String,
    },
    /// An argument number beyond 5.
    #[error("linux.seccomp: argument index {index} in the rule for {names} (expected 0 to 5)")]
    ArgIndex {
        /// The index.
        index: u32,
        /// The rule's syscalls.
        names: String,
    },
    /// An architecture name libseccomp does not know.
    #[error("linux.seccomp: unknown architecture {0:?}")]
    Arch(String),
    /// A filter flag the guest cannot apply.
    #[error("linux.seccomp: unsupported flag {0:?} (expected SECCOMP_FILTER_FLAG_TSYNC, SECCOMP_FILTER_FLAG_LOG or SECCOMP_FILTER_FLAG_SPEC_ALLOW)")]
    Flag(String),
    /// seccompiler refused a filter (too large, ...).
    #[error("linux.seccomp: cannot compile the filter: {0}")]
    Compile(String),
}

/// Architecture names of the OCI spec (libseccomp's).
const ARCHES: &[&str] = &[
    "SCMP_ARCH_X86",
    "SCMP_ARCH_X86_64",
    "SCMP_ARCH_X32",
    "SCMP_ARCH_ARM",
    "SCMP_ARCH_AARCH64",
    "SCMP_ARCH_MIPS",
    "SCMP_ARCH_MIPS64",
    "SCMP_ARCH_MIPS64N32",
    "SCMP_ARCH_MIPSEL",
    "SCMP_ARCH_MIPSEL64",
    "SCMP_ARCH_MIPSEL64N32",
    "SCMP_ARCH_PPC",
    "SCMP_ARCH_PPC64",
    "SCMP_ARCH_PPC64LE",
    "SCMP_ARCH_S390",
    "SCMP_ARCH_S390X",
    "SCMP_ARCH_PARISC",
    "SCMP_ARCH_PARISC64",
    "SCMP_ARCH_RISCV64",
    "SCMP_ARCH_LOONGARCH64",
    "SCMP_ARCH_M68K",
    "SCMP_ARCH_SH",
    "SCMP_ARCH_SHEB",
];

/// The action of `name` with `errno_ret`; `names` is for messages.
fn action(name: &str, errno_ret: Option<u32>, names: &str) -> Result<SeccompAction, SeccompError> {
    Ok(match name {
        "SCMP_ACT_KILL" | "SCMP_ACT_KILL_THREAD" => SeccompAction::KillThread,
        "SCMP_ACT_KILL_PROCESS" => SeccompAction::KillProcess,
        "SCMP_ACT_TRAP" => SeccompAction::Trap,
        "SCMP_ACT_ERRNO" => SeccompAction::Errno(errno_ret.unwrap_or(libc::EPERM as u32)),
        "SCMP_ACT_TRACE" => SeccompAction::Trace(errno_ret.unwrap_or(libc::EPERM as u32)),
        "SCMP_ACT_ALLOW" => SeccompAction::Allow,
        "SCMP_ACT_LOG" => SeccompAction::Log,
        "SCMP_ACT_NOTIFY" => return Err(SeccompError::Notify(names.to_owned())),
        other => return Err(SeccompError::Action(other.to_owned())),
    })
}

/// The seccompiler operator of an OCI one, with the value it compares against.
fn condition(arg: &Arg, names: &str) -> Result<SeccompCondition, SeccompError> {
    let (op, value) = match arg.op.as_str() {
        "SCMP_CMP_NE" => (SeccompCmpOp::Ne, arg.value),
        "SCMP_CMP_LT" => (SeccompCmpOp::Lt, arg.value),
        "SCMP_CMP_LE" => (SeccompCmpOp::Le, arg.value),
        "SCMP_CMP_EQ" => (SeccompCmpOp::Eq, arg.value),
        "SCMP_CMP_GE" => (SeccompCmpOp::Ge, arg.value),
        "SCMP_CMP_GT" => (SeccompCmpOp::Gt, arg.value),
        "SCMP_CMP_MASKED_EQ" => (SeccompCmpOp::MaskedEq(arg.value), arg.value_two),
        other => {
            return Err(SeccompError::Op {
                op: other.to_owned(),
                names: names.to_owned(),
            })
        }
    };
    let index = u8::try_from(arg.index)
        .ok()
        .filter(|i| *i <= 5)
        .ok_or_else(|| SeccompError::ArgIndex {
            index: arg.index,
            names: names.to_owned(),
        })?;
    SeccompCondition::new(index, SeccompCmpArgLen::Qword, op, value)
        .map_err(|e| SeccompError::Compile(e.to_string()))
}

/// The rules one OCI rule gives each of its syscalls: `None` = unconditional.
fn rules_of(rule: &Rule, names: &str) -> Result<Option<Vec<SeccompRule>>, SeccompError> {
    if rule.args.is_empty() {
        return Ok(None);
    }
    let conditions = rule
        .args
        .iter()
        .map(|a| condition(a, names))
        .collect::<Result<Vec<_>, _>>()?;
    let mut seen = [false; 6];
    let repeated = rule.args.iter().any(|a| {
        let i = a.index as usize;
        std::mem::replace(&mut seen[i], true)
    });
    let grouped = if repeated {
        // libseccomp cannot AND two conditions on one argument: runc adds them as separate
        // rules.
        conditions.into_iter().map(|c| vec![c]).collect()
    } else {
        vec![conditions]
    };
    grouped
        .into_iter()
        .map(|c| SeccompRule::new(c).map_err(|e| SeccompError::Compile(e.to_string())))
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// Syscall number -> its rules; an empty list matches every call of that syscall.
type RuleMap = BTreeMap<i64, Vec<SeccompRule>>;

fn add_rules(map: &mut RuleMap, nr: i64, rules: &Option<Vec<SeccompRule>>) {
    let Some(rules) = rules else {
        map.insert(nr, Vec::new());
        return;
    };
    match map.get_mut(&nr) {
        None => {
            map.insert(nr, rules.clone());
        }
        // An unconditional rule already covers every call.
        Some(existing) if existing.is_empty() => {}
        Some(existing) => existing.extend(rules.iter().cloned()),
    }
}

/// The native architecture for seccompiler.
fn native_arch() -> Result<TargetArch, SeccompError> {
    TargetArch::try_from(std::env::consts::ARCH).map_err(|e| SeccompError::Compile(e.to_string()))
}

/// Compiles a profile (see the module docs).
pub fn compile(profile: &Profile) -> Result<Compiled, SeccompError> {
    let default = action(
        &profile.default_action,
        profile.default_errno_ret,
        "the default action",
    )?;
    for arch in &profile.architectures {
        if !ARCHES.contains(&arch.as_str()) {
            return Err(SeccompError::Arch(arch.clone()));
        }
    }
    let mut flags = 0;
    for flag in &profile.flags {
        flags |= match flag.as_str() {
            // One thread: nothing to synchronize.
            "SECCOMP_FILTER_FLAG_TSYNC" => 0,
            "SECCOMP_FILTER_FLAG_LOG" => libc::SECCOMP_FILTER_FLAG_LOG,
            "SECCOMP_FILTER_FLAG_SPEC_ALLOW" => libc::SECCOMP_FILTER_FLAG_SPEC_ALLOW,
            other => return Err(SeccompError::Flag(other.to_owned())),
        } as u32;
    }
    // Every call some rule matches (for the default filter), and per action what matches.
    let mut matched = RuleMap::new();
    let mut by_action: Vec<(SeccompAction, RuleMap)> = Vec::new();
    for rule in &profile.syscalls {
        let names = rule.names.join(",");
        let act = action(&rule.action, rule.errno_ret, &names)?;
        let rules = rules_of(rule, &names)?;
        if act == default {
            continue;
        }
        let numbers: Vec<i64> = rule
            .names
            .iter()
            .filter_map(|n| syscalls::Sysno::from_str(n).ok())
            .map(|s| i64::from(s.id()))
            .collect();
        if numbers.is_empty() {
            continue;
        }
        let slot = match by_action.iter().position(|(a, _)| *a == act) {
            Some(i) => i,
            None => {
                by_action.push((act.clone(), RuleMap::new()));
                by_action.len() - 1
            }
        };
        for nr in numbers {
            add_rules(&mut matched, nr, &rules);
            add_rules(&mut by_action[slot].1, nr, &rules);
        }
    }
    let arch = native_arch()?;
    let mut filters = Vec::new();
    if default != SeccompAction::Allow {
        filters.push(build(matched, default, SeccompAction::Allow, arch)?);
    }
    for (act, map) in by_action {
        if act != SeccompAction::Allow {
            filters.push(build(map, SeccompAction::Allow, act, arch)?);
        }
    }
    if !filters.is_empty() {
        if let Some(guard) = other_abi_guard() {
            filters.insert(0, guard);
        }
    }
    Ok(Compiled { filters, flags })
}

fn build(
    rules: RuleMap,
    mismatch: SeccompAction,
    matched: SeccompAction,
    arch: TargetArch,
) -> Result<Vec<Insn>, SeccompError> {
    let filter = SeccompFilter::new(rules, mismatch, matched, arch)
        .map_err(|e| SeccompError::Compile(e.to_string()))?;
    let program: BpfProgram = filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| SeccompError::Compile(e.to_string()))?;
    Ok(program.iter().map(|i| (i.code, i.jt, i.jf, i.k)).collect())
}

/// x86_64's x32 ABI shares the architecture value but sets bit 30 of the syscall number:
/// such a call would miss every rule. This filter kills it.
fn other_abi_guard() -> Option<Vec<Insn>> {
    #[cfg(target_arch = "x86_64")]
    {
        const X32_SYSCALL_BIT: u32 = 0x4000_0000;
        const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
        const JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
        const JGE_K: u16 = (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16;
        const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
        const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
        Some(vec![
            (LD_W_ABS, 0, 0, 4),
            // Another architecture: the other filters kill it.
            (JEQ_K, 1, 0, AUDIT_ARCH_X86_64),
            (RET_K, 0, 0, libc::SECCOMP_RET_ALLOW),
            (LD_W_ABS, 0, 0, 0),
            (JGE_K, 0, 1, X32_SYSCALL_BIT),
            (RET_K, 0, 0, libc::SECCOMP_RET_KILL_PROCESS),
            (RET_K, 0, 0, libc::SECCOMP_RET_ALLOW),
        ])
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        None
    }
}

/// Installs the filters in the calling thread. It needs `no_new_privs` or `CAP_SYS_ADMIN`
/// in the effective set.
pub fn install(compiled: &Compiled) -> std::io::Result<()> {
    for filter in &compiled.filters {
        let program: Vec<sock_filter> = filter
            .iter()
            .map(|&(code, jt, jf, k)| sock_filter { code, jt, jf, k })
            .collect();
        let prog = libc::sock_fprog {
            len: u16::try_from(program.len())
                .map_err(|_| std::io::Error::from_raw_os_error(libc::E2BIG))?,
            filter: program.as_ptr() as *mut libc::sock_filter,
        };
        // SAFETY: `prog` points at `program`, which outlives the call; the kernel copies
        // the instructions. seccompiler's sock_filter has the kernel's layout.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                compiled.flags as libc::c_ulong,
                &prog as *const libc::sock_fprog,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `struct seccomp_data` for the interpreter.
    struct Data {
        nr: u32,
        arch: u32,
        args: [u64; 6],
    }

    fn load(d: &Data, off: u32) -> u32 {
        match off {
            0 => d.nr,
            4 => d.arch,
            o if (16..64).contains(&o) => {
                let a = d.args[((o - 16) / 8) as usize];
                if (o - 16) % 8 == 0 {
                    a as u32
                } else {
                    (a >> 32) as u32
                }
            }
            o => panic!("load at {o}"),
        }
    }

    /// A classic BPF interpreter for what seccompiler and the guard emit.
    fn run(prog: &[Insn], d: &Data) -> u32 {
        let (mut a, mut pc) = (0u32, 0usize);
        loop {
            let (code, jt, jf, k) = prog[pc];
            let code = u32::from(code);
            pc += 1;
            match code & 0x07 {
                c if c == libc::BPF_LD => a = load(d, k),
                c if c == libc::BPF_ALU => {
                    assert_eq!(code & 0xf0, libc::BPF_AND);
                    a &= k;
                }
                c if c == libc::BPF_RET => return k,
                c if c == libc::BPF_JMP => {
                    let op = code & 0xf0;
                    if op == libc::BPF_JA {
                        pc += k as usize;
                        continue;
                    }
                    let taken = match op {
                        o if o == libc::BPF_JEQ => a == k,
                        o if o == libc::BPF_JGT => a > k,
                        o if o == libc::BPF_JGE => a >= k,
                        o if o == libc::BPF_JSET => a & k != 0,
                        o => panic!("jump op {o:#x}"),
                    };
                    pc += usize::from(if taken { jt } else { jf });
                }
                c => panic!("class {c:#x}"),
            }
        }
    }

    /// The kernel's answer: the most severe over all filters (lowest action value, kill
    /// process first).
    fn verdict(c: &Compiled, nr: i64, args: [u64; 6]) -> u32 {
        let d = Data {
            nr: nr as u32,
            arch: 0xc000_003e,
            args,
        };
        c.filters
            .iter()
            .rev()
            .map(|f| run(f, &d))
            .min_by_key(|r| (*r & libc::SECCOMP_RET_ACTION_FULL) as i32)
            .unwrap_or(libc::SECCOMP_RET_ALLOW)
    }

    fn profile(json: &str) -> Profile {
        serde_json::from_str(json).unwrap()
    }

    const ERRNO: u32 = libc::SECCOMP_RET_ERRNO;

    #[test]
    fn a_deny_list_answers_its_errno_and_allows_the_rest() {
        let c = compile(&profile(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","architectures":["SCMP_ARCH_X86_64","SCMP_ARCH_X86"],
                "syscalls":[{"names":["mkdir","mkdirat","no_such_call"],"action":"SCMP_ACT_ERRNO","errnoRet":18}]}"#,
        ))
        .unwrap();
        assert_eq!(verdict(&c, libc::SYS_mkdir, [0; 6]), ERRNO | 18);
        assert_eq!(verdict(&c, libc::SYS_mkdirat, [0; 6]), ERRNO | 18);
        assert_eq!(
            verdict(&c, libc::SYS_getpid, [0; 6]),
            libc::SECCOMP_RET_ALLOW
        );
        // x32 calls do not slip past the rules.
        assert_eq!(
            verdict(&c, 0x4000_0000 | libc::SYS_mkdir, [0; 6]),
            libc::SECCOMP_RET_KILL_PROCESS
        );
    }

    #[test]
    fn an_allow_list_gives_the_default_errno_and_rules_keep_their_own() {
        let c = compile(&profile(
            r#"{"defaultAction":"SCMP_ACT_ERRNO","defaultErrnoRet":1,
                "syscalls":[
                  {"names":["read","write","getpid"],"action":"SCMP_ACT_ALLOW"},
                  {"names":["clone3"],"action":"SCMP_ACT_ERRNO","errnoRet":38},
                  {"names":["personality"],"action":"SCMP_ACT_ALLOW","args":[{"index":0,"value":8,"op":"SCMP_CMP_EQ"}]},
                  {"names":["personality"],"action":"SCMP_ACT_ALLOW","args":[{"index":0,"value":131072,"op":"SCMP_CMP_EQ"}]},
                  {"names":["clone"],"action":"SCMP_ACT_ALLOW","args":[{"index":0,"value":2114060288,"valueTwo":0,"op":"SCMP_CMP_MASKED_EQ"}]},
                  {"names":["kill"],"action":"SCMP_ACT_ERRNO"}
                ]}"#,
        ))
        .unwrap();
        let allow = libc::SECCOMP_RET_ALLOW;
        assert_eq!(verdict(&c, libc::SYS_read, [0; 6]), allow);
        assert_eq!(verdict(&c, libc::SYS_mkdir, [0; 6]), ERRNO | 1);
        assert_eq!(verdict(&c, libc::SYS_clone3, [0; 6]), ERRNO | 38);
        // Rule-level ERRNO without errnoRet is EPERM, as runc.
        assert_eq!(verdict(&c, libc::SYS_kill, [0; 6]), ERRNO | 1);
        assert_eq!(
            verdict(&c, libc::SYS_personality, [8, 0, 0, 0, 0, 0]),
            allow
        );
        assert_eq!(
            verdict(&c, libc::SYS_personality, [0x20000, 0, 0, 0, 0, 0]),
            allow
        );
        assert_eq!(
            verdict(&c, libc::SYS_personality, [1, 0, 0, 0, 0, 0]),
            ERRNO | 1
        );
        // No namespace flag: allowed; CLONE_NEWUSER: the default.
        assert_eq!(verdict(&c, libc::SYS_clone, [0x11, 0, 0, 0, 0, 0]), allow);
        assert_eq!(
            verdict(
                &c,
                libc::SYS_clone,
                [libc::CLONE_NEWUSER as u64, 0, 0, 0, 0, 0]
            ),
            ERRNO | 1
        );
    }

    #[test]
    fn conditions_are_and_unless_they_share_an_argument() {
        let c = compile(&profile(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[
                {"names":["socket"],"action":"SCMP_ACT_ERRNO","errnoRet":13,
                 "args":[{"index":0,"value":40,"op":"SCMP_CMP_EQ"},{"index":1,"value":1,"op":"SCMP_CMP_EQ"}]},
                {"names":["setns"],"action":"SCMP_ACT_ERRNO","errnoRet":13,
                 "args":[{"index":1,"value":5,"op":"SCMP_CMP_GT"},{"index":1,"value":2,"op":"SCMP_CMP_LT"}]}]}"#,
        ))
        .unwrap();
        let denied = ERRNO | 13;
        assert_eq!(verdict(&c, libc::SYS_socket, [40, 1, 0, 0, 0, 0]), denied);
        assert_eq!(
            verdict(&c, libc::SYS_socket, [40, 2, 0, 0, 0, 0]),
            0x7fff_0000
        );
        assert_eq!(
            verdict(&c, libc::SYS_socket, [2, 1, 0, 0, 0, 0]),
            0x7fff_0000
        );
        // Same argument twice: either condition.
        assert_eq!(verdict(&c, libc::SYS_setns, [0, 7, 0, 0, 0, 0]), denied);
        assert_eq!(verdict(&c, libc::SYS_setns, [0, 1, 0, 0, 0, 0]), denied);
        assert_eq!(
            verdict(&c, libc::SYS_setns, [0, 3, 0, 0, 0, 0]),
            0x7fff_0000
        );
        // 64-bit comparisons see the upper half.
        assert_eq!(
            verdict(&c, libc::SYS_socket, [40 | (1 << 32), 1, 0, 0, 0, 0]),
            0x7fff_0000
        );
    }

    #[test]
    fn the_most_severe_action_wins_and_defaults_are_dropped() {
        let c = compile(&profile(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[
                {"names":["getpid"],"action":"SCMP_ACT_ALLOW"},
                {"names":["chroot"],"action":"SCMP_ACT_LOG"},
                {"names":["chroot"],"action":"SCMP_ACT_KILL_PROCESS","args":[{"index":0,"value":0,"op":"SCMP_CMP_EQ"}]}]}"#,
        ))
        .unwrap();
        assert_eq!(
            verdict(&c, libc::SYS_chroot, [1, 0, 0, 0, 0, 0]),
            libc::SECCOMP_RET_LOG
        );
        assert_eq!(
            verdict(&c, libc::SYS_chroot, [0; 6]),
            libc::SECCOMP_RET_KILL_PROCESS
        );
        // guard + LOG + KILL_PROCESS; the allow rule equals the default.
        assert_eq!(c.filters.len(), 3);
        let none = compile(&profile(r#"{"defaultAction":"SCMP_ACT_ALLOW"}"#)).unwrap();
        assert!(none.filters.is_empty());
    }

    #[test]
    fn what_cannot_be_applied_is_refused_by_name() {
        let e = compile(&profile(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["connect","accept"],"action":"SCMP_ACT_NOTIFY"}]}"#,
        ))
        .unwrap_err();
        assert_eq!(e, SeccompError::Notify("connect,accept".into()));
        assert!(e.to_string().contains("SCMP_ACT_NOTIFY"), "{e}");
        let e = compile(&profile(r#"{"defaultAction":"SCMP_ACT_BOGUS"}"#)).unwrap_err();
        assert_eq!(e, SeccompError::Action("SCMP_ACT_BOGUS".into()));
        let e = compile(&profile(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["read"],"action":"SCMP_ACT_ERRNO","args":[{"index":6,"value":0,"op":"SCMP_CMP_EQ"}]}]}"#,
        ))
        .unwrap_err();
        assert!(matches!(e, SeccompError::ArgIndex { index: 6, .. }), "{e}");
        let e = compile(&profile(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["read"],"action":"SCMP_ACT_ERRNO","args":[{"index":0,"value":0,"op":"SCMP_CMP_ABOUT"}]}]}"#,
        ))
        .unwrap_err();
        assert!(e.to_string().contains("SCMP_CMP_ABOUT"), "{e}");
        let e = compile(&profile(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","architectures":["SCMP_ARCH_Z80"]}"#,
        ))
        .unwrap_err();
        assert_eq!(e, SeccompError::Arch("SCMP_ARCH_Z80".into()));
        let e = compile(&profile(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","flags":["SECCOMP_FILTER_FLAG_NEW_LISTENER"]}"#,
        ))
        .unwrap_err();
        assert!(matches!(e, SeccompError::Flag(_)), "{e}");
        let ok = compile(&profile(
            r#"{"defaultAction":"SCMP_ACT_ERRNO","flags":["SECCOMP_FILTER_FLAG_LOG","SECCOMP_FILTER_FLAG_TSYNC"]}"#,
        ))
        .unwrap();
        assert_eq!(ok.flags, libc::SECCOMP_FILTER_FLAG_LOG as u32);
    }

    #[test]
    fn installed_filters_answer_in_a_real_process() {
        let c = compile(&profile(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["mkdir","mkdirat"],"action":"SCMP_ACT_ERRNO","errnoRet":18}]}"#,
        ))
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = std::ffi::CString::new(dir.path().join("x").to_str().unwrap()).unwrap();
        // SAFETY: the child makes raw syscalls only and leaves with _exit.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                // SAFETY: prctl with integer arguments.
                unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
                let code = match install(&c) {
                    Err(_) => 100,
                    // SAFETY: `path` is a valid C string.
                    Ok(()) => match unsafe { libc::mkdir(path.as_ptr(), 0o755) } {
                        0 => 0,
                        _ => std::io::Error::last_os_error().raw_os_error().unwrap_or(99),
                    },
                };
                // SAFETY: leaving the forked child without running the parent's destructors.
                unsafe { libc::_exit(code) }
            }
            nix::unistd::ForkResult::Parent { child } => {
                let status = nix::sys::wait::waitpid(child, None).unwrap();
                assert_eq!(
                    status,
                    nix::sys::wait::WaitStatus::Exited(child, libc::EXDEV)
                );
                assert!(!dir.path().join("x").exists());
            }
        }
    }
}
