//! How the domain types appear in the OpenAPI schema and are parsed from
//! requests. Each type's schema states exactly what its parser accepts
//! (pattern, length, range): the unit tests below hold the two together, and
//! schemathesis checks the running server against the spec in CI.
//!
//! Money is accepted as a JSON string (`"1.50"`) or number (`1.5`); numbers
//! arrive as their exact text (serde_json's `arbitrary_precision`), so no value
//! ever passes through a float. poem-openapi's own `Decimal` would. A string
//! is held to one plain spelling (its pattern); a number is judged by its
//! value, as JSON Schema judges numbers.

use std::borrow::Cow;

use poem_openapi::registry::{MetaSchema, MetaSchemaRef};
use poem_openapi::types::{
    ParseError, ParseFromJSON, ParseFromParameter, ParseResult, ToJSON, Type,
};
use serde_json::Value;

use crate::domain::{
    ACCOUNT_NAME_LENGTH_MAX, AMOUNT_MAX_CENTS, AMOUNT_SCALE, AccountId, AccountName, Amount,
    BatchId, IdempotencyKey, OrderId, QUANTITY_MAX_UNITS, Quantity, Symbol, format_units,
    parse_uuid, truncate_for_message,
};

/// The exact text each string type accepts, as ECMA-262 patterns that Rust's
/// `regex` and Python's `re` read the same way (no look-around, `\uXXXX`).
pub mod patterns {
    /// A UUID, hyphenated, either case.
    pub const UUID: &str =
        "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$";
    /// A customer account's UUID, or a system account.
    pub const ACCOUNT_ID: &str = "^(@bank|@exchange|@card|@transit|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})$";
    /// An API key's id: 32 lower-case hex digits.
    pub const KEY_ID: &str = "^[0-9a-f]{32}$";
    /// A ticker.
    pub const SYMBOL: &str = "^[A-Z0-9]{1,12}$";
    /// Visible ASCII, as an Idempotency-Key must be.
    pub const IDEMPOTENCY_KEY: &str = "^[!-~]{1,128}$";
    /// Text without control characters (Unicode category Cc).
    pub const TEXT: &str = "^[^\\u0000-\\u001F\\u007F-\\u009F]*$";
    /// Text without control characters and not blank: at least one
    /// character that is neither a control nor Unicode White_Space (what
    /// Rust's `trim` removes).
    pub const NON_BLANK_TEXT: &str = "^[^\\u0000-\\u001F\\u007F-\\u009F]*[^\\u0000-\\u0020\\u007F-\\u00A0\\u1680\\u2000-\\u200A\\u2028\\u2029\\u202F\\u205F\\u3000][^\\u0000-\\u001F\\u007F-\\u009F]*$";
    /// An amount from 0 to 1,000,000,000.00, at most 2 places, no leading zeros.
    pub const AMOUNT: &str = "^((0|[1-9][0-9]{0,8})(\\.[0-9]{1,2})?|1000000000(\\.00?)?)$";
    /// As [`AMOUNT`], greater than zero.
    pub const POSITIVE_AMOUNT: &str =
        "^([1-9][0-9]{0,8}(\\.[0-9]{1,2})?|0\\.(0[1-9]|[1-9][0-9]?)|1000000000(\\.00?)?)$";
    /// As [`AMOUNT`], at least 0.12 (an advance: a cent per installment).
    pub const ADVANCE_AMOUNT: &str =
        "^([1-9][0-9]{0,8}(\\.[0-9]{1,2})?|0\\.(1[2-9]|[2-9][0-9]?)|1000000000(\\.00?)?)$";
    /// A quantity from 0.00000001 to 1,000,000, at most 8 places.
    pub const QUANTITY: &str = "^([1-9][0-9]{0,5}(\\.[0-9]{1,8})?|0\\.([1-9][0-9]{0,7}|0[1-9][0-9]{0,6}|00[1-9][0-9]{0,5}|000[1-9][0-9]{0,4}|0000[1-9][0-9]{0,3}|00000[1-9][0-9]{0,2}|000000[1-9][0-9]?|0000000[1-9])|1000000(\\.0{1,8})?)$";
}

/// The schema of a string type.
fn string_schema(
    format: Option<&'static str>,
    pattern: &str,
    description: &'static str,
    example: &str,
) -> MetaSchema {
    MetaSchema {
        format,
        pattern: Some(pattern.to_owned()),
        description: Some(description),
        example: Some(Value::String(example.to_owned())),
        ..MetaSchema::new("string")
    }
}

/// The schema of money: a string in one plain spelling, or a JSON number
/// judged by its value.
fn decimal_schema(
    description: &'static str,
    pattern: &str,
    (minimum, exclusive): (f64, bool),
    maximum: f64,
    step: f64,
    example: &str,
) -> MetaSchema {
    let text = MetaSchema {
        pattern: Some(pattern.to_owned()),
        ..MetaSchema::new("string")
    };
    let number = MetaSchema {
        minimum: Some(minimum),
        exclusive_minimum: exclusive.then_some(true),
        maximum: Some(maximum),
        multiple_of: Some(step),
        ..MetaSchema::new("number")
    };
    MetaSchema {
        description: Some(description),
        example: Some(Value::String(example.to_owned())),
        any_of: vec![
            MetaSchemaRef::Inline(Box::new(text)),
            MetaSchemaRef::Inline(Box::new(number)),
        ],
        ..MetaSchema::ANY
    }
}

/// Newtypes shown as what they wrap.
macro_rules! display_as_inner {
    ($($ty:ty),*) => {
        $(impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                self.0.fmt(f)
            }
        })*
    };
}

display_as_inner!(
    PositiveAmount,
    AdvanceAmount,
    CustomerAccountId,
    Uuid,
    Timestamp
);

/// Implements the poem-openapi traits for a type read from one string (and,
/// for money, a JSON number) and written as a string.
macro_rules! string_schema_type {
    ($ty:ty, $name:literal, schema = $schema:expr, parse = $parse:expr, numbers = $numbers:literal) => {
        impl Type for $ty {
            const IS_REQUIRED: bool = true;
            type RawValueType = Self;
            type RawElementValueType = Self;

            fn name() -> Cow<'static, str> {
                $name.into()
            }

            fn schema_ref() -> MetaSchemaRef {
                MetaSchemaRef::Inline(Box::new($schema))
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
                    Some(Value::String(text)) => $parse(&text, false).map_err(ParseError::custom),
                    Some(Value::Number(number)) if $numbers => {
                        $parse(&number.to_string(), true).map_err(ParseError::custom)
                    }
                    None | Some(Value::Null) => Err(ParseError::expected_input()),
                    Some(other) => Err(ParseError::expected_type(other)),
                }
            }
        }

        impl ParseFromParameter for $ty {
            fn parse_from_parameter(text: &str) -> ParseResult<Self> {
                $parse(text, false).map_err(ParseError::custom)
            }
        }

        impl ToJSON for $ty {
            fn to_json(&self) -> Option<Value> {
                Some(Value::String(self.to_string()))
            }
        }
    };
}

/// Money as a client sent it: a JSON number is judged by its exact value; a
/// string must also be spelled plainly (`pattern`), so that what the spec
/// admits and what the server admits are the same texts.
fn parse_money<T, E: std::fmt::Display>(
    text: &str,
    is_number: bool,
    pattern: &str,
    parse: impl Fn(&str) -> Result<T, E>,
    plain: &str,
) -> Result<T, String> {
    let value = parse(text).map_err(|err| err.to_string())?;
    if !is_number && !matches_plain_decimal(text, pattern) {
        return Err(format!(
            "`{}` is not written as {plain}",
            truncate_for_message(text)
        ));
    }
    Ok(value)
}

/// Whether `text` matches one of the decimal patterns above. The parser has
/// already accepted its value, so what is left to check is the spelling: no
/// sign, exponent, leading zero or trailing zeros past the scale.
fn matches_plain_decimal(text: &str, pattern: &str) -> bool {
    let places_max = if pattern == patterns::QUANTITY { 8 } else { 2 };
    let (whole, fraction) = match text.split_once('.') {
        Some((whole, fraction)) => (whole, Some(fraction)),
        None => (text, None),
    };
    let digits = |part: &str| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit());
    digits(whole)
        && (whole == "0" || !whole.starts_with('0'))
        && fraction.is_none_or(|fraction| digits(fraction) && fraction.len() <= places_max)
}

// A non-negative amount in USD.
string_schema_type!(
    Amount,
    "amount",
    schema = decimal_schema(
        "USD, 0 to 1,000,000,000.00 with at most 2 decimal places: a string (`\"12.00\"`) or a JSON number",
        patterns::AMOUNT,
        (0.0, false),
        AMOUNT_MAX_CENTS as f64 / 100.0,
        0.01,
        "12.00"
    ),
    parse = |text: &str, is_number| parse_money(
        text,
        is_number,
        patterns::AMOUNT,
        Amount::parse,
        "a plain decimal (`12.50`)"
    ),
    numbers = true
);

/// An amount greater than zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PositiveAmount(pub Amount);

string_schema_type!(
    PositiveAmount,
    "amount",
    schema = decimal_schema(
        "USD, greater than zero, up to 1,000,000,000.00 with at most 2 decimal places: a string (`\"12.00\"`) or a JSON number",
        patterns::POSITIVE_AMOUNT,
        (0.0, true),
        AMOUNT_MAX_CENTS as f64 / 100.0,
        0.01,
        "12.00"
    ),
    parse = |text: &str, is_number| parse_money(
        text,
        is_number,
        patterns::POSITIVE_AMOUNT,
        |text| Amount::parse_positive(text).map(PositiveAmount),
        "a plain decimal (`12.50`)"
    ),
    numbers = true
);

/// The smallest advance: a cent for each of its installments.
pub const ADVANCE_AMOUNT_MIN_CENTS: i64 = crate::store::advances::INSTALLMENTS as i64;

/// An advance's amount: at least [`ADVANCE_AMOUNT_MIN_CENTS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdvanceAmount(pub Amount);

fn parse_advance_amount(text: &str) -> Result<AdvanceAmount, String> {
    let amount = Amount::parse(text).map_err(|err| err.to_string())?;
    if amount.cents() < ADVANCE_AMOUNT_MIN_CENTS {
        return Err(format!(
            "must be at least {} (a cent for each of the {ADVANCE_AMOUNT_MIN_CENTS} installments)",
            format_units(ADVANCE_AMOUNT_MIN_CENTS, AMOUNT_SCALE)
        ));
    }
    Ok(AdvanceAmount(amount))
}

string_schema_type!(
    AdvanceAmount,
    "amount",
    schema = decimal_schema(
        "USD lent, from 0.12 (a cent for each of the 12 installments) to 1,000,000,000.00: a string (`\"120.00\"`) or a JSON number",
        patterns::ADVANCE_AMOUNT,
        (ADVANCE_AMOUNT_MIN_CENTS as f64 / 100.0, false),
        AMOUNT_MAX_CENTS as f64 / 100.0,
        0.01,
        "120.00"
    ),
    parse = |text: &str, is_number| parse_money(
        text,
        is_number,
        patterns::ADVANCE_AMOUNT,
        parse_advance_amount,
        "a plain decimal (`120.00`)"
    ),
    numbers = true
);

string_schema_type!(
    Quantity,
    "quantity",
    schema = decimal_schema(
        "How much to buy: greater than zero, up to 1,000,000 with at most 8 decimal places: a string (`\"3\"`) or a JSON number",
        patterns::QUANTITY,
        (0.0, true),
        QUANTITY_MAX_UNITS as f64 / 1e8,
        1e-8,
        "3"
    ),
    parse = |text: &str, is_number| parse_money(
        text,
        is_number,
        patterns::QUANTITY,
        Quantity::parse,
        "a plain decimal (`0.5`)"
    ),
    numbers = true
);

string_schema_type!(
    Symbol,
    "symbol",
    schema = string_schema(
        Some("ticker"),
        patterns::SYMBOL,
        "An upper-case ticker, one of GET /prices",
        "ABAN"
    ),
    parse = |text: &str, _| Symbol::parse(text).map_err(|err| err.to_string()),
    numbers = false
);

string_schema_type!(
    AccountId,
    "account_id",
    schema = string_schema(
        Some("account-id"),
        patterns::ACCOUNT_ID,
        "A customer account's UUID, or a system account (@bank, @exchange, @card, @transit)",
        "0190a0b0-0000-7000-8000-000000000000"
    ),
    parse = |text: &str, _| AccountId::parse(text).map_err(|err| err.to_string()),
    numbers = false
);

/// A customer account: the id of a system account is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomerAccountId(pub AccountId);

fn parse_customer_account_id(text: &str) -> Result<CustomerAccountId, String> {
    if text.starts_with('@') {
        return Err(format!(
            "`{}` is a system account; only a customer account's UUID is accepted here",
            truncate_for_message(text)
        ));
    }
    AccountId::parse(text)
        .map(CustomerAccountId)
        .map_err(|err| err.to_string())
}

string_schema_type!(
    CustomerAccountId,
    "account_id",
    schema = string_schema(
        Some("uuid"),
        patterns::UUID,
        "A customer account's UUID (system accounts are refused here)",
        "0190a0b0-0000-7000-8000-000000000000"
    ),
    parse = |text: &str, _| parse_customer_account_id(text),
    numbers = false
);

string_schema_type!(
    OrderId,
    "order_id",
    schema = string_schema(
        Some("uuid"),
        patterns::UUID,
        "An order's UUID",
        "0190a0b0-0000-7000-8000-000000000000"
    ),
    parse = |text: &str, _| OrderId::parse(text).map_err(|err| err.to_string()),
    numbers = false
);

string_schema_type!(
    BatchId,
    "batch_id",
    schema = string_schema(
        Some("uuid"),
        patterns::UUID,
        "A batch's UUID",
        "0190a0b0-0000-7000-8000-000000000000"
    ),
    parse = |text: &str, _| BatchId::parse(text).map_err(|err| err.to_string()),
    numbers = false
);

/// A UUID in canonical form (lower case, hyphenated): one spelling per id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uuid(pub String);

string_schema_type!(
    Uuid,
    "uuid",
    schema = string_schema(
        Some("uuid"),
        patterns::UUID,
        "A UUID",
        "0190a0b0-0000-7000-8000-000000000000"
    ),
    parse = |text: &str, _| parse_uuid(text)
        .map(|uuid| Uuid(uuid.to_string()))
        .map_err(|err| err.to_string()),
    numbers = false
);

string_schema_type!(
    crate::access::KeyId,
    "key_id",
    schema = string_schema(
        None,
        patterns::KEY_ID,
        "An API key's id: 32 lower-case hex digits",
        "0190a0b00000700080000000000000ab"
    ),
    parse = |text: &str, _| crate::access::KeyId::parse(text).map_err(|err| err.to_string()),
    numbers = false
);

string_schema_type!(
    AccountName,
    "name",
    schema = MetaSchema {
        min_length: Some(1),
        max_length: Some(ACCOUNT_NAME_LENGTH_MAX),
        ..string_schema(
            None,
            patterns::NON_BLANK_TEXT,
            "The holder's name: 1 to 200 characters, not blank, no control characters; \
             leading and trailing whitespace is trimmed",
            "Ada Lovelace"
        )
    },
    parse = |text: &str, _| AccountName::parse(text).map_err(|err| format!("name {err}")),
    numbers = false
);

/// What a free-text field admits: at most `MAX` characters, no control
/// characters; with `NON_BLANK`, not blank either, and trimmed. `NAME` names
/// the field in refusals (poem names the type, not the field).
pub trait TextField: Send + Sync + 'static {
    const NAME: &'static str;
    const MAX: usize;
    const NON_BLANK: bool;
}

/// Declares the free-text fields of the request bodies.
macro_rules! text_fields {
    ($($(#[$doc:meta])* $field:ident = ($name:literal, $max:expr, non_blank = $non_blank:literal);)*) => {
        $(
            $(#[$doc])*
            #[derive(Debug, Clone, PartialEq, Eq)]
            pub struct $field;

            impl TextField for $field {
                const NAME: &'static str = $name;
                const MAX: usize = $max;
                const NON_BLANK: bool = $non_blank;
            }
        )*
    };
}

text_fields! {
    /// A bank transaction's reason, kept in the journal.
    Reason = ("reason", crate::api::transfers::REASON_LENGTH_MAX, non_blank = true);
    /// A wallet transaction's description.
    Description = ("description", crate::api::wallet::WALLET_TEXT_LENGTH_MAX, non_blank = false);
    /// Where a card was used.
    Merchant = ("merchant", crate::api::wallet::WALLET_TEXT_LENGTH_MAX, non_blank = false);
    /// Why an operator refunded a batch.
    Note = ("note", crate::api::orders::REFUND_NOTE_LENGTH_MAX, non_blank = false);
    /// What an API key is for.
    Label = ("label", crate::access::KEY_LABEL_LENGTH_MAX, non_blank = false);
}

/// Free text, as its [`TextField`] admits it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Text<F: TextField>(String, std::marker::PhantomData<F>);

impl<F: TextField> Text<F> {
    fn parse(text: &str) -> Result<Self, String> {
        let length = text.chars().count();
        if length > F::MAX || text.chars().any(char::is_control) {
            return Err(format!(
                "{} must be at most {} characters, with no control characters",
                F::NAME,
                F::MAX
            ));
        }
        if F::NON_BLANK {
            let trimmed = text.trim();
            if trimmed.is_empty() {
                return Err(format!("{} must not be blank", F::NAME));
            }
            return Ok(Text(trimmed.to_owned(), std::marker::PhantomData));
        }
        Ok(Text(text.to_owned(), std::marker::PhantomData))
    }

    pub fn into_inner(self) -> String {
        self.0
    }
}

impl<F: TextField> Type for Text<F> {
    const IS_REQUIRED: bool = true;
    type RawValueType = Self;
    type RawElementValueType = Self;

    fn name() -> Cow<'static, str> {
        F::NAME.into()
    }

    fn schema_ref() -> MetaSchemaRef {
        let pattern = if F::NON_BLANK {
            patterns::NON_BLANK_TEXT
        } else {
            patterns::TEXT
        };
        MetaSchemaRef::Inline(Box::new(MetaSchema {
            pattern: Some(pattern.to_owned()),
            min_length: F::NON_BLANK.then_some(1),
            max_length: Some(F::MAX),
            ..MetaSchema::new("string")
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

impl<F: TextField> ParseFromJSON for Text<F> {
    fn parse_from_json(value: Option<Value>) -> ParseResult<Self> {
        match value {
            Some(Value::String(text)) => Self::parse(&text).map_err(ParseError::custom),
            None | Some(Value::Null) => Err(ParseError::expected_input()),
            Some(other) => Err(ParseError::expected_type(other)),
        }
    }
}

impl<F: TextField> ToJSON for Text<F> {
    fn to_json(&self) -> Option<Value> {
        Some(Value::String(self.0.clone()))
    }
}

/// The `Idempotency-Key` header as the spec states it. The handlers read the
/// raw header themselves (see `idempotency_key`): poem-openapi would drop a
/// value that is not visible ASCII and take the first of several, and either
/// would turn a retry into a second charge.
#[derive(Debug, Clone)]
pub struct IdempotencyKeyHeader(IdempotencyKey);

impl std::fmt::Display for IdempotencyKeyHeader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0.as_str())
    }
}

string_schema_type!(
    IdempotencyKeyHeader,
    "idempotency_key",
    schema = MetaSchema {
        min_length: Some(1),
        max_length: Some(crate::domain::IDEMPOTENCY_KEY_LENGTH_MAX),
        ..string_schema(
            None,
            patterns::IDEMPOTENCY_KEY,
            "1 to 128 visible ASCII characters, unique per request you mean once; \
             scoped to your API key",
            "order-2026-11-30-0001",
        )
    },
    parse = |text: &str, _| IdempotencyKey::parse(text)
        .map(IdempotencyKeyHeader)
        .map_err(|err| err.to_string()),
    numbers = false
);

string_schema_type!(
    crate::access::Role,
    "role",
    // From the roles themselves, so a new role is in the spec at once.
    schema = MetaSchema {
        enum_items: crate::access::Role::ALL
            .iter()
            .map(|role| Value::String(role.as_str().to_owned()))
            .collect(),
        description: Some("A key's role (see Access in the README)"),
        ..MetaSchema::new("string")
    },
    parse = |text: &str, _| crate::access::Role::parse(text).map_err(|err| err.to_string()),
    numbers = false
);

/// An instant given as RFC 3339 with any offset, as ms since the Unix epoch
/// (0 for instants before it: a range that starts earlier starts there).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timestamp(pub u64);

string_schema_type!(
    Timestamp,
    "date_time",
    // `format: date-time` is the whole rule (RFC 3339, which a pattern
    // cannot state: the date must exist).
    schema = MetaSchema {
        format: Some("date-time"),
        description: Some("An RFC 3339 time with its offset, e.g. `2026-11-30T12:00:00Z`"),
        example: Some(Value::String("2026-11-30T12:00:00Z".to_owned())),
        ..MetaSchema::new("string")
    },
    parse = |text: &str, _| parse_rfc3339_ms(text)
        .map(Timestamp)
        .ok_or_else(|| format!("`{}` is not an RFC 3339 time", truncate_for_message(text))),
    numbers = false
);

/// Parses RFC 3339 (`2026-11-30T12:00:00.5+01:00`): the calendar date must
/// exist, seconds run to 60 (a leap second counts as the next second's start).
fn parse_rfc3339_ms(text: &str) -> Option<u64> {
    let bytes = text.as_bytes();
    let number = |from: usize, to: usize| -> Option<i64> {
        let part = text.get(from..to)?;
        part.bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| part.parse().ok())?
    };
    if bytes.len() < 20
        || bytes[4] != b'-'
        || bytes[7] != b'-'
        || !matches!(bytes[10], b'T' | b't')
        || bytes[13] != b':'
        || bytes[16] != b':'
    {
        return None;
    }
    let (year, month, day) = (number(0, 4)?, number(5, 7)?, number(8, 10)?);
    let (hour, minute, second) = (number(11, 13)?, number(14, 16)?, number(17, 19)?);
    let mut rest = &text[19..];
    let mut millis = 0;
    if let Some(fraction) = rest.strip_prefix('.') {
        let digits = fraction.bytes().take_while(u8::is_ascii_digit).count();
        if !(1..=9).contains(&digits) {
            return None;
        }
        let padded = format!("{:0<3}", &fraction[..digits.min(3)]);
        millis = padded.parse::<i64>().ok()?;
        rest = &fraction[digits..];
    }
    let offset_minutes = match rest.as_bytes() {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), _, _, b':', _, _] => {
            let hours = number(text.len() - 5, text.len() - 3)?;
            let minutes = number(text.len() - 2, text.len())?;
            if hours > 23 || minutes > 59 {
                return None;
            }
            let offset = hours * 60 + minutes;
            if *sign == b'-' { -offset } else { offset }
        }
        _ => return None,
    };
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let month_days = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    let valid = (1..=12).contains(&month)
        && (1..=month_days[(month - 1) as usize]).contains(&day)
        && hour <= 23
        && minute <= 59
        && second <= 60;
    if !valid {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let year_of_era = y - era * 400;
    let day_of_year = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    let days = era * 146_097 + day_of_era - 719_468;
    let seconds = days * 86_400 + hour * 3_600 + minute * 60 + second - offset_minutes * 60;
    Some(u64::try_from(seconds * 1_000 + millis).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accepts<T: ParseFromJSON>(text: &str) -> bool {
        T::parse_from_json(Some(Value::String(text.to_owned()))).is_ok()
    }

    /// Every text the pattern (and length bounds) admit, the parser admits,
    /// and no other: the spec tells the truth about each string type.
    fn assert_agree<T: ParseFromJSON + Type>(samples: &[String]) {
        let MetaSchemaRef::Inline(schema) = T::schema_ref() else {
            panic!("inline schema")
        };
        let strings: Vec<MetaSchema> = if schema.any_of.is_empty() {
            vec![*schema]
        } else {
            schema
                .any_of
                .iter()
                .filter_map(|branch| match branch {
                    MetaSchemaRef::Inline(branch) if branch.ty == "string" => {
                        Some((**branch).clone())
                    }
                    _ => None,
                })
                .collect()
        };
        let schema = &strings[0];
        let pattern = regex::Regex::new(schema.pattern.as_deref().unwrap()).unwrap();
        for sample in samples {
            let length = sample.chars().count();
            let admitted = pattern.is_match(sample)
                && schema.min_length.is_none_or(|min| length >= min)
                && schema.max_length.is_none_or(|max| length <= max);
            assert_eq!(
                admitted,
                accepts::<T>(sample),
                "{}: {sample:?}: spec says {admitted}",
                T::name()
            );
        }
    }

    fn decimal_samples() -> Vec<String> {
        let mut samples: Vec<String> = [
            "",
            "0",
            "00",
            "0.0",
            "0.00",
            "0.000",
            "0.01",
            "0.1",
            "0.11",
            "0.12",
            "0.19",
            "0.2",
            "0.99",
            "1",
            "01",
            "1.",
            ".5",
            "1.5",
            "1.50",
            "1.500",
            "1e2",
            "1E2",
            "-1",
            "-0",
            "+1",
            " 1",
            "1 ",
            "12.345",
            "999999999.99",
            "1000000000",
            "1000000000.0",
            "1000000000.00",
            "1000000000.01",
            "1000000001",
            "9999999999",
            "0.00000001",
            "0.000000001",
            "0.00000010",
            "1000000",
            "1000000.00000000",
            "1000000.00000001",
            "999999.99999999",
            "1000001",
            "abc",
            "1,5",
            "1.5.5",
            "NaN",
            "Infinity",
            "0x10",
            "\u{0661}",
            "12.00",
            "99",
            "100000",
            "123456789",
            "1234567890",
        ]
        .iter()
        .map(|text| text.to_string())
        .collect();
        for cents in (0..2_000).step_by(7) {
            samples.push(format!("{}.{:02}", cents / 100, cents % 100));
            samples.push(format!("{}.{}", cents / 100, cents % 10));
        }
        samples
    }

    #[test]
    fn money_patterns_admit_exactly_what_the_parsers_do() {
        let samples = decimal_samples();
        assert_agree::<Amount>(&samples);
        assert_agree::<PositiveAmount>(&samples);
        assert_agree::<AdvanceAmount>(&samples);
        assert_agree::<Quantity>(&samples);
    }

    #[test]
    fn numbers_are_judged_by_value() {
        let number = |text: &str| Some(Value::Number(serde_json::from_str(text).unwrap()));
        assert!(Amount::parse_from_json(number("1.500")).is_ok());
        assert!(Amount::parse_from_json(number("1.5e2")).is_ok());
        assert!(Amount::parse_from_json(number("0.001")).is_err());
        assert!(PositiveAmount::parse_from_json(number("0")).is_err());
        assert!(AdvanceAmount::parse_from_json(number("0.11")).is_err());
        assert!(AdvanceAmount::parse_from_json(number("0.12")).is_ok());
    }

    #[test]
    fn id_and_text_patterns_admit_exactly_what_the_parsers_do() {
        let uuid = "0190a0b0-0000-7000-8000-00000000000a";
        let ids: Vec<String> = [
            uuid,
            "0190A0B0-0000-7000-8000-00000000000A",
            "0190a0b000007000800000000000000a",
            "{0190a0b0-0000-7000-8000-00000000000a}",
            "0190a0b0-0000-7000-8000-00000000000g",
            "@bank",
            "@exchange",
            "@card",
            "@nope",
            "bank",
            "",
            "0190a0b00000700080000000000000ab",
            "0190A0B00000700080000000000000AB",
            "0190a0b00000700080000000000000a",
            "ABAN",
            "aban",
            "ABAN1",
            "ABCDEFGHIJKLM",
            "ABCDEFGHIJKL",
        ]
        .iter()
        .map(|text| text.to_string())
        .collect();
        assert_agree::<AccountId>(&ids);
        assert_agree::<CustomerAccountId>(&ids);
        assert_agree::<OrderId>(&ids);
        assert_agree::<Uuid>(&ids);
        assert_agree::<crate::access::KeyId>(&ids);
        assert_agree::<Symbol>(&ids);

        let mut texts: Vec<String> = [
            "",
            " ",
            "   ",
            "Ada",
            "  Ada  ",
            "a\nb",
            "\t",
            "a\u{7f}",
            "a\u{85}",
            "\u{a0}",
            "\u{3000}x",
            "\u{2028}",
            "\u{feff}",
            "é",
            "😀",
            "a\u{9f}b",
        ]
        .iter()
        .map(|text| text.to_string())
        .collect();
        for length in [99, 100, 101, 199, 200, 201] {
            texts.push("x".repeat(length));
            texts.push(format!(" {}", "x".repeat(length - 1)));
        }
        assert_agree::<AccountName>(&texts);
        assert_agree::<Text<Label>>(&texts);
        assert_agree::<Text<Reason>>(&texts);
        assert_agree::<Text<Note>>(&texts);
    }

    #[test]
    fn rfc3339_times_parse_with_their_offsets() {
        assert_eq!(parse_rfc3339_ms("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339_ms("1970-01-01T01:00:00.5+01:00"), Some(500));
        assert_eq!(
            parse_rfc3339_ms("2026-11-30T12:00:00Z"),
            Some(1_796_040_000_000)
        );
        assert_eq!(parse_rfc3339_ms("1969-12-31T23:59:59Z"), Some(0));
        assert_eq!(
            parse_rfc3339_ms("2024-02-29t00:00:00z"),
            Some(1_709_164_800_000)
        );
        for bad in [
            "2023-02-29T00:00:00Z",
            "2026-13-01T00:00:00Z",
            "2026-11-30T24:00:00Z",
            "2026-11-30T12:00:00",
            "2026-11-30 12:00:00Z",
            "2026-11-30T12:00:00.Z",
            "2026-11-30T12:00:00+1:00",
            "2026-11-30T12:00:00+24:00",
        ] {
            assert_eq!(parse_rfc3339_ms(bad), None, "{bad}");
        }
        assert!(parse_rfc3339_ms("2026-11-30t12:00:00.123456789-05:30").is_some());
    }
}
