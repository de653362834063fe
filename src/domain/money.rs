//! Money and quantities: exact decimals at the edge, integer minor units inside.
//!
//! USD amounts are held as cents (scale 2) and crypto quantities as units of
//! 1e-8 (scale 8). Text is parsed digit by digit, never through a float nor
//! a rounding decimal parser, and every value is bounded so that any sum a Lua script compares stays far
//! below 2^53 (where Lua's doubles stop being exact).

use std::fmt;

use rust_decimal::Decimal;

/// Decimal places of a USD amount.
pub const AMOUNT_SCALE: u32 = 2;
/// Decimal places of a crypto quantity.
pub const QUANTITY_SCALE: u32 = 8;
/// Largest amount accepted anywhere: 1,000,000,000.00 USD.
pub const AMOUNT_MAX_CENTS: i64 = 100_000_000_000;
/// Largest quantity accepted in one order: 1,000,000 coins.
pub const QUANTITY_MAX_UNITS: i64 = 100_000_000_000_000;
/// Largest total of quantities (a batch, a bucket): a large order takes the
/// bucket along, so a total may pass one order's bound. The scripts add
/// quantities in Lua's doubles, which are exact below 2^53.
pub const QUANTITY_TOTAL_MAX_UNITS: i64 = (1 << 53) - 1;
/// The largest balance, either way, the Lua scripts keep exact: 2^53 - 1
/// cents (`BALANCE_LIMIT` in `lua/lib.lua`). Every script that moves money
/// refuses a move that would take either side past it, and the audit
/// reports any balance outside it.
pub const BALANCE_LIMIT_CENTS: i64 = (1 << 53) - 1;
/// Longest decimal text we try to parse; anything longer is refused unread.
pub const DECIMAL_TEXT_LENGTH_MAX: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("`{0}` is not a decimal number")]
    NotANumber(String),
    #[error("must not be negative")]
    Negative,
    #[error("must be greater than zero")]
    NotPositive,
    #[error("has more than {0} decimal places")]
    TooPrecise(u32),
    #[error("is larger than the maximum {0}")]
    TooLarge(String),
}

/// Parses decimal text (optionally with an exponent, as JSON numbers may have)
/// into integer minor units at `scale`, refusing anything not exact. The text
/// is taken apart digit by digit: `Decimal::from_str` would round past 28
/// digits before the scale could be checked, so `2.999...9` (30 nines) became 3.
fn parse_units(text: &str, scale: u32, max_units: i64) -> Result<i64, MoneyError> {
    let too_large = || MoneyError::TooLarge(format_units(max_units, scale));
    if text.len() > DECIMAL_TEXT_LENGTH_MAX {
        return Err(too_large());
    }
    if !is_decimal_syntax(text) {
        return Err(MoneyError::NotANumber(text.to_owned()));
    }
    let exact = ExactDecimal::split(text);
    if exact.digits.is_empty() {
        // Zero, however spelled (`-0`, `0e999`, `0.000e-40`).
        return Ok(0);
    }
    if exact.negative {
        return Err(MoneyError::Negative);
    }
    if exact.places > i64::from(scale) {
        return Err(MoneyError::TooPrecise(scale));
    }
    // Units are `digits` followed by `shift` zeros; 18 digits always fit an
    // i64, and every maximum is far below 10^18.
    let shift = i64::from(scale).saturating_sub(exact.places);
    if (exact.digits.len() as i64).saturating_add(shift) > 18 {
        return Err(too_large());
    }
    let units = exact
        .digits
        .parse::<i64>()
        .ok()
        .and_then(|digits| digits.checked_mul(10_i64.checked_pow(u32::try_from(shift).ok()?)?))
        .ok_or_else(too_large)?;
    if units > max_units {
        return Err(too_large());
    }
    Ok(units)
}

/// Syntactically valid decimal text, taken apart: its value is `digits` x
/// 10^-`places`, with `digits` free of leading and trailing zeros (empty for zero).
struct ExactDecimal {
    negative: bool,
    digits: String,
    places: i64,
}

impl ExactDecimal {
    /// `text` must have passed [`is_decimal_syntax`].
    fn split(text: &str) -> Self {
        let negative = text.starts_with('-');
        let text = text.strip_prefix('-').unwrap_or(text);
        let (mantissa, exponent) = match text.find(['e', 'E']) {
            Some(at) => (&text[..at], &text[at + 1..]),
            None => (text, "0"),
        };
        let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
        // Saturating: the text is at most 64 characters, so any exponent
        // beyond i64 is decided by its sign alone.
        let magnitude =
            exponent
                .trim_start_matches(['+', '-'])
                .bytes()
                .fold(0_i64, |acc, digit| {
                    acc.saturating_mul(10)
                        .saturating_add(i64::from(digit - b'0'))
                });
        let exponent = if exponent.starts_with('-') {
            -magnitude
        } else {
            magnitude
        };
        let all = format!("{whole}{fraction}");
        let significant = all.trim_end_matches('0');
        let trailing_zeros = (all.len() - significant.len()) as i64;
        let places = (fraction.len() as i64)
            .saturating_sub(trailing_zeros)
            .saturating_sub(exponent);
        ExactDecimal {
            negative,
            digits: significant.trim_start_matches('0').to_owned(),
            places,
        }
    }
}

/// `-?digits(.digits)?([eE][+-]?digits)?`: what JSON allows for a number,
/// minus nothing; stricter than `Decimal::from_str`, which takes `1_000`.
fn is_decimal_syntax(text: &str) -> bool {
    let text = text.strip_prefix('-').unwrap_or(text);
    let (mantissa, exponent) = match text.find(['e', 'E']) {
        Some(at) => (&text[..at], Some(&text[at + 1..])),
        None => (text, None),
    };
    let (whole, fraction) = match mantissa.split_once('.') {
        Some((whole, fraction)) => (whole, Some(fraction)),
        None => (mantissa, None),
    };
    let digits = |part: &str| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit());
    let exponent_ok = exponent.is_none_or(|exponent| {
        let exponent = exponent.strip_prefix(['+', '-']).unwrap_or(exponent);
        digits(exponent)
    });
    digits(whole) && fraction.is_none_or(digits) && exponent_ok
}

/// Formats minor units as decimal text with exactly `scale` places.
pub fn format_units(units: i64, scale: u32) -> String {
    Decimal::new(units, scale).to_string()
}

/// A non-negative USD amount, held in cents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Amount(i64);

impl Amount {
    pub const ZERO: Amount = Amount(0);

    pub fn parse(text: &str) -> Result<Self, MoneyError> {
        parse_units(text, AMOUNT_SCALE, AMOUNT_MAX_CENTS).map(Amount)
    }

    /// Like [`Amount::parse`], refusing zero too.
    pub fn parse_positive(text: &str) -> Result<Self, MoneyError> {
        let amount = Self::parse(text)?;
        if amount.is_zero() {
            return Err(MoneyError::NotPositive);
        }
        Ok(amount)
    }

    /// Wraps cents read back from Redis, which only ever holds values this
    /// module validated; a value out of range there is a broken invariant.
    pub fn from_cents(cents: i64) -> Result<Self, MoneyError> {
        if cents < 0 {
            return Err(MoneyError::Negative);
        }
        Ok(Amount(cents))
    }

    pub fn cents(self) -> i64 {
        self.0
    }

    pub fn is_zero(self) -> bool {
        self.0 == 0
    }
}

impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_units(self.0, AMOUNT_SCALE))
    }
}

/// A positive crypto quantity, held in units of 1e-8.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Quantity(i64);

impl Quantity {
    pub fn parse(text: &str) -> Result<Self, MoneyError> {
        let units = parse_units(text, QUANTITY_SCALE, QUANTITY_MAX_UNITS)?;
        Self::from_units(units)
    }

    pub fn from_units(units: i64) -> Result<Self, MoneyError> {
        Self::bounded(units, QUANTITY_MAX_UNITS)
    }

    /// A total of orders' quantities: a batch, a bucket, a purchase.
    pub fn parse_total(text: &str) -> Result<Self, MoneyError> {
        let units = parse_units(text, QUANTITY_SCALE, QUANTITY_TOTAL_MAX_UNITS)?;
        Self::from_total_units(units)
    }

    /// A total of orders' quantities read back from Redis.
    pub fn from_total_units(units: i64) -> Result<Self, MoneyError> {
        Self::bounded(units, QUANTITY_TOTAL_MAX_UNITS)
    }

    fn bounded(units: i64, max_units: i64) -> Result<Self, MoneyError> {
        if units <= 0 {
            return Err(MoneyError::NotPositive);
        }
        if units > max_units {
            let max = format_units(max_units, QUANTITY_SCALE);
            return Err(MoneyError::TooLarge(max));
        }
        Ok(Quantity(units))
    }

    pub fn units(self) -> i64 {
        self.0
    }

    pub fn to_decimal(self) -> Decimal {
        Decimal::new(self.0, QUANTITY_SCALE)
    }
}

impl fmt::Display for Quantity {
    /// Quantities print without trailing zeros: `3`, `1.5`, `0.00000001`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.to_decimal().normalize())
    }
}

/// The cost of `quantity` at `price`, rounded up to the cent: the house never
/// sells below price. `None` when the cost exceeds [`AMOUNT_MAX_CENTS`].
pub fn order_cost(price: Amount, quantity: Quantity) -> Option<Amount> {
    let scale = 10_i128.pow(QUANTITY_SCALE);
    let numerator = i128::from(price.cents()) * i128::from(quantity.units());
    let cents = (numerator + scale - 1) / scale;
    let cents = i64::try_from(cents).ok()?;
    (cents <= AMOUNT_MAX_CENTS).then_some(Amount(cents))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_balance_limit_is_the_one_the_scripts_check() {
        let lib = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/lua/lib.lua"));
        let declared = format!("local BALANCE_LIMIT = {BALANCE_LIMIT_CENTS}\n");
        assert!(lib.contains(&declared), "lua/lib.lua declares {declared}");
    }

    #[test]
    fn totals_may_pass_one_orders_bound_but_not_lua_exactness() {
        let past_one_order = QUANTITY_MAX_UNITS + 100_000_000;
        assert!(Quantity::from_units(past_one_order).is_err());
        assert_eq!(
            Quantity::from_total_units(past_one_order)
                .unwrap()
                .to_string(),
            "1000001"
        );
        assert_eq!(
            Quantity::parse_total("1000001").unwrap().units(),
            past_one_order
        );
        assert!(Quantity::from_total_units(1 << 53).is_err());
        assert!(Quantity::from_total_units(0).is_err());
    }

    #[test]
    fn amounts_parse_exactly() {
        assert_eq!(Amount::parse("12").unwrap().cents(), 1200);
        assert_eq!(Amount::parse("12.5").unwrap().cents(), 1250);
        assert_eq!(Amount::parse("0.01").unwrap().cents(), 1);
        assert_eq!(Amount::parse("1.500").unwrap().cents(), 150);
        assert_eq!(Amount::parse("1e2").unwrap().cents(), 10000);
        assert_eq!(Amount::parse("-0").unwrap().cents(), 0);
        assert_eq!(Amount::parse("12.00").unwrap().to_string(), "12.00");
    }

    #[test]
    fn amounts_refuse_what_is_not_exact_or_bounded() {
        assert_eq!(Amount::parse("0.001"), Err(MoneyError::TooPrecise(2)));
        assert_eq!(Amount::parse("-1"), Err(MoneyError::Negative));
        assert_eq!(Amount::parse_positive("0.00"), Err(MoneyError::NotPositive));
        assert!(matches!(
            Amount::parse("1000000000.01"),
            Err(MoneyError::TooLarge(_))
        ));
        assert!(matches!(
            Amount::parse("1e40"),
            Err(MoneyError::TooLarge(_))
        ));
        // Past 28 digits a decimal parser rounds; these must not become 12.00.
        assert_eq!(
            Amount::parse("12.0000000000000000000000000001"),
            Err(MoneyError::TooPrecise(2))
        );
        assert_eq!(Amount::parse("1e-30"), Err(MoneyError::TooPrecise(2)));
        assert_eq!(Amount::parse("0e999").unwrap().cents(), 0);
        assert_eq!(Amount::parse("0.10e1").unwrap().cents(), 100);
        assert_eq!(
            Amount::parse("1000000000000000000000e-20").unwrap().cents(),
            1000
        );
        assert!(matches!(
            Amount::parse("1e999999999999999999999999"),
            Err(MoneyError::TooLarge(_))
        ));
        for bad in [
            "", "abc", "1_000", " 1", "1.", ".5", "+1", "0x10", "1e", "NaN", "1.2.3",
        ] {
            assert!(
                matches!(Amount::parse(bad), Err(MoneyError::NotANumber(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn quantities_parse_exactly_and_must_be_positive() {
        assert_eq!(Quantity::parse("3").unwrap().units(), 300_000_000);
        assert_eq!(Quantity::parse("0.00000001").unwrap().units(), 1);
        assert_eq!(Quantity::parse("1.5").unwrap().to_string(), "1.5");
        assert_eq!(
            Quantity::parse("0.000000001"),
            Err(MoneyError::TooPrecise(8))
        );
        assert_eq!(
            Quantity::parse("2.999999999999999999999999999999"),
            Err(MoneyError::TooPrecise(8))
        );
        assert_eq!(Quantity::parse("0"), Err(MoneyError::NotPositive));
        assert_eq!(Quantity::parse("-2"), Err(MoneyError::Negative));
        assert!(matches!(
            Quantity::parse("1000000.00000001"),
            Err(MoneyError::TooLarge(_))
        ));
        assert!(matches!(
            Quantity::parse("99999999999999999999999999999999"),
            Err(MoneyError::TooLarge(_))
        ));
    }

    #[test]
    fn cost_rounds_up_to_the_cent() {
        let price = Amount::parse("4.00").unwrap();
        assert_eq!(
            order_cost(price, Quantity::parse("3").unwrap())
                .unwrap()
                .cents(),
            1200
        );
        assert_eq!(
            order_cost(price, Quantity::parse("0.00000001").unwrap())
                .unwrap()
                .cents(),
            1
        );
        assert_eq!(
            order_cost(price, Quantity::parse("0.0025").unwrap())
                .unwrap()
                .cents(),
            1
        );
        assert_eq!(
            order_cost(price, Quantity::parse("0.00250001").unwrap())
                .unwrap()
                .cents(),
            2
        );
        let dear = Amount::parse("1000000000").unwrap();
        assert_eq!(order_cost(dear, Quantity::parse("2").unwrap()), None);
    }
}
