//! Linux's `execve(2)` limits on a container process's `args` and `env`, checked the same
//! way by the shim (before anything is created) and by the agent (its own edge).
//!
//! Linux refuses an `execve` with `E2BIG` when one string (with its NUL) is longer than
//! `MAX_ARG_STRLEN` (32 pages, 128 KiB), or when all strings with their NULs, the program's
//! path and one pointer per string take more than a quarter of the stack rlimit (never less
//! than `ARG_MAX`, 128 KiB, never more than 6 MiB, three quarters of `_STK_LIM`).
//!
//! What the guest enforces: each string up to [`MAX_ARG_STRLEN`]; in all, Linux's limit for
//! the process's `RLIMIT_STACK` soft limit (the default 8 MiB when the spec sets none), less
//! [`PROGRAM_RESERVE`] for the program's path and the `HOME` the agent may add, and never
//! more than [`MAX_TOTAL`] = 2 MiB (the limit of the default stack): a larger stack would let
//! Linux take up to 6 MiB, but the spec must also fit one agent protocol message
//! (4 MiB), so the JSON-encoded strings may take at most [`MAX_ENCODED`].

/// Longest single argument or environment string, its NUL included (`32 * PAGE_SIZE`).
pub const MAX_ARG_STRLEN: usize = 32 * 4096;
/// What Linux allows in all whatever the stack limit (`ARG_MAX`, 32 pages).
pub const ARG_MAX: usize = 32 * 4096;
/// The stack rlimit a process has when the spec sets none (`_STK_LIM`, 8 MiB).
pub const DEFAULT_STACK: u64 = 8 << 20;
/// Linux's ceiling for all strings, three quarters of `_STK_LIM` (6 MiB).
pub const LINUX_CEILING: usize = 6 << 20;
/// The guest's ceiling for all strings: the limit of the default 8 MiB stack (2 MiB).
pub const MAX_TOTAL: usize = 2 << 20;
/// Kept out of the total for the program's path (`PATH_MAX`) and the `HOME` entry the
/// agent adds when the environment has none.
pub const PROGRAM_RESERVE: usize = 4096;
/// Most bytes `args` and `env` may take JSON-encoded (quotes and escapes included), so a
/// spec carrying them fits one 4 MiB agent protocol message.
pub const MAX_ENCODED: usize = 3 << 20;
/// Bytes of one `argv`/`envp` pointer on the stack.
const POINTER: usize = 8;

/// `args` or `env` beyond what the guest runs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    /// One string is longer than `MAX_ARG_STRLEN`.
    #[error("{field}[{index}] is {size} bytes with its NUL, more than Linux's MAX_ARG_STRLEN of {limit} bytes for one argument or environment string")]
    String {
        /// `process.args` or `process.env`.
        field: &'static str,
        /// Which entry.
        index: usize,
        /// Its length with the NUL.
        size: usize,
        /// [`MAX_ARG_STRLEN`].
        limit: usize,
    },
    /// All strings together are too large for `execve`.
    #[error("process.args and process.env take {size} bytes (strings with their NULs and {POINTER}-byte pointers), more than the {limit} bytes allowed ({why})")]
    Total {
        /// What they take, counted as Linux counts.
        size: usize,
        /// The limit for this process.
        limit: usize,
        /// Where the limit comes from.
        why: String,
    },
    /// Encoded as JSON they would not fit an agent protocol message.
    #[error("process.args and process.env take {size} bytes as JSON, more than the {limit} bytes an agent protocol message leaves for them")]
    Encoded {
        /// JSON-encoded size.
        size: usize,
        /// [`MAX_ENCODED`].
        limit: usize,
    },
}

/// The total limit for a process whose `RLIMIT_STACK` soft limit is `stack_soft` (`None`:
/// the default), with the reason, for messages.
pub fn total_limit(stack_soft: Option<u64>) -> (usize, String) {
    let stack = stack_soft.unwrap_or(DEFAULT_STACK);
    let quarter = usize::try_from(stack / 4).unwrap_or(usize::MAX);
    let linux = quarter.clamp(ARG_MAX, LINUX_CEILING);
    let why = match stack_soft {
        None => "a quarter of the default 8 MiB stack".to_owned(),
        Some(s) if linux < MAX_TOTAL => format!("Linux's limit for RLIMIT_STACK {s}"),
        Some(_) => "the guest's 2 MiB ceiling".to_owned(),
    };
    (
        linux.min(MAX_TOTAL) - PROGRAM_RESERVE,
        format!("{why}, less {PROGRAM_RESERVE} for the program path"),
    )
}

/// Bytes `s` takes as a JSON string (quotes included), as serde_json writes it.
fn json_len(s: &str) -> usize {
    2 + s
        .bytes()
        .map(|b| match b {
            b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 2,
            0..=0x1f => 6,
            _ => 1,
        })
        .sum::<usize>()
}

/// Checks a process's `args` and `env` against Linux's limits (see the module docs);
/// `stack_soft` is the soft `RLIMIT_STACK` the process gets, if its spec sets one.
pub fn check_process(
    args: &[String],
    env: &[String],
    stack_soft: Option<u64>,
) -> Result<(), LimitError> {
    let mut total = 0usize;
    let mut encoded = 0usize;
    for (field, strings) in [("process.args", args), ("process.env", env)] {
        for (index, s) in strings.iter().enumerate() {
            let size = s.len() + 1;
            if size > MAX_ARG_STRLEN {
                return Err(LimitError::String {
                    field,
                    index,
                    size,
                    limit: MAX_ARG_STRLEN,
                });
            }
            total += size + POINTER;
            encoded += json_len(s) + 1;
        }
    }
    let (limit, why) = total_limit(stack_soft);
    if total > limit {
        return Err(LimitError::Total {
            size: total,
            limit,
            why,
        });
    }
    if encoded > MAX_ENCODED {
        return Err(LimitError::Encoded {
            size: encoded,
            limit: MAX_ENCODED,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_string_up_to_max_arg_strlen() {
        let ok = vec![format!("A={}", "x".repeat(MAX_ARG_STRLEN - 3))];
        assert_eq!(ok[0].len() + 1, MAX_ARG_STRLEN);
        check_process(&["sh".into()], &ok, None).unwrap();
        let big = vec![format!("A={}", "x".repeat(200 << 10))];
        let e = check_process(&["sh".into()], &big, None).unwrap_err();
        assert_eq!(
            e,
            LimitError::String {
                field: "process.env",
                index: 0,
                size: (200 << 10) + 3,
                limit: MAX_ARG_STRLEN
            }
        );
        let text = e.to_string();
        assert!(
            text.contains("MAX_ARG_STRLEN") && text.contains("131072") && text.contains("204803"),
            "{text}"
        );
        let e = check_process(&["sh".into(), "y".repeat(MAX_ARG_STRLEN)], &[], None).unwrap_err();
        assert!(e.to_string().starts_with("process.args[1]"), "{e}");
    }

    #[test]
    fn a_megabyte_in_many_variables_fits_and_the_total_is_bounded() {
        // 1 MiB in 1024 variables of 1 KiB.
        let env: Vec<String> = (0..1024)
            .map(|i| format!("V{i:04}={}", "v".repeat(1024 - 6)))
            .collect();
        check_process(&["sh".into()], &env, None).unwrap();
        let env: Vec<String> = (0..2100)
            .map(|i| format!("V{i:04}={}", "v".repeat(1024 - 6)))
            .collect();
        let e = check_process(&["sh".into()], &env, None).unwrap_err();
        let LimitError::Total { size, limit, .. } = &e else {
            panic!("{e}")
        };
        assert_eq!(*limit, MAX_TOTAL - PROGRAM_RESERVE);
        assert_eq!(*size, 3 + 8 + 2100 * (1025 + 8));
        assert!(
            e.to_string().contains(&size.to_string()) && e.to_string().contains("2093056"),
            "{e}"
        );
    }

    #[test]
    fn the_total_follows_the_stack_rlimit() {
        assert_eq!(total_limit(None).0, (2 << 20) - 4096);
        // A quarter of a 1 MiB stack.
        assert_eq!(total_limit(Some(1 << 20)).0, (256 << 10) - 4096);
        // Never below ARG_MAX, never above the guest's ceiling.
        assert_eq!(total_limit(Some(4096)).0, ARG_MAX - 4096);
        assert_eq!(total_limit(Some(u64::MAX)).0, MAX_TOTAL - 4096);
        let env = vec!["A=".to_owned() + &"x".repeat(100 << 10); 3];
        check_process(&["sh".into()], &env, None).unwrap();
        let e = check_process(&["sh".into()], &env, Some(1 << 20)).unwrap_err();
        assert!(e.to_string().contains("RLIMIT_STACK 1048576"), "{e}");
    }

    #[test]
    fn escapes_count_toward_the_message_size() {
        assert_eq!(json_len("ab"), 4);
        assert_eq!(json_len("\"\n\u{1}é"), 2 + 2 + 2 + 6 + 2);
        // Control characters take 6 bytes each as JSON: 16 strings of 100 KiB pass Linux's
        // total but not the protocol's.
        let env = vec!["\u{1}".repeat(100 << 10); 16];
        let e = check_process(&["sh".into()], &env, None).unwrap_err();
        assert!(matches!(e, LimitError::Encoded { .. }), "{e}");
    }
}
