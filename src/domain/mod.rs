//! Domain types that validate at the edge: once a value of one of these types
//! exists, it is known to be well formed and within its bounds.

mod idempotency;
mod ids;
mod money;
mod name;
mod symbol;

pub use idempotency::{
    IDEMPOTENCY_KEY_LENGTH_MAX, Idempotency, IdempotencyKey, IdempotencyKeyError,
};
pub use ids::{
    AccountId, BatchId, IdError, OrderId, SystemAccount, parse_uuid, truncate_for_message,
};
pub use money::{
    AMOUNT_MAX_CENTS, AMOUNT_SCALE, Amount, BALANCE_LIMIT_CENTS, MoneyError, QUANTITY_MAX_UNITS,
    QUANTITY_SCALE, Quantity, format_units, order_cost,
};
pub use name::{ACCOUNT_NAME_LENGTH_MAX, AccountName, AccountNameError};
pub use symbol::{Symbol, SymbolError};
