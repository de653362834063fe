//! Crypto symbols (`ABAN`, `BTC`): short upper-case tickers.

use std::fmt;

use super::ids::truncate_for_message;

/// Longest ticker accepted.
pub const SYMBOL_LENGTH_MAX: usize = 12;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a symbol (1 to 12 upper-case letters and digits)")]
pub struct SymbolError(String);

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Symbol(String);

impl Symbol {
    pub fn parse(text: &str) -> Result<Self, SymbolError> {
        let valid = (1..=SYMBOL_LENGTH_MAX).contains(&text.len())
            && text
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit());
        if !valid {
            return Err(SymbolError(truncate_for_message(text)));
        }
        Ok(Symbol(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Symbol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symbols_are_short_upper_case_tickers() {
        assert_eq!(Symbol::parse("ABAN").unwrap().as_str(), "ABAN");
        for bad in ["", "aban", "AB AN", "ABAN:X", "ABCDEFGHIJKLM"] {
            assert!(Symbol::parse(bad).is_err(), "{bad}");
        }
    }
}
