//! CORS for the origins `TALLY_CORS_ALLOWED_ORIGINS` lists, and for no one
//! else. With no CORS headers a browser keeps another site's page from
//! reading our answers (and from sending JSON at all: that needs a preflight).
//!
//! A request from a listed origin goes through poem's `Cors` (which answers
//! preflights itself); every other request passes by it untouched. poem's
//! `Cors` alone would refuse an unlisted origin with 403, and browsers send
//! `Origin` on same-origin POSTs too: the Swagger UI at `/docs` would break
//! as soon as one front end was listed.

use std::collections::HashSet;
use std::sync::Arc;

use poem::http::header::{AUTHORIZATION, CONTENT_TYPE, ORIGIN};
use poem::http::{HeaderValue, Method};
use poem::middleware::{Cors, CorsEndpoint};
use poem::{Endpoint, IntoResponse, Middleware, Request, Response};

use crate::config::OriginList;

/// How long a browser may keep a preflight's answer (Chromium caps it at
/// two hours anyway).
pub const CORS_MAX_AGE_SECS: i32 = 600;

/// Set on a replayed answer; a page must be able to read it.
const IDEMPOTENT_REPLAYED_HEADER: &str = "Idempotent-Replayed";

/// Routes a request from a listed origin through poem's `Cors`, any other past it.
pub struct CorsForListedOrigins<E> {
    plain: Arc<E>,
    /// `None` when no origin is listed.
    cors: Option<CorsEndpoint<Arc<E>>>,
    origins: HashSet<HeaderValue>,
}

impl<E: Endpoint> CorsForListedOrigins<E> {
    pub fn new(inner: E, origins: &OriginList) -> Self {
        let plain = Arc::new(inner);
        let origins: HashSet<HeaderValue> = origins
            .iter()
            .map(|origin| HeaderValue::from_str(origin).expect("a parsed origin is a header value"))
            .collect();
        let cors = (!origins.is_empty()).then(|| {
            Cors::new()
                .allow_origins(origins.iter().cloned())
                .allow_methods([Method::GET, Method::POST])
                .allow_headers([
                    CONTENT_TYPE.as_str(),
                    AUTHORIZATION.as_str(),
                    super::IDEMPOTENCY_KEY_HEADER,
                ])
                .expose_header(IDEMPOTENT_REPLAYED_HEADER)
                // Keys travel in Authorization, never in cookies.
                .allow_credentials(false)
                .max_age(CORS_MAX_AGE_SECS)
                .transform(plain.clone())
        });
        CorsForListedOrigins {
            plain,
            cors,
            origins,
        }
    }
}

impl<E: Endpoint> Endpoint for CorsForListedOrigins<E> {
    type Output = Response;

    async fn call(&self, request: Request) -> poem::Result<Response> {
        let listed = request
            .headers()
            .get(ORIGIN)
            .is_some_and(|origin| self.origins.contains(origin));
        match &self.cors {
            Some(cors) if listed => cors.call(request).await,
            _ => self
                .plain
                .call(request)
                .await
                .map(IntoResponse::into_response),
        }
    }
}
