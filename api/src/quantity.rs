//! Kubernetes resource quantities (`7500`, `8Gi`, `1.5`, `100m`, `1e3`),
//! parsed exactly (no floating point) so that "is this a whole number" and
//! "how many MiB is this" have exact answers.

use std::fmt;
use std::str::FromStr;

use crate::error::QuantityError;

/// Scale of the stored value: quantities are kept in billionths.
const NANOS_PER_UNIT: i128 = 1_000_000_000;
const BYTES_PER_MIB: i128 = 1024 * 1024;

/// The suffix a quantity was written with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Suffix {
    /// No suffix: a plain number.
    None,
    /// `Ki`, `Mi`, `Gi`, `Ti`, `Pi`, `Ei` (power of 1024).
    Binary(u32),
    /// `n`, `u`, `m`, `k`, `M`, `G`, `T`, `P`, `E` (power of 10).
    Decimal(i32),
    /// `e<n>` / `E<n>` exponent notation.
    Exponent(i32),
}

/// A parsed Kubernetes quantity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quantity {
    nanos: i128,
    suffix: Suffix,
}

impl Quantity {
    /// A whole quantity with no suffix.
    pub fn from_integer(value: i64) -> Self {
        Self {
            nanos: i128::from(value) * NANOS_PER_UNIT,
            suffix: Suffix::None,
        }
    }

    /// The suffix it was written with.
    pub fn suffix(&self) -> Suffix {
        self.suffix
    }

    /// True when the value is below zero.
    pub fn is_negative(&self) -> bool {
        self.nanos < 0
    }

    /// The value as a whole number, or `None` when it has a fractional part
    /// or does not fit in an `i64`.
    pub fn to_integer(&self) -> Option<i64> {
        if self.nanos % NANOS_PER_UNIT != 0 {
            return None;
        }
        i64::try_from(self.nanos / NANOS_PER_UNIT).ok()
    }

    /// The value rounded up to a whole number (how Kubernetes reports
    /// `Value()` of a fractional quantity); `None` when out of range.
    pub fn to_integer_ceil(&self) -> Option<i64> {
        self.ceil_in_units_of(NANOS_PER_UNIT)
    }

    /// The value in thousandths, rounded up (Kubernetes' `MilliValue`), for
    /// CPU accounting.
    pub fn to_millis_ceil(&self) -> Option<i64> {
        self.ceil_in_units_of(NANOS_PER_UNIT / 1000)
    }

    fn ceil_in_units_of(&self, unit_nanos: i128) -> Option<i64> {
        let whole = self.nanos.div_euclid(unit_nanos);
        let remainder = self.nanos.rem_euclid(unit_nanos);
        i64::try_from(whole + i128::from(remainder != 0)).ok()
    }

    /// Reads a GPU memory quantity as MiB: a plain number is MiB (HAMi's
    /// convention: `nvidia.com/gpumem: 7500`); a number with a byte-size
    /// suffix (`8Gi`, `7500Mi`, `16G`) is bytes, rounded down to whole MiB.
    /// `None` when the value is not a whole, non-negative number of MiB.
    pub fn to_mebibytes(&self) -> Option<u64> {
        if self.nanos < 0 {
            return None;
        }
        match self.suffix {
            Suffix::Binary(_) | Suffix::Decimal(1..) | Suffix::Exponent(1..)
                if self.nanos >= NANOS_PER_UNIT * BYTES_PER_MIB =>
            {
                let bytes = self.nanos / NANOS_PER_UNIT;
                u64::try_from(bytes / BYTES_PER_MIB).ok()
            }
            _ => self.to_integer().and_then(|v| u64::try_from(v).ok()),
        }
    }
}

impl FromStr for Quantity {
    type Err = QuantityError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        parse_quantity(input)
    }
}

impl fmt::Display for Quantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let whole = self.nanos / NANOS_PER_UNIT;
        let frac = (self.nanos % NANOS_PER_UNIT).abs();
        if frac == 0 {
            write!(f, "{whole}")
        } else {
            let digits = format!("{frac:09}");
            let sign = if self.nanos < 0 && whole == 0 {
                "-"
            } else {
                ""
            };
            write!(f, "{sign}{whole}.{}", digits.trim_end_matches('0'))
        }
    }
}

fn split_number_and_suffix(input: &str) -> (&str, &str) {
    let end = input
        .char_indices()
        .find(|&(i, c)| !(c.is_ascii_digit() || c == '.' || ((c == '+' || c == '-') && i == 0)))
        .map_or(input.len(), |(i, _)| i);
    input.split_at(end)
}

fn parse_suffix(suffix: &str) -> Option<Suffix> {
    Some(match suffix {
        "" => Suffix::None,
        "Ki" => Suffix::Binary(1),
        "Mi" => Suffix::Binary(2),
        "Gi" => Suffix::Binary(3),
        "Ti" => Suffix::Binary(4),
        "Pi" => Suffix::Binary(5),
        "Ei" => Suffix::Binary(6),
        "n" => Suffix::Decimal(-9),
        "u" => Suffix::Decimal(-6),
        "m" => Suffix::Decimal(-3),
        "k" => Suffix::Decimal(3),
        "M" => Suffix::Decimal(6),
        "G" => Suffix::Decimal(9),
        "T" => Suffix::Decimal(12),
        "P" => Suffix::Decimal(15),
        "E" => Suffix::Decimal(18),
        exp if exp.starts_with(['e', 'E']) => {
            let power: i32 = exp[1..].parse().ok()?;
            if !(-9..=18).contains(&power) {
                return None;
            }
            Suffix::Exponent(power)
        }
        _ => return None,
    })
}

/// Parses a Kubernetes quantity string exactly.
pub fn parse_quantity(input: &str) -> Result<Quantity, QuantityError> {
    let invalid = |reason: &'static str| QuantityError {
        input: input.to_owned(),
        reason,
    };
    let trimmed = input.trim();
    if trimmed.is_empty() {
        return Err(invalid("it is empty"));
    }
    let (number, suffix_text) = split_number_and_suffix(trimmed);
    let suffix = parse_suffix(suffix_text)
        .ok_or_else(|| invalid("unknown suffix; use a plain number, Ki/Mi/Gi/Ti, k/M/G/T or m"))?;
    let (negative, unsigned) = match number.as_bytes().first() {
        Some(b'-') => (true, &number[1..]),
        Some(b'+') => (false, &number[1..]),
        _ => (false, number),
    };
    let (int_part, frac_part) = unsigned.split_once('.').unwrap_or((unsigned, ""));
    if int_part.is_empty() && frac_part.is_empty() {
        return Err(invalid("it has no digits"));
    }
    if !int_part.bytes().all(|b| b.is_ascii_digit())
        || !frac_part.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(invalid("it is not a number"));
    }
    if frac_part.len() > 9 {
        return Err(invalid("it has more than 9 decimal places"));
    }
    let too_large = || invalid("it is too large");
    let int_value: i128 = if int_part.is_empty() {
        0
    } else {
        int_part.parse().map_err(|_| too_large())?
    };
    let frac_value: i128 = if frac_part.is_empty() {
        0
    } else {
        let padded = format!("{frac_part:0<9}");
        padded.parse().map_err(|_| too_large())?
    };
    let mut nanos = int_value
        .checked_mul(NANOS_PER_UNIT)
        .and_then(|v| v.checked_add(frac_value))
        .ok_or_else(too_large)?;
    match suffix {
        Suffix::None => {}
        Suffix::Binary(power) => {
            nanos = nanos
                .checked_mul(1_i128 << (10 * power))
                .ok_or_else(too_large)?;
        }
        Suffix::Decimal(power) | Suffix::Exponent(power) => {
            if power >= 0 {
                nanos = nanos
                    .checked_mul(10_i128.pow(power.unsigned_abs()))
                    .ok_or_else(too_large)?;
            } else {
                let divisor = 10_i128.pow(power.unsigned_abs());
                if nanos % divisor != 0 {
                    return Err(invalid("it is smaller than one billionth"));
                }
                nanos /= divisor;
            }
        }
    }
    if nanos > i128::from(i64::MAX) * NANOS_PER_UNIT {
        return Err(too_large());
    }
    Ok(Quantity {
        nanos: if negative { -nanos } else { nanos },
        suffix,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(s: &str) -> Quantity {
        parse_quantity(s).expect(s)
    }

    #[test]
    fn plain_integers() {
        assert_eq!(q("7500").to_integer(), Some(7500));
        assert_eq!(q("+3").to_integer(), Some(3));
        assert_eq!(q("-2").to_integer(), Some(-2));
        assert!(q("-2").is_negative());
    }

    #[test]
    fn fractions_are_not_integers() {
        assert_eq!(q("1.5").to_integer(), None);
        assert_eq!(q("1.5").to_integer_ceil(), Some(2));
        assert_eq!(q("100m").to_integer(), None);
        assert_eq!(q("100m").to_millis_ceil(), Some(100));
        assert_eq!(q("2000m").to_integer(), Some(2));
        assert_eq!(q("0.5").to_string(), "0.5");
    }

    #[test]
    fn suffixes() {
        assert_eq!(q("1Ki").to_integer(), Some(1024));
        assert_eq!(q("8Gi").to_integer(), Some(8 << 30));
        assert_eq!(q("2k").to_integer(), Some(2000));
        assert_eq!(q("1e3").to_integer(), Some(1000));
        assert_eq!(q("1.5Gi").to_integer(), Some(3 << 29));
    }

    #[test]
    fn gpu_memory_in_mebibytes() {
        assert_eq!(q("7500").to_mebibytes(), Some(7500));
        assert_eq!(q("8Gi").to_mebibytes(), Some(8192));
        assert_eq!(q("7500Mi").to_mebibytes(), Some(7500));
        assert_eq!(q("16G").to_mebibytes(), Some(15258));
        assert_eq!(q("1.5").to_mebibytes(), None);
        assert_eq!(q("-1").to_mebibytes(), None);
    }

    #[test]
    fn rejects_garbage_with_reason() {
        for bad in [
            "",
            "abc",
            "12XB",
            "1.2.3",
            "--1",
            ".",
            "1.0000000001",
            "1e99",
        ] {
            let err = parse_quantity(bad).expect_err(bad);
            assert!(!err.to_string().is_empty());
        }
    }

    proptest::proptest! {
        #[test]
        fn never_panics(s in "\\PC*") {
            let _ = parse_quantity(&s);
        }

        #[test]
        fn integers_round_trip(v in proptest::num::i64::ANY) {
            proptest::prop_assert_eq!(q(&v.to_string()).to_integer(), Some(v));
        }
    }
}
