//! How the domain types appear in the OpenAPI schema and are parsed from JSON.
//!
//! Money is accepted as a JSON string (`"1.50"`) or number (`1.5`); numbers
//! arrive as their exact text (serde_json's `arbitrary_precision`), so no value
//! ever passes through a float. poem-openapi's own `Decimal` would.

use std::borrow::Cow;

use poem_openapi::registry::{MetaSchema, MetaSchemaRef};
use poem_openapi::types::{
    ParseError, ParseFromJSON, ParseFromParameter, ParseResult, ToJSON, Type,
};
use serde_json::Value;

use crate::domain::{AccountId, AccountName, Amount, BatchId, OrderId, Quantity, Symbol};

macro_rules! string_schema_type {
    ($ty:ty, $name:literal, $format:literal, $description:literal, $example:literal,
     parse = $parse:expr, numbers = $numbers:literal) => {
        impl Type for $ty {
            const IS_REQUIRED: bool = true;
            type RawValueType = Self;
            type RawElementValueType = Self;

            fn name() -> Cow<'static, str> {
                $name.into()
            }

            fn schema_ref() -> MetaSchemaRef {
                MetaSchemaRef::Inline(Box::new(MetaSchema {
                    description: Some($description),
                    example: Some(Value::String($example.to_owned())),
                    ..MetaSchema::new_with_format("string", $format)
                }))
            }

            fn as_raw_value(&self) -> Option<&Self::RawValueType> {
                Some(self)
            }

            fn raw_element_iter<'a>(
                &'a self,
            ) -> Box<dyn Iterator<Item = &'a Self::RawElementValueType> + 'a> {
                Box::new(self.as_raw_value().into_iter())
            }
        }

        impl ParseFromJSON for $ty {
            fn parse_from_json(value: Option<Value>) -> ParseResult<Self> {
                match value {
                    Some(Value::String(text)) => $parse(&text).map_err(ParseError::custom),
                    Some(Value::Number(number)) if $numbers => {
                        $parse(&number.to_string()).map_err(ParseError::custom)
                    }
                    None | Some(Value::Null) => Err(ParseError::expected_input()),
                    Some(other) => Err(ParseError::expected_type(other)),
                }
            }
        }

        impl ParseFromParameter for $ty {
            fn parse_from_parameter(text: &str) -> ParseResult<Self> {
                $parse(text).map_err(ParseError::custom)
            }
        }

        impl ToJSON for $ty {
            fn to_json(&self) -> Option<Value> {
                Some(Value::String(self.to_string()))
            }
        }
    };
}

string_schema_type!(
    Amount,
    "amount",
    "decimal",
    "USD, a decimal string (or JSON number) with at most 2 decimal places",
    "12.00",
    parse = Amount::parse,
    numbers = true
);
string_schema_type!(
    Quantity,
    "quantity",
    "decimal",
    "A positive decimal string (or JSON number) with at most 8 decimal places",
    "3",
    parse = Quantity::parse,
    numbers = true
);
string_schema_type!(
    Symbol,
    "symbol",
    "ticker",
    "An upper-case ticker, one of GET /prices",
    "ABAN",
    parse = Symbol::parse,
    numbers = false
);
string_schema_type!(
    AccountId,
    "account_id",
    "account-id",
    "A customer account's UUID, or a system account (@bank, @exchange, @card)",
    "0190a0b0-0000-7000-8000-000000000000",
    parse = AccountId::parse,
    numbers = false
);
string_schema_type!(
    OrderId,
    "order_id",
    "uuid",
    "An order's UUID",
    "0190a0b0-0000-7000-8000-000000000000",
    parse = OrderId::parse,
    numbers = false
);
string_schema_type!(
    BatchId,
    "batch_id",
    "uuid",
    "A batch's UUID",
    "0190a0b0-0000-7000-8000-000000000000",
    parse = BatchId::parse,
    numbers = false
);
string_schema_type!(
    AccountName,
    "name",
    "text",
    "The holder's name: 1 to 200 characters, trimmed",
    "Ada Lovelace",
    parse = AccountName::parse,
    numbers = false
);
