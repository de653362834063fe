//! An account holder's name.

/// Longest name accepted, in characters.
pub const ACCOUNT_NAME_LENGTH_MAX: usize = 200;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("must be 1 to 200 characters, not blank and without control characters")]
pub struct AccountNameError;

/// A trimmed, non-empty name without control characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountName(String);

impl AccountName {
    pub fn parse(text: &str) -> Result<Self, AccountNameError> {
        // Length and controls are judged on the text as sent, as the spec
        // states them; only then is it trimmed.
        let name = text.trim();
        let length = text.chars().count();
        if name.is_empty() || length > ACCOUNT_NAME_LENGTH_MAX || text.chars().any(char::is_control)
        {
            return Err(AccountNameError);
        }
        Ok(AccountName(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for AccountName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_trimmed_and_bounded() {
        assert_eq!(AccountName::parse("  Ada ").unwrap().as_str(), "Ada");
        for bad in [
            "",
            "   ",
            "a\nb",
            "Ada\n",
            &"x".repeat(201),
            &format!(" {}", "x".repeat(200)),
        ] {
            assert!(AccountName::parse(bad).is_err(), "{bad:?}");
        }
    }
}
