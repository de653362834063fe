//! `/accounts`: open, read and list customer accounts.

use std::sync::Arc;

use poem::http::HeaderMap;
use poem_openapi::param::{Header, Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object, OpenApi};

use super::access::ApiKey;
use super::problem::ApiError;
use super::schema::IdempotencyKeyHeader;
use super::{ApiTags, AppState, idempotency_key, page_size, rfc3339};
use crate::access::Role;
use crate::domain::{AccountId, AccountName, Amount, Idempotency, format_units};
use crate::store::accounts::{self, Account, CreateAccountError, CreateAccountOutcome, NewAccount};

pub struct AccountsApi(pub Arc<AppState>);

#[derive(Debug, Object)]
#[oai(deny_unknown_fields)]
struct CreateAccountRequest {
    /// The holder's name.
    name: AccountName,
    /// Opening balance in USD, funded by @bank. Defaults to 0.00.
    balance: Option<Amount>,
}

#[derive(Debug, Object)]
struct AccountView {
    id: String,
    name: String,
    /// USD; only system accounts (names starting with @) can be negative.
    balance: String,
    created_at: String,
}

impl From<Account> for AccountView {
    fn from(account: Account) -> Self {
        AccountView {
            id: account.id.to_string(),
            name: account.name,
            balance: format_units(account.balance_cents, 2),
            created_at: rfc3339(account.created_at_ms),
        }
    }
}

#[derive(Debug, Object)]
struct AccountPage {
    items: Vec<AccountView>,
    /// Pass as `cursor` for the next page; absent on the last page.
    #[oai(skip_serializing_if_is_none)]
    next_cursor: Option<String>,
}

#[derive(ApiResponse)]
enum CreateAccountResponse {
    /// The account is open (or, for a repeated Idempotency-Key, was opened by the first request).
    #[oai(status = 201)]
    Created(
        Json<AccountView>,
        #[oai(header = "Location")] String,
        #[oai(header = "Idempotent-Replayed")] Option<bool>,
    ),
}

#[derive(ApiResponse)]
enum GetAccountResponse {
    #[oai(status = 200)]
    Ok(Json<AccountView>),
}

#[derive(ApiResponse)]
enum ListAccountsResponse {
    #[oai(status = 200)]
    Ok(Json<AccountPage>),
}

#[OpenApi(tag = "ApiTags::Accounts")]
impl AccountsApi {
    /// Open a customer account, optionally with an opening balance.
    ///
    /// Role: `bank` or `admin`.
    #[oai(path = "/accounts", method = "post", operation_id = "createAccount")]
    async fn create_account(
        &self,
        auth: ApiKey,
        body: Json<CreateAccountRequest>,
        // Declared for the spec only: `idempotency_key` reads the raw header(s).
        #[oai(name = "Idempotency-Key")] _key: Header<Option<IdempotencyKeyHeader>>,
        headers: &HeaderMap,
    ) -> Result<CreateAccountResponse, ApiError> {
        let caller = auth.require(&[Role::Bank, Role::Admin])?;
        let Json(request) = body;
        let name = request.name;
        let opening_balance = request.balance.unwrap_or(Amount::ZERO);
        let idempotency = idempotency_key(headers, caller)?.map(|key| {
            Idempotency::new(key, &[name.as_str(), &opening_balance.cents().to_string()])
        });
        let id = self
            .0
            .store
            .keys()
            .new_account_id(idempotency.as_ref().map(|idem| idem.key.as_str()));
        let new = NewAccount {
            id,
            name,
            opening_balance,
            idempotency,
            idempotency_ttl_secs: self.0.api.idempotency_ttl_secs,
        };
        let mut conn = self.0.store.conn().await?;
        let (id, replayed) =
            match accounts::create_account(&mut conn, self.0.store.keys(), &new).await {
                Ok(CreateAccountOutcome::Created(id)) => (id, None),
                Ok(CreateAccountOutcome::Replayed(id)) => (id, Some(true)),
                Err(CreateAccountError::IdempotencyConflict(id)) => {
                    let detail =
                        format!("this Idempotency-Key opened account {id} with another request");
                    return Err(ApiError::conflict("idempotency-conflict", detail));
                }
                Err(err @ CreateAccountError::BalanceLimit(_)) => {
                    return Err(ApiError::balance_limit(err));
                }
                Err(CreateAccountError::Store(err)) => return Err(err.into()),
            };
        let account = accounts::get_account(&mut conn, self.0.store.keys(), &id)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("account {id} not found")))?;
        let location = format!("{}/accounts/{id}", super::API_PREFIX);
        Ok(CreateAccountResponse::Created(
            Json(account.into()),
            location,
            replayed,
        ))
    }

    /// One account, customer or system (`@bank`, `@exchange`, `@card`, `@transit`).
    ///
    /// Role: `customer` (its own account only: any other answers 404, as a
    /// missing one does), `read`, `ops`, `bank` or `admin`.
    #[oai(path = "/accounts/:id", method = "get", operation_id = "getAccount")]
    async fn get_account(
        &self,
        auth: ApiKey,
        id: Path<AccountId>,
    ) -> Result<GetAccountResponse, ApiError> {
        let Path(id) = id;
        let not_found = || ApiError::not_found(format!("account {id} not found"));
        auth.read_account(&id, not_found)?;
        let mut conn = self.0.store.conn().await?;
        let account = accounts::get_account(&mut conn, self.0.store.keys(), &id)
            .await?
            .ok_or_else(not_found)?;
        Ok(GetAccountResponse::Ok(Json(account.into())))
    }

    /// Customer accounts in creation order, a page at a time.
    ///
    /// Role: `read`, `ops`, `bank` or `admin`.
    #[oai(path = "/accounts", method = "get", operation_id = "listAccounts")]
    async fn list_accounts(
        &self,
        auth: ApiKey,
        /// Page size (default 20, at most the configured maximum, 100 by default).
        limit: Query<Option<u32>>,
        /// `next_cursor` from the previous page.
        cursor: Query<Option<AccountId>>,
    ) -> Result<ListAccountsResponse, ApiError> {
        auth.require_reader()?;
        let limit = page_size(limit.0, &self.0.api)?;
        let after = cursor.0;
        let mut conn = self.0.store.conn().await?;
        let page =
            accounts::list_accounts(&mut conn, self.0.store.keys(), after.as_ref(), limit).await?;
        let next_cursor = (page.len() == limit).then(|| page[page.len() - 1].id.to_string());
        let items = page.into_iter().map(AccountView::from).collect();
        Ok(ListAccountsResponse::Ok(Json(AccountPage {
            items,
            next_cursor,
        })))
    }
}
