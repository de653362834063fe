//! Which methods each path takes, for the `Allow` header of a 405.
//!
//! poem answers a method a route lacks with a bare 405; RFC 9110 (15.5.6)
//! asks for `Allow` listing the methods the path does take. The table is
//! built from the same sources as the routes, so it cannot drift from them:
//! the OpenAPI operations (`OpenApi::meta`), and the other routes, which
//! `app` adds through [`MethodTable::get_at`] and [`MethodTable::get_nest`].
//!
//! poem's `RouteMethod` serves HEAD with the GET endpoint (dropping the body)
//! wherever there is no HEAD endpoint of its own, so HEAD is listed with GET.

use std::collections::HashMap;
use std::sync::Arc;

use poem::http::header::ALLOW;
use poem::http::{HeaderValue, Method, StatusCode};
use poem::{Endpoint, IntoEndpoint, IntoResponse, Request, Response, Route};

use super::problem::{Problem, problem_response};

/// The order methods are listed in: the spec's, then poem's HEAD.
const METHOD_ORDER: [Method; 8] = [
    Method::GET,
    Method::HEAD,
    Method::POST,
    Method::PUT,
    Method::PATCH,
    Method::DELETE,
    Method::OPTIONS,
    Method::TRACE,
];

/// How many characters of an unknown method a 405 repeats.
const METHOD_ECHO_MAX_CHARS: usize = 16;

/// One segment of a path template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    /// `{id}` (the spec's spelling) or `:id` (poem's): any one non-empty segment.
    Parameter,
}

#[derive(Debug, Clone)]
struct Entry {
    segments: Vec<Segment>,
    /// A nested route: also every path below `segments`.
    nested: bool,
    methods: Vec<Method>,
}

/// Path templates and the methods each takes.
#[derive(Debug, Clone, Default)]
pub struct MethodTable {
    entries: Vec<Entry>,
    /// The entries without parameters, by their exact text: every request
    /// asks the table, and the busiest paths (`/api/v1/orders`) take one
    /// hash lookup rather than a scan.
    literal: HashMap<String, usize>,
}

impl MethodTable {
    /// The operations of an OpenAPI service nested at `prefix`.
    pub fn from_openapi<T: poem_openapi::OpenApi>(prefix: &str) -> Self {
        let mut table = MethodTable::default();
        for api in T::meta() {
            for path in api.paths {
                let methods = path
                    .operations
                    .iter()
                    .map(|operation| operation.method.clone());
                table.add(&format!("{prefix}{}", path.path), false, methods);
            }
        }
        table
    }

    fn add(&mut self, template: &str, nested: bool, methods: impl IntoIterator<Item = Method>) {
        let segments = segments(template)
            .map(|segment| {
                if segment.starts_with('{') || segment.starts_with(':') {
                    Segment::Parameter
                } else {
                    Segment::Literal(segment.to_owned())
                }
            })
            .collect::<Vec<_>>();
        let is_literal = !nested
            && segments
                .iter()
                .all(|segment| matches!(segment, Segment::Literal(_)));
        let index = match self
            .entries
            .iter()
            .position(|entry| entry.segments == segments && entry.nested == nested)
        {
            Some(index) => index,
            None => {
                self.entries.push(Entry {
                    segments,
                    nested,
                    methods: Vec::new(),
                });
                self.entries.len() - 1
            }
        };
        if is_literal {
            self.literal.insert(template.to_owned(), index);
        }
        let entry = &mut self.entries[index];
        for method in methods {
            if !entry.methods.contains(&method) {
                entry.methods.push(method);
            }
        }
        if entry.methods.contains(&Method::GET) && !entry.methods.contains(&Method::HEAD) {
            entry.methods.push(Method::HEAD);
        }
        entry.methods.sort_by_key(|method| {
            METHOD_ORDER
                .iter()
                .position(|known| known == method)
                .unwrap_or(METHOD_ORDER.len())
        });
    }

    /// Adds `endpoint` at `path` for GET (and so HEAD), and notes it.
    pub fn get_at<E>(&mut self, route: Route, path: &str, endpoint: E) -> Route
    where
        E: IntoEndpoint,
        E::Endpoint: 'static,
    {
        self.add(path, false, [Method::GET]);
        route.at(path, poem::get(endpoint))
    }

    /// Nests `endpoint` at `path` (every path below it) for GET, and notes it.
    pub fn get_nest<E>(&mut self, route: Route, path: &str, endpoint: E) -> Route
    where
        E: IntoEndpoint,
        E::Endpoint: 'static,
    {
        self.add(path, true, [Method::GET]);
        route.nest(path, poem::get(endpoint))
    }

    /// Nests `endpoint` at `path` (every path below it), which serves GET
    /// and POST, and notes it.
    pub fn nest_get_post<E>(&mut self, route: Route, path: &str, endpoint: E) -> Route
    where
        E: IntoEndpoint,
        E::Endpoint: 'static,
    {
        self.add(path, true, [Method::GET, Method::POST]);
        route.nest(path, endpoint)
    }

    /// The methods `path` takes, or `None` for a path no route serves (a
    /// 404, not a 405). A literal segment wins over a parameter, as in poem's
    /// router.
    pub fn allowed(&self, path: &str) -> Option<&[Method]> {
        if let Some(&index) = self.literal.get(path) {
            return Some(&self.entries[index].methods);
        }
        let requested: Vec<&str> = segments(path).collect();
        self.entries
            .iter()
            .filter(|entry| entry.matches(&requested))
            .min_by_key(|entry| {
                entry
                    .segments
                    .iter()
                    .map(|segment| matches!(segment, Segment::Parameter))
                    .collect::<Vec<_>>()
            })
            .map(|entry| entry.methods.as_slice())
    }
}

impl Entry {
    fn matches(&self, requested: &[&str]) -> bool {
        let exact = requested.len() == self.segments.len();
        let below = self.nested && requested.len() > self.segments.len();
        (exact || below)
            && self
                .segments
                .iter()
                .zip(requested)
                .all(|(segment, requested)| match segment {
                    Segment::Literal(literal) => literal == requested,
                    Segment::Parameter => !requested.is_empty(),
                })
    }
}

/// The segments of a path, without the empty one before its leading slash.
fn segments(path: &str) -> impl Iterator<Item = &str> {
    path.strip_prefix('/').unwrap_or(path).split('/')
}

/// Answers 405 with `Allow` when the path exists but does not take the
/// method; passes everything else on (an unknown path to poem's 404).
pub async fn refuse_other_methods<E: Endpoint>(
    endpoint: Arc<E>,
    request: Request,
    table: Arc<MethodTable>,
) -> poem::Result<Response> {
    if let Some(allowed) = table.allowed(request.uri().path())
        && !allowed.contains(request.method())
    {
        return Ok(method_not_allowed(request.method(), allowed));
    }
    endpoint
        .call(request)
        .await
        .map(IntoResponse::into_response)
}

fn method_not_allowed(method: &Method, allowed: &[Method]) -> Response {
    let list = allowed
        .iter()
        .map(Method::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    let sent: String = method
        .as_str()
        .chars()
        .take(METHOD_ECHO_MAX_CHARS)
        .collect();
    let detail = format!("this path does not take {sent}; it takes {list}");
    let mut response = problem_response(Problem::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        detail,
    ));
    let value = HeaderValue::from_str(&list).expect("method names are header-safe");
    response.headers_mut().insert(ALLOW, value);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> MethodTable {
        let mut table = MethodTable::default();
        table.add("/api/v1/accounts", false, [Method::POST, Method::GET]);
        table.add("/api/v1/accounts/{id}", false, [Method::GET]);
        table.add("/api/v1/accounts/export", false, [Method::POST]);
        table.add("/docs", true, [Method::GET]);
        table
    }

    #[test]
    fn a_path_takes_its_templates_methods_and_head_with_get() {
        let table = table();
        assert_eq!(
            table.allowed("/api/v1/accounts").unwrap(),
            [Method::GET, Method::HEAD, Method::POST]
        );
        assert_eq!(
            table.allowed("/api/v1/accounts/CUS_1").unwrap(),
            [Method::GET, Method::HEAD]
        );
        assert_eq!(
            table.allowed("/api/v1/accounts/export").unwrap(),
            [Method::POST],
            "a literal segment wins over a parameter"
        );
        assert_eq!(
            table.allowed("/docs/oauth-receiver.html").unwrap(),
            [Method::GET, Method::HEAD]
        );
        assert_eq!(table.allowed("/docs").unwrap(), [Method::GET, Method::HEAD]);
    }

    #[test]
    fn an_unknown_path_has_no_methods() {
        let table = table();
        for path in [
            "/api/v1/accounts/",
            "/api/v1/accounts//",
            "/api/v1/accounts/CUS_1/x",
            "/api/v1",
            "/",
            "/docsx",
        ] {
            assert!(table.allowed(path).is_none(), "{path}");
        }
    }
}
