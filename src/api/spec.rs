//! The spec as published (`/openapi.yaml`, Swagger UI, `tally openapi`):
//! poem-openapi's document, plus what its derive macros cannot say.
//!
//! - `additionalProperties: false` on every request body: each is derived with
//!   `deny_unknown_fields`, and the server refuses an unknown field (400).
//! - The bounds of `limit`, `offset` and `page`, which come from this server's
//!   settings (`TALLY_PAGE_SIZE`, `TALLY_PAGE_SIZE_MAX`) or from constants the
//!   handlers check.

use serde_yaml::{Mapping, Value};

use super::LIST_OFFSET_MAX;
use super::report::REPORT_PAGE_MAX;
use crate::config::ApiSettings;

/// The published document, from poem-openapi's JSON text.
pub struct Spec(Value);

impl Spec {
    pub fn refine(poem_json: &str, settings: &ApiSettings) -> Self {
        // JSON is YAML: read through serde_yaml, whose mappings keep the
        // document's key order (serde_json's would sort them).
        let mut document: Value =
            serde_yaml::from_str(poem_json).expect("poem-openapi writes valid JSON");
        close_request_bodies(&mut document);
        bound_listing_parameters(&mut document, settings);
        Spec(document)
    }

    pub fn yaml(&self) -> String {
        serde_yaml::to_string(&self.0).expect("a YAML value serializes")
    }

    pub fn json(&self) -> String {
        serde_json::to_string_pretty(&self.0).expect("a YAML value of JSON serializes as JSON")
    }
}

fn get<'a>(value: &'a Value, key: &str) -> Option<&'a Value> {
    value.as_mapping()?.get(key)
}

fn get_mut<'a>(value: &'a mut Value, key: &str) -> Option<&'a mut Value> {
    value.as_mapping_mut()?.get_mut(key)
}

/// The schema names the request bodies refer to (`#/components/schemas/X`).
fn request_body_schemas(document: &Value) -> Vec<String> {
    let mut names = Vec::new();
    let Some(paths) = get(document, "paths").and_then(Value::as_mapping) else {
        return names;
    };
    for operations in paths.values() {
        for operation in operations
            .as_mapping()
            .into_iter()
            .flat_map(Mapping::values)
        {
            let contents = get(operation, "requestBody")
                .and_then(|body| get(body, "content"))
                .and_then(Value::as_mapping);
            for content in contents.into_iter().flat_map(Mapping::values) {
                let reference = get(content, "schema")
                    .and_then(|schema| get(schema, "$ref"))
                    .and_then(Value::as_str);
                if let Some(name) =
                    reference.and_then(|text| text.strip_prefix("#/components/schemas/"))
                {
                    names.push(name.to_owned());
                }
            }
        }
    }
    names
}

fn close_request_bodies(document: &mut Value) {
    for name in request_body_schemas(document) {
        let schema = get_mut(document, "components")
            .and_then(|components| get_mut(components, "schemas"))
            .and_then(|schemas| get_mut(schemas, &name))
            .and_then(Value::as_mapping_mut)
            .expect("a request body's schema is in components");
        schema.insert("additionalProperties".into(), Value::Bool(false));
    }
}

fn bound_listing_parameters(document: &mut Value, settings: &ApiSettings) {
    let bounds = |name: &str| -> Option<(u64, u64, Option<u64>)> {
        match name {
            "limit" => Some((
                1,
                settings.page_size_max as u64,
                Some(settings.page_size as u64),
            )),
            "offset" => Some((0, LIST_OFFSET_MAX, Some(0))),
            "page" => Some((1, REPORT_PAGE_MAX, None)),
            _ => None,
        }
    };
    let Some(paths) = get_mut(document, "paths").and_then(Value::as_mapping_mut) else {
        return;
    };
    for operations in paths.values_mut() {
        let Some(operations) = operations.as_mapping_mut() else {
            continue;
        };
        for operation in operations.values_mut() {
            let Some(parameters) =
                get_mut(operation, "parameters").and_then(Value::as_sequence_mut)
            else {
                continue;
            };
            for parameter in parameters {
                let is_query = get(parameter, "in").and_then(Value::as_str) == Some("query");
                let name = get(parameter, "name")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                let Some((minimum, maximum, default)) = bounds(name).filter(|_| is_query) else {
                    continue;
                };
                let Some(schema) = get_mut(parameter, "schema").and_then(Value::as_mapping_mut)
                else {
                    continue;
                };
                schema.insert("minimum".into(), minimum.into());
                schema.insert("maximum".into(), maximum.into());
                if let Some(default) = default {
                    schema.insert("default".into(), default.into());
                }
            }
        }
    }
}
