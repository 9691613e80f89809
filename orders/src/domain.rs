//! A new order's values, validated at the HTTP boundary.

use crate::error::OrdersError;

/// A validated `POST /orders` request.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct OrderRequest {
    /// A positive product id.
    pub product_id: i64,
    /// 1 to [`MAX_QUANTITY`].
    pub quantity: i64,
    /// Trimmed, 1 to 100 characters.
    pub customer_id: String,
    /// Trimmed, at most 100 characters; blank means none.
    pub customer_name: Option<String>,
    /// Trimmed, at most 200 characters; blank means none.
    pub customer_addr: Option<String>,
}

/// The largest quantity one order may ask for.
pub const MAX_QUANTITY: i64 = 1_000_000;

impl OrderRequest {
    /// Validates the raw fields; the message names the first field that is wrong.
    pub fn parse(
        product_id: i64,
        quantity: i64,
        customer_id: &str,
        customer_name: Option<&str>,
        customer_addr: Option<&str>,
    ) -> Result<Self, OrdersError> {
        if product_id <= 0 {
            return Err(OrdersError::Invalid(format!(
                "productId must be a positive id, got {product_id}"
            )));
        }
        if !(1..=MAX_QUANTITY).contains(&quantity) {
            return Err(OrdersError::Invalid(format!(
                "quantity must be between 1 and {MAX_QUANTITY}, got {quantity}"
            )));
        }
        let customer_id = text("customerId", Some(customer_id), 100)?
            .ok_or_else(|| OrdersError::Invalid("customerId must not be empty".into()))?;
        Ok(OrderRequest {
            product_id,
            quantity,
            customer_id,
            customer_name: text("customerName", customer_name, 100)?,
            customer_addr: text("customerAddr", customer_addr, 200)?,
        })
    }
}

fn text(field: &str, value: Option<&str>, max: usize) -> Result<Option<String>, OrdersError> {
    let Some(value) = value.map(str::trim).filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    if value.chars().count() > max {
        return Err(OrdersError::Invalid(format!(
            "{field} must be at most {max} characters"
        )));
    }
    Ok(Some(value.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_good_request_is_trimmed() {
        let r = OrderRequest::parse(1, 2, " c@x ", Some(" "), Some(" Seoul ")).unwrap();
        assert_eq!(r.customer_id, "c@x");
        assert_eq!(r.customer_name, None);
        assert_eq!(r.customer_addr.as_deref(), Some("Seoul"));
    }

    #[test]
    fn bad_fields_are_named() {
        let cases = [
            (OrderRequest::parse(0, 1, "c", None, None), "productId"),
            (OrderRequest::parse(1, 0, "c", None, None), "quantity"),
            (
                OrderRequest::parse(1, MAX_QUANTITY + 1, "c", None, None),
                "quantity",
            ),
            (OrderRequest::parse(1, 1, "  ", None, None), "customerId"),
            (
                OrderRequest::parse(1, 1, "c", Some(&"n".repeat(101)), None),
                "customerName",
            ),
        ];
        for (result, field) in cases {
            let err = result.unwrap_err().to_string();
            assert!(err.contains(field), "{err} should name {field}");
        }
    }
}
