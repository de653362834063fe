//! Dead letters per job stream, with replay and discard.

use std::sync::Arc;

use askama::Template;
use poem::http::StatusCode;
use poem::web::{Data, Path, Query};
use poem::{Response, handler};
use serde::Deserialize;

use super::Console;
use super::auth::{FormFields, Viewer, message};
use super::batches::NOTE_CHARS_MAX;
use super::pages::{Chrome, bad_cursor, render, rfc3339, store_failed};
use crate::operator::{self, Via};
use crate::store::dead_letters::{self, DeadLetter, Resolution, ResolveError};
use crate::store::keys::StreamKind;

/// The job streams whose dead letters the console lists, in its tabs.
const DEAD_LETTER_STREAMS: [StreamKind; 4] = [
    StreamKind::Events,
    StreamKind::Wallet,
    StreamKind::Installments,
    StreamKind::Settle,
];

fn stream_named(name: &str) -> Option<StreamKind> {
    DEAD_LETTER_STREAMS
        .into_iter()
        .find(|kind| kind.label() == name)
}

pub struct DeadLetterLine {
    pub name: String,
    pub at: String,
    pub error: String,
    /// The job's own fields, `name=value`.
    pub job: String,
    /// A dead settle job's batch, resolved on the batch's page.
    pub batch: Option<String>,
}

#[derive(Template)]
#[template(path = "dead_letters.html")]
struct DeadLettersPage {
    chrome: Chrome,
    stream: &'static str,
    streams: Vec<&'static str>,
    /// Replayed and discarded here (a settle job is resolved by its batch).
    resolvable: bool,
    letters: Vec<DeadLetterLine>,
    next: Option<String>,
}

#[derive(Deserialize)]
pub struct DeadLettersQuery {
    stream: Option<String>,
    after: Option<String>,
}

#[handler]
pub async fn dead_letters_page(
    console: Data<&Arc<Console>>,
    viewer: Data<&Viewer>,
    query: Query<DeadLettersQuery>,
) -> Response {
    let state = &console.state;
    let keys = state.store.keys();
    let Some(stream) = stream_named(query.stream.as_deref().unwrap_or("events")) else {
        return message(
            StatusCode::BAD_REQUEST,
            "Unknown stream",
            "Pick events, wallet, installments or settle.",
        );
    };
    let after = match query
        .after
        .as_deref()
        .map(|text| dead_letters::parse_cursor(text, keys))
    {
        Some(None) => {
            return bad_cursor();
        }
        Some(Some(after)) => Some(after),
        None => None,
    };
    let limit = state.api.console.page_size;
    let read = async {
        let mut conn = state.store.conn().await?;
        dead_letters::page(&mut conn, keys, stream, after, limit).await
    };
    let letters = match read.await {
        Ok(letters) => letters,
        Err(err) => return store_failed(err),
    };
    let next = (letters.len() == limit)
        .then(|| letters.last().map(DeadLetter::cursor))
        .flatten();
    let lines = letters
        .iter()
        .map(|letter| DeadLetterLine {
            name: letter.cursor(),
            at: rfc3339(letter.id.ms as i64),
            error: letter.field("error").unwrap_or_default().to_owned(),
            job: letter
                .fields
                .iter()
                .filter(|(name, _)| !matches!(name.as_str(), "error" | "worker" | "stream_id"))
                .map(|(name, value)| format!("{name}={value}"))
                .collect::<Vec<_>>()
                .join("  "),
            batch: (stream == StreamKind::Settle)
                .then(|| letter.field("batch_id").map(str::to_owned))
                .flatten(),
        })
        .collect();
    let page = DeadLettersPage {
        chrome: Chrome::new("Dead letters", &viewer),
        stream: stream.label(),
        streams: DEAD_LETTER_STREAMS
            .iter()
            .map(|kind| kind.label())
            .collect(),
        resolvable: stream != StreamKind::Settle,
        letters: lines,
        next,
    };
    render(&page, StatusCode::OK)
}

#[derive(Template)]
#[template(path = "resolved.html")]
struct ResolvedPage {
    chrome: Chrome,
    title: String,
    effect: String,
    stream: &'static str,
}

async fn resolve(
    console: &Console,
    viewer: &Viewer,
    stream: &str,
    letter: &str,
    resolution: Resolution,
    fields: &FormFields,
) -> Response {
    let Some(stream) = stream_named(stream) else {
        return message(
            StatusCode::NOT_FOUND,
            "Not found",
            "There is no such stream.",
        );
    };
    let reason = fields.get("reason").unwrap_or_default().trim();
    if (resolution == Resolution::Discard && reason.is_empty())
        || reason.chars().count() > NOTE_CHARS_MAX
        || reason.chars().any(char::is_control)
    {
        return message(
            StatusCode::BAD_REQUEST,
            "Refused",
            &format!(
                "Give a reason of 1 to {NOTE_CHARS_MAX} characters, on one line (a discard needs one). Nothing was done."
            ),
        );
    }
    let resolved = operator::resolve_dead_letter(
        &console.state.store,
        &viewer.caller,
        stream,
        letter,
        resolution,
        reason,
        Via::Console,
    )
    .await;
    match resolved {
        Ok(effect) => render(
            &ResolvedPage {
                chrome: Chrome::new("Resolved", viewer),
                title: format!(
                    "Dead letter {letter} {}",
                    match resolution {
                        Resolution::Replay => "replayed",
                        Resolution::Discard => "discarded",
                    }
                ),
                effect,
                stream: stream.label(),
            },
            StatusCode::OK,
        ),
        Err(ResolveError::Store(err)) => store_failed(err),
        Err(err @ ResolveError::Missing) => message(
            StatusCode::CONFLICT,
            "Refused",
            &format!("{err}. Nothing was done."),
        ),
        Err(err) => message(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Refused",
            &format!("{err}. Nothing was done."),
        ),
    }
}

/// Replays or discards one dead letter: `action` is `replay` or `discard`.
#[handler]
pub async fn resolve_dead_letter(
    console: Data<&Arc<Console>>,
    viewer: Data<&Viewer>,
    path: Path<(String, String, String)>,
    fields: Data<&FormFields>,
) -> Response {
    let Path((stream, letter, action)) = path;
    let resolution = match action.as_str() {
        "replay" => Resolution::Replay,
        "discard" => Resolution::Discard,
        _ => {
            return message(
                StatusCode::NOT_FOUND,
                "Not found",
                "A dead letter is replayed or discarded.",
            );
        }
    };
    resolve(&console, &viewer, &stream, &letter, resolution, &fields).await
}
