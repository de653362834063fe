//! `/advances`: money lent from @bank, repaid in 12 installments one period
//! apart; and `/audit`, the ledger's invariants with every advance reconciled.

use std::sync::Arc;

use poem::http::HeaderMap;
use poem_openapi::param::{Header, Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object, OpenApi};

use super::access::ApiKey;
use super::problem::ApiError;
use super::schema::{AdvanceAmount, CustomerAccountId, IdempotencyKeyHeader, Uuid};
use super::{ApiTags, AppState, idempotency_key, list_offset, page_size, rfc3339};
use crate::access::Role;
use crate::domain::{AccountId, Idempotency, format_units};
use crate::store::advances::{self, Advance, AdvanceError, NewAdvance};
use crate::store::{accounts, now_ms};

pub struct AdvancesApi(pub Arc<AppState>);

#[derive(Debug, Object)]
#[oai(deny_unknown_fields)]
struct NewAdvanceRequest {
    account_id: CustomerAccountId,
    amount: AdvanceAmount,
}

#[derive(Debug, Object)]
struct InstallmentView {
    /// From 1.
    number: u32,
    amount: String,
    due_at: String,
    /// `scheduled`, `processing`, `paid` or `failed` (its amount moved to the next one).
    status: String,
}

#[derive(Debug, Object)]
struct AdvanceView {
    id: String,
    account_id: String,
    amount: String,
    created_at: String,
    installments: Vec<InstallmentView>,
    paid: String,
    scheduled: String,
    processing: String,
    /// paid + scheduled + processing equals the amount.
    reconciled: bool,
}

impl From<Advance> for AdvanceView {
    fn from(advance: Advance) -> Self {
        let usd = |cents: i64| format_units(cents, 2);
        AdvanceView {
            id: advance.id.clone(),
            account_id: advance.account_id.to_string(),
            amount: usd(advance.amount_cents),
            created_at: rfc3339(advance.created_at_ms),
            paid: usd(advance.paid_cents()),
            scheduled: usd(advance.scheduled_cents()),
            processing: usd(advance.processing_cents()),
            reconciled: advance.reconciles(),
            installments: advance
                .installments
                .into_iter()
                .map(|installment| InstallmentView {
                    number: installment.n,
                    amount: usd(installment.amount_cents),
                    due_at: rfc3339(installment.due_ms),
                    status: installment.status,
                })
                .collect(),
        }
    }
}

#[derive(Debug, Object)]
struct AuditView {
    clean: bool,
    balances_sum: String,
    accounts_checked: u64,
    journal_entries: u64,
    mismatched_accounts: Vec<String>,
    /// Accounts whose balance is outside ±90,071,992,547,409.91 (2^53 - 1
    /// cents), the range every operation keeps balances in.
    out_of_range_accounts: Vec<String>,
    advances_checked: u64,
    unreconciled_advances: Vec<String>,
    /// The report as `tally audit` prints it.
    report: String,
}

#[derive(ApiResponse)]
enum CreatedResponse {
    #[oai(status = 201)]
    Created(
        Json<AdvanceView>,
        #[oai(header = "Idempotent-Replayed")] Option<bool>,
    ),
}

#[derive(ApiResponse)]
enum AdvanceResponse {
    #[oai(status = 200)]
    Ok(Json<AdvanceView>),
}

#[derive(ApiResponse)]
enum AdvanceListResponse {
    #[oai(status = 200)]
    Ok(Json<Vec<AdvanceView>>),
}

#[derive(ApiResponse)]
enum AuditResponse {
    #[oai(status = 200)]
    Ok(Json<AuditView>),
}

impl AdvancesApi {
    async fn view(&self, id: &str) -> Result<AdvanceView, ApiError> {
        let mut conn = self.0.store.conn().await?;
        let Some(advance) = advances::get(&mut conn, self.0.store.keys(), id).await? else {
            let window = self.0.ledger.record_retention;
            let day = crate::retention::archive_day_of(&self.0.store, id, window).await?;
            return Err(ApiError::missing_record("advance", id, day));
        };
        Ok(advance.into())
    }
}

#[OpenApi(tag = "ApiTags::Accounts")]
impl AdvancesApi {
    /// Lend a customer money from @bank, repaid in 12 installments one period
    /// apart (the remainder on the last). A failed installment's amount moves
    /// to the next one, or to a new one a period after the last.
    ///
    /// Role: `bank` or `admin`.
    #[oai(path = "/advances", method = "post", operation_id = "createAdvance")]
    async fn create(
        &self,
        auth: ApiKey,
        body: Json<NewAdvanceRequest>,
        // Declared for the spec only: `idempotency_key` reads the raw header(s).
        #[oai(name = "Idempotency-Key")] _key: Header<Option<IdempotencyKeyHeader>>,
        headers: &HeaderMap,
    ) -> Result<CreatedResponse, ApiError> {
        let caller = auth.require(&[Role::Bank, Role::Admin])?;
        let Json(request) = body;
        let account_id = request.account_id.0;
        let amount = request.amount.0;
        let cents = amount.cents().to_string();
        let idempotency = idempotency_key(headers, caller)?
            .map(|key| Idempotency::new(key, &[account_id.as_str(), &cents]));
        let keys = self.0.store.keys();
        let advance = NewAdvance {
            id: keys.new_id_in(keys.account_shard(&account_id)).to_string(),
            account_id,
            amount,
            period_ms: u64::try_from(self.0.ledger.advance_period.as_millis()).unwrap_or(u64::MAX),
            now_ms: now_ms(),
            idempotency,
            idempotency_ttl_secs: self.0.api.idempotency_ttl_secs,
        };
        let mut conn = self.0.store.conn().await?;
        let (id, replayed) = match advances::create(&mut conn, self.0.store.keys(), &advance).await
        {
            Ok(created) => created,
            Err(AdvanceError::AccountNotFound) => {
                return Err(ApiError::unprocessable(
                    "account-not-found",
                    format!("account {} not found", advance.account_id),
                ));
            }
            Err(AdvanceError::IdempotencyConflict(id)) => {
                return Err(ApiError::conflict(
                    "idempotency-conflict",
                    format!("this Idempotency-Key made advance {id} with another request"),
                ));
            }
            Err(err @ AdvanceError::BalanceLimit(_)) => return Err(ApiError::balance_limit(err)),
            Err(AdvanceError::Store(err)) => return Err(err.into()),
        };
        Ok(CreatedResponse::Created(
            Json(self.view(&id).await?),
            replayed.then_some(true),
        ))
    }

    /// One advance: its installments and the reconciliation figures.
    ///
    /// Role: `customer` (its own advances only: any other answers 404, as a
    /// missing one does), `read`, `ops`, `bank` or `admin`.
    #[oai(path = "/advances/:id", method = "get", operation_id = "getAdvance")]
    async fn get(&self, auth: ApiKey, id: Path<Uuid>) -> Result<AdvanceResponse, ApiError> {
        // Canonical form only, lowercased: one spelling per id, as for accounts.
        let id = id.0.0;
        auth.require_reader_or_customer()?;
        let view = self.view(&id.to_string()).await?;
        let owner = AccountId::parse(&view.account_id).ok();
        if !owner.is_some_and(|owner| auth.0.may_read_account(&owner)) {
            return Err(ApiError::not_found(format!("advance {id} not found")));
        }
        Ok(AdvanceResponse::Ok(Json(view)))
    }

    /// An account's advances, oldest first. Page with `offset`: the next
    /// page starts where this one ended, and a page shorter than `limit` is the last.
    ///
    /// Role: `customer` (its own account only: any other answers 404, as a
    /// missing one does), `read`, `ops`, `bank` or `admin`.
    #[oai(
        path = "/accounts/:id/advances",
        method = "get",
        operation_id = "listAdvances"
    )]
    async fn list(
        &self,
        auth: ApiKey,
        id: Path<AccountId>,
        /// Page size (default 20, at most the configured maximum).
        limit: Query<Option<u32>>,
        /// Advances to skip, oldest first (at most 1,000,000).
        offset: Query<Option<u64>>,
    ) -> Result<AdvanceListResponse, ApiError> {
        let Path(account) = id;
        auth.read_account(&account, || {
            ApiError::not_found(format!("account {account} not found"))
        })?;
        let limit = page_size(limit.0, &self.0.api)?;
        let offset = list_offset(offset.0)?;
        let mut conn = self.0.store.conn().await?;
        if accounts::get_account(&mut conn, self.0.store.keys(), &account)
            .await?
            .is_none()
        {
            return Err(ApiError::not_found(format!("account {account} not found")));
        }
        let ids = advances::ids(
            &mut conn,
            self.0.store.keys(),
            Some(&account),
            offset as usize,
            limit,
        )
        .await?;
        drop(conn);
        let mut views = Vec::with_capacity(ids.len());
        for id in ids {
            views.push(self.view(&id).await?);
        }
        Ok(AdvanceListResponse::Ok(Json(views)))
    }

    /// The ledger's invariants, as `tally audit` checks them, with every advance reconciled.
    /// One audit runs at a time across every API process; another asked for
    /// meanwhile answers 409 `audit-running`.
    ///
    /// Role: `read`, `ops`, `bank` or `admin`.
    #[oai(path = "/audit", method = "get", operation_id = "runAudit")]
    async fn audit(&self, auth: ApiKey) -> Result<AuditResponse, ApiError> {
        auth.require_reader()?;
        let lock_ms = self.0.api.request_timeout_ms;
        let Some(_lock) = crate::store::locks::Lock::acquire(
            &self.0.store,
            crate::store::keys::AUDIT_RUNNING,
            lock_ms,
        )
        .await?
        else {
            return Err(ApiError::conflict(
                "audit-running",
                "an audit is running already (one at a time, across every API process); retry in a few seconds",
            ));
        };
        let report = crate::audit::run(&self.0.store).await?;
        Ok(AuditResponse::Ok(Json(AuditView {
            clean: report.is_clean(),
            balances_sum: format_units(report.balances_sum_cents, 2),
            accounts_checked: report.accounts_checked as u64,
            journal_entries: report.journal_entries,
            mismatched_accounts: report
                .mismatched_accounts
                .iter()
                .map(|(id, _, _)| id.to_string())
                .collect(),
            out_of_range_accounts: report
                .out_of_range_accounts
                .iter()
                .map(|(id, _)| id.to_string())
                .collect(),
            advances_checked: report.advances_checked as u64,
            unreconciled_advances: report.unreconciled_advances.clone(),
            report: report.to_string(),
        })))
    }
}
