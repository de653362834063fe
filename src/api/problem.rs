//! Errors as `application/problem+json` (RFC 7807), one shape everywhere:
//! for refusals a handler returns, and for everything poem rejects before a
//! handler runs (malformed JSON, unknown routes, oversized bodies).

use poem::Response;
use poem::http::StatusCode;
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object};

pub const PROBLEM_CONTENT_TYPE: &str = "application/problem+json";

/// An RFC 7807 problem.
#[derive(Debug, Clone, Object)]
pub struct Problem {
    /// A URI reference naming the kind of problem, e.g. `/problems/insufficient-funds`.
    #[oai(rename = "type")]
    pub kind: String,
    /// A short summary of the kind of problem.
    pub title: String,
    /// The HTTP status code.
    pub status: u16,
    /// What went wrong with this request, naming the offending input.
    pub detail: String,
    /// For a refused transfer: the journaled transaction.
    #[oai(skip_serializing_if_is_none)]
    pub transaction_id: Option<String>,
    /// For a refused transfer: why, as journaled.
    #[oai(skip_serializing_if_is_none)]
    pub reason: Option<String>,
}

impl Problem {
    pub fn new(status: StatusCode, code: &str, detail: impl Into<String>) -> Self {
        Problem {
            kind: format!("/problems/{code}"),
            title: status.canonical_reason().unwrap_or("Error").to_owned(),
            status: status.as_u16(),
            detail: detail.into(),
            transaction_id: None,
            reason: None,
        }
    }
}

/// Every refusal an operation can answer with.
#[derive(Debug, ApiResponse)]
pub enum ApiError {
    /// The request is malformed: bad JSON, a wrong type, a missing field, an invalid value.
    #[oai(status = 400, content_type = "application/problem+json")]
    BadRequest(Json<Problem>),
    /// No valid API key: none, malformed, unknown, expired or revoked. Send
    /// `Authorization: Bearer <key>`.
    #[oai(status = 401, content_type = "application/problem+json")]
    Unauthorized(Json<Problem>, #[oai(header = "WWW-Authenticate")] String),
    /// The key's role does not allow this operation, or a customer key names
    /// another account as the payer; nothing was done.
    #[oai(status = 403, content_type = "application/problem+json")]
    Forbidden(Json<Problem>),
    /// The resource does not exist (or belongs to another customer).
    #[oai(status = 404, content_type = "application/problem+json")]
    NotFound(Json<Problem>),
    /// The record left Redis for the archive after its retention window
    /// (`archived`): the detail names the archive day (`tally archive find ID`).
    #[oai(status = 410, content_type = "application/problem+json")]
    Gone(Json<Problem>),
    /// The request body did not arrive within the request timeout; nothing was done.
    #[oai(status = 408, content_type = "application/problem+json")]
    BodyTimeout(Json<Problem>),
    /// The Idempotency-Key was already used for a different request.
    #[oai(status = 409, content_type = "application/problem+json")]
    Conflict(Json<Problem>),
    /// The request body is larger than the configured bound; nothing was done.
    #[oai(status = 413, content_type = "application/problem+json")]
    BodyTooLarge(Json<Problem>),
    /// A POST without `Content-Type: application/json` (bodiless ones included); nothing
    /// was done.
    #[oai(status = 415, content_type = "application/problem+json")]
    UnsupportedMediaType(Json<Problem>),
    /// The request is well formed but cannot be carried out (unknown account, insufficient funds).
    #[oai(status = 422, content_type = "application/problem+json")]
    Unprocessable(Json<Problem>),
    /// The key (or, for failed authentications, the client address) is past its rate limit
    /// (`rate-limited`: retry after `Retry-After` seconds), or too much is waiting already
    /// (`queue-full`: an account's wallet queue); nothing was done.
    #[oai(status = 429, content_type = "application/problem+json")]
    TooManyRequests(Json<Problem>, #[oai(header = "Retry-After")] Option<u64>),
    /// Something failed on our side; nothing was half done.
    #[oai(status = 500, content_type = "application/problem+json")]
    Internal(Json<Problem>),
    /// Redis refused or could not be reached (`unavailable`: nothing was written), or its
    /// answer was lost (`outcome-unknown`: it may have been applied). Retry with the same
    /// Idempotency-Key. An audit that could not read a steady journal answers `contended`.
    #[oai(status = 503, content_type = "application/problem+json")]
    Unavailable(Json<Problem>),
    /// The request took longer than the request timeout; it may have been applied. Retry with
    /// the same Idempotency-Key.
    #[oai(status = 504, content_type = "application/problem+json")]
    Timeout(Json<Problem>),
}

impl ApiError {
    pub fn bad_request(code: &str, detail: impl Into<String>) -> Self {
        ApiError::BadRequest(Json(Problem::new(StatusCode::BAD_REQUEST, code, detail)))
    }

    pub fn not_found(detail: impl Into<String>) -> Self {
        ApiError::NotFound(Json(Problem::new(
            StatusCode::NOT_FOUND,
            "not-found",
            detail,
        )))
    }

    /// 404 for a record that is not in Redis, or 410 when `archived_day`
    /// names the archive file its id leads to (see
    /// [`crate::retention::archive_day_of`]).
    pub fn missing_record(what: &str, id: &str, archived_day: Option<String>) -> Self {
        match archived_day {
            Some(day) => ApiError::Gone(Json(Problem::new(
                StatusCode::GONE,
                "archived",
                format!(
                    "{what} {id} is older than the retention window and no longer in Redis: it is in the archive of {day} (`tally archive find {id}`)"
                ),
            ))),
            None => Self::not_found(format!("{what} {id} not found")),
        }
    }

    pub fn conflict(code: &str, detail: impl Into<String>) -> Self {
        ApiError::Conflict(Json(Problem::new(StatusCode::CONFLICT, code, detail)))
    }

    pub fn too_many_requests(code: &str, detail: impl Into<String>) -> Self {
        let status = StatusCode::TOO_MANY_REQUESTS;
        ApiError::TooManyRequests(Json(Problem::new(status, code, detail)), None)
    }

    /// 401 with the challenge RFC 6750 asks for.
    pub fn unauthorized(detail: impl Into<String>) -> Self {
        let problem = Problem::new(StatusCode::UNAUTHORIZED, "unauthenticated", detail);
        ApiError::Unauthorized(Json(problem), r#"Bearer realm="tally""#.to_owned())
    }

    pub fn forbidden(code: &str, detail: impl Into<String>) -> Self {
        ApiError::Forbidden(Json(Problem::new(StatusCode::FORBIDDEN, code, detail)))
    }

    pub fn unprocessable(code: &str, detail: impl Into<String>) -> Self {
        let status = StatusCode::UNPROCESSABLE_ENTITY;
        ApiError::Unprocessable(Json(Problem::new(status, code, detail)))
    }

    /// A request that would take a balance past the largest amount the
    /// ledger keeps exact: 422 `balance-limit`. `refusal` names the account.
    pub fn balance_limit(refusal: impl std::fmt::Display) -> Self {
        let limit = crate::domain::format_units(crate::domain::BALANCE_LIMIT_CENTS, 2);
        Self::unprocessable(
            "balance-limit",
            format!("{refusal} (±{limit}); nothing was done"),
        )
    }

    /// Store failures: logged in full, answered without internals.
    pub fn from_store(err: crate::store::StoreError) -> Self {
        use crate::store::StoreError;
        tracing::error!(error = %err, "store failure");
        if err.outcome_unknown() {
            // The script may have run with only its reply lost: the key is
            // what makes the retry safe.
            return ApiError::Unavailable(Json(Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "outcome-unknown",
                "the ledger store did not answer, so the request may have been applied; \
                 retry with the same Idempotency-Key (a retry without one may apply it twice)",
            )));
        }
        match err {
            StoreError::Connect(_)
            | StoreError::Pool(_)
            | StoreError::Redis(_)
            | StoreError::GroupFailed { .. } => ApiError::Unavailable(Json(Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "the ledger store is unavailable; retry with the same Idempotency-Key",
            ))),
            StoreError::Contended(detail) => ApiError::Unavailable(Json(Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "contended",
                format!("{detail}; nothing was written, run it again"),
            ))),
            StoreError::Corrupt { .. } | StoreError::UnexpectedReply(_) => {
                ApiError::Internal(Json(Problem::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "an internal error occurred",
                )))
            }
        }
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(err: crate::store::StoreError) -> Self {
        ApiError::from_store(err)
    }
}

/// Turns any error that escaped the handlers into a problem response. Errors
/// that already carry a problem response (our `ApiError`s) pass unchanged.
pub async fn into_problem_response(err: poem::Error) -> Response {
    if err.is_from_response() {
        return err.into_response();
    }
    let status = err.status();
    // A parameter the spec bounds (a pattern, a page size) names itself:
    // `invalid-limit`, `invalid-idempotency-key`. Every path parameter is an
    // id, and poem knows them only by position (`param0`).
    if let Some(parse) = err.downcast_ref::<poem_openapi::error::ParseParamError>() {
        let code = format!(
            "invalid-{}",
            parse.name.to_ascii_lowercase().replace('_', "-")
        );
        return problem_response(Problem::new(status, &code, err.to_string()));
    }
    if let Some(parse) = err.downcast_ref::<poem_openapi::error::ParsePathError>() {
        let detail = format!("an id in the path: {}", parse.reason);
        return problem_response(Problem::new(status, "invalid-id", detail));
    }
    let code = match status {
        StatusCode::BAD_REQUEST => "bad-request",
        StatusCode::NOT_FOUND => "not-found",
        StatusCode::METHOD_NOT_ALLOWED => "method-not-allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "body-too-large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported-media-type",
        StatusCode::GATEWAY_TIMEOUT => "timeout",
        _ if status.is_server_error() => "internal",
        _ => "error",
    };
    let detail = if status.is_server_error() {
        tracing::error!(error = %err, "request failed");
        "an internal error occurred".to_owned()
    } else {
        err.to_string()
    };
    problem_response(Problem::new(status, code, detail))
}

pub fn problem_response(problem: Problem) -> Response {
    let status = StatusCode::from_u16(problem.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    use poem_openapi::types::ToJSON;
    Response::builder()
        .status(status)
        .content_type(PROBLEM_CONTENT_TYPE)
        .body(problem.to_json_string())
}
