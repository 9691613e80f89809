//! Validated catalog values, parsed at the HTTP boundary so handlers never see bad ones.

use crate::error::ProductsError;

/// A product name: trimmed, 1 to 100 characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProductName(String);

impl ProductName {
    /// Validates a name.
    pub fn parse(raw: &str) -> Result<Self, ProductsError> {
        let name = raw.trim();
        if name.is_empty() {
            return Err(ProductsError::Invalid("name must not be empty".into()));
        }
        if name.chars().count() > 100 {
            return Err(ProductsError::Invalid(
                "name must be at most 100 characters".into(),
            ));
        }
        Ok(ProductName(name.to_owned()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Checks a whole amount lies in `0..=max`; `what` names the field in the message.
pub fn amount(what: &str, value: i64, max: i64) -> Result<i64, ProductsError> {
    if (0..=max).contains(&value) {
        Ok(value)
    } else {
        Err(ProductsError::Invalid(format!(
            "{what} must be between 0 and {max}, got {value}"
        )))
    }
}

/// Highest accepted price.
pub const MAX_PRICE: i64 = 1_000_000_000_000;
/// Highest accepted stock.
pub const MAX_STOCK: i64 = 1_000_000_000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_trimmed_and_bounded() {
        assert_eq!(ProductName::parse("  TV ").unwrap().as_str(), "TV");
        assert!(ProductName::parse("   ").is_err());
        assert!(ProductName::parse(&"x".repeat(101)).is_err());
        assert!(ProductName::parse(&"가".repeat(100)).is_ok());
    }

    #[test]
    fn amounts_are_bounded() {
        assert_eq!(amount("stock", 0, MAX_STOCK).unwrap(), 0);
        let err = amount("stock", -1, MAX_STOCK).unwrap_err();
        assert!(err.to_string().contains("stock must be between 0"), "{err}");
        assert!(amount("price", MAX_PRICE + 1, MAX_PRICE).is_err());
    }
}
