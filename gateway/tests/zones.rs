//! `/v1/zones` end to end: real server, SQLite and PostgreSQL, real Montreal district
//! boundaries (`../shared/data/zones/`, beside the clone), validation errors, service-area refusal over HTTP,
//! and a console that sees `zone.enter` when a courier drives in.

mod common;

use common::*;
use geo::{BoundingRect, InteriorPoint};
use hexfleet_gateway::auth::Role;
use serde_json::{Value, json};

/// `../shared/data/` beside the repo clone (outside data is not copied into the repo).
const DISTRICTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/data/zones/montreal_districts.geojson");

fn districts() -> Vec<Value> {
    let text = std::fs::read_to_string(DISTRICTS).unwrap_or_else(|e| panic!("reference data {DISTRICTS} is missing ({e}); the tests need shared/data beside the clone"));
    let v: Value = serde_json::from_str(&text).unwrap();
    v["features"].as_array().unwrap().clone()
}

/// The district named `name` as a zone Feature of `kind`.
fn district(name: &str, kind: &str) -> Value {
    let mut f = districts().into_iter().find(|f| f["properties"]["district"] == name).unwrap_or_else(|| panic!("no district {name}"));
    f["properties"]["kind"] = json!(kind);
    f["properties"]["name"] = json!(name);
    f
}

/// A point inside the district and one ~2 km north of its bounding box, as (lat, lng).
fn inside_and_outside(f: &Value) -> ((f64, f64), (f64, f64)) {
    let (mp, _, _) = hexfleet_gateway::zones::parse_feature(f.clone()).unwrap();
    let p = mp.interior_point().unwrap();
    let r = mp.bounding_rect().unwrap();
    ((p.y(), p.x()), (r.max().y + 0.02, p.x()))
}

async fn put_raw(srv: &TestServer, path: &str, token: &str, body: &str) -> (u16, Value) {
    let r = srv
        .http
        .put(format!("{}{path}", srv.base))
        .bearer_auth(token)
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    let s = r.status().as_u16();
    (s, r.json().await.unwrap_or(Value::Null))
}

fn assert_error(v: &Value, code: &str) {
    assert_eq!(v["error"]["code"], code, "{v}");
    assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
}

fn positions(v: &Value) -> usize {
    v["geometry"]["coordinates"].as_array().unwrap().iter().flat_map(|p| p.as_array().unwrap()).map(|r| r.as_array().unwrap().len()).sum()
}

/// Every Montreal district goes in; list, read, replace, role and tenant checks; a restart
/// keeps them; delete.
async fn round_trip(db: &str) {
    let mut srv = TestServer::start(fast_config(db)).await;
    let disp = srv.dispatcher("mtl");
    let all = districts();
    for (i, f) in all.iter().enumerate() {
        let mut f = f.clone();
        f["properties"]["kind"] = json!("district");
        let (s, v) = srv.put(&format!("/v1/zones/d{i}"), &disp, f).await;
        assert_eq!(s, 201, "{v}");
        assert_eq!((v["type"].as_str(), v["geometry"]["type"].as_str()), (Some("Feature"), Some("MultiPolygon")), "{v}");
    }
    let (s, list) = srv.get("/v1/zones", Some(&disp)).await;
    assert_eq!(s, 200, "{list}");
    let items = list["items"].as_array().unwrap();
    assert_eq!(items.len(), all.len());
    for it in items {
        assert_eq!(it["properties"]["kind"], "district");
        assert_eq!((it["properties"]["supply"].as_u64(), it["properties"]["demand"].as_u64()), (Some(0), Some(0)), "{it}");
        assert_eq!(it["properties"]["surge"].as_f64(), Some(0.0));
    }
    // The first district is a MultiPolygon of two parts: every position round-trips.
    let (s, d0) = srv.get("/v1/zones/d0", Some(&disp)).await;
    assert_eq!(s, 200, "{d0}");
    assert_eq!(d0["geometry"]["coordinates"], all[0]["geometry"]["coordinates"]);

    // Replace: 200, new kind and name.
    let (s, v) = srv.put("/v1/zones/d0", &disp, district("111-Mile-End", "service_area")).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!((v["properties"]["kind"].as_str(), v["properties"]["name"].as_str()), (Some("service_area"), Some("111-Mile-End")));

    // Roles and tenants.
    let courier = srv.token(Role::Courier, "c1", "mtl", None);
    let (s, v) = srv.put("/v1/zones/x", &courier, district("111-Mile-End", "hub")).await;
    assert_eq!(s, 403, "{v}");
    assert_error(&v, "forbidden");
    assert_eq!(srv.get("/v1/zones", Some(&courier)).await.0, 403);
    assert_eq!(srv.delete("/v1/zones/d1", &courier).await.0, 403);
    assert_eq!(srv.get("/v1/zones", None).await.0, 401);
    let other = srv.dispatcher("other");
    let (s, v) = srv.get("/v1/zones", Some(&other)).await;
    assert_eq!((s, v["items"].as_array().map(Vec::len)), (200, Some(0)), "{v}");
    assert_eq!(srv.get("/v1/zones/d1", Some(&other)).await.0, 404);
    assert_eq!(srv.delete("/v1/zones/d1", &other).await.0, 404);

    srv.stop().await;
    let mut srv = TestServer::start(fast_config(db)).await;
    let (s, list) = srv.get("/v1/zones", Some(&disp)).await;
    assert_eq!((s, list["items"].as_array().unwrap().len()), (200, all.len()), "zones survive a restart");
    let (_, d1) = srv.get("/v1/zones/d1", Some(&disp)).await;
    assert_eq!(d1["geometry"]["coordinates"][0], all[1]["geometry"]["coordinates"]);
    let (_, d0) = srv.get("/v1/zones/d0", Some(&disp)).await;
    assert_eq!(d0["properties"]["kind"], "service_area");
    assert!(positions(&d0) > 3);

    let (s, _) = srv.delete("/v1/zones/d1", &disp).await;
    assert_eq!(s, 204);
    assert_eq!(srv.get("/v1/zones/d1", Some(&disp)).await.0, 404);
    let (s, v) = srv.delete("/v1/zones/d1", &disp).await;
    assert_eq!(s, 404);
    assert_error(&v, "not_found");
    let (s, ev) = srv.get("/v1/events?entity=zone&id=d1", Some(&disp)).await;
    assert_eq!(s, 200);
    let kinds: Vec<&str> = ev["items"].as_array().unwrap().iter().filter_map(|e| e["kind"].as_str()).collect();
    assert_eq!(kinds, ["zone.created", "zone.deleted"]);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zones_round_trip_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    round_trip(dir.path().join("hexfleet.db").to_str().unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zones_round_trip_on_postgres() {
    let Some(db) = PgDb::create().await else { return };
    round_trip(&db.url).await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_zones_get_400_with_the_error_shape() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(fast_config(dir.path().join("h.db").to_str().unwrap())).await;
    let disp = srv.dispatcher("t");
    let poly = |coords: Value| json!({"type":"Feature","properties":{"kind":"hub"},"geometry":{"type":"Polygon","coordinates":coords}});
    let cases: Vec<(Value, &str)> = vec![
        (poly(json!([[[-73.6, 45.5], [-73.5, 45.5], [-73.5, 45.6], [-73.6, 45.6]]])), "open_ring"),
        (poly(json!([[[-73.6, 45.5], [-73.5, 95.0], [-73.5, 45.6], [-73.6, 45.5]]])), "bad_coordinates"),
        (poly(json!([[[-73.6, 45.5], [-73.5, 45.5], [-73.6, 45.5]]])), "invalid_geometry"),
        (poly(json!([[[-73.6, 45.5], [-73.5, 45.5], [-73.5, 45.5], [-73.6, 45.5]]])), "invalid"),
        // Across the antimeridian without a cut, near a pole, and without area (geo/src/fence.rs).
        (poly(json!([[[179.0, -18.0], [-179.0, -18.0], [-179.0, -16.0], [179.0, -16.0], [179.0, -18.0]]])), "invalid"),
        (poly(json!([[[-170.0, 89.0], [170.0, 89.0], [170.0, 89.05], [-170.0, 89.05], [-170.0, 89.0]]])), "invalid"),
        (poly(json!([[[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [0.0, 0.0]]])), "invalid"),
        (json!({"type":"Feature","properties":{"kind":"hub"},"geometry":{"type":"Point","coordinates":[-73.6, 45.5]}}), "unsupported_geometry"),
        (json!({"type":"Feature","properties":{"name":"no kind"},"geometry":{"type":"Polygon","coordinates":[[[-73.6, 45.5], [-73.5, 45.5], [-73.5, 45.6], [-73.6, 45.5]]]}}), "missing_kind"),
        (json!({"type":"Feature","geometry":{"type":"Polygon","coordinates":"nope"},"properties":{"kind":"hub"}}), "invalid_geojson"),
        (json!([1, 2, 3]), "invalid_geojson"),
    ];
    for (body, code) in cases {
        let (s, v) = srv.put("/v1/zones/z1", &disp, body.clone()).await;
        assert_eq!(s, 400, "{body} -> {v}");
        assert_error(&v, code);
    }
    // NaN and Infinity are not JSON; a truncated body is not either.
    for raw in [
        r#"{"type":"Feature","properties":{"kind":"hub"},"geometry":{"type":"Polygon","coordinates":[[[NaN,45.5],[-73.5,45.5],[-73.5,45.6],[NaN,45.5]]]}}"#,
        r#"{"type":"Feature","properties":{"kind":"hub"},"geometry":{"type":"Polygon","coordinates":[[[1e999,45.5],[-73.5,45.5],[-73.5,45.6],[1e999,45.5]]]}}"#,
        r#"{"type":"Feature","properties":{"#,
    ] {
        let (s, v) = put_raw(&srv, "/v1/zones/z1", &disp, raw).await;
        assert_eq!(s, 400, "{raw} -> {v}");
        assert_error(&v, "malformed_json");
    }
    // Too many positions.
    let ring: Vec<Value> = (0..30_000).map(|i| json!([-73.6 + i as f64 * 1e-6, 45.5])).chain([json!([-73.6, 45.6]), json!([-73.6, 45.5])]).collect();
    let (s, v) = srv.put("/v1/zones/z1", &disp, poly(json!([ring]))).await;
    assert!(s == 400 || s == 413, "{s} {v}");
    assert!(v["error"]["code"].is_string(), "{v}");
    assert_eq!(srv.get("/v1/zones/z1", Some(&disp)).await.0, 404, "nothing was stored");
    // The routes are in the OpenAPI document.
    let (s, doc) = srv.get("/openapi.json", None).await;
    assert_eq!(s, 200);
    for p in ["/v1/zones", "/v1/zones/{id}"] {
        assert!(doc["paths"][p].is_object(), "{p} missing from the OpenAPI document");
    }
    for m in ["put", "get", "delete"] {
        assert!(doc["paths"]["/v1/zones/{id}"][m].is_object(), "{m} /v1/zones/{{id}} missing");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_outside_the_service_area_get_422() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(fast_config(dir.path().join("h.db").to_str().unwrap())).await;
    let disp = srv.dispatcher("mtl");
    let f = district("111-Mile-End", "service_area");
    let (inside, outside) = inside_and_outside(&f);
    let at = |p: (f64, f64)| json!({"lat": p.0, "lng": p.1});
    // No service area yet: accepted.
    let (s, v) = srv.post("/v1/orders", &disp, json!({"id":"before","pickup":at(outside),"dropoff":at(outside)})).await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = srv.put("/v1/zones/mile-end", &disp, f).await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = srv.post("/v1/orders", &disp, json!({"id":"in","pickup":at(inside),"dropoff":at(inside)})).await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = srv.post("/v1/orders", &disp, json!({"id":"out","pickup":at(outside),"dropoff":at(inside)})).await;
    assert_eq!(s, 422, "{v}");
    assert_error(&v, "outside_service_area");
    let (s, v) = srv.post("/v1/orders", &disp, json!({"id":"out2","pickup":at(inside),"dropoff":at(outside)})).await;
    assert_eq!(s, 422, "{v}");
    assert_eq!(srv.get("/v1/orders/out", Some(&disp)).await.0, 404);
    // The waiting order inside counts as the zone's demand.
    let v = eventually("demand 1", || async {
        let (_, v) = srv.get("/v1/zones/mile-end", Some(&disp)).await;
        (v["properties"]["demand"] == 1).then_some(v)
    })
    .await;
    assert_eq!(v["properties"]["surge"].as_f64(), Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_console_sees_zone_enter_when_a_courier_drives_in() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(fast_config(dir.path().join("h.db").to_str().unwrap())).await;
    let tenant = "mtl";
    let disp = srv.dispatcher(tenant);
    let f = district("111-Mile-End", "hub");
    let (inside, outside) = inside_and_outside(&f);
    let (s, v) = srv.put("/v1/zones/mile-end", &disp, f).await;
    assert_eq!(s, 201, "{v}");

    let mut console = srv.ws("/v1/ws/console", &disp).await;
    console.send(json!({"t":"subscribe","bbox":[-74.0, 45.3, -73.4, 45.8]})).await;
    let zs = console.expect("zones snapshot", |v| t(v) == "zones").await;
    assert_eq!(zs["items"][0]["id"], "mile-end", "{zs}");
    assert_eq!(zs["items"][0]["geometry"]["type"], "MultiPolygon");

    let mut courier = srv.ws("/v1/ws/courier", &srv.token(Role::Courier, "c1", tenant, None)).await;
    courier.send(json!({"t":"status","status":"available"})).await;
    let t0 = now_ms() - 600_000;
    courier.send(json!({"t":"loc","lat":outside.0,"lng":outside.1,"ts":t0})).await;
    courier.send(json!({"t":"loc","lat":inside.0,"lng":inside.1,"ts":t0 + 300_000})).await;
    let ev = console.expect("zone.enter", |v| t(v) == "event" && v["event"]["kind"] == "zone.enter").await;
    assert_eq!(ev["event"]["entity"], "zone");
    assert_eq!(ev["event"]["entity_id"], "mile-end");
    assert_eq!(ev["event"]["attrs"]["courier_id"], "c1");
    assert_eq!(ev["event"]["ts"], t0 + 300_000);
    assert!(ev["seq"].as_u64().is_some());
    // It is counted as the zone's supply, and the event is in the log.
    eventually("supply 1", || async {
        let (_, v) = srv.get("/v1/zones/mile-end", Some(&disp)).await;
        (v["properties"]["supply"] == 1).then_some(())
    })
    .await;
    eventually("zone.enter logged", || async {
        let (_, v) = srv.get("/v1/events?entity=zone&id=mile-end", Some(&disp)).await;
        v["items"].as_array().unwrap().iter().any(|e| e["kind"] == "zone.enter").then_some(())
    })
    .await;
    // Deleting the zone: the console sees the closing exit.
    let (s, _) = srv.delete("/v1/zones/mile-end", &disp).await;
    assert_eq!(s, 204);
    // Both arrive, in either order (the exit comes from the courier's actor).
    let (mut exit, mut gone) = (None, None);
    while exit.is_none() || gone.is_none() {
        let v = console.expect("zone.exit and zones deletion", |v| (t(v) == "event" && v["event"]["kind"] == "zone.exit") || (t(v) == "zones" && v["deleted"].is_array())).await;
        if t(&v) == "event" { exit = Some(v) } else { gone = Some(v) }
    }
    assert_eq!(exit.unwrap()["event"]["reason"], "zone deleted");
    assert_eq!(gone.unwrap()["deleted"][0], "mile-end");
}

/// Two nodes on one PostgreSQL database and one Redis: a zone drawn on node A guards the
/// couriers connected to node B (their geofence events come from B), and deleting it on A
/// closes their stay on B. Without the sync, B would know the zone only after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zone_changed_on_one_node_is_live_on_the_other() {
    let Some(url) = redis_or_skip().await else { return };
    let Some(db) = PgDb::create().await else { return };
    let prefix = format!("hexfleet:test:{}:", uuid_like());
    let node = |name: &str| {
        let mut cfg = fast_config(&db.url);
        cfg.redis_url = Some(url.clone());
        cfg.redis_prefix = prefix.clone();
        cfg.node_id = name.into();
        cfg
    };
    let mut a = TestServer::start(node("node-a")).await;
    let mut b = TestServer::start(node("node-b")).await;
    let tenant = "mtl2";
    let (disp_a, disp_b) = (a.dispatcher(tenant), b.dispatcher(tenant));
    let f = district("111-Mile-End", "hub");
    let (inside, outside) = inside_and_outside(&f);

    // A courier on node B, outside the district.
    let mut courier = b.ws("/v1/ws/courier", &b.token(Role::Courier, "cb", tenant, None)).await;
    let t0 = now_ms() - 600_000;
    courier.send(json!({"t":"loc","lat":outside.0,"lng":outside.1,"ts":t0})).await;
    assert_eq!(b.get("/v1/zones/mile-end", Some(&disp_b)).await.0, 404);

    // Drawn on A; B learns it through Redis and the shared store.
    let (s, v) = a.put("/v1/zones/mile-end", &disp_a, f).await;
    assert_eq!(s, 201, "{v}");
    eventually("node b has the zone", || async {
        let (s, v) = b.get("/v1/zones/mile-end", Some(&disp_b)).await;
        (s == 200 && v["properties"]["kind"] == "hub").then_some(())
    })
    .await;
    courier.send(json!({"t":"loc","lat":inside.0,"lng":inside.1,"ts":t0 + 300_000})).await;
    eventually("zone.enter of the courier on node b", || async {
        let (_, v) = a.get("/v1/events?entity=zone&id=mile-end", Some(&disp_a)).await;
        v["items"].as_array()?.iter().any(|e| e["kind"] == "zone.enter" && e["attrs"]["courier_id"] == "cb").then_some(())
    })
    .await;

    // Deleted on A: B drops it and closes the courier's stay.
    assert_eq!(a.delete("/v1/zones/mile-end", &disp_a).await.0, 204);
    eventually("node b dropped the zone", || async { (b.get("/v1/zones/mile-end", Some(&disp_b)).await.0 == 404).then_some(()) }).await;
    eventually("closing zone.exit from node b", || async {
        let (_, v) = a.get("/v1/events?entity=zone&id=mile-end", Some(&disp_a)).await;
        v["items"].as_array()?.iter().any(|e| e["kind"] == "zone.exit" && e["attrs"]["courier_id"] == "cb").then_some(())
    })
    .await;
    a.stop().await;
    b.stop().await;
    db.drop_db().await;
}
