//! Purchase orders: pricing and the checks that come before the script.
//!
//! The API parses the request into domain types; this module prices it and
//! builds the one atomic step (`place_order.lua`) that debits the customer,
//! journals it, and buckets or batches the order.

use crate::config::LedgerSettings;
use crate::domain::{
    AccountId, BatchId, Idempotency, IdempotencyKey, OrderId, Quantity, Symbol, order_cost,
};
use crate::store::orders::PlaceOrder;

/// A purchase order as the customer asked for it, already well formed.
#[derive(Debug, Clone)]
pub struct OrderRequest {
    pub account_id: AccountId,
    pub symbol: Symbol,
    pub quantity: Quantity,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum OrderRejection {
    #[error("symbol `{0}` is not traded here")]
    UnknownSymbol(Symbol),
    #[error("`{0}` is a system account; orders are placed by customer accounts")]
    SystemAccount(AccountId),
    #[error("the order's value is above the largest amount accepted")]
    ValueTooLarge,
}

/// Prices `request` and prepares its script call. The batch id is drawn now
/// and used only if this order closes a batch.
pub fn prepare(
    request: &OrderRequest,
    ledger: &LedgerSettings,
    idempotency_key: Option<IdempotencyKey>,
    idempotency_ttl_secs: u64,
) -> Result<PlaceOrder, OrderRejection> {
    if request.account_id.is_system() {
        return Err(OrderRejection::SystemAccount(request.account_id.clone()));
    }
    let price = ledger
        .prices
        .price(&request.symbol)
        .ok_or_else(|| OrderRejection::UnknownSymbol(request.symbol.clone()))?;
    let cost = order_cost(price, request.quantity).ok_or(OrderRejection::ValueTooLarge)?;
    let idempotency = idempotency_key.map(|key| {
        let quantity_units = request.quantity.units().to_string();
        let parts = [
            request.account_id.as_str(),
            request.symbol.as_str(),
            &quantity_units,
        ];
        Idempotency::new(key, &parts)
    });
    Ok(PlaceOrder {
        order_id: OrderId::new(),
        account_id: request.account_id.clone(),
        symbol: request.symbol.clone(),
        quantity: request.quantity,
        price,
        cost,
        exchange_minimum: ledger.exchange_minimum,
        batch_id: BatchId::new(),
        idempotency,
        idempotency_ttl_secs,
        created_at_ms: crate::store::now_ms(),
    })
}
