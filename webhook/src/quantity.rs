//! Kubernetes resource quantities (`500m`, `1.5`, `1Gi`, `500M`, `129e6`) as exact numbers.
//!
//! A quantity is a signed decimal number with an optional suffix: a binary one (`Ki` `Mi`
//! `Gi` `Ti` `Pi` `Ei`), a decimal one (`n` `u` `m` `k` `M` `G` `T` `P` `E`) or a decimal
//! exponent (`e3`, `E-2`). [`Quantity`] holds its value in billionths (nano units) in an
//! `i128`, so sums are exact; anything finer than a billionth is rounded up, as Kubernetes
//! rounds quantities up to its own precision. Results are rounded up to whole units only
//! at the end ([`Quantity::ceil_units`]).

use std::fmt;

/// Nano units in one unit.
const NANO: i128 = 1_000_000_000;

/// A quantity in nano units (1 = 10^-9 of the unit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Quantity(i128);

/// A quantity that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    #[error("{0:?} is not a quantity (expected a number with an optional suffix such as 500m, 1.5, 1Gi, 500M or 129e6)")]
    Syntax(String),
    #[error("{0:?} is too large")]
    TooLarge(String),
}

impl Quantity {
    /// Zero.
    pub const ZERO: Self = Self(0);

    /// Reads a quantity in Kubernetes' notation.
    pub fn parse(text: &str) -> Result<Self, QuantityError> {
        let syntax = || QuantityError::Syntax(text.to_owned());
        let too_large = || QuantityError::TooLarge(text.to_owned());

        let (negative, rest) = match text.as_bytes().first() {
            Some(b'-') => (true, &text[1..]),
            Some(b'+') => (false, &text[1..]),
            _ => (false, text),
        };
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, suffix) = rest.split_at(number_len);
        let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
        if whole.is_empty() && fraction.is_empty() || fraction.contains('.') {
            return Err(syntax());
        }

        // The digits as one integer, then scaled by 10^decimal * 2^binary.
        let mut mantissa: i128 = 0;
        for digit in whole.bytes().chain(fraction.bytes()) {
            mantissa = mantissa
                .checked_mul(10)
                .and_then(|m| m.checked_add(i128::from(digit - b'0')))
                .ok_or_else(too_large)?;
        }
        let (decimal, binary) = suffix_scale(suffix).ok_or_else(syntax)?;
        let fraction_digits = i32::try_from(fraction.len()).map_err(|_| too_large())?;
        // Nano units: 10^9 more.
        let exponent = decimal
            .checked_add(9)
            .and_then(|e| e.checked_sub(fraction_digits))
            .ok_or_else(too_large)?;

        let mut nanos = mantissa
            .checked_mul(1i128.checked_shl(binary).ok_or_else(too_large)?)
            .ok_or_else(too_large)?;
        if exponent >= 0 {
            let scale = 10i128
                .checked_pow(exponent.unsigned_abs())
                .ok_or_else(too_large)?;
            nanos = nanos.checked_mul(scale).ok_or_else(too_large)?;
        } else {
            // Finer than a nano unit: round up (away from zero), as Kubernetes does.
            nanos = match 10i128.checked_pow(exponent.unsigned_abs()) {
                Some(scale) => ceil_div(nanos, scale),
                None => i128::from(nanos > 0),
            };
        }
        Ok(Self(if negative { -nanos } else { nanos }))
    }

    /// Whether the quantity is below zero.
    pub fn is_negative(self) -> bool {
        self.0 < 0
    }

    /// Whether the quantity is zero.
    pub fn is_zero(self) -> bool {
        self.0 == 0
    }

    /// The sum, or `None` on overflow.
    pub fn checked_add(self, other: Self) -> Option<Self> {
        self.0.checked_add(other.0).map(Self)
    }

    /// The number of whole `unit`s (in units of the quantity) that hold this quantity,
    /// rounded up: `ceil_units(1)` gives vCPUs from CPU, `ceil_units(1 << 20)` MiB from
    /// bytes. Zero and negative quantities give 0.
    pub fn ceil_units(self, unit: u64) -> u64 {
        if self.0 <= 0 {
            return 0;
        }
        let units = ceil_div(self.0, NANO * i128::from(unit.max(1)));
        u64::try_from(units).unwrap_or(u64::MAX)
    }
}

impl fmt::Display for Quantity {
    /// In units with up to nine decimals (`0.5`, `1073741824`), for logs and messages.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let abs = self.0.unsigned_abs();
        let (whole, nanos) = (abs / NANO as u128, abs % NANO as u128);
        if nanos == 0 {
            write!(f, "{sign}{whole}")
        } else {
            let fraction = format!("{nanos:09}");
            write!(f, "{sign}{whole}.{}", fraction.trim_end_matches('0'))
        }
    }
}

/// The suffix as (power of ten, power of two); `None` for an unknown suffix.
fn suffix_scale(suffix: &str) -> Option<(i32, u32)> {
    let scale = match suffix {
        "" => (0, 0),
        "Ki" => (0, 10),
        "Mi" => (0, 20),
        "Gi" => (0, 30),
        "Ti" => (0, 40),
        "Pi" => (0, 50),
        "Ei" => (0, 60),
        "n" => (-9, 0),
        "u" => (-6, 0),
        "m" => (-3, 0),
        "k" => (3, 0),
        "M" => (6, 0),
        "G" => (9, 0),
        "T" => (12, 0),
        "P" => (15, 0),
        "E" => (18, 0),
        _ => {
            let exponent = suffix
                .strip_prefix('e')
                .or_else(|| suffix.strip_prefix('E'))?;
            let digits = exponent.strip_prefix(['+', '-']).unwrap_or(exponent);
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            // Beyond any quantity i128 holds either way; the caller reports it as too large
            // (or rounds a tiny one up).
            let exponent = exponent
                .parse::<i32>()
                .unwrap_or(if exponent.starts_with('-') {
                    -1000
                } else {
                    1000
                });
            (exponent.clamp(-1000, 1000), 0)
        }
    };
    Some(scale)
}

/// `a / b` rounded up, for `b > 0`.
fn ceil_div(a: i128, b: i128) -> i128 {
    let quotient = a / b;
    if a % b > 0 {
        quotient + 1
    } else {
        quotient
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nanos(text: &str) -> i128 {
        Quantity::parse(text).unwrap().0
    }

    #[test]
    fn cpu_notations() {
        assert_eq!(nanos("500m"), 500_000_000);
        assert_eq!(nanos("1.5"), 1_500_000_000);
        assert_eq!(nanos("2"), 2 * NANO);
        assert_eq!(nanos(".25"), 250_000_000);
        assert_eq!(nanos("1."), NANO);
        assert_eq!(nanos("100u"), 100_000);
        assert_eq!(nanos("7n"), 7);
        assert_eq!(nanos("+3"), 3 * NANO);
    }

    #[test]
    fn memory_notations() {
        assert_eq!(nanos("1Gi"), (1 << 30) * NANO);
        assert_eq!(nanos("500M"), 500_000_000 * NANO);
        assert_eq!(nanos("129e6"), 129_000_000 * NANO);
        assert_eq!(nanos("1.5Gi"), 1_610_612_736 * NANO);
        assert_eq!(nanos("0.1Ki"), 102_400_000_000);
        assert_eq!(nanos("1E3"), 1000 * NANO);
        assert_eq!(nanos("5e-1"), 500_000_000);
        assert_eq!(nanos("2k"), 2000 * NANO);
        assert_eq!(nanos("1Ei"), (1 << 60) * NANO);
    }

    #[test]
    fn finer_than_nano_rounds_up() {
        assert_eq!(nanos("0.1n"), 1);
        assert_eq!(nanos("1e-30"), 1);
        assert_eq!(nanos("1e-2000"), 1);
        assert_eq!(nanos("0e-2000"), 0);
        assert_eq!(nanos("-0.1n"), -1);
    }

    #[test]
    fn negatives_parse_and_say_so() {
        let q = Quantity::parse("-1").unwrap();
        assert!(q.is_negative());
        assert_eq!(q.ceil_units(1), 0);
    }

    #[test]
    fn bad_notations_are_named() {
        for bad in [
            "", "m", "1.2.3", "1Gb", "1 Gi", "1e", "1e+", "0x10", "--1", "1mi", "Gi",
        ] {
            let err = Quantity::parse(bad).unwrap_err();
            assert_eq!(err, QuantityError::Syntax(bad.to_owned()), "{bad}");
            assert!(err.to_string().contains("500m"), "{err}");
        }
        for huge in [
            "1e40",
            "99999999999999999999999999999999999999999",
            "1e2000",
            "1000000000000Ei",
        ] {
            assert_eq!(
                Quantity::parse(huge).unwrap_err(),
                QuantityError::TooLarge(huge.to_owned()),
                "{huge}"
            );
        }
    }

    #[test]
    fn ceil_units_rounds_up() {
        assert_eq!(Quantity::parse("500m").unwrap().ceil_units(1), 1);
        assert_eq!(Quantity::parse("1.5").unwrap().ceil_units(1), 2);
        assert_eq!(Quantity::parse("2").unwrap().ceil_units(1), 2);
        assert_eq!(Quantity::parse("1Gi").unwrap().ceil_units(1 << 20), 1024);
        // 500M = 476.84 MiB, 129e6 = 123.02 MiB
        assert_eq!(Quantity::parse("500M").unwrap().ceil_units(1 << 20), 477);
        assert_eq!(Quantity::parse("129e6").unwrap().ceil_units(1 << 20), 124);
        assert_eq!(Quantity::ZERO.ceil_units(1), 0);
        assert_eq!(Quantity::parse("1n").unwrap().ceil_units(1 << 20), 1);
    }

    #[test]
    fn display_is_plain_units() {
        assert_eq!(Quantity::parse("500m").unwrap().to_string(), "0.5");
        assert_eq!(Quantity::parse("1Ki").unwrap().to_string(), "1024");
        assert_eq!(Quantity::parse("-1.25").unwrap().to_string(), "-1.25");
    }
}
