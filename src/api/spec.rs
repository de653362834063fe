//! The spec as published (`/openapi.yaml`, Swagger UI, `tally openapi`):
//! poem-openapi's document, plus what its derive macros cannot say.
//!
//! - `additionalProperties: false` on every request body: each is derived with
//!   `deny_unknown_fields`, and the server refuses an unknown field (400).
//! - The bounds of `limit`, `offset` and `page`, which come from this server's
//!   settings (`TALLY_PAGE_SIZE`, `TALLY_PAGE_SIZE_MAX`) or from constants the
//!   handlers check.
//! - OpenAPI links: which answer's ids a client passes to which operation
//!   (an account's id to an order, an order's batch to the batch). Clients
//!   and Swagger UI show them; schemathesis follows them in its stateful
//!   phase, so that it reaches past the 404s and 422s of made-up ids.

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
        gone_only_where_records_leave(&mut document);
        bound_listing_parameters(&mut document, settings);
        add_links(&mut document);
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

/// The operations that can answer 410 (`archived`): a `GET` of a record
/// retention takes out of Redis. Every operation shares the error type, so
/// poem-openapi lists 410 on all of them.
const GONE_OPERATIONS: [&str; 4] = ["getOrder", "getBatch", "getWalletTransaction", "getAdvance"];

fn gone_only_where_records_leave(document: &mut Value) {
    let Some(paths) = get_mut(document, "paths").and_then(Value::as_mapping_mut) else {
        return;
    };
    for operations in paths.values_mut() {
        let Some(operations) = operations.as_mapping_mut() else {
            continue;
        };
        for operation in operations.values_mut() {
            let id = get(operation, "operationId").and_then(Value::as_str);
            if id.is_some_and(|id| GONE_OPERATIONS.contains(&id)) {
                continue;
            }
            if let Some(responses) = get_mut(operation, "responses").and_then(Value::as_mapping_mut)
            {
                responses.shift_remove("410");
            }
        }
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

/// One OpenAPI link: from an operation's answer to another operation, with
/// runtime expressions for the target's parameters and body fields.
struct Link {
    from: &'static str,
    status: &'static str,
    name: &'static str,
    to: &'static str,
    parameters: &'static [(&'static str, &'static str)],
    body: &'static [(&'static str, &'static str)],
}

const ACCOUNT_ID: &str = "$response.body#/id";

const LINKS: &[Link] = &[
    Link {
        from: "createAccount",
        status: "201",
        name: "GetAccount",
        to: "getAccount",
        parameters: &[("path.id", ACCOUNT_ID)],
        body: &[],
    },
    Link {
        from: "createAccount",
        status: "201",
        name: "PlaceOrder",
        to: "placeOrder",
        parameters: &[],
        body: &[
            ("account_id", ACCOUNT_ID),
            ("symbol", "ABAN"),
            ("quantity", "1"),
        ],
    },
    Link {
        from: "createAccount",
        status: "201",
        name: "TransferFrom",
        to: "createTransfer",
        parameters: &[],
        body: &[("src_account_id", ACCOUNT_ID)],
    },
    Link {
        from: "createAccount",
        status: "201",
        name: "TransferTo",
        to: "createTransfer",
        parameters: &[],
        body: &[("dst_account_id", ACCOUNT_ID)],
    },
    Link {
        from: "createAccount",
        status: "201",
        name: "BankTransaction",
        to: "createBankTransaction",
        parameters: &[],
        body: &[("account_id", ACCOUNT_ID)],
    },
    Link {
        from: "createAccount",
        status: "201",
        name: "Advance",
        to: "createAdvance",
        parameters: &[],
        body: &[("account_id", ACCOUNT_ID)],
    },
    Link {
        from: "createAccount",
        status: "201",
        name: "WalletTransaction",
        to: "createWalletTransaction",
        parameters: &[("path.id", ACCOUNT_ID)],
        body: &[],
    },
    Link {
        from: "createAccount",
        status: "201",
        name: "WalletTransactions",
        to: "listWalletTransactions",
        parameters: &[("path.id", ACCOUNT_ID)],
        body: &[],
    },
    Link {
        from: "createAccount",
        status: "201",
        name: "Advances",
        to: "listAdvances",
        parameters: &[("path.id", ACCOUNT_ID)],
        body: &[],
    },
    Link {
        from: "createAccount",
        status: "201",
        name: "CustomerKey",
        to: "createKey",
        parameters: &[],
        body: &[("role", "customer"), ("account_id", ACCOUNT_ID)],
    },
    Link {
        from: "createBankTransaction",
        status: "201",
        name: "PlaceOrder",
        to: "placeOrder",
        parameters: &[],
        body: &[
            ("account_id", "$response.body#/account_id"),
            ("symbol", "ABAN"),
            ("quantity", "1"),
        ],
    },
    Link {
        from: "placeOrder",
        status: "201",
        name: "GetOrder",
        to: "getOrder",
        parameters: &[("path.id", "$response.body#/id")],
        body: &[],
    },
    Link {
        from: "placeOrder",
        status: "201",
        name: "GetBatch",
        to: "getBatch",
        parameters: &[("path.id", "$response.body#/batch_id")],
        body: &[],
    },
    Link {
        from: "getOrder",
        status: "200",
        name: "GetBatch",
        to: "getBatch",
        parameters: &[("path.id", "$response.body#/batch_id")],
        body: &[],
    },
    Link {
        from: "listBatches",
        status: "200",
        name: "RetryBatch",
        to: "retryBatch",
        parameters: &[("path.id", "$response.body#/items/0/id")],
        body: &[],
    },
    Link {
        from: "listBatches",
        status: "200",
        name: "RefundBatch",
        to: "refundBatch",
        parameters: &[("path.id", "$response.body#/items/0/id")],
        body: &[],
    },
    Link {
        from: "createWalletTransaction",
        status: "202",
        name: "GetWalletTransaction",
        to: "getWalletTransaction",
        parameters: &[
            ("path.id", "$request.path.id"),
            ("path.txn_id", "$response.body#/id"),
        ],
        body: &[],
    },
    Link {
        from: "createAdvance",
        status: "201",
        name: "GetAdvance",
        to: "getAdvance",
        parameters: &[("path.id", "$response.body#/id")],
        body: &[],
    },
    Link {
        from: "createKey",
        status: "201",
        name: "RevokeKey",
        to: "revokeKey",
        parameters: &[("path.id", "$response.body#/id")],
        body: &[],
    },
];

fn add_links(document: &mut Value) {
    let Some(paths) = get_mut(document, "paths").and_then(Value::as_mapping_mut) else {
        return;
    };
    for operation in paths
        .values_mut()
        .filter_map(Value::as_mapping_mut)
        .flat_map(Mapping::values_mut)
    {
        let Some(id) = get(operation, "operationId")
            .and_then(Value::as_str)
            .map(str::to_owned)
        else {
            continue;
        };
        for link in LINKS.iter().filter(|link| link.from == id) {
            let response = get_mut(operation, "responses")
                .and_then(|responses| get_mut(responses, link.status))
                .and_then(Value::as_mapping_mut)
                .unwrap_or_else(|| panic!("{id} answers {}", link.status));
            let links = response
                .entry("links".into())
                .or_insert_with(|| Value::Mapping(Mapping::new()))
                .as_mapping_mut()
                .expect("links is a mapping");
            let mut definition = Mapping::new();
            definition.insert("operationId".into(), link.to.into());
            let pairs = |pairs: &[(&str, &str)]| -> Mapping {
                pairs
                    .iter()
                    .map(|&(name, expression)| (name.into(), expression.into()))
                    .collect()
            };
            if !link.parameters.is_empty() {
                definition.insert("parameters".into(), Value::Mapping(pairs(link.parameters)));
            }
            if !link.body.is_empty() {
                definition.insert("requestBody".into(), Value::Mapping(pairs(link.body)));
            }
            links.insert(link.name.into(), Value::Mapping(definition));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every link starts at an operation of the document and ends at one: a
    /// misspelt operationId would drop it without a word.
    #[test]
    fn every_link_joins_two_operations_of_the_document() {
        let document: Value = serde_yaml::from_str(&crate::api::spec_yaml()).unwrap();
        let operations: Vec<&Value> = document["paths"]
            .as_mapping()
            .unwrap()
            .values()
            .flat_map(|path| path.as_mapping().unwrap().values())
            .collect();
        let ids: Vec<&str> = operations
            .iter()
            .map(|operation| operation["operationId"].as_str().unwrap())
            .collect();
        let mut found = 0;
        for operation in &operations {
            for response in operation["responses"].as_mapping().unwrap().values() {
                for link in response["links"]
                    .as_mapping()
                    .into_iter()
                    .flat_map(Mapping::values)
                {
                    assert!(
                        ids.contains(&link["operationId"].as_str().unwrap()),
                        "{link:?}"
                    );
                    found += 1;
                }
            }
        }
        assert_eq!(found, LINKS.len());
    }
}
