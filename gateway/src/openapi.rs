//! The OpenAPI document of the REST API (utoipa), served at `/openapi.json`. WebSocket
//! messages are described in the repo's `ARCHITECTURE.md` (OpenAPI has no good way to say them).

use utoipa::OpenApi;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};

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
    components(schemas(AssignReq, crate::dto::AssignmentDto, crate::dto::CandidateDto, CourierDto, CourierPutReq, LatLngDto, NearbyDto, crate::dto::NearbyListDto, NewOrderReq, OrderDto, PositionDto, crate::dto::TrailDto, crate::dto::DeviceKeyDto,
        crate::history::HistoryCollection, crate::history::HistoryFeature, crate::history::PointGeometry,
        crate::history::HistoryProperties, crate::history::ErasedDto,
        crate::zones::ZoneDto, crate::zones::ZonePropsDto, crate::zones::ZoneListDto,
        crate::webhooks::WebhookPutReq, crate::webhooks::WebhookDto, crate::webhooks::WebhookStatsDto,
        crate::webhooks::WebhookListDto, crate::webhooks::DeliveryDto, crate::webhooks::DeliveryListDto,
        crate::webhooks::WebhookPayload, crate::webhooks::RedeliverReq, crate::webhooks::RedeliverDto, crate::markets::MarketDto)),
    modifiers(&Bearer)
)]
struct ApiDoc;

struct Bearer;

impl utoipa::Modify for Bearer {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let c = openapi.components.get_or_insert_with(Default::default);
        c.add_security_scheme("bearer", SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format("JWT").build()));
    }
}

/// The document as JSON text.
pub fn spec_json() -> String {
    ApiDoc::openapi().to_json().unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}
