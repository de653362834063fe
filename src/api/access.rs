//! Authentication and authorization at the HTTP edge.
//!
//! The [`authenticate`] middleware runs before anything reads the body: it
//! checks the bearer key, spends a rate-limit token, and hands the handlers
//! a [`Caller`] in the request's extensions. Every operation takes an
//! [`ApiKey`] (which declares the bearer scheme in the spec, so Swagger UI's
//! Authorize button works) and checks the role it needs.

use std::sync::Arc;

use poem::http::{HeaderMap, Method};
use poem::{Endpoint, IntoResponse, Request, Response};
use poem_openapi::SecurityScheme;
use poem_openapi::auth::Bearer;

use super::AppState;
use super::problem::ApiError;
use crate::access::{Caller, Denied, KeyId, RequestClass, Role};
use crate::domain::AccountId;

/// The bearer key every `/api/v1` operation needs.
#[derive(SecurityScheme)]
#[oai(
    rename = "apiKey",
    ty = "bearer",
    bearer_format = "tally_<role>_<id>_<secret>",
    checker = "checked_caller"
)]
pub struct ApiKey(pub Caller);

/// The middleware has already checked the key; this only hands it over.
async fn checked_caller(request: &Request, _bearer: Bearer) -> Option<Caller> {
    request.extensions().get::<Caller>().cloned()
}

/// The roles that read every account.
const READERS: [Role; 4] = [Role::Read, Role::Ops, Role::Bank, Role::Admin];

fn role_list(roles: &[Role]) -> String {
    roles
        .iter()
        .map(|role| role.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

impl ApiKey {
    /// 403 unless the key's role is one of `roles`.
    pub fn require(&self, roles: &[Role]) -> Result<&Caller, ApiError> {
        if roles.contains(&self.0.role) {
            return Ok(&self.0);
        }
        let detail = format!(
            "this operation needs a key with one of the roles {}; this key's role is {}",
            role_list(roles),
            self.0.role
        );
        Err(ApiError::forbidden("forbidden", detail))
    }

    /// 403 unless the key reads every account (bank, read, ops, admin).
    pub fn require_reader(&self) -> Result<&Caller, ApiError> {
        self.require(&READERS)
    }

    /// 403 unless the key reads every account or is a customer's (which
    /// then sees only its own: [`ApiKey::read_account`]).
    pub fn require_reader_or_customer(&self) -> Result<&Caller, ApiError> {
        self.require(&[
            Role::Customer,
            Role::Read,
            Role::Ops,
            Role::Bank,
            Role::Admin,
        ])
    }

    /// Readers see every account; a customer key only its own, and for any
    /// other gets `not_found`: the answer a missing account gets, so a key
    /// cannot probe which accounts exist.
    pub fn read_account(
        &self,
        account: &AccountId,
        not_found: impl FnOnce() -> ApiError,
    ) -> Result<(), ApiError> {
        self.require_reader_or_customer()?;
        if self.0.may_read_account(account) {
            Ok(())
        } else {
            Err(not_found())
        }
    }

    /// For operations a customer sends as the payer: the paying account must
    /// be the key's own. The answer depends only on the key, so it tells
    /// nothing about the other account.
    pub fn pay_from(&self, payer: &AccountId, others: &[Role]) -> Result<(), ApiError> {
        if self.0.role == Role::Customer {
            if self.0.owns(payer) {
                return Ok(());
            }
            let detail = format!(
                "a customer key may only pay from its own account ({})",
                self.0.account.as_ref().map_or("none", AccountId::as_str)
            );
            return Err(ApiError::forbidden("not-the-payer", detail));
        }
        self.require(others).map(|_| ())
    }
}

/// What anyone may fetch without a key: liveness, readiness, the spec and
/// Swagger UI. Everything else needs one, unknown paths included (default
/// deny: a route added later is not open by mistake).
/// The console (`/ops`) checks its own sessions and keys.
fn is_open(path: &str) -> bool {
    matches!(path, "/health" | "/ready" | "/openapi.yaml" | "/docs")
        || path.starts_with("/docs/")
        || crate::console::serves(path)
}

/// Checks the bearer key and the caller's rate limit, then runs `endpoint`
/// with the [`Caller`] in the request's extensions.
pub async fn authenticate<E: Endpoint>(
    endpoint: Arc<E>,
    mut request: Request,
    state: Arc<AppState>,
) -> poem::Result<Response> {
    if is_open(request.uri().path()) {
        return endpoint
            .call(request)
            .await
            .map(IntoResponse::into_response);
    }
    let access = &state.access;
    if !access.settings().authentication {
        // Only `tally bench` builds an app like this, to measure the cost.
        request.extensions_mut().insert(Caller {
            key_id: KeyId::parse(&"0".repeat(32)).expect("a well-formed id"),
            role: Role::Admin,
            account: None,
        });
        return endpoint
            .call(request)
            .await
            .map(IntoResponse::into_response);
    }
    let class = match *request.method() {
        Method::GET | Method::HEAD => RequestClass::Read,
        _ => RequestClass::Write,
    };
    let client = request
        .remote_addr()
        .as_socket_addr()
        .map_or_else(|| "unknown".to_owned(), |address| address.ip().to_string());
    let allow_stale = request.uri().path() == "/metrics";
    let address_refused = access.failures_refused(&client);
    let admitted = match bearer_token(request.headers()) {
        Ok(token) => {
            access
                .admit(token, class, allow_stale, address_refused)
                .await
        }
        Err(detail) => Err(Denied::Unauthenticated(detail)),
    };
    let caller = match admitted {
        Ok(caller) => caller,
        Err(Denied::Unauthenticated(_)) if address_refused.is_some() => {
            let denied = Denied::RateLimited {
                retry_after: address_refused.unwrap_or_default(),
            };
            return Ok(refusal(denied, TOO_MANY_FAILURES).into_response());
        }
        Err(Denied::Unauthenticated(detail)) => {
            return Ok(match access.note_failure(&client).await {
                Ok(()) => ApiError::unauthorized(detail).into_response(),
                Err(denied) => refusal(denied, TOO_MANY_FAILURES).into_response(),
            });
        }
        Err(denied) => {
            return Ok(refusal(denied, "this key is past its rate limit").into_response());
        }
    };
    request.extensions_mut().insert(caller);
    endpoint
        .call(request)
        .await
        .map(IntoResponse::into_response)
}

const TOO_MANY_FAILURES: &str = "too many failed authentications from this address";

fn refusal(denied: Denied, rate_limited: &str) -> ApiError {
    match denied {
        Denied::Unauthenticated(detail) => ApiError::unauthorized(detail),
        Denied::RateLimited { retry_after } => {
            let seconds = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
            let mut error = ApiError::too_many_requests(
                "rate-limited",
                format!("{rate_limited}; retry after {} s", seconds.max(1)),
            );
            if let ApiError::TooManyRequests(_, retry) = &mut error {
                *retry = Some(seconds.max(1));
            }
            error
        }
        Denied::Store(err) => err.into(),
    }
}

/// The token of the one `Authorization: Bearer` header, or why there is none.
fn bearer_token(headers: &HeaderMap) -> Result<&str, &'static str> {
    let mut values = headers.get_all(poem::http::header::AUTHORIZATION).iter();
    let value = values
        .next()
        .ok_or("send an API key: Authorization: Bearer <key>")?;
    if values.next().is_some() {
        return Err("send one Authorization header");
    }
    let value = value
        .to_str()
        .map_err(|_| "the Authorization header is not visible ASCII")?;
    let (scheme, token) = value
        .split_once(' ')
        .ok_or("the Authorization header must be `Bearer <key>`")?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err("the Authorization header must be `Bearer <key>`");
    }
    Ok(token)
}
