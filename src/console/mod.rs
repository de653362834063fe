//! `/ops`: the operator's console, served by `tally serve`.
//!
//! HTML rendered on the server from compile-time checked templates
//! (askama, `src/console/templates`), with its stylesheet and one small
//! script embedded in the binary. Every page works without JavaScript; with
//! it, the overview's figures refresh in place at an interval the operator
//! sets or pauses.
//!
//! # Access
//!
//! Viewing needs an operator key (`read`, `ops` or `admin`); acting, `ops` or
//! `admin`. A browser signs in once with its key and gets a session cookie
//! (`HttpOnly`, `SameSite=Strict`, `Path=/ops`); the session lives in Redis
//! under the SHA-256 of its token and stands for the key, which is checked
//! again on every request (revoking the key ends its sessions). Every form
//! that acts carries the session's CSRF token. Scripts may send
//! `Authorization: Bearer <key>` instead, with no session and no CSRF token.
//!
//! # Layout
//!
//! - `auth`: sign-in, sessions, the guard every request passes.
//! - `overview`, `batches`, `dead_letters`, `log`: the pages and
//!   the forms that act; `pages`, what they share.
//! - `records`: an account's page, and find by exact id.
//! - [`snapshot`]: the overview's figures, one Redis read shared by every
//!   browser.
//! - `charts`: the flow charts, as SVG drawn on the server.

mod auth;
mod batches;
mod charts;
mod dead_letters;
mod log;
mod overview;
mod pages;
mod records;
pub mod snapshot;

use std::sync::Arc;
use std::time::Duration;

use poem::http::header;
use poem::middleware::SetHeader;
use poem::{Endpoint, EndpointExt, Route, get, post};

use crate::api::AppState;

/// Where the console is served.
pub const CONSOLE_PREFIX: &str = "/ops";

/// Whether the console serves `path` (it authenticates its requests itself).
pub fn serves(path: &str) -> bool {
    path == CONSOLE_PREFIX
        || path
            .strip_prefix(CONSOLE_PREFIX)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// What every console request shares.
pub struct Console {
    pub state: Arc<AppState>,
    pub overview: Arc<snapshot::SharedOverview>,
}

impl Console {
    pub fn new(state: Arc<AppState>) -> Arc<Self> {
        let symbols = state
            .ledger
            .prices
            .iter()
            .map(|(symbol, _)| symbol.clone())
            .collect();
        let overview = snapshot::SharedOverview::new(
            state.store.clone(),
            symbols,
            Duration::from_millis(state.api.console.snapshot_ms),
        );
        Arc::new(Console { state, overview })
    }
}

/// The stylesheet and the script, embedded.
const CONSOLE_CSS: &str = include_str!("assets/console.css");
const CONSOLE_JS: &str = include_str!("assets/console.js");

/// What a console page may load and where its forms may go: its own
/// assets only, no frames (so no page can overlay its buttons).
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; style-src 'self'; script-src 'self'; \
     img-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// The console's routes, to be nested at `/ops`, and the paths they take.
pub fn routes(console: Arc<Console>) -> impl Endpoint {
    let asset = |body: &'static str, content_type: &'static str| {
        poem::endpoint::make_sync(move |_| {
            poem::Response::builder()
                .content_type(content_type)
                .body(body)
        })
    };
    let guarded = console.clone();
    Route::new()
        .at("/", get(overview::overview_page))
        .at("/sign-in", get(auth::sign_in_page).post(auth::sign_in))
        .at("/sign-out", post(auth::sign_out))
        .at("/batches", get(batches::failed_batches_page))
        .at("/batches/retry", post(batches::retry_batches))
        .at("/batches/:id", get(batches::batch_page))
        .at(
            "/batches/:id/retry",
            get(batches::confirm_retry).post(batches::retry_batch),
        )
        .at(
            "/batches/:id/refund",
            get(batches::confirm_refund).post(batches::refund_batch),
        )
        .at("/log", get(log::log_page))
        .at("/dead-letters", get(dead_letters::dead_letters_page))
        .at("/accounts/:id", get(records::account_page))
        .at("/find", get(records::find_page))
        .at(
            "/dead-letters/:stream/:letter/:action",
            post(dead_letters::resolve_dead_letter),
        )
        .at(
            "/assets/console.css",
            get(asset(CONSOLE_CSS, "text/css; charset=utf-8")),
        )
        .at(
            "/assets/console.js",
            get(asset(CONSOLE_JS, "text/javascript; charset=utf-8")),
        )
        .around(move |endpoint, request| auth::guard(endpoint, request, guarded.clone()))
        .data(console)
        .with(
            SetHeader::new()
                .overriding("Content-Security-Policy", CONTENT_SECURITY_POLICY)
                .overriding(header::X_FRAME_OPTIONS, "DENY")
                .overriding(header::REFERRER_POLICY, "same-origin"),
        )
}
