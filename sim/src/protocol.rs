//! The wire protocol as the simulator sees it: what a courier, a customer and a dispatcher
//! console send and receive (see "Wire protocol" in the repo's `ARCHITECTURE.md`).
//!
//! Client messages are serialized exactly as the contract spells them. Server messages are
//! parsed leniently: unknown fields are ignored and unknown `t` values map to
//! [`ServerMsg::Other`], so a newer server does not break an older simulator.

use serde::{Deserialize, Serialize};

/// A point on the wire: `{"lat":..,"lng":..}`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Point {
    pub lat: f64,
    pub lng: f64,
}

/// The stops of the order embedded in an `order_update` (its other fields are not used here).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct OrderStops {
    #[serde(default)]
    pub pickup: Option<Point>,
    #[serde(default)]
    pub dropoff: Option<Point>,
}

/// One fix inside a `locs` batch.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LocItem {
    pub lat: f64,
    pub lng: f64,
    pub ts: i64,
}

/// Messages a courier app sends on `/v1/ws/courier`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum CourierMsg {
    Loc {
        lat: f64,
        lng: f64,
        ts: i64,
        #[serde(skip_serializing_if = "Option::is_none", default)]
        speed: Option<f64>,
        #[serde(skip_serializing_if = "Option::is_none", default)]
        heading: Option<f64>,
        #[serde(skip_serializing_if = "Option::is_none", default)]
        acc: Option<f64>,
    },
    Locs {
        items: Vec<LocItem>,
    },
    Status {
        status: CourierStatus,
    },
    OfferReply {
        order_id: String,
        accept: bool,
    },
    OrderEvent {
        order_id: String,
        event: OrderEventKind,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CourierStatus {
    Available,
    Offline,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderEventKind {
    PickedUp,
    Delivered,
    Failed,
}

/// Kind of a stop in a `route`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopKind {
    Pickup,
    Dropoff,
}

/// One stop of a courier's route.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stop {
    pub order_id: String,
    pub kind: StopKind,
    pub lat: f64,
    pub lng: f64,
}

/// Messages any server socket may send to the simulator (courier, tracking and console).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum ServerMsg {
    Offer {
        #[serde(default)]
        seq: u64,
        order_id: String,
        pickup: Point,
        dropoff: Point,
        #[serde(default)]
        expires_at: Option<i64>,
    },
    Assigned {
        #[serde(default)]
        seq: u64,
        order_id: String,
        pickup: Point,
        dropoff: Point,
    },
    Route {
        #[serde(default)]
        seq: u64,
        stops: Vec<Stop>,
    },
    OrderUpdate {
        #[serde(default)]
        seq: u64,
        order_id: String,
        state: String,
        #[serde(default)]
        courier_id: Option<String>,
        #[serde(default)]
        ts: Option<i64>,
        /// The order itself (its stops): what a courier reconnecting to orders it holds needs,
        /// since `assigned` is not sent again.
        #[serde(default)]
        order: Option<OrderStops>,
    },
    Error {
        #[serde(default)]
        code: String,
        #[serde(default)]
        message: String,
    },
    /// A courier position on a tracking socket.
    Courier {
        #[serde(default)]
        seq: u64,
        courier_id: String,
        lat: f64,
        lng: f64,
        ts: i64,
        #[serde(default)]
        eta_s: Option<f64>,
    },
    /// A batch of courier positions on a console socket.
    Couriers {
        #[serde(default)]
        seq: u64,
        items: Vec<ConsoleCourier>,
    },
    Resync {
        #[serde(default)]
        seq: u64,
    },
    /// `orders`, `zones`, `event`, `stats` and anything newer: counted, not interpreted.
    #[serde(other)]
    Other,
}

/// One item of a console `couriers` batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConsoleCourier {
    pub id: String,
    pub lat: f64,
    pub lng: f64,
    pub ts: i64,
    #[serde(default)]
    pub status: Option<String>,
}

/// What a console sends to choose its view.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum ConsoleMsg {
    Subscribe { bbox: [f64; 4] },
}

/// Order states after which a simulated courier or customer forgets the order.
pub fn is_terminal_state(state: &str) -> bool {
    matches!(state, "delivered" | "cancelled" | "failed" | "expired")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loc_serializes_as_the_contract() {
        let m = CourierMsg::Loc { lat: 52.5, lng: 13.4, ts: 1_700_000_000_000, speed: Some(4.2), heading: None, acc: None };
        assert_eq!(
            serde_json::to_string(&m).unwrap(),
            r#"{"t":"loc","lat":52.5,"lng":13.4,"ts":1700000000000,"speed":4.2}"#
        );
        let r = CourierMsg::OfferReply { order_id: "o1".into(), accept: true };
        assert_eq!(serde_json::to_string(&r).unwrap(), r#"{"t":"offer_reply","order_id":"o1","accept":true}"#);
        let e = CourierMsg::OrderEvent { order_id: "o1".into(), event: OrderEventKind::PickedUp };
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"t":"order_event","order_id":"o1","event":"picked_up"}"#
        );
        let s = CourierMsg::Status { status: CourierStatus::Available };
        assert_eq!(serde_json::to_string(&s).unwrap(), r#"{"t":"status","status":"available"}"#);
        let c = ConsoleMsg::Subscribe { bbox: [13.3, 52.4, 13.5, 52.6] };
        assert_eq!(serde_json::to_string(&c).unwrap(), r#"{"t":"subscribe","bbox":[13.3,52.4,13.5,52.6]}"#);
    }

    #[test]
    fn server_messages_parse() {
        let offer: ServerMsg = serde_json::from_str(
            r#"{"t":"offer","seq":1,"order_id":"o1","pickup":{"lat":1,"lng":2},"dropoff":{"lat":3,"lng":4},"expires_at":5}"#,
        )
        .unwrap();
        assert!(matches!(offer, ServerMsg::Offer { seq: 1, .. }));
        let route: ServerMsg = serde_json::from_str(
            r#"{"t":"route","seq":3,"stops":[{"order_id":"o1","kind":"pickup","lat":1,"lng":2}]}"#,
        )
        .unwrap();
        assert!(matches!(route, ServerMsg::Route { ref stops, .. } if stops[0].kind == StopKind::Pickup));
        let stats: ServerMsg =
            serde_json::from_str(r#"{"t":"stats","seq":9,"couriers_online":1,"orders_open":0,"ingest_per_s":3}"#).unwrap();
        assert_eq!(stats, ServerMsg::Other);
        let batch: ServerMsg =
            serde_json::from_str(r#"{"t":"couriers","seq":2,"items":[{"id":"c","lat":1,"lng":2,"ts":3,"status":"available","speed":1}]}"#)
                .unwrap();
        assert!(matches!(batch, ServerMsg::Couriers { ref items, .. } if items.len() == 1));
    }

    /// JSON equality where `90` and `90.0` are the same number (the contract's examples write
    /// whole floats without a fraction; serde writes `90.0`).
    fn same_json(a: &serde_json::Value, b: &serde_json::Value) -> bool {
        use serde_json::Value as V;
        match (a, b) {
            (V::Number(x), V::Number(y)) => x.as_f64() == y.as_f64(),
            (V::Array(x), V::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same_json(a, b)),
            (V::Object(x), V::Object(y)) => x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same_json(v, w))),
            _ => a == b,
        }
    }

    /// Every client message example of the repo's ARCHITECTURE.md parses into our type and
    /// serializes back to the same JSON.
    #[test]
    fn client_examples_of_the_contract_round_trip() {
        let examples = [
            r#"{"t":"loc","lat":52.5,"lng":13.4,"ts":1700000000000,"speed":4.2,"heading":90,"acc":5}"#,
            r#"{"t":"locs","items":[{"lat":52.5,"lng":13.4,"ts":1700000000000},{"lat":52.51,"lng":13.41,"ts":1700000001000}]}"#,
            r#"{"t":"status","status":"available"}"#,
            r#"{"t":"status","status":"offline"}"#,
            r#"{"t":"offer_reply","order_id":"o1","accept":true}"#,
            r#"{"t":"order_event","order_id":"o1","event":"picked_up"}"#,
            r#"{"t":"order_event","order_id":"o1","event":"delivered"}"#,
            r#"{"t":"order_event","order_id":"o1","event":"failed"}"#,
        ];
        for ex in examples {
            let msg: CourierMsg = serde_json::from_str(ex).unwrap_or_else(|e| panic!("{ex}: {e}"));
            let back = serde_json::to_value(&msg).unwrap();
            let want: serde_json::Value = serde_json::from_str(ex).unwrap();
            assert!(same_json(&back, &want), "{ex} came back as {back}");
        }
        let sub: ConsoleMsg = serde_json::from_str(r#"{"t":"subscribe","bbox":[13.3,52.4,13.5,52.6]}"#).unwrap();
        assert_eq!(sub, ConsoleMsg::Subscribe { bbox: [13.3, 52.4, 13.5, 52.6] });
        // Unknown values are refused, not guessed.
        assert!(serde_json::from_str::<CourierMsg>(r#"{"t":"status","status":"busy"}"#).is_err());
        assert!(serde_json::from_str::<CourierMsg>(r#"{"t":"order_event","order_id":"o1","event":"lost"}"#).is_err());
    }

    /// The server message examples of ARCHITECTURE.md (placeholders filled in), plus what the
    /// gateway really adds (`null` optionals, an embedded `order`, `snapshot`), all parse.
    #[test]
    fn server_examples_of_the_contract_parse() {
        let p = Point { lat: 52.5, lng: 13.4 };
        let d = Point { lat: 52.52, lng: 13.42 };
        let cases: Vec<(&str, ServerMsg)> = vec![
            (
                r#"{"t":"offer","seq":1,"order_id":"o1","pickup":{"lat":52.5,"lng":13.4},"dropoff":{"lat":52.52,"lng":13.42},"expires_at":1700000020000}"#,
                ServerMsg::Offer { seq: 1, order_id: "o1".into(), pickup: p, dropoff: d, expires_at: Some(1_700_000_020_000) },
            ),
            (
                r#"{"t":"assigned","seq":2,"order_id":"o1","pickup":{"lat":52.5,"lng":13.4},"dropoff":{"lat":52.52,"lng":13.42}}"#,
                ServerMsg::Assigned { seq: 2, order_id: "o1".into(), pickup: p, dropoff: d },
            ),
            (
                r#"{"t":"route","seq":3,"stops":[{"order_id":"o1","kind":"pickup","lat":52.5,"lng":13.4},{"order_id":"o1","kind":"dropoff","lat":52.52,"lng":13.42}]}"#,
                ServerMsg::Route {
                    seq: 3,
                    stops: vec![
                        Stop { order_id: "o1".into(), kind: StopKind::Pickup, lat: 52.5, lng: 13.4 },
                        Stop { order_id: "o1".into(), kind: StopKind::Dropoff, lat: 52.52, lng: 13.42 },
                    ],
                },
            ),
            (
                r#"{"t":"order_update","seq":4,"order_id":"o1","state":"at_pickup","courier_id":"c1","ts":1700000000000}"#,
                ServerMsg::OrderUpdate { seq: 4, order_id: "o1".into(), state: "at_pickup".into(), courier_id: Some("c1".into()), ts: Some(1_700_000_000_000), order: None },
            ),
            (
                r#"{"t":"order_update","seq":1,"order_id":"o2","state":"created","courier_id":null,"ts":5,"order":{"id":"o2"}}"#,
                ServerMsg::OrderUpdate { seq: 1, order_id: "o2".into(), state: "created".into(), courier_id: None, ts: Some(5), order: Some(OrderStops { pickup: None, dropoff: None }) },
            ),
            (
                r#"{"t":"error","code":"bad_coordinates","message":"lat out of range"}"#,
                ServerMsg::Error { code: "bad_coordinates".into(), message: "lat out of range".into() },
            ),
            (
                r#"{"t":"courier","seq":7,"order_id":"o1","courier_id":"c1","lat":52.5,"lng":13.4,"ts":1700000000000,"speed":4.2,"heading":null,"eta_s":120}"#,
                ServerMsg::Courier { seq: 7, courier_id: "c1".into(), lat: 52.5, lng: 13.4, ts: 1_700_000_000_000, eta_s: Some(120.0) },
            ),
            (r#"{"t":"resync","seq":9}"#, ServerMsg::Resync { seq: 9 }),
            (
                r#"{"t":"couriers","seq":2,"snapshot":true,"items":[{"id":"c1","lat":52.5,"lng":13.4,"ts":1700000000000,"status":"available","speed":null,"heading":90}]}"#,
                ServerMsg::Couriers {
                    seq: 2,
                    items: vec![ConsoleCourier { id: "c1".into(), lat: 52.5, lng: 13.4, ts: 1_700_000_000_000, status: Some("available".into()) }],
                },
            ),
            (r#"{"t":"orders","seq":3,"items":[]}"#, ServerMsg::Other),
            (r#"{"t":"zones","seq":4,"items":[{"type":"Feature"}]}"#, ServerMsg::Other),
            (r#"{"t":"event","seq":5,"event":{"kind":"zone_enter"}}"#, ServerMsg::Other),
            (r#"{"t":"stats","seq":6,"couriers_online":3,"orders_open":1,"ingest_per_s":12}"#, ServerMsg::Other),
        ];
        for (text, want) in cases {
            let got: ServerMsg = serde_json::from_str(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(got, want, "{text}");
        }
        // Malformed known messages are errors (the clients log and skip them).
        assert!(serde_json::from_str::<ServerMsg>(r#"{"t":"offer","order_id":"o1"}"#).is_err());
        assert!(serde_json::from_str::<ServerMsg>("not json").is_err());
        assert!(serde_json::from_str::<ServerMsg>(r#"{"seq":1}"#).is_err());
    }
}
