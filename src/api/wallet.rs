//! `/accounts/{id}/transactions`: deposits, withdrawals and card payments,
//! accepted at once (202) and applied by the wallet workers in order.

use std::sync::Arc;

use poem::http::HeaderMap;
use poem_openapi::param::{Header, Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Enum, Object, OpenApi};

use super::access::ApiKey;
use super::problem::ApiError;
use super::schema::{
    Description, IdempotencyKeyHeader, Merchant, PositiveAmount, Text, TextField, Uuid,
};
use super::{ApiTags, AppState, idempotency_key, page_size, rfc3339};
use crate::access::Role;
use crate::domain::{AccountId, Idempotency};
use crate::store::wallet::{
    self, EnqueueError, EnqueueOutcome, NewWalletTransaction, WalletKind, WalletTransaction,
};
use crate::store::{accounts, now_ms};

/// Longest description or merchant name kept.
pub const WALLET_TEXT_LENGTH_MAX: usize = 200;
/// Most history entries looked at to fill one filtered page.
const HISTORY_SCAN_MAX: usize = 1_000;

pub struct WalletApi(pub Arc<AppState>);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "snake_case")]
enum Kind {
    Deposit,
    Withdrawal,
    CardPayment,
}

#[derive(Debug, Object)]
#[oai(deny_unknown_fields)]
struct NewTransaction {
    kind: Kind,
    amount: PositiveAmount,
    description: Option<Text<Description>>,
    /// For card payments: where the card was used.
    merchant: Option<Text<Merchant>>,
}

#[derive(Debug, Object)]
struct Accepted {
    id: String,
    /// `queued`: a worker applies it shortly, in the order accepted.
    status: String,
}

#[derive(Debug, Object)]
struct TransactionView {
    id: String,
    account_id: String,
    kind: String,
    amount: String,
    #[oai(skip_serializing_if_is_none)]
    description: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    merchant: Option<String>,
    /// `queued`, `completed` or `rejected`.
    status: String,
    /// Why it was rejected.
    #[oai(skip_serializing_if_is_none)]
    reason: Option<String>,
    created_at: String,
    #[oai(skip_serializing_if_is_none)]
    applied_at: Option<String>,
}

impl From<WalletTransaction> for TransactionView {
    fn from(txn: WalletTransaction) -> Self {
        let text = |text: String| (!text.is_empty()).then_some(text);
        TransactionView {
            id: txn.id,
            account_id: txn.account_id.to_string(),
            kind: txn.kind.as_str().to_owned(),
            amount: txn.amount.to_string(),
            description: text(txn.description),
            merchant: text(txn.merchant),
            status: txn.status,
            reason: txn.reason,
            created_at: rfc3339(txn.created_at_ms),
            applied_at: txn.applied_at_ms.map(rfc3339),
        }
    }
}

#[derive(Debug, Object)]
struct TransactionPage {
    items: Vec<TransactionView>,
    /// Pass as `cursor` for the next page; absent on the last page.
    #[oai(skip_serializing_if_is_none)]
    next_cursor: Option<String>,
}

#[derive(ApiResponse)]
enum AcceptedResponse {
    /// Accepted and queued (or, for a repeated Idempotency-Key, accepted before).
    #[oai(status = 202)]
    Accepted(
        Json<Accepted>,
        #[oai(header = "Idempotent-Replayed")] Option<bool>,
    ),
}

#[derive(ApiResponse)]
enum TransactionResponse {
    #[oai(status = 200)]
    Ok(Json<TransactionView>),
}

#[derive(ApiResponse)]
enum PageResponse {
    #[oai(status = 200)]
    Ok(Json<TransactionPage>),
}

/// Free text kept with a transaction: trimmed, empty when absent.
fn optional_text<F: TextField>(text: Option<Text<F>>) -> String {
    text.map(Text::into_inner)
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// The statuses a wallet transaction can have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "lowercase")]
enum Status {
    Queued,
    Completed,
    Rejected,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Completed => "completed",
            Status::Rejected => "rejected",
        }
    }
}

#[OpenApi(tag = "ApiTags::Accounts")]
impl WalletApi {
    /// Accept a deposit, withdrawal or card payment. It is applied shortly by
    /// a worker, after every earlier transaction of the account; a withdrawal
    /// or card payment the balance cannot cover is `rejected` with a reason.
    ///
    /// Role: deposits `bank` or `admin`; withdrawals and card payments also
    /// `customer` (from its own account only: any other answers 404, as a
    /// missing one does).
    #[oai(
        path = "/accounts/:id/transactions",
        method = "post",
        operation_id = "createWalletTransaction"
    )]
    async fn accept(
        &self,
        auth: ApiKey,
        id: Path<AccountId>,
        body: Json<NewTransaction>,
        // Declared for the spec only: `idempotency_key` reads the raw header(s).
        #[oai(name = "Idempotency-Key")] _key: Header<Option<IdempotencyKeyHeader>>,
        headers: &HeaderMap,
    ) -> Result<AcceptedResponse, ApiError> {
        let Path(account_id) = id;
        // An account id the spec admits, but the ledger keeps no wallet for
        // a system account: 422.
        if account_id.is_system() {
            return Err(ApiError::unprocessable(
                "system-account",
                "wallet transactions are for customer accounts",
            ));
        }
        let Json(request) = body;
        match request.kind {
            Kind::Deposit => auth.require(&[Role::Bank, Role::Admin])?,
            Kind::Withdrawal | Kind::CardPayment => {
                let not_found = || ApiError::not_found(format!("account {account_id} not found"));
                auth.read_account(&account_id, not_found)?;
                auth.require(&[Role::Customer, Role::Bank, Role::Admin])?
            }
        };
        let kind = match request.kind {
            Kind::Deposit => WalletKind::Deposit,
            Kind::Withdrawal => WalletKind::Withdrawal,
            Kind::CardPayment => WalletKind::CardPayment,
        };
        let description = optional_text(request.description);
        let merchant = optional_text(request.merchant);
        let amount = request.amount.0;
        let cents = amount.cents().to_string();
        let idempotency = idempotency_key(headers, &auth.0)?.map(|key| {
            Idempotency::new(
                key,
                &[
                    account_id.as_str(),
                    kind.as_str(),
                    &cents,
                    &description,
                    &merchant,
                ],
            )
        });
        let keys = self.0.store.keys();
        let txn = NewWalletTransaction {
            id: keys.new_id_in(keys.account_shard(&account_id)).to_string(),
            account_id,
            kind,
            amount,
            description,
            merchant,
            idempotency,
            idempotency_ttl_secs: self.0.api.idempotency_ttl_secs,
            at_ms: now_ms(),
            queue_max: self.0.api.wallet_queue_max,
        };
        let mut conn = self.0.store.conn().await?;
        let (id, replayed) = match wallet::enqueue(&mut conn, self.0.store.keys(), &txn).await {
            Ok(EnqueueOutcome::Queued(id)) => (id, None),
            Ok(EnqueueOutcome::Replayed(id)) => (id, Some(true)),
            Err(EnqueueError::AccountNotFound) => {
                return Err(ApiError::not_found(format!(
                    "account {} not found",
                    txn.account_id
                )));
            }
            Err(EnqueueError::QueueFull { waiting }) => {
                return Err(ApiError::too_many_requests(
                    "queue-full",
                    format!(
                        "account {} has {waiting} transactions waiting, the most it may have; retry once some are applied",
                        txn.account_id
                    ),
                ));
            }
            Err(EnqueueError::IdempotencyConflict(id)) => {
                return Err(ApiError::conflict(
                    "idempotency-conflict",
                    format!("this Idempotency-Key queued transaction {id} with another request"),
                ));
            }
            Err(EnqueueError::Store(err)) => return Err(err.into()),
        };
        Ok(AcceptedResponse::Accepted(
            Json(Accepted {
                id,
                status: "queued".to_owned(),
            }),
            replayed,
        ))
    }

    /// An account's wallet transactions, newest first.
    ///
    /// Role: `customer` (its own account only: any other answers 404, as a
    /// missing one does), `read`, `ops`, `bank` or `admin`.
    #[oai(
        path = "/accounts/:id/transactions",
        method = "get",
        operation_id = "listWalletTransactions"
    )]
    async fn list(
        &self,
        auth: ApiKey,
        id: Path<AccountId>,
        /// Only this status: `queued`, `completed` or `rejected`.
        status: Query<Option<Status>>,
        limit: Query<Option<u32>>,
        /// `next_cursor` from the previous page.
        cursor: Query<Option<Uuid>>,
    ) -> Result<PageResponse, ApiError> {
        let Path(account_id) = id;
        auth.read_account(&account_id, || {
            ApiError::not_found(format!("account {account_id} not found"))
        })?;
        let limit = page_size(limit.0, &self.0.api)?;
        let cursor = cursor.0.map(|id| id.0);
        let mut conn = self.0.store.conn().await?;
        if accounts::get_account(&mut conn, self.0.store.keys(), &account_id)
            .await?
            .is_none()
        {
            return Err(ApiError::not_found(format!(
                "account {account_id} not found"
            )));
        }
        let mut items = Vec::new();
        let mut before = cursor;
        let mut scanned = 0;
        let mut exhausted = false;
        while items.len() < limit && scanned < HISTORY_SCAN_MAX {
            let ids = wallet::history(
                &mut conn,
                self.0.store.keys(),
                &account_id,
                before.as_deref(),
                limit,
            )
            .await?;
            exhausted = ids.len() < limit;
            for id in &ids {
                scanned += 1;
                before = Some(id.clone());
                if let Some(txn) = wallet::get(&mut conn, self.0.store.keys(), id).await?
                    && status.0.is_none_or(|status| status.as_str() == txn.status)
                {
                    items.push(TransactionView::from(txn));
                    if items.len() == limit {
                        break;
                    }
                }
            }
            if exhausted {
                break;
            }
        }
        let next_cursor = (!exhausted || items.len() == limit)
            .then_some(before)
            .flatten();
        Ok(PageResponse::Ok(Json(TransactionPage {
            items,
            next_cursor,
        })))
    }

    /// One wallet transaction of an account.
    ///
    /// Role: `customer` (its own account only: any other answers 404, as a
    /// missing one does), `read`, `ops`, `bank` or `admin`.
    #[oai(
        path = "/accounts/:id/transactions/:txn_id",
        method = "get",
        operation_id = "getWalletTransaction"
    )]
    async fn get(
        &self,
        auth: ApiKey,
        id: Path<AccountId>,
        txn_id: Path<Uuid>,
    ) -> Result<TransactionResponse, ApiError> {
        let Path(account_id) = id;
        let txn_id = txn_id.0.0;
        auth.read_account(&account_id, || {
            ApiError::not_found(format!(
                "transaction {txn_id} not found for account {account_id}"
            ))
        })?;
        let mut conn = self.0.store.conn().await?;
        let Some(txn) = wallet::get(&mut conn, self.0.store.keys(), &txn_id).await? else {
            let window = self.0.ledger.record_retention;
            let day = crate::retention::archive_day_of(&self.0.store, &txn_id, window).await?;
            return Err(ApiError::missing_record(
                "transaction",
                &txn_id.to_string(),
                day,
            ));
        };
        if txn.account_id != account_id {
            return Err(ApiError::not_found(format!(
                "transaction {txn_id} not found for account {account_id}"
            )));
        }
        Ok(TransactionResponse::Ok(Json(txn.into())))
    }
}
