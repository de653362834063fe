//! `/transfers` and `/bank-transactions`: money moved at once, never leaving a
//! customer balance negative; refusals are journaled and answered 422.

use std::sync::Arc;

use poem::http::{HeaderMap, StatusCode};
use poem_openapi::param::Header;
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Enum, Object, OpenApi};

use super::access::ApiKey;
use super::problem::{ApiError, Problem};
use super::schema::{CustomerAccountId, IdempotencyKeyHeader, PositiveAmount, Reason, Text};
use super::{ApiTags, AppState, idempotency_key, rfc3339};
use crate::access::{Caller, Role};
use crate::domain::{AccountId, Amount, Idempotency, SystemAccount};
use crate::store::now_ms;
use crate::store::transfers::{
    Movement, MovementError, MovementOutcome, Refusal, move_money, stored_movement,
};

/// Longest bank-transaction reason kept.
pub const REASON_LENGTH_MAX: usize = 200;

pub struct TransfersApi(pub Arc<AppState>);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "lowercase")]
pub enum Direction {
    /// Transfers: src pays dst. Bank transactions: the account pays @bank.
    Debit,
    /// Transfers: dst pays src. Bank transactions: @bank pays the account.
    Credit,
}

#[derive(Debug, Object)]
#[oai(deny_unknown_fields)]
struct TransferRequest {
    src_account_id: CustomerAccountId,
    /// Another customer account than `src_account_id`.
    dst_account_id: CustomerAccountId,
    amount: PositiveAmount,
    direction: Direction,
}

#[derive(Debug, Object)]
struct TransferView {
    transaction_id: String,
    transaction_timestamp: String,
    src_account_id: String,
    dst_account_id: String,
    amount: String,
    direction: Direction,
    /// Always `success`: a refused transfer is answered 422.
    status: String,
}

#[derive(Debug, Object)]
#[oai(deny_unknown_fields)]
struct BankTransactionRequest {
    account_id: CustomerAccountId,
    amount: PositiveAmount,
    direction: Direction,
    /// What the money is for, kept in the journal; trimmed.
    reason: Text<Reason>,
}

#[derive(Debug, Object)]
struct BankTransactionView {
    transaction_id: String,
    transaction_timestamp: String,
    account_id: String,
    amount: String,
    direction: Direction,
    reason: String,
    status: String,
}

#[derive(ApiResponse)]
enum TransferResponse {
    /// The money moved (or, for a repeated Idempotency-Key, had moved).
    #[oai(status = 201)]
    Created(
        Json<TransferView>,
        #[oai(header = "Idempotent-Replayed")] Option<bool>,
    ),
}

#[derive(ApiResponse)]
enum BankTransactionResponse {
    #[oai(status = 201)]
    Created(
        Json<BankTransactionView>,
        #[oai(header = "Idempotent-Replayed")] Option<bool>,
    ),
}

/// How a movement ended, once replays are resolved.
struct Ended {
    id: String,
    at_ms: i64,
    failure: Option<String>,
    refusal: Option<Refusal>,
    replayed: Option<bool>,
}

impl TransfersApi {
    async fn run(&self, movement: Movement) -> Result<Ended, ApiError> {
        let store = &self.0.store;
        let keys = store.keys();
        let mut conn = store.conn().await?;
        // Two customers on two shards: one script over both where one node
        // holds them, else the transfer saga.
        let moved = if store.sagas()
            && crate::store::transfer_saga::crosses_shards(keys, &movement.payer, &movement.payee)
        {
            crate::store::transfer_saga::move_money(&mut conn, keys, &movement).await
        } else {
            move_money(&mut conn, keys, &movement).await
        };
        match moved {
            Ok(MovementOutcome::Success) => Ok(Ended {
                id: movement.id,
                at_ms: movement.at_ms,
                failure: None,
                refusal: None,
                replayed: None,
            }),
            Ok(MovementOutcome::Fail { refusal, reason }) => Ok(Ended {
                id: movement.id,
                at_ms: movement.at_ms,
                failure: Some(reason),
                refusal: Some(refusal),
                replayed: None,
            }),
            Ok(MovementOutcome::Replayed(id)) => {
                let stored = stored_movement(&mut conn, self.0.store.keys(), &id)
                    .await?
                    .ok_or_else(|| ApiError::not_found(format!("transaction {id} not found")))?;
                Ok(Ended {
                    id: stored.id,
                    at_ms: stored.at_ms,
                    failure: stored.failure,
                    refusal: stored.refusal,
                    replayed: Some(true),
                })
            }
            Err(MovementError::IdempotencyConflict(id)) => Err(ApiError::conflict(
                "idempotency-conflict",
                format!("this Idempotency-Key made transaction {id} with another request"),
            )),
            Err(MovementError::Store(err)) => Err(err.into()),
        }
    }

    fn movement(
        &self,
        kind: &'static str,
        (payer, payee, amount): (AccountId, AccountId, Amount),
        canonical_request: String,
        memo: String,
        (headers, caller): (&HeaderMap, &Caller),
    ) -> Result<Movement, ApiError> {
        let idempotency = idempotency_key(headers, caller)?
            .map(|key| Idempotency::new(key, &[kind, &canonical_request]));
        let keys = self.0.store.keys();
        let shard = crate::store::transfers::movement_shard(keys, &payer, &payee);
        Ok(Movement {
            id: keys.new_id_in(shard).to_string(),
            kind,
            payer,
            payee,
            amount,
            canonical_request,
            memo,
            at_ms: now_ms(),
            idempotency,
            idempotency_ttl_secs: self.0.api.idempotency_ttl_secs,
        })
    }
}

/// A refusal journaled as a failed transaction: 422 with its id and reason.
/// One that would take a balance past the limit is `balance-limit`, as it is
/// for every operation; the others are `transaction-refused`.
fn refused(id: String, reason: String, refusal: Option<Refusal>) -> ApiError {
    let code = match refusal {
        Some(Refusal::BalanceLimit) => "balance-limit",
        Some(Refusal::AccountNotFound | Refusal::InsufficientFunds) | None => "transaction-refused",
    };
    let mut problem = Problem::new(StatusCode::UNPROCESSABLE_ENTITY, code, reason.clone());
    problem.transaction_id = Some(id);
    problem.reason = Some(reason);
    ApiError::Unprocessable(Json(problem))
}

#[OpenApi(tag = "ApiTags::Transfers")]
impl TransfersApi {
    /// Move money between two customer accounts at once. `debit`: src pays
    /// dst; `credit`: dst pays src. A refusal (insufficient funds, unknown
    /// account) is journaled with its reason and answered 422.
    ///
    /// Role: `customer` (its own account must be the payer: `src` for
    /// `debit`, `dst` for `credit`) or `admin`.
    #[oai(path = "/transfers", method = "post", operation_id = "createTransfer")]
    async fn transfer(
        &self,
        auth: ApiKey,
        body: Json<TransferRequest>,
        // Declared for the spec only: `idempotency_key` reads the raw header(s).
        #[oai(name = "Idempotency-Key")] _key: Header<Option<IdempotencyKeyHeader>>,
        headers: &HeaderMap,
    ) -> Result<TransferResponse, ApiError> {
        let Json(request) = body;
        let amount = request.amount.0;
        let (src, dst) = (request.src_account_id.0, request.dst_account_id.0);
        // The one rule of the body that a JSON Schema cannot state: 422.
        if src == dst {
            return Err(ApiError::unprocessable(
                "same-account",
                "src_account_id and dst_account_id must differ",
            ));
        }
        let (payer, payee) = match request.direction {
            Direction::Debit => (src.clone(), dst.clone()),
            Direction::Credit => (dst.clone(), src.clone()),
        };
        auth.pay_from(&payer, &[Role::Admin])?;
        let canonical = format!("{} {} {} {:?}", src, dst, amount.cents(), request.direction);
        let movement = self.movement(
            "transfer",
            (payer, payee, amount),
            canonical,
            String::new(),
            (headers, &auth.0),
        )?;
        let ended = self.run(movement).await?;
        if let Some(reason) = ended.failure {
            return Err(refused(ended.id, reason, ended.refusal));
        }
        Ok(TransferResponse::Created(
            Json(TransferView {
                transaction_id: ended.id,
                transaction_timestamp: rfc3339(ended.at_ms),
                src_account_id: src.to_string(),
                dst_account_id: dst.to_string(),
                amount: amount.to_string(),
                direction: request.direction,
                status: "success".to_owned(),
            }),
            ended.replayed,
        ))
    }

    /// Move money between an account and @bank. `debit` takes from the
    /// account; `credit` gives to it.
    ///
    /// Role: `bank` or `admin`.
    #[oai(
        path = "/bank-transactions",
        method = "post",
        operation_id = "createBankTransaction"
    )]
    async fn bank_transaction(
        &self,
        auth: ApiKey,
        body: Json<BankTransactionRequest>,
        // Declared for the spec only: `idempotency_key` reads the raw header(s).
        #[oai(name = "Idempotency-Key")] _key: Header<Option<IdempotencyKeyHeader>>,
        headers: &HeaderMap,
    ) -> Result<BankTransactionResponse, ApiError> {
        auth.require(&[Role::Bank, Role::Admin])?;
        let Json(request) = body;
        let amount = request.amount.0;
        let reason = request.reason.into_inner();
        let account_id = request.account_id.0;
        let bank = SystemAccount::Bank.id();
        let (payer, payee) = match request.direction {
            Direction::Debit => (account_id.clone(), bank),
            Direction::Credit => (bank, account_id.clone()),
        };
        let canonical = format!(
            "{} {} {:?} {reason}",
            account_id,
            amount.cents(),
            request.direction
        );
        let movement = self.movement(
            "bank_transaction",
            (payer, payee, amount),
            canonical,
            reason.clone(),
            (headers, &auth.0),
        )?;
        let ended = self.run(movement).await?;
        if let Some(failure) = ended.failure {
            return Err(refused(ended.id, failure, ended.refusal));
        }
        Ok(BankTransactionResponse::Created(
            Json(BankTransactionView {
                transaction_id: ended.id,
                transaction_timestamp: rfc3339(ended.at_ms),
                account_id: account_id.to_string(),
                amount: amount.to_string(),
                direction: request.direction,
                reason,
                status: "success".to_owned(),
            }),
            ended.replayed,
        ))
    }
}
