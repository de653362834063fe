//! The HTTP API: poem + poem-openapi under `/api/v1`, Swagger UI at `/docs`,
//! the spec at `/openapi.yaml`, `/health` and `/ready`.

pub mod access;
mod accounts;
mod advances;
mod cors;
mod health;
mod json_body;
mod keys;
mod methods;
pub(crate) mod metrics;
mod orders;
pub mod problem;
mod report;
mod schema;
mod spec;
mod transfers;
mod wallet;

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use poem::http::header::{CACHE_CONTROL, CONTENT_TYPE, X_CONTENT_TYPE_OPTIONS};
use poem::http::{HeaderMap, Method, StatusCode};
use poem::middleware::SetHeader;
use poem::{Endpoint, EndpointExt, IntoEndpoint, Request, Response, Route};
use poem_openapi::{OpenApiService, Tags};

use crate::config::{ApiSettings, LedgerSettings};
use crate::domain::IdempotencyKey;
use crate::store::Store;
use poem::IntoResponse;
use problem::{ApiError, Problem};

pub const API_PREFIX: &str = "/api/v1";

/// What every handler shares.
pub struct AppState {
    pub store: Store,
    /// Groups concurrent orders into one script call.
    pub orders: crate::orders::OrderGrouper,
    pub ledger: LedgerSettings,
    pub api: ApiSettings,
    /// Checks API keys and rate limits.
    pub access: crate::access::Authenticator,
    /// Set with `TALLY_REPLICA_ACKS`: what a write waits for before its answer.
    pub replica_acks: Option<crate::store::replica_acks::ReplicaAcks>,
}

#[derive(Tags)]
enum ApiTags {
    /// Customer and system accounts.
    Accounts,
    /// Crypto purchase orders, pending buckets and settlement batches.
    Orders,
    /// Transfers between accounts, and bank transactions against @bank.
    Transfers,
    /// The journal, newest first, paged inside a snapshot.
    Report,
    /// API keys: make, list, revoke (admin keys only).
    Keys,
}

type Apis = (
    accounts::AccountsApi,
    orders::OrdersApi,
    transfers::TransfersApi,
    report::ReportApi,
    wallet::WalletApi,
    advances::AdvancesApi,
    keys::KeysApi,
);

fn service(state: Arc<AppState>) -> OpenApiService<Apis, ()> {
    OpenApiService::new(
        (
            accounts::AccountsApi(state.clone()),
            orders::OrdersApi(state.clone()),
            transfers::TransfersApi(state.clone()),
            report::ReportApi(state.clone()),
            wallet::WalletApi(state.clone()),
            advances::AdvancesApi(state.clone()),
            keys::KeysApi(state),
        ),
        "tally",
        env!("CARGO_PKG_VERSION"),
    )
    .description(
        "A Redis-native ledger and settlement service. Amounts are decimal strings in USD \
         (a JSON number is read exactly, too); every POST that moves money takes an optional \
         Idempotency-Key header (scoped to the API key). Every operation needs an API key, \
         `Authorization: Bearer tally_<role>_<id>_<secret>`; each says which roles may call \
         it.\n\n\
         Every error is `application/problem+json`. 400 means the request breaks this \
         document (a pattern, a bound, an unknown field); 422 means it keeps to it but the \
         ledger refuses it (an unknown account, insufficient funds, a rule between fields \
         such as `src_account_id` = `dst_account_id`). A method a path does not have \
         answers 405 with `Allow`. A POST with a body must send it as \
         `Content-Type: application/json` (415 otherwise).",
    )
    .server(API_PREFIX)
}

/// The OpenAPI spec as YAML, exactly as `/openapi.yaml` serves it with the
/// default settings.
pub fn spec_yaml() -> String {
    let store = Store::unconnected();
    let access = crate::config::AccessSettings {
        api_key_pepper: Some(crate::access::Pepper::generate_text()),
        ..crate::config::AccessSettings::default()
    };
    let state = Arc::new(AppState {
        orders: crate::orders::OrderGrouper::new(store.clone()),
        access: crate::access::Authenticator::new(store.clone(), access)
            .expect("a generated pepper is long enough"),
        store,
        ledger: LedgerSettings::default(),
        api: ApiSettings::default(),
        replica_acks: None,
    });
    spec::Spec::refine(&service(state.clone()).spec(), &state.api).yaml()
}

/// The whole HTTP application.
pub fn app(state: Arc<AppState>) -> impl Endpoint<Output = Response> {
    let body_size_max_bytes = state.api.body_size_max_bytes;
    let request_timeout = Duration::from_millis(state.api.request_timeout_ms);
    let cors_allowed_origins = state.api.cors_allowed_origins.clone();
    let api = service(state.clone());
    let poem_json = api.spec();
    let published = spec::Spec::refine(&poem_json, &state.api);
    // Swagger UI embeds the document it is given: give it the published one.
    let docs_html = api.swagger_ui_html().replace(&poem_json, &published.json());
    let docs = poem::endpoint::make_sync(move |_| poem::web::Html(docs_html.clone()));
    let spec_text = published.yaml();
    let spec = poem::endpoint::make_sync(move |_| {
        Response::builder()
            .content_type("application/x-yaml")
            .header("Content-Disposition", "inline; filename=\"openapi.yaml\"")
            .body(spec_text.clone())
    });
    let http_metrics = metrics::HttpMetrics::shared();
    let access_state = state.clone();
    let acks_state = state.clone();
    // Every route but the API's goes through `method_table`, which notes the
    // methods it takes for the `Allow` header of a 405.
    let mut method_table = methods::MethodTable::from_openapi::<Apis>(API_PREFIX);
    let routes = Route::new().nest(API_PREFIX, api);
    let routes = method_table.get_nest(routes, "/docs", docs);
    let routes = method_table.get_at(routes, "/openapi.yaml", spec);
    let routes = method_table.get_at(routes, "/health", health::health);
    let metrics_endpoint = metrics::metrics
        .data(state.clone())
        .data(http_metrics.clone());
    let routes = method_table.get_at(routes, "/metrics", metrics_endpoint);
    let console = crate::console::Console::new(state.clone());
    if tokio::runtime::Handle::try_current().is_ok() {
        console.overview.start_sampling();
    }
    let routes = method_table.nest_get_post(routes, "/ops", crate::console::routes(console));
    let routes = method_table.get_at(routes, "/ready", health::ready.data(state));
    let method_table = Arc::new(method_table);
    let routes = routes
        .around(move |endpoint, request| {
            let bounds = (body_size_max_bytes, request_timeout);
            guard(endpoint, request, bounds, acks_state.clone())
        })
        // Outside the guard: a method the path does not take is answered
        // 405 whatever the body; inside authentication, which comes first.
        .around(move |endpoint, request| {
            methods::refuse_other_methods(endpoint, request, method_table.clone())
        })
        // Outside the guard: a stranger is refused before any body is read.
        // Inside CORS: a browser's preflight carries no key.
        .around(move |endpoint, request| {
            access::authenticate(endpoint, request, access_state.clone())
        })
        // Inside the CORS layer too: poem's `Cors` would answer an error
        // with poem's plain text rather than problem+json.
        .catch_all_error(problem::into_problem_response);
    cors::CorsForListedOrigins::new(routes, &cors_allowed_origins)
        .catch_all_error(problem::into_problem_response)
        .map_to_response()
        // On every answer, refusals and preflights included, so outermost:
        // no browser guesses a type other than the one sent (a problem body
        // echoing input is never run as HTML), and nothing about money is
        // kept by a cache between the client and us.
        .with(
            SetHeader::new()
                .overriding(X_CONTENT_TYPE_OPTIONS, "nosniff")
                .overriding(CACHE_CONTROL, "no-store"),
        )
        .with(metrics::RecordRequests(http_metrics))
        .into_endpoint()
}

/// With `TALLY_REPLICA_ACKS`, a request that may have written (any method
/// but GET, HEAD and OPTIONS) and succeeded is answered only once the
/// replicas have its writes; if they do not confirm in time, it answers 503
/// `replica-ack-timeout`: the change is made on the primary, and would be
/// lost only if the primary failed before a replica got it.
async fn wait_for_replicas<E: Endpoint>(
    endpoint: Arc<E>,
    request: Request,
    state: Arc<AppState>,
) -> poem::Result<Response> {
    let writes = !matches!(
        *request.method(),
        poem::http::Method::GET | poem::http::Method::HEAD | poem::http::Method::OPTIONS
    );
    let response = endpoint.call(request).await?.into_response();
    let Some(acks) = state.replica_acks.as_ref().filter(|_| writes) else {
        return Ok(response);
    };
    if !response.status().is_success() {
        return Ok(response);
    }
    match acks.wait().await {
        Ok(()) => Ok(response),
        Err(err) => {
            tracing::warn!(error = %err, "a write was not confirmed by its replicas in time");
            Ok(problem::problem_response(problem::Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "replica-ack-timeout",
                format!(
                    "the request was applied on the primary, but {err}: it would be lost if the \
                     primary failed now; retry with the same Idempotency-Key to learn when it is safe"
                ),
            )))
        }
    }
}

/// Bounds every request: its body is read up to `body_size_max_bytes` (413
/// beyond, whether or not it announced its length) and it must finish within
/// `request_timeout`, reading the body included (408 when the body is what
/// is late, 504 when the handler is). A POST must say its body is JSON (415
/// otherwise), and a JSON body must name each key of an object once (400
/// `duplicate-key`) and hold no null (400 `null-value`). Each refusal writes
/// nothing.
///
/// The request timeout bounds the wait for replicas too ([`wait_for_replicas`]).
async fn guard<E: Endpoint>(
    endpoint: Arc<E>,
    mut request: Request,
    (body_size_max_bytes, request_timeout): (usize, Duration),
    state: Arc<AppState>,
) -> poem::Result<Response> {
    let deadline = tokio::time::Instant::now() + request_timeout;
    let read = tokio::time::timeout_at(
        deadline,
        read_body(request.take_body(), body_size_max_bytes),
    );
    let Ok(read) = read.await else {
        // A client that announces a body and sends it slowly (or never)
        // would otherwise hold the connection and its task open unbounded.
        let detail = format!(
            "the request body did not arrive within {} ms",
            request_timeout.as_millis()
        );
        let problem = Problem::new(StatusCode::REQUEST_TIMEOUT, "body-timeout", detail);
        return Ok(ApiError::BodyTimeout(poem_openapi::payload::Json(problem)).into_response());
    };
    let body = match read? {
        Some(body) => body,
        None => {
            let detail = format!("the request body is larger than {body_size_max_bytes} bytes");
            let problem = Problem::new(StatusCode::PAYLOAD_TOO_LARGE, "body-too-large", detail);
            return Ok(ApiError::BodyTooLarge(poem_openapi::payload::Json(problem)).into_response());
        }
    };
    // Checked once the body is read, so that a client still sending gets
    // the answer rather than a reset connection.
    if let Err(refusal) = check_json_body(&request, &body) {
        return Ok(refusal.into_response());
    }
    request.set_body(body);
    match tokio::time::timeout_at(deadline, wait_for_replicas(endpoint, request, state)).await {
        Ok(result) => result,
        Err(_) => Ok(ApiError::Timeout(poem_openapi::payload::Json(Problem::new(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout",
            "the request took too long; retry with the same Idempotency-Key",
        )))
        .into_response()),
    }
}

/// Refuses a POST whose body is not declared JSON, and a JSON body that
/// repeats a key or holds a null.
///
/// A form post or a `text/plain` one is a "simple" request that any web page
/// can make a browser send cross-site without a preflight; a JSON one needs
/// the preflight that CORS then refuses. A bodiless POST (`/batches/{id}/retry`)
/// has no type to declare, and cannot carry a key cross-site: the key travels
/// in `Authorization`, which no simple request may set.
fn check_json_body(request: &Request, body: &[u8]) -> Result<(), ApiError> {
    // The console takes forms, and checks a CSRF token on each instead.
    if crate::console::serves(request.uri().path()) {
        return Ok(());
    }
    let is_json = is_json_content_type(request.headers());
    if request.method() == Method::POST && !is_json && !body.is_empty() {
        let sent = match request.headers().get(CONTENT_TYPE) {
            Some(value) => format!(
                "`{}`",
                String::from_utf8_lossy(value.as_bytes())
                    .chars()
                    .take(CONTENT_TYPE_ECHO_MAX_CHARS)
                    .collect::<String>()
            ),
            None => "none".to_owned(),
        };
        return Err(ApiError::UnsupportedMediaType(poem_openapi::payload::Json(
            Problem::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                format!(
                    "a POST body must be sent as Content-Type: application/json (sent: {sent})"
                ),
            ),
        )));
    }
    if is_json && !body.is_empty() {
        match json_body::check(body) {
            Some(json_body::Finding::DuplicateKey(key)) => {
                let detail = format!("the key `{key}` appears twice in one object");
                return Err(ApiError::bad_request("duplicate-key", detail));
            }
            Some(json_body::Finding::Null(key)) => {
                let at = key.map_or_else(|| "the body".to_owned(), |key| format!("`{key}`"));
                let detail = format!(
                    "{at} is null: no field takes null; leave an optional field out instead"
                );
                return Err(ApiError::bad_request("null-value", detail));
            }
            None => {}
        }
    }
    Ok(())
}

/// How much of a refused Content-Type the 415 repeats.
const CONTENT_TYPE_ECHO_MAX_CHARS: usize = 64;

/// Exactly one `Content-Type`, `application/json` in any case, with any
/// parameters (`; charset=utf-8`).
fn is_json_content_type(headers: &HeaderMap) -> bool {
    let mut values = headers.get_all(CONTENT_TYPE).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return false;
    };
    let Ok(text) = value.to_str() else {
        return false;
    };
    let essence = text.split(';').next().unwrap_or_default().trim();
    essence.eq_ignore_ascii_case("application/json")
}

/// How much of an oversized body is still read (and dropped) before the 413,
/// so the client, still sending, gets the answer rather than a reset
/// connection. Past this the connection is simply closed.
pub const BODY_DRAIN_MAX_BYTES: usize = 1024 * 1024;

/// The body, or `None` when it is larger than `size_max_bytes`.
async fn read_body(body: poem::Body, size_max_bytes: usize) -> poem::Result<Option<Vec<u8>>> {
    use futures::StreamExt;
    let mut chunks = std::pin::pin!(body.into_bytes_stream());
    let mut kept = Vec::new();
    let mut seen = 0usize;
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(|err| poem::Error::new(err, StatusCode::BAD_REQUEST))?;
        seen += chunk.len();
        if seen <= size_max_bytes {
            kept.extend_from_slice(&chunk);
        } else if seen > size_max_bytes + BODY_DRAIN_MAX_BYTES {
            break;
        }
    }
    Ok((seen <= size_max_bytes).then_some(kept))
}

/// RFC 3339 UTC with milliseconds, from ms since the Unix epoch.
fn rfc3339(ms: i64) -> String {
    let at = UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_millis(at).to_string()
}

/// The header that makes a POST that moves money safe to retry.
pub const IDEMPOTENCY_KEY_HEADER: &str = "Idempotency-Key";

/// Parses the optional `Idempotency-Key` header from the raw headers. The
/// handlers still declare it as `Header<Option<String>>` for the spec, but
/// poem-openapi drops a value that is not visible ASCII and takes the first
/// of several: either would turn a retry into a second charge.
/// The key is scoped by the caller's API key.
fn idempotency_key(
    headers: &HeaderMap,
    caller: &crate::access::Caller,
) -> Result<Option<IdempotencyKey>, ApiError> {
    let refuse = |detail: String| ApiError::bad_request("invalid-idempotency-key", detail);
    let mut values = headers.get_all(IDEMPOTENCY_KEY_HEADER).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(refuse(format!(
            "send at most one {IDEMPOTENCY_KEY_HEADER} header"
        )));
    }
    // Lossy: any byte that is not ASCII becomes U+FFFD, which parse refuses.
    let text = String::from_utf8_lossy(value.as_bytes());
    IdempotencyKey::parse(&text)
        .map(|key| Some(key.scoped(caller.key_id.as_str())))
        .map_err(|err| refuse(err.to_string()))
}

/// Checks a requested page size against the configured bounds.
/// Highest `offset` accepted by the listings that page by offset: far more
/// items than anyone pages through, and small enough that `offset + limit`
/// cannot overflow on the way to Redis.
pub const LIST_OFFSET_MAX: u64 = 1_000_000;

/// The `offset` of a listing, or 400 past [`LIST_OFFSET_MAX`].
fn list_offset(requested: Option<u64>) -> Result<u64, ApiError> {
    let offset = requested.unwrap_or(0);
    if offset > LIST_OFFSET_MAX {
        let detail = format!("offset must be at most {LIST_OFFSET_MAX}");
        return Err(ApiError::bad_request("invalid-offset", detail));
    }
    Ok(offset)
}

fn page_size(requested: Option<u32>, settings: &ApiSettings) -> Result<usize, ApiError> {
    let size = requested.map_or(settings.page_size, |size| size as usize);
    if size == 0 || size > settings.page_size_max {
        let detail = format!("limit must be between 1 and {}", settings.page_size_max);
        return Err(ApiError::bad_request("invalid-limit", detail));
    }
    Ok(size)
}
