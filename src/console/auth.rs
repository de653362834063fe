//! Who is looking: sign-in with a key, sessions in Redis, CSRF tokens, and
//! the guard every console request passes before its page.

use std::sync::Arc;

use askama::Template;
use poem::http::{HeaderMap, Method, StatusCode, header};
use poem::web::Data;
use poem::{Endpoint, IntoResponse, Request, Response, handler};
use sha2::{Digest, Sha256};

use super::Console;
use crate::access::{Caller, Denied, Role};
use crate::store::console::{self as store_console, Session};
use crate::store::now_ms;

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "tally_ops";
/// Bytes of randomness in a session token and in a CSRF token.
const TOKEN_BYTES: usize = 32;
/// The largest form the console reads (a bulk retry of a full page of ids
/// fits many times over).
pub const FORM_BYTES_MAX: usize = 64 * 1024;

/// The roles that may use the console; the first two may also act.
const VIEWERS: [Role; 3] = [Role::Ops, Role::Admin, Role::Read];

/// The caller of a console request, as the guard admitted it.
#[derive(Debug, Clone)]
pub struct Viewer {
    pub caller: Caller,
    /// The session's CSRF token; `None` for a bearer key (a script, which
    /// carries its key in a header no other site can make a browser send).
    pub csrf: Option<String>,
}

impl Viewer {
    pub fn may_act(&self) -> bool {
        matches!(self.caller.role, Role::Ops | Role::Admin)
    }
}

/// A POST's form fields, read and checked by the guard.
#[derive(Debug, Clone, Default)]
pub struct FormFields(pub Vec<(String, String)>);

impl FormFields {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    pub fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0
            .iter()
            .filter(move |(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }
}

#[derive(Template)]
#[template(path = "sign_in.html")]
struct SignInPage<'a> {
    problem: Option<&'a str>,
}

#[derive(Template)]
#[template(path = "message.html")]
pub struct MessagePage<'a> {
    pub title: &'a str,
    pub detail: &'a str,
}

/// An HTML answer.
pub fn html(status: StatusCode, body: String) -> Response {
    Response::builder()
        .status(status)
        .content_type("text/html; charset=utf-8")
        .body(body)
}

/// A page that says what went wrong, and nothing else.
pub fn message(status: StatusCode, title: &str, detail: &str) -> Response {
    match (MessagePage { title, detail }).render() {
        Ok(body) => html(status, body),
        Err(err) => rendering_failed(err),
    }
}

pub fn rendering_failed(err: askama::Error) -> Response {
    tracing::error!(error = %err, "console: a template did not render");
    html(
        StatusCode::INTERNAL_SERVER_ERROR,
        "the page could not be rendered".to_owned(),
    )
}

fn sign_in_response(status: StatusCode, problem: Option<&str>) -> Response {
    match (SignInPage { problem }).render() {
        Ok(body) => html(status, body),
        Err(err) => rendering_failed(err),
    }
}

/// Every console request but the sign-in page and the assets passes here:
/// a session (or a bearer key) of an operator's, a CSRF token on every form
/// a session posts, an acting role for every POST but signing out. What it
/// refuses, it answers with a page that shows no figures.
pub async fn guard<E: Endpoint>(
    endpoint: Arc<E>,
    mut request: Request,
    console: Arc<Console>,
) -> poem::Result<Response> {
    let path = request.uri().path().to_owned();
    let is_post = request.method() == Method::POST;
    if is_post && !same_origin(request.headers()) {
        // Another site's page posting here (a forged sign-in included).
        return Ok(message(
            StatusCode::FORBIDDEN,
            "Refused",
            "This form came from another site. Nothing was done.",
        ));
    }
    if path == "/sign-in" || path.starts_with("/assets/") {
        if is_post {
            let fields = match read_form(&mut request).await {
                Ok(fields) => fields,
                Err(refusal) => return Ok(refusal),
            };
            request.extensions_mut().insert(fields);
        }
        return endpoint
            .call(request)
            .await
            .map(IntoResponse::into_response);
    }
    let viewer = match viewer(&request, &console).await {
        Ok(viewer) => viewer,
        Err(refusal) => return Ok(refusal),
    };
    if is_post {
        let fields = match read_form(&mut request).await {
            Ok(fields) => fields,
            Err(refusal) => return Ok(refusal),
        };
        if let Some(expected) = &viewer.csrf
            && !fields
                .get("csrf")
                .is_some_and(|sent| same_secret(sent, expected))
        {
            return Ok(message(
                StatusCode::FORBIDDEN,
                "Refused",
                "This form did not carry this session's token: it is stale, or another page made it. Nothing was done.",
            ));
        }
        if path != "/sign-out" && !viewer.may_act() {
            return Ok(message(
                StatusCode::FORBIDDEN,
                "Refused",
                &format!(
                    "A {} key may look but not act: acting needs an ops or admin key. Nothing was done.",
                    viewer.caller.role
                ),
            ));
        }
        request.extensions_mut().insert(fields);
    }
    request.extensions_mut().insert(viewer);
    endpoint
        .call(request)
        .await
        .map(IntoResponse::into_response)
}

/// The viewer a request stands for, or the answer that refuses it.
async fn viewer(request: &Request, console: &Console) -> Result<Viewer, Response> {
    let state = &console.state;
    // Failed sign-ins, bad bearer keys and unknown session tokens all count
    // against the client's address, as failed authentications do in the API.
    let client = client_address(request);
    let address_refused = state.access.failures_refused(&client);
    let class = if request.method() == Method::GET || request.method() == Method::HEAD {
        crate::access::RequestClass::Read
    } else {
        crate::access::RequestClass::Write
    };
    let admitted = if request.headers().contains_key(header::AUTHORIZATION) {
        let token = bearer(request.headers()).ok_or_else(|| {
            sign_in_response(
                StatusCode::UNAUTHORIZED,
                Some("the Authorization header must be `Bearer <key>`"),
            )
        })?;
        state
            .access
            .admit(token, class, false, address_refused)
            .await
            .map(|caller| Viewer { caller, csrf: None })
    } else {
        let Some(token) = session_token(request.headers()) else {
            return Err(sign_in_response(StatusCode::UNAUTHORIZED, None));
        };
        if address_refused.is_some() {
            return Err(too_many_failures());
        }
        let session = {
            let settings = &state.api.console;
            let mut conn = state.store.conn().await.map_err(unavailable)?;
            store_console::touch_session(
                &mut conn,
                state.store.keys(),
                &token_hash(token),
                settings.session_idle_ms,
                now_ms(),
            )
            .await
            .map_err(unavailable)?
        };
        let Some(session) = session else {
            let _ = state.access.note_failure(&client).await;
            return Err(signed_out(Some(
                "Your session ended (signed out, idle too long, or past its limit). Sign in again.",
            )));
        };
        state
            .access
            .admit_session(&session.key_id, session.role, class)
            .await
            .map(|caller| Viewer {
                caller,
                csrf: Some(session.csrf),
            })
    };
    if let Err(Denied::Unauthenticated(_)) = &admitted {
        let _ = state.access.note_failure(&client).await;
    }
    let viewer = admitted.map_err(|denied| match denied {
        Denied::Unauthenticated(_) => signed_out(Some(
            "The key of this session is no longer valid (revoked or expired). Sign in with another.",
        )),
        Denied::RateLimited { retry_after } => message(
            StatusCode::TOO_MANY_REQUESTS,
            "Slow down",
            &format!(
                "This key is past its rate limit; try again in {} s.",
                retry_after.as_secs().max(1)
            ),
        ),
        Denied::Store(err) => unavailable(err),
    })?;
    if !VIEWERS.contains(&viewer.caller.role) {
        return Err(message(
            StatusCode::FORBIDDEN,
            "Not an operator's key",
            &format!(
                "The console needs a read, ops or admin key; this key's role is {}.",
                viewer.caller.role
            ),
        ));
    }
    Ok(viewer)
}

fn client_address(request: &Request) -> String {
    request
        .remote_addr()
        .as_socket_addr()
        .map_or_else(|| "unknown".to_owned(), |address| address.ip().to_string())
}

fn too_many_failures() -> Response {
    message(
        StatusCode::TOO_MANY_REQUESTS,
        "Slow down",
        "Too many failed sign-ins from this address; wait a little and try again.",
    )
}

/// The sign-in page, with the session cookie cleared.
fn signed_out(problem: Option<&str>) -> Response {
    let mut response = sign_in_response(StatusCode::UNAUTHORIZED, problem);
    if let Ok(value) = header::HeaderValue::from_str(&clear_cookie()) {
        response.headers_mut().append(header::SET_COOKIE, value);
    }
    response
}

fn unavailable(err: crate::store::StoreError) -> Response {
    tracing::warn!(error = %err, "console: Redis did not answer");
    message(
        StatusCode::SERVICE_UNAVAILABLE,
        "Unavailable",
        "Redis did not answer; nothing was done. Try again shortly.",
    )
}

#[handler]
pub fn sign_in_page() -> Response {
    sign_in_response(StatusCode::OK, None)
}

/// Checks the key as the API does (failed attempts count against the
/// client's address), then opens a session for it.
#[handler]
pub async fn sign_in(
    request: &Request,
    console: Data<&Arc<Console>>,
    fields: Data<&FormFields>,
) -> Response {
    let state = &console.state;
    let client = client_address(request);
    let key = fields.get("key").unwrap_or_default().trim();
    let address_refused = state.access.failures_refused(&client);
    let admitted = state
        .access
        .admit(
            key,
            crate::access::RequestClass::Write,
            false,
            address_refused,
        )
        .await;
    let caller = match admitted {
        Ok(caller) => caller,
        Err(Denied::Unauthenticated(detail)) => {
            let _ = state.access.note_failure(&client).await;
            return sign_in_response(StatusCode::UNAUTHORIZED, Some(detail));
        }
        Err(Denied::RateLimited { .. }) => {
            return sign_in_response(
                StatusCode::TOO_MANY_REQUESTS,
                Some("too many attempts; wait a little and try again"),
            );
        }
        Err(Denied::Store(err)) => return unavailable(err),
    };
    if !VIEWERS.contains(&caller.role) {
        return sign_in_response(
            StatusCode::FORBIDDEN,
            Some("the console needs a read, ops or admin key"),
        );
    }
    let token = hex::encode(random_bytes());
    let settings = &state.api.console;
    let now = now_ms();
    let session = Session {
        key_id: caller.key_id.clone(),
        role: caller.role,
        csrf: hex::encode(random_bytes()),
        created_at_ms: now,
        expires_at_ms: now
            .saturating_add(i64::try_from(settings.session_max_ms).unwrap_or(i64::MAX)),
    };
    let created = async {
        let mut conn = state.store.conn().await?;
        store_console::create_session(
            &mut conn,
            state.store.keys(),
            &token_hash(&token),
            &session,
            settings.session_idle_ms,
        )
        .await
    };
    if let Err(err) = created.await {
        return unavailable(err);
    }
    crate::operator::record_sign_in(&state.store, &caller).await;
    let mut response = Response::builder()
        .status(StatusCode::SEE_OTHER)
        .header(header::LOCATION, "/ops")
        .finish();
    let cookie = session_cookie(&token, settings.cookie_secure);
    if let Ok(value) = header::HeaderValue::from_str(&cookie) {
        response.headers_mut().append(header::SET_COOKIE, value);
    }
    response
}

#[handler]
pub async fn sign_out(request: &Request, console: Data<&Arc<Console>>) -> Response {
    if let Some(token) = session_token(request.headers()) {
        let state = &console.state;
        let deleted = async {
            let mut conn = state.store.conn().await?;
            store_console::delete_session(&mut conn, state.store.keys(), &token_hash(token)).await
        };
        if let Err(err) = deleted.await {
            return unavailable(err);
        }
    }
    let mut response = Response::builder()
        .status(StatusCode::SEE_OTHER)
        .header(header::LOCATION, "/ops/sign-in")
        .finish();
    if let Ok(value) = header::HeaderValue::from_str(&clear_cookie()) {
        response.headers_mut().append(header::SET_COOKIE, value);
    }
    response
}

fn session_cookie(token: &str, secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    format!("{SESSION_COOKIE}={token}; Path=/ops; HttpOnly; SameSite=Strict{secure}")
}

fn clear_cookie() -> String {
    format!("{SESSION_COOKIE}=; Path=/ops; HttpOnly; SameSite=Strict; Max-Age=0")
}

/// The session token of the request's cookie, if it has one of the right
/// shape (anything else is no session, with no Redis read).
fn session_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == SESSION_COOKIE)
        .map(|(_, token)| token)
        .filter(|token| {
            token.len() == 2 * TOKEN_BYTES && token.bytes().all(|b| b.is_ascii_hexdigit())
        })
}

/// Whether a browser's `Origin`, when it sends one, is this server (the
/// authority it asked for in `Host`). Scripts send none.
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let host = headers
        .get(header::HOST)
        .and_then(|host| host.to_str().ok());
    let authority = origin
        .to_str()
        .ok()
        .and_then(|origin| origin.split_once("://"))
        .map(|(_, authority)| authority);
    matches!((authority, host), (Some(authority), Some(host)) if authority.eq_ignore_ascii_case(host))
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|token| !token.is_empty())
}

/// The name a session is stored under: the token itself never reaches Redis.
fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

fn random_bytes() -> [u8; TOKEN_BYTES] {
    let mut bytes = [0u8; TOKEN_BYTES];
    getrandom::fill(&mut bytes).expect("the operating system's random source works");
    bytes
}

/// Compares two tokens in time that depends on their length only.
fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |differ, (x, y)| differ | (x ^ y))
            == 0
}

/// Reads a form body (`application/x-www-form-urlencoded`), at most
/// [`FORM_BYTES_MAX`].
async fn read_form(request: &mut Request) -> Result<FormFields, Response> {
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body = request.take_body();
    let bytes = body.into_bytes_limit(FORM_BYTES_MAX).await.map_err(|_| {
        message(
            StatusCode::PAYLOAD_TOO_LARGE,
            "Refused",
            "The form is larger than the console reads. Nothing was done.",
        )
    })?;
    let essence = content_type.split(';').next().unwrap_or_default().trim();
    if !bytes.is_empty() && !essence.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
        return Err(message(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Refused",
            "The console takes forms (application/x-www-form-urlencoded). Nothing was done.",
        ));
    }
    Ok(FormFields(
        form_urlencoded::parse(&bytes)
            .map(|(key, value)| (key.into_owned(), value.into_owned()))
            .collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_cookie_of_the_right_shape_is_a_session() {
        let token = "ab".repeat(TOKEN_BYTES);
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            format!("other=1; {SESSION_COOKIE}={token}")
                .parse()
                .unwrap(),
        );
        assert_eq!(session_token(&headers), Some(token.as_str()));
        headers.insert(
            header::COOKIE,
            format!("{SESSION_COOKIE}=short").parse().unwrap(),
        );
        assert_eq!(session_token(&headers), None);
        headers.insert(
            header::COOKIE,
            format!("{SESSION_COOKIE}={}", "zz".repeat(TOKEN_BYTES))
                .parse()
                .unwrap(),
        );
        assert_eq!(session_token(&headers), None);
    }

    #[test]
    fn a_post_from_another_origin_is_told_apart() {
        let mut headers = HeaderMap::new();
        assert!(same_origin(&headers), "no Origin: a script");
        headers.insert(header::HOST, "127.0.0.1:8080".parse().unwrap());
        headers.insert(header::ORIGIN, "http://127.0.0.1:8080".parse().unwrap());
        assert!(same_origin(&headers));
        headers.insert(header::ORIGIN, "https://evil.example".parse().unwrap());
        assert!(!same_origin(&headers));
        headers.insert(header::ORIGIN, "null".parse().unwrap());
        assert!(!same_origin(&headers));
    }

    #[test]
    fn tokens_compare_equal_only_when_equal() {
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abc", "abd"));
        assert!(!same_secret("abc", "abcd"));
    }

    #[test]
    fn the_cookie_is_http_only_strict_and_scoped_to_the_console() {
        let cookie = session_cookie("t", false);
        assert!(cookie.contains("HttpOnly"));
        assert!(cookie.contains("SameSite=Strict"));
        assert!(cookie.contains("Path=/ops"));
        assert!(!cookie.contains("Secure"));
        assert!(session_cookie("t", true).ends_with("; Secure"));
    }
}
