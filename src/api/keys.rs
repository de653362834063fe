//! `/keys`: API key management, for `admin` keys. The same as `tally keys`,
//! which works straight against Redis (that is how the first admin key is made).

use std::sync::Arc;
use std::time::Duration;

use poem_openapi::param::{Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object, OpenApi};

use super::access::ApiKey;
use super::problem::ApiError;
use super::schema::{CustomerAccountId, Label, Text};
use super::{ApiTags, AppState, list_offset, page_size, rfc3339};
use crate::access::{IssueError, KeyId, KeyRequest, Role, issue_key};
use crate::store::api_keys::{self, KeyRecord};
use crate::store::now_ms;

pub struct KeysApi(pub Arc<AppState>);

#[derive(Debug, Object)]
#[oai(deny_unknown_fields)]
struct NewKeyRequest {
    role: Role,
    /// For a `customer` key (and only for one, else 422): the account it is
    /// bound to.
    account_id: Option<CustomerAccountId>,
    /// Seconds until the key stops working, up to about 10 years (default: never).
    #[oai(validator(minimum(value = "1"), maximum(value = "316224000")))]
    expires_in_secs: Option<u64>,
    /// What the key is for, shown in listings.
    label: Option<Text<Label>>,
    /// The key's own limit on reads per second (default: the server's).
    #[oai(validator(minimum(value = "1"), maximum(value = "1000000")))]
    reads_per_s: Option<u32>,
    /// The key's own limit on writes per second (default: the server's).
    #[oai(validator(minimum(value = "1"), maximum(value = "1000000")))]
    writes_per_s: Option<u32>,
}

// The bounds above, as `issue_key` checks them too.
const _: () = assert!(crate::access::KEY_LIFETIME_MAX.as_secs() == 316_224_000);

#[derive(Debug, Object)]
struct KeyView {
    /// Names the key in logs and listings; not secret.
    id: String,
    role: String,
    /// The account a `customer` key is bound to.
    #[oai(skip_serializing_if_is_none)]
    account_id: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    label: Option<String>,
    created_at: String,
    #[oai(skip_serializing_if_is_none)]
    expires_at: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    revoked_at: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    reads_per_s: Option<u32>,
    #[oai(skip_serializing_if_is_none)]
    writes_per_s: Option<u32>,
}

impl From<KeyRecord> for KeyView {
    fn from(record: KeyRecord) -> Self {
        KeyView {
            id: record.id.to_string(),
            role: record.role.to_string(),
            account_id: record.account.map(|account| account.to_string()),
            label: record.label,
            created_at: rfc3339(record.created_at_ms),
            expires_at: record.expires_at_ms.map(rfc3339),
            revoked_at: record.revoked_at_ms.map(rfc3339),
            reads_per_s: record.reads_per_s,
            writes_per_s: record.writes_per_s,
        }
    }
}

#[derive(Debug, Object)]
struct CreatedKey {
    /// The key to send as `Authorization: Bearer <key>`. Shown this once:
    /// tally keeps only a keyed hash of its secret.
    key: String,
    #[oai(flatten)]
    record: KeyView,
}

#[derive(ApiResponse)]
enum CreatedKeyResponse {
    /// The key is made; `key` is its only copy.
    #[oai(status = 201)]
    Created(Json<CreatedKey>),
}

#[derive(Debug, Object)]
struct KeyPage {
    items: Vec<KeyView>,
    /// Pass as `offset` for the next page; absent on the last page.
    #[oai(skip_serializing_if_is_none)]
    next_offset: Option<u64>,
}

#[derive(ApiResponse)]
enum KeyPageResponse {
    #[oai(status = 200)]
    Ok(Json<KeyPage>),
}

#[derive(ApiResponse)]
enum KeyResponse {
    #[oai(status = 200)]
    Ok(Json<KeyView>),
}

#[OpenApi(tag = "ApiTags::Keys")]
impl KeysApi {
    /// Make an API key. The answer holds the key itself, once.
    ///
    /// Role: `admin` (no key can make a key broader than its own).
    #[oai(path = "/keys", method = "post", operation_id = "createKey")]
    async fn create(
        &self,
        auth: ApiKey,
        body: Json<NewKeyRequest>,
    ) -> Result<CreatedKeyResponse, ApiError> {
        let caller = auth.require(&[Role::Admin])?;
        let Json(request) = body;
        let role = request.role;
        if !caller.role.covers(role) {
            let detail = format!("a {} key cannot make a {role} key", caller.role);
            return Err(ApiError::forbidden("forbidden", detail));
        }
        let request = KeyRequest {
            role,
            account: request.account_id.map(|account| account.0),
            expires_in: request.expires_in_secs.map(Duration::from_secs),
            label: request.label.map(Text::into_inner),
            reads_per_s: request.reads_per_s,
            writes_per_s: request.writes_per_s,
        };
        let (generated, record) = issue_key(&self.0.store, self.0.access.pepper(), request)
            .await
            .map_err(|err| match err {
                // What is left once the body parsed: the role and the
                // account must go together, a rule the schema cannot state.
                IssueError::Invalid(detail) => {
                    ApiError::unprocessable("invalid-key-request", detail)
                }
                err @ IssueError::AccountNotFound(_) => {
                    ApiError::unprocessable("account-not-found", err.to_string())
                }
                IssueError::Store(err) => err.into(),
            })?;
        tracing::info!(key_id = %record.id, role = %record.role, by = %caller.key_id, "API key created over HTTP");
        Ok(CreatedKeyResponse::Created(Json(CreatedKey {
            key: generated.plaintext,
            record: record.into(),
        })))
    }

    /// Every API key, oldest first (never their secrets).
    ///
    /// Role: `admin`.
    #[oai(path = "/keys", method = "get", operation_id = "listKeys")]
    async fn list(
        &self,
        auth: ApiKey,
        /// Page size (default 20, at most the configured maximum).
        limit: Query<Option<u32>>,
        /// `next_offset` from the previous page (at most 1,000,000).
        offset: Query<Option<u64>>,
    ) -> Result<KeyPageResponse, ApiError> {
        auth.require(&[Role::Admin])?;
        let limit = page_size(limit.0, &self.0.api)?;
        let offset = list_offset(offset.0)?;
        let mut conn = self.0.store.conn().await?;
        let records =
            api_keys::list_api_keys(&mut conn, self.0.store.keys(), offset as usize, limit).await?;
        let next_offset = (records.len() == limit).then_some(offset + limit as u64);
        Ok(KeyPageResponse::Ok(Json(KeyPage {
            items: records.into_iter().map(KeyView::from).collect(),
            next_offset,
        })))
    }

    /// Revoke a key: every API process refuses it within a second. Revoking
    /// one twice answers as the first time did. The key making the request
    /// cannot revoke itself (409 `own-key`).
    ///
    /// Role: `admin`.
    #[oai(path = "/keys/:id", method = "delete", operation_id = "revokeKey")]
    async fn revoke(&self, auth: ApiKey, id: Path<KeyId>) -> Result<KeyResponse, ApiError> {
        let caller = auth.require(&[Role::Admin])?;
        let Path(id) = id;
        // Over HTTP a key cannot lock its holder out: the last admin key
        // would take the API with it. `tally keys revoke` can.
        if id == caller.key_id {
            return Err(ApiError::conflict(
                "own-key",
                "a key cannot revoke itself; use another admin key or `tally keys revoke`",
            ));
        }
        let not_found = || ApiError::not_found(format!("key {id} not found"));
        let mut conn = self.0.store.conn().await?;
        api_keys::revoke_api_key(&mut conn, self.0.store.keys(), &id, now_ms())
            .await?
            .ok_or_else(not_found)?;
        tracing::info!(key_id = %id, by = %caller.key_id, "API key revoked");
        let record = api_keys::get_api_key(&mut conn, self.0.store.keys(), &id)
            .await?
            .ok_or_else(not_found)?;
        Ok(KeyResponse::Ok(Json(record.into())))
    }
}
