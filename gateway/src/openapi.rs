//! The OpenAPI document of the REST API (utoipa), served at `/openapi.json`. WebSocket
//! messages are described in the repo's `ARCHITECTURE.md` (OpenAPI has no good way to say them).

use utoipa::OpenApi;
use utoipa::openapi::path::{Operation, ParameterIn};
use utoipa::openapi::schema::{ArrayItems, ObjectBuilder, Schema, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{Content, Ref, RefOr, Response};

use crate::dto::{AssignReq, CourierDto, CourierPutReq, LatLngDto, NearbyDto, NewOrderReq, OrderDto, PositionDto};

#[derive(OpenApi)]
#[openapi(
    info(title = "hexfleet", description = "Real-time courier tracking and dispatch"),
    paths(
        crate::api::create_order, crate::api::get_order, crate::api::cancel_order, crate::api::assign_order, crate::api::release_order,
        crate::api::put_courier, crate::api::get_courier, crate::api::get_trail, crate::api::device_key, crate::api::nearby, crate::api::events,
        crate::history::export, crate::history::erase,
        crate::zones::put_zone, crate::zones::list_zones, crate::zones::get_zone, crate::zones::delete_zone,
        crate::webhooks::put_webhook, crate::webhooks::list_webhooks, crate::webhooks::get_webhook,
        crate::webhooks::delete_webhook, crate::webhooks::deliveries, crate::webhooks::redeliver, crate::markets::get_market
    ),
    components(schemas(AssignReq, crate::dto::AssignmentDto, crate::dto::CandidateDto, CourierDto, CourierPutReq, LatLngDto, NearbyDto, crate::dto::NearbyListDto, crate::dto::EventDto, crate::dto::EventListDto, NewOrderReq, OrderDto, PositionDto, crate::dto::TrailDto, crate::dto::DeviceKeyDto,
        crate::history::HistoryCollection, crate::history::HistoryFeature, crate::history::PointGeometry,
        crate::history::HistoryProperties, crate::history::ErasedDto,
        crate::zones::ZoneDto, crate::zones::ZonePropsDto, crate::zones::ZoneListDto, crate::zones::ZonePutDoc, crate::zones::ZoneGeometryDoc, crate::zones::ZonePutPropsDoc,
        crate::webhooks::WebhookPutReq, crate::webhooks::WebhookDto, crate::webhooks::WebhookStatsDto,
        crate::webhooks::WebhookListDto, crate::webhooks::DeliveryDto, crate::webhooks::DeliveryListDto,
        crate::webhooks::WebhookPayload, crate::webhooks::RedeliverReq, crate::webhooks::RedeliverDto, crate::markets::MarketDto)),
    modifiers(&Bearer, &Conventions)
)]
struct ApiDoc;

struct Bearer;

impl utoipa::Modify for Bearer {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let c = openapi.components.get_or_insert_with(Default::default);
        c.add_security_scheme("bearer", SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format("JWT").build()));
    }
}

/// What every operation shares, written once here instead of in each handler's annotation:
/// - every path parameter is an id, with [`hexfleet_actors::domain::valid_id`]'s rule as its schema;
/// - every error answer has the [`crate::error::ErrorDto`] body;
/// - the errors any operation can give are listed: 400 (a bad id, query or body), 401 (no
///   token, or an expired or wrongly signed one), 403 (a role or tenant the operation does not
///   serve), 429 (`--http-limit-per-ip`), 500, and 502/503/504 (the store, or with market leases the owning node, did not
///   answer; retry); 404 where the path names something; 413 and 415 where a body is taken.
struct Conventions;

impl utoipa::Modify for Conventions {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let c = openapi.components.get_or_insert_with(Default::default);
        c.schemas.insert("ErrorDto".into(), <crate::error::ErrorDto<'static> as utoipa::PartialSchema>::schema());
        c.schemas.insert("ErrorDetail".into(), <crate::error::ErrorDetail<'static> as utoipa::PartialSchema>::schema());
        // The derive cannot put a pattern on a list's items.
        if let Some(RefOr::T(Schema::Object(o))) = c.schemas.get_mut("WebhookPutReq")
            && let Some(RefOr::T(Schema::Array(a))) = o.properties.get_mut("events")
        {
            let item = ObjectBuilder::new().schema_type(Type::String).max_length(Some(64)).pattern(Some(crate::webhooks::EVENT_PATTERN));
            a.items = ArrayItems::RefOrSchema(Box::new(Schema::Object(item.build()).into()));
        }
        for (path, item) in openapi.paths.paths.iter_mut() {
            // Tagged by resource (`/v1/orders/…` → `orders`), not by Rust module.
            let tag = path.trim_start_matches("/v1/").split('/').next().unwrap_or_default().to_owned();
            for op in [&mut item.get, &mut item.put, &mut item.post, &mut item.delete, &mut item.patch].into_iter().flatten() {
                op.tags = Some(vec![tag.clone()]);
                conventions(op);
            }
        }
    }
}

/// The schema of an id in a path: [`hexfleet_actors::domain::valid_id`]'s rule, 1 to 64
/// characters of `[A-Za-z0-9_.:-]`, as a regular expression (ECMA-262, as OpenAPI reads it).
fn id_schema() -> Schema {
    use hexfleet_actors::domain::MAX_ID_LEN;
    Schema::Object(
        ObjectBuilder::new()
            .schema_type(Type::String)
            .min_length(Some(1))
            .max_length(Some(MAX_ID_LEN))
            .pattern(Some(format!("^[A-Za-z0-9_.:-]{{1,{MAX_ID_LEN}}}$")))
            .build(),
    )
}

fn conventions(op: &mut Operation) {
    let mut names_something = false;
    for p in op.parameters.iter_mut().flatten() {
        if p.parameter_in == ParameterIn::Path {
            p.schema = Some(id_schema().into());
            names_something = true;
        }
    }
    let mut errors = vec![
        ("400", "Bad request: an id, a query parameter or the body is not valid"),
        ("401", "No token, or an expired or wrongly signed one"),
        ("403", "The token's role or tenant may not do this"),
        ("429", "With --http-limit-per-ip: too many requests from this address; see Retry-After"),
        ("500", "Internal error"),
        ("502", "With market leases: the node owning the market answered badly"),
        ("503", "The store or the owning node is unavailable, or the market is moving; retry after Retry-After seconds"),
        ("504", "With market leases: the node owning the market did not answer in time"),
    ];
    if names_something {
        errors.push(("404", "No such id in the token's tenant"));
    }
    if op.request_body.is_some() {
        errors.push(("413", "Body too large"));
        errors.push(("415", "Body is not application/json"));
    }
    for (status, what) in &errors {
        op.responses.responses.entry((*status).into()).or_insert_with(|| Response::new(*what).into());
    }
    for (status, r) in op.responses.responses.iter_mut() {
        let RefOr::T(r) = r else { continue };
        if r.description.is_empty() {
            r.description = match status.as_str() {
                "200" => "OK",
                "201" => "Created",
                "204" => "Done; no body",
                "409" => "Conflicts with the current state (see the error's code)",
                "422" => "Valid, but cannot be served (see the error's code)",
                s => errors.iter().find(|(e, _)| *e == s).map_or("", |(_, what)| *what),
            }
            .to_owned();
        }
        if status.starts_with(['4', '5']) && r.content.is_empty() {
            r.content.insert("application/json".into(), Content::new(Some(Ref::from_schema_name("ErrorDto"))));
        }
    }
}

/// The document as JSON text.
pub fn spec_json() -> String {
    ApiDoc::openapi().to_json().unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

#[cfg(test)]
mod tests {
    use hexfleet_actors::domain::{Vehicle, valid_id};
    use serde_json::Value;

    fn spec() -> Value {
        serde_json::from_str(&super::spec_json()).unwrap()
    }

    /// `(method path, operation)` for every operation.
    fn operations(spec: &Value) -> Vec<(String, Value)> {
        let mut out = Vec::new();
        for (path, item) in spec["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                out.push((format!("{} {path}", method.to_uppercase()), op.clone()));
            }
        }
        assert!(out.len() >= 24, "{out:?}");
        out
    }

    /// Every pattern in the document, with where it is.
    fn patterns(v: &Value, at: &str, out: &mut Vec<(String, String)>) {
        match v {
            Value::Object(m) => {
                for (k, x) in m {
                    match (k.as_str(), x) {
                        ("pattern", Value::String(p)) => out.push((at.to_owned(), p.clone())),
                        _ => patterns(x, &format!("{at}/{k}"), out),
                    }
                }
            }
            Value::Array(a) => a.iter().enumerate().for_each(|(i, x)| patterns(x, &format!("{at}/{i}"), out)),
            _ => {}
        }
    }

    #[test]
    fn every_operation_lists_its_errors_with_the_error_body() {
        let spec = spec();
        for (op_name, op) in operations(&spec) {
            let responses = op["responses"].as_object().unwrap();
            let mut need = vec!["400", "401", "403", "500", "503"];
            if op["parameters"].as_array().is_some_and(|ps| ps.iter().any(|p| p["in"] == "path")) {
                need.push("404");
            }
            if op.get("requestBody").is_some() {
                need.extend(["413", "415"]);
            }
            for status in need {
                assert!(responses.contains_key(status), "{op_name} does not list {status}");
            }
            for (status, r) in responses {
                assert!(!r["description"].as_str().unwrap_or_default().is_empty(), "{op_name} {status} has no description");
                if status.starts_with(['4', '5']) {
                    assert_eq!(r["content"]["application/json"]["schema"]["$ref"], "#/components/schemas/ErrorDto", "{op_name} {status}");
                }
            }
            assert_eq!(op["tags"].as_array().map(Vec::len), Some(1), "{op_name}");
        }
        let error = &spec["components"]["schemas"]["ErrorDto"];
        assert_eq!(error["properties"]["error"]["$ref"], "#/components/schemas/ErrorDetail", "{error}");
        let detail = &spec["components"]["schemas"]["ErrorDetail"];
        assert_eq!(detail["required"], serde_json::json!(["code", "message"]), "{detail}");
    }

    /// The rule the handlers apply to ids is the one the document states, for path ids and the
    /// ids inside bodies; every pattern is a valid regular expression.
    #[test]
    fn the_documents_id_pattern_is_valid_id() {
        let spec = spec();
        let mut found = Vec::new();
        patterns(&spec, "", &mut found);
        for (at, p) in &found {
            regex::Regex::new(p).unwrap_or_else(|e| panic!("{at}: {p}: {e}"));
        }
        let ids: Vec<&(String, String)> = found.iter().filter(|(_, p)| p.starts_with("^[A-Za-z0-9_.:-]")).collect();
        let mut path_ids = 0;
        for (op_name, op) in operations(&spec) {
            for p in op["parameters"].as_array().into_iter().flatten().filter(|p| p["in"] == "path") {
                assert_eq!(p["schema"]["pattern"], ids[0].1.as_str(), "{op_name}");
                path_ids += 1;
            }
        }
        assert!(path_ids >= 18, "{path_ids}");
        assert!(ids.len() >= path_ids + 4, "ids in bodies too: {ids:?}");
        let re = regex::Regex::new(&ids[0].1).unwrap();
        let long = "x".repeat(64);
        let longer = "x".repeat(65);
        for sample in ["a", "A-1_b.c:d", long.as_str(), longer.as_str(), "", "a b", "ops@example.com", "é", "a/b", "a\n"] {
            assert_eq!(re.is_match(sample), valid_id(sample), "{sample:?}");
        }
        for (at, p) in ids {
            assert_eq!(p, &ids_pattern(&spec), "{at}");
        }
    }

    fn ids_pattern(spec: &Value) -> String {
        spec["paths"]["/v1/orders/{id}"]["get"]["parameters"][0]["schema"]["pattern"].as_str().unwrap().to_owned()
    }

    #[test]
    fn the_documents_vehicles_are_the_dispatchers() {
        let spec = spec();
        let p = spec["components"]["schemas"]["CourierPutReq"]["properties"]["vehicle"]["pattern"].as_str().unwrap().to_owned();
        let re = regex::Regex::new(&p).unwrap();
        for v in Vehicle::ALL {
            assert!(re.is_match(v.as_str()), "{v:?}");
        }
        assert_eq!(p.matches('|').count() + 1, Vehicle::ALL.len(), "{p}");
    }
}
