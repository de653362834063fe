//! `/orders`, `/prices`, `/buckets`, `/batches`: buying crypto.

use std::sync::Arc;

use poem::http::HeaderMap;
use poem_openapi::param::{Header, Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Enum, Object, OpenApi};

use super::access::ApiKey;
use super::problem::ApiError;
use super::schema::{CustomerAccountId, IdempotencyKeyHeader, Note, Text};
use super::{ApiTags, AppState, idempotency_key, list_offset, page_size, rfc3339};
use crate::access::Role;
use crate::domain::{AccountId, BatchId, OrderId, Quantity, Symbol, format_units};
use crate::orders::{OrderRejection, OrderRequest, prepare};
use crate::retention::archive_day_of;
use crate::store::orders::{
    self as store_orders, Batch, Bucket, Order, PlaceOrderError, PlaceOrderOutcome,
    SettlementStatus,
};
use crate::store::settlement::{self, OperatorError};

pub struct OrdersApi(pub Arc<AppState>);

#[derive(Debug, Object)]
#[oai(deny_unknown_fields)]
struct PlaceOrderRequest {
    /// The paying customer account.
    account_id: CustomerAccountId,
    /// What to buy; see GET /prices.
    symbol: Symbol,
    /// How much to buy, up to 8 decimal places.
    quantity: Quantity,
}

#[derive(Debug, Object)]
struct OrderView {
    id: String,
    account_id: String,
    symbol: String,
    quantity: String,
    /// USD per unit at the time of the order.
    price: String,
    /// USD debited: price x quantity, rounded up to the cent.
    cost: String,
    /// `pending` (waiting in the bucket), `settling`, `settled`, `failed`,
    /// `refunding` (a refund under way, shard by shard, on a cluster) or `refunded`.
    status: String,
    /// The batch that carries the order to the exchange, once there is one.
    #[oai(skip_serializing_if_is_none)]
    batch_id: Option<String>,
    /// Exchange calls made for the order's batch so far.
    attempts: i64,
    /// Why the batch's last exchange call failed, if it did.
    #[oai(skip_serializing_if_is_none)]
    last_error: Option<String>,
    created_at: String,
}

impl From<Order> for OrderView {
    fn from(order: Order) -> Self {
        OrderView {
            id: order.id.to_string(),
            account_id: order.account_id.to_string(),
            symbol: order.symbol.to_string(),
            quantity: order.quantity.to_string(),
            price: order.price.to_string(),
            cost: order.cost.to_string(),
            status: order.status.as_str().to_owned(),
            batch_id: order.batch_id.map(|id| id.to_string()),
            attempts: order.attempts,
            last_error: order.last_error,
            created_at: rfc3339(order.created_at_ms),
        }
    }
}

#[derive(Debug, Object)]
struct PriceView {
    symbol: String,
    /// USD per unit.
    price: String,
}

#[derive(Debug, Object)]
struct PriceList {
    prices: Vec<PriceView>,
    /// The smallest purchase the exchange accepts; smaller orders wait in a bucket.
    exchange_minimum: String,
}

#[derive(Debug, Object)]
struct BucketView {
    symbol: String,
    /// USD paid by the orders waiting.
    value: String,
    quantity: String,
    order_count: i64,
}

impl From<Bucket> for BucketView {
    fn from(bucket: Bucket) -> Self {
        BucketView {
            symbol: bucket.symbol.to_string(),
            value: format_units(bucket.value_cents, 2),
            quantity: Quantity::from_units(bucket.quantity_units)
                .map_or_else(|_| "0".to_owned(), |quantity| quantity.to_string()),
            order_count: bucket.order_count,
        }
    }
}

#[derive(Debug, Object)]
struct BatchView {
    id: String,
    symbol: String,
    quantity: String,
    /// USD paid by the batch's orders.
    value: String,
    order_ids: Vec<String>,
    /// `settling`, `settled`, `failed` (dead-lettered: retry or refund it),
    /// `refunding` (a refund under way, shard by shard, on a cluster) or `refunded`.
    status: String,
    /// Exchange calls made so far.
    attempts: i64,
    #[oai(skip_serializing_if_is_none)]
    last_error: Option<String>,
    /// An exchange call got no answer, so the exchange may have filled the
    /// batch: retry it to find out before refunding.
    may_be_filled: bool,
    created_at: String,
}

impl From<Batch> for BatchView {
    fn from(batch: Batch) -> Self {
        BatchView {
            id: batch.id.to_string(),
            symbol: batch.symbol.to_string(),
            quantity: batch.quantity.to_string(),
            value: batch.value.to_string(),
            order_ids: batch.order_ids.iter().map(ToString::to_string).collect(),
            status: batch.status.as_str().to_owned(),
            attempts: batch.attempts,
            last_error: batch.last_error,
            may_be_filled: batch.fill_unknown,
            created_at: rfc3339(batch.created_at_ms),
        }
    }
}

#[derive(ApiResponse)]
enum PlaceOrderResponse {
    /// The customer is debited and the order queued (or, for a repeated
    /// Idempotency-Key, the order the first request placed, as it stands now).
    #[oai(status = 201)]
    Created(
        Json<OrderView>,
        #[oai(header = "Location")] String,
        #[oai(header = "Idempotent-Replayed")] Option<bool>,
    ),
}

#[derive(ApiResponse)]
enum OrderResponse {
    #[oai(status = 200)]
    Ok(Json<OrderView>),
}

#[derive(ApiResponse)]
enum PricesResponse {
    #[oai(status = 200)]
    Ok(Json<PriceList>),
}

#[derive(ApiResponse)]
enum BucketsResponse {
    #[oai(status = 200)]
    Ok(Json<Vec<BucketView>>),
}

#[derive(ApiResponse)]
enum BatchResponse {
    #[oai(status = 200)]
    Ok(Json<BatchView>),
}

#[derive(ApiResponse)]
enum BatchListResponse {
    #[oai(status = 200)]
    Ok(Json<BatchPage>),
}

#[derive(Debug, Object)]
struct BatchPage {
    items: Vec<BatchView>,
    /// Pass as `offset` for the next page; absent on the last page.
    #[oai(skip_serializing_if_is_none)]
    next_offset: Option<u64>,
}

#[derive(Debug, Object)]
#[oai(deny_unknown_fields)]
struct RefundRequest {
    /// Why the batch is refunded, for the record (at most 200 characters).
    note: Option<Text<Note>>,
    /// Needed when an exchange call for the batch got no answer, so the
    /// exchange may have filled it: `true` says you checked that it did not.
    /// Otherwise retry the batch, which finds out (the exchange fills each
    /// batch once).
    #[oai(default)]
    exchange_confirmed_unfilled: bool,
}

/// The batches `GET /batches` lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "lowercase")]
enum ListedBatchStatus {
    /// Dead-lettered, waiting for an operator to retry or refund.
    Failed,
}

/// Longest operator note kept with a refund.
pub const REFUND_NOTE_LENGTH_MAX: usize = 200;

#[OpenApi(tag = "ApiTags::Orders")]
impl OrdersApi {
    /// Buy crypto: debits the customer at once; the purchase reaches the
    /// exchange alone (at or above the minimum) or with others once their
    /// bucket reaches it.
    ///
    /// Role: `customer` (paying from its own account only) or `admin`.
    #[oai(path = "/orders", method = "post", operation_id = "placeOrder")]
    async fn place_order(
        &self,
        auth: ApiKey,
        body: Json<PlaceOrderRequest>,
        // Declared for the spec only: `idempotency_key` reads the raw header(s).
        #[oai(name = "Idempotency-Key")] _key: Header<Option<IdempotencyKeyHeader>>,
        headers: &HeaderMap,
    ) -> Result<PlaceOrderResponse, ApiError> {
        let Json(request) = body;
        let account_id = request.account_id.0;
        auth.pay_from(&account_id, &[Role::Admin])?;
        let request = OrderRequest {
            account_id,
            symbol: request.symbol,
            quantity: request.quantity,
        };
        let key = idempotency_key(headers, &auth.0)?;
        let order = prepare(
            &request,
            self.0.store.keys(),
            &self.0.ledger,
            key,
            self.0.api.idempotency_ttl_secs,
        )
        .map_err(|rejection| {
            let code = match rejection {
                OrderRejection::UnknownSymbol(_) => "unknown-symbol",
                OrderRejection::SystemAccount(_) => "not-a-customer-account",
                OrderRejection::ValueTooLarge => "value-too-large",
            };
            ApiError::unprocessable(code, rejection.to_string())
        })?;
        let location = |id: &OrderId| format!("{}/orders/{id}", super::API_PREFIX);
        // The script's verdict is all a new order's answer needs: no read-back.
        let placed = self.0.orders.place(order.clone()).await;
        let (status, batch_id) = match placed {
            Ok(PlaceOrderOutcome::Pending) => (SettlementStatus::Pending, None),
            Ok(PlaceOrderOutcome::Settling(batch_id)) => {
                (SettlementStatus::Settling, Some(batch_id))
            }
            Ok(PlaceOrderOutcome::Replayed(id)) => {
                let mut conn = self.0.store.conn().await?;
                let replayed = store_orders::get_order(&mut conn, self.0.store.keys(), &id)
                    .await?
                    .ok_or_else(|| ApiError::not_found(format!("order {id} not found")))?;
                return Ok(PlaceOrderResponse::Created(
                    Json(replayed.into()),
                    location(&id),
                    Some(true),
                ));
            }
            Err(err) => return Err(refusal(err, &request.account_id)),
        };
        let placed = Order {
            id: order.order_id,
            account_id: order.account_id,
            symbol: order.symbol,
            quantity: order.quantity,
            price: order.price,
            cost: order.cost,
            created_at_ms: order.created_at_ms,
            status,
            batch_id,
            attempts: 0,
            last_error: None,
        };
        Ok(PlaceOrderResponse::Created(
            Json(placed.into()),
            location(&order.order_id),
            None,
        ))
    }

    /// One order, with its status and batch.
    ///
    /// Role: `customer` (its own orders only: any other answers 404, as a
    /// missing one does), `read`, `ops`, `bank` or `admin`.
    #[oai(path = "/orders/:id", method = "get", operation_id = "getOrder")]
    async fn get_order(&self, auth: ApiKey, id: Path<OrderId>) -> Result<OrderResponse, ApiError> {
        let Path(id) = id;
        let not_found = || ApiError::not_found(format!("order {id} not found"));
        auth.require_reader_or_customer()?;
        let mut conn = self.0.store.conn().await?;
        let Some(order) = store_orders::get_order(&mut conn, self.0.store.keys(), &id).await?
        else {
            let window = self.0.ledger.record_retention;
            let day = archive_day_of(&self.0.store, &id.to_string(), window).await?;
            return Err(ApiError::missing_record("order", &id.to_string(), day));
        };
        auth.read_account(&order.account_id, not_found)?;
        Ok(OrderResponse::Ok(Json(order.into())))
    }

    /// Prices in USD per unit, and the exchange minimum.
    ///
    /// Role: `customer`, `read`, `ops`, `bank` or `admin`.
    #[oai(path = "/prices", method = "get", operation_id = "listPrices")]
    async fn prices(&self, auth: ApiKey) -> Result<PricesResponse, ApiError> {
        auth.require_reader_or_customer()?;
        let prices = self
            .0
            .ledger
            .prices
            .iter()
            .map(|(symbol, price)| PriceView {
                symbol: symbol.to_string(),
                price: price.to_string(),
            })
            .collect();
        let exchange_minimum = self.0.ledger.exchange_minimum.to_string();
        Ok(PricesResponse::Ok(Json(PriceList {
            prices,
            exchange_minimum,
        })))
    }

    /// What waits for the exchange minimum, per symbol.
    ///
    /// Role: `read`, `ops`, `bank` or `admin`.
    #[oai(path = "/buckets", method = "get", operation_id = "listBuckets")]
    async fn buckets(&self, auth: ApiKey) -> Result<BucketsResponse, ApiError> {
        auth.require_reader()?;
        let symbols: Vec<Symbol> = self
            .0
            .ledger
            .prices
            .iter()
            .map(|(symbol, _)| symbol.clone())
            .collect();
        let mut conn = self.0.store.conn().await?;
        let buckets = store_orders::buckets(&mut conn, self.0.store.keys(), &symbols).await?;
        Ok(BucketsResponse::Ok(Json(
            buckets.into_iter().map(BucketView::from).collect(),
        )))
    }

    /// One batch: what was (or is being) bought from the exchange in one call.
    ///
    /// Role: `read`, `ops`, `bank` or `admin`.
    #[oai(path = "/batches/:id", method = "get", operation_id = "getBatch")]
    async fn get_batch(&self, auth: ApiKey, id: Path<BatchId>) -> Result<BatchResponse, ApiError> {
        auth.require_reader()?;
        let Path(id) = id;
        Ok(BatchResponse::Ok(Json(self.batch_view(&id).await?)))
    }

    /// Batches by status, oldest first. Only `failed` (dead-lettered batches,
    /// waiting for an operator) is listable.
    ///
    /// Role: `read`, `ops`, `bank` or `admin`.
    #[oai(path = "/batches", method = "get", operation_id = "listBatches")]
    async fn list_batches(
        &self,
        auth: ApiKey,
        /// Only `failed` can be listed.
        #[oai(name = "status")]
        _status: Query<ListedBatchStatus>,
        /// Page size (default 20, at most the configured maximum).
        limit: Query<Option<u32>>,
        /// `next_offset` from the previous page (at most 1,000,000).
        offset: Query<Option<u64>>,
    ) -> Result<BatchListResponse, ApiError> {
        auth.require_reader()?;
        let limit = page_size(limit.0, &self.0.api)?;
        let offset = list_offset(offset.0)?;
        let mut conn = self.0.store.conn().await?;
        let ids =
            settlement::failed_batches(&mut conn, self.0.store.keys(), offset as usize, limit)
                .await?;
        drop(conn);
        let mut items = Vec::with_capacity(ids.len());
        for id in &ids {
            items.push(self.batch_view(id).await?);
        }
        let next_offset = (ids.len() == limit)
            .then(|| offset.checked_add(limit as u64))
            .flatten();
        Ok(BatchListResponse::Ok(Json(BatchPage {
            items,
            next_offset,
        })))
    }

    /// Send a failed batch back to the exchange (attempts start over).
    ///
    /// Role: `ops` or `admin`.
    #[oai(
        path = "/batches/:id/retry",
        method = "post",
        operation_id = "retryBatch"
    )]
    async fn retry_batch(
        &self,
        auth: ApiKey,
        id: Path<BatchId>,
    ) -> Result<BatchResponse, ApiError> {
        let caller = auth.require(&[Role::Ops, Role::Admin])?;
        let Path(id) = id;
        crate::operator::retry_batch(&self.0.store, caller, &id, crate::operator::Via::Api)
            .await
            .map_err(operator_refusal)?;
        Ok(BatchResponse::Ok(Json(self.batch_view(&id).await?)))
    }

    /// Give every customer of a failed batch their money back, atomically and journaled.
    ///
    /// Role: `ops` or `admin`.
    #[oai(
        path = "/batches/:id/refund",
        method = "post",
        operation_id = "refundBatch"
    )]
    async fn refund_batch(
        &self,
        auth: ApiKey,
        id: Path<BatchId>,
        body: Json<RefundRequest>,
    ) -> Result<BatchResponse, ApiError> {
        let caller = auth.require(&[Role::Ops, Role::Admin])?;
        let Path(id) = id;
        // Control characters are refused (by its type), as in names and
        // reasons: the note lands in the journal and in logs.
        let note = body
            .0
            .note
            .map_or_else(|| "refunded by operator".to_owned(), Text::into_inner);
        let confirmed = body.0.exchange_confirmed_unfilled;
        crate::operator::refund_batch(
            &self.0.store,
            caller,
            &id,
            &note,
            confirmed,
            crate::operator::Via::Api,
        )
        .await
        .map_err(operator_refusal)?;
        Ok(BatchResponse::Ok(Json(self.batch_view(&id).await?)))
    }
}

impl OrdersApi {
    async fn batch_view(&self, id: &BatchId) -> Result<BatchView, ApiError> {
        let mut conn = self.0.store.conn().await?;
        let Some(batch) = store_orders::get_batch(&mut conn, self.0.store.keys(), id).await? else {
            let window = self.0.ledger.record_retention;
            let day = archive_day_of(&self.0.store, &id.to_string(), window).await?;
            return Err(ApiError::missing_record("batch", &id.to_string(), day));
        };
        Ok(batch.into())
    }
}

pub(crate) fn operator_refusal(err: OperatorError) -> ApiError {
    match err {
        OperatorError::NotFailed(id, status) if status == "missing" => {
            ApiError::not_found(format!("batch {id} not found"))
        }
        err @ (OperatorError::NotFailed(..) | OperatorError::StaleOrders(_)) => {
            ApiError::conflict("batch-not-failed", err.to_string())
        }
        err @ OperatorError::MayBeFilled(_) => ApiError::conflict("may-be-filled", err.to_string()),
        err @ OperatorError::BalanceLimit(..) => ApiError::balance_limit(err),
        OperatorError::Store(err) => err.into(),
    }
}

fn refusal(err: PlaceOrderError, account_id: &AccountId) -> ApiError {
    match err {
        PlaceOrderError::AccountNotFound => ApiError::unprocessable(
            "account-not-found",
            format!("account {account_id} not found"),
        ),
        PlaceOrderError::InsufficientFunds { balance } => ApiError::unprocessable(
            "insufficient-funds",
            format!("insufficient funds: account {account_id} holds {balance}"),
        ),
        err @ PlaceOrderError::BalanceLimit(_) => ApiError::balance_limit(err),
        PlaceOrderError::IdempotencyConflict(id) => ApiError::conflict(
            "idempotency-conflict",
            format!("this Idempotency-Key placed order {id} with another request"),
        ),
        PlaceOrderError::Store(err) => err.into(),
    }
}
