//! The edges: authentication and tenancy, bad input over HTTP and WebSocket (a courier that
//! sends garbage affects nobody else), the OsmAnd/Traccar endpoint, and fan-out between two
//! nodes through the real Redis.

mod common;

use common::*;
use hexfleet_gateway::auth::{Claims, Role};
use serde_json::json;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

async fn server() -> (TestServer, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(fast_config(dir.path().join("h.db").to_str().unwrap())).await;
    (srv, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_roles_and_tenants_are_enforced() {
    let (srv, _d) = server().await;
    let order = json!({"id":"o1","pickup":{"lat":52.5,"lng":13.4},"dropoff":{"lat":52.51,"lng":13.41}});
    // No token, wrong secret, expired.
    let r = srv.http.post(format!("{}/v1/orders", srv.base)).json(&order).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unauthorized", "{body}");
    let forged = hexfleet_gateway::auth::Keys::new("another-secret").mint(Role::Admin, "x", "t1", None, std::time::Duration::from_secs(60));
    assert_eq!(srv.post("/v1/orders", &forged, order.clone()).await.0, 401);
    let claims = Claims { sub: "d".into(), role: Role::Dispatcher, tenant: "t1".into(), exp: 1_000_000, order_id: None };
    let expired = jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes())).unwrap();
    let (s, v) = srv.post("/v1/orders", &expired, order.clone()).await;
    assert_eq!((s, v["error"]["message"].as_str()), (401, Some("token expired")));
    // Wrong role.
    let (s, v) = srv.post("/v1/orders", &srv.token(Role::Courier, "c1", "t1", None), order.clone()).await;
    assert_eq!((s, v["error"]["code"].as_str()), (403, Some("forbidden")), "{v}");
    let (s, _) = srv.post("/v1/orders", &srv.token(Role::Customer, "u", "t1", Some("o1")), order.clone()).await;
    assert_eq!(s, 403);
    // The right role works; a customer sees only its own order; other tenants see nothing.
    assert_eq!(srv.post("/v1/orders", &srv.dispatcher("t1"), order.clone()).await.0, 201);
    // A staff or customer subject may be what an identity provider issues; a courier's is its id.
    let alice = srv.token(Role::Dispatcher, "alice@example.com", "t1", None);
    assert_eq!(srv.get("/v1/orders/o1", Some(&alice)).await.0, 200);
    let (s, v) = srv.get("/v1/couriers/nearby?lat=52.5&lng=13.4", Some(&srv.token(Role::Courier, "c@1", "t1", None))).await;
    assert_eq!((s, v["error"]["message"].as_str()), (401, Some("token has an invalid tenant or subject")), "{v}");
    for bad in ["line\nbreak", "alice\u{202e}moc.elpmaxe", "two words"] {
        assert_eq!(srv.get("/v1/orders/o1", Some(&srv.token(Role::Dispatcher, bad, "t1", None))).await.0, 401, "{bad:?}");
    }
    assert_eq!(srv.get("/v1/orders/o1", Some(&srv.token(Role::Customer, "u", "t1", Some("o1")))).await.0, 200);
    assert_eq!(srv.get("/v1/orders/o1", Some(&srv.token(Role::Customer, "u", "t1", Some("o2")))).await.0, 404);
    assert_eq!(srv.get("/v1/orders/o1", Some(&srv.dispatcher("t2"))).await.0, 404);
    assert_eq!(srv.get("/v1/couriers/nearby?lat=52.5&lng=13.4", Some(&srv.token(Role::Customer, "u", "t1", Some("o1")))).await.0, 403);
    // WebSockets refuse the upgrade with the same statuses.
    let refused = |path: &str, tok: String| {
        let url = format!("{}{path}?token={tok}", srv.ws);
        async move {
            match tokio_tungstenite::connect_async(url).await {
                Err(tokio_tungstenite::tungstenite::Error::Http(r)) => r.status().as_u16(),
                other => panic!("expected a refused upgrade, got {:?}", other.map(|_| ())),
            }
        }
    };
    assert_eq!(refused("/v1/ws/courier", srv.dispatcher("t1")).await, 403);
    assert_eq!(refused("/v1/ws/courier", expired.clone()).await, 401);
    assert_eq!(refused("/v1/ws/console", srv.token(Role::Courier, "c1", "t1", None)).await, 403);
    assert_eq!(refused("/v1/ws/track/o1", srv.token(Role::Customer, "u", "t1", Some("o2"))).await, 403);
    assert_eq!(refused("/v1/ws/track/o1", srv.dispatcher("t2")).await, 404);

    // The ingest port refuses the same way, before the upgrade, with the API's error body.
    let ingest = srv.ingest.clone().unwrap();
    let refused_ingest = |path: &str, tok: Option<String>| {
        let url = match tok {
            Some(t) => format!("{ingest}{path}?token={t}"),
            None => format!("{ingest}{path}"),
        };
        async move {
            match tokio_tungstenite::connect_async(url).await {
                Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
                    let body: serde_json::Value = serde_json::from_slice(r.body().as_deref().unwrap_or_default()).expect("a JSON error body");
                    (r.status().as_u16(), body["error"]["code"].as_str().unwrap_or_default().to_owned())
                }
                other => panic!("expected a refused upgrade, got {:?}", other.map(|_| ())),
            }
        }
    };
    assert_eq!(refused_ingest("/v1/ws/courier", Some(srv.dispatcher("t1"))).await, (403, "forbidden".into()));
    assert_eq!(refused_ingest("/v1/ws/courier", Some(expired.clone())).await, (401, "unauthorized".into()));
    assert_eq!(refused_ingest("/v1/ws/courier", Some(forged.clone())).await, (401, "unauthorized".into()));
    assert_eq!(refused_ingest("/v1/ws/courier", None).await, (401, "unauthorized".into()));
    assert_eq!(refused_ingest("/v1/ws/console", Some(srv.dispatcher("t1"))).await, (404, "not_found".into()));
    // Not a WebSocket at all, and not HTTP at all.
    let http_url = ingest.replacen("ws://", "http://", 1);
    let r = srv.http.get(format!("{http_url}/v1/ws/courier")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "not_websocket", "{v}");
    let mut raw = tokio::net::TcpStream::connect(ingest.trim_start_matches("ws://")).await.unwrap();
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    raw.write_all(b"\x16\x03\x01 not http at all\r\n\r\n").await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(DEADLINE, raw.read_to_string(&mut answer)).await.expect("answered and closed").unwrap();
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    // A head that never ends is cut off at 8 KiB.
    let mut raw = tokio::net::TcpStream::connect(ingest.trim_start_matches("ws://")).await.unwrap();
    let long = format!("GET /v1/ws/courier HTTP/1.1\r\nx-pad: {}\r\n", "a".repeat(10_000));
    let _ = raw.write_all(long.as_bytes()).await;
    let mut answer = String::new();
    let _ = tokio::time::timeout(DEADLINE, raw.read_to_string(&mut answer)).await.expect("answered and closed");
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_http_input_gets_clear_errors() {
    let (srv, _d) = server().await;
    let disp = srv.dispatcher("t1");
    let raw = |body: &'static str| {
        let req = srv.http.post(format!("{}/v1/orders", srv.base)).bearer_auth(&disp).header("content-type", "application/json").body(body);
        async move {
            let r = req.send().await.unwrap();
            (r.status().as_u16(), r.json::<serde_json::Value>().await.unwrap())
        }
    };
    let (s, v) = raw("{not json").await;
    assert_eq!((s, v["error"]["code"].as_str()), (400, Some("malformed_json")), "{v}");
    let (s, v) = raw(r#"{"pickup":{"lat":NaN,"lng":13.4},"dropoff":{"lat":52.5,"lng":13.4}}"#).await;
    assert_eq!((s, v["error"]["code"].as_str()), (400, Some("malformed_json")), "{v}");
    let (s, v) = srv.post("/v1/orders", &disp, json!({"pickup":{"lat":91.0,"lng":13.4},"dropoff":{"lat":52.5,"lng":13.4}})).await;
    assert_eq!((s, v["error"]["code"].as_str()), (400, Some("bad_coordinates")), "{v}");
    let (s, v) = srv.post("/v1/orders", &disp, json!({"pickup":{"lat":52.0,"lng":-180.5},"dropoff":{"lat":52.5,"lng":13.4}})).await;
    assert_eq!((s, v["error"]["code"].as_str()), (400, Some("bad_coordinates")), "{v}");
    let (s, v) = srv.post("/v1/orders", &disp, json!({"id":"bad id!","pickup":{"lat":52.0,"lng":13.0},"dropoff":{"lat":52.5,"lng":13.4}})).await;
    assert_eq!((s, v["error"]["code"].as_str()), (400, Some("bad_id")), "{v}");
    let (s, v) = srv.get("/v1/couriers/nearby?lat=NaN&lng=13.4", Some(&disp)).await;
    assert_eq!((s, v["error"]["code"].as_str()), (400, Some("bad_coordinates")), "{v}");
    let (s, _) = srv.get("/v1/orders/nope", Some(&disp)).await;
    assert_eq!(s, 404);
    let big = format!("{{\"pad\":\"{}\"}}", "x".repeat(400 * 1024));
    let r = srv.http.post(format!("{}/v1/orders", srv.base)).bearer_auth(&disp).header("content-type", "application/json").body(big).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 413);
    // Control characters in free text are refused (PostgreSQL refuses NUL in text, and would
    // fail the whole commit group the write went in with).
    let (s, v) = srv.put("/v1/couriers/c1", &disp, json!({"name":"a\u{0}b"})).await;
    assert_eq!((s, v["error"]["code"].as_str()), (400, Some("bad_name")), "{v}");
    let zone = json!({"type":"Feature","properties":{"kind":"service_area","name":"x\u{0}"},
        "geometry":{"type":"Polygon","coordinates":[[[13.0,52.0],[13.1,52.0],[13.1,52.1],[13.0,52.0]]]}});
    let (s, v) = srv.put("/v1/zones/z1", &disp, zone).await;
    assert_eq!((s, v["error"]["code"].as_str()), (400, Some("bad_name")), "{v}");
    let hook = json!({"url":"https://example.com/h","events":["*"],"secret":"0123456789abcdef\u{0}"});
    let (s, v) = srv.put("/v1/webhooks/w1", &disp, hook).await;
    assert_eq!((s, v["error"]["code"].as_str()), (400, Some("invalid_webhook")), "{v}");
    // An id already used: the same request again gets that order (a retry; one order), another
    // order under it a conflict.
    let o = json!({"id":"dup","pickup":{"lat":52.5,"lng":13.4},"dropoff":{"lat":52.51,"lng":13.41}});
    let (s, first) = srv.post("/v1/orders", &disp, o.clone()).await;
    assert_eq!(s, 201, "{first}");
    let (s, again) = srv.post("/v1/orders", &disp, o).await;
    assert_eq!((s, &again["id"], &again["created_at"]), (201, &first["id"], &first["created_at"]), "{again}");
    let other = json!({"id":"dup","pickup":{"lat":52.5,"lng":13.4},"dropoff":{"lat":52.52,"lng":13.41}});
    let (s, v) = srv.post("/v1/orders", &disp, other).await;
    assert_eq!((s, v["error"]["code"].as_str()), (409, Some("conflict")), "{v}");
}

async fn nearby_ids(srv: &TestServer, tenant: &str, lat: f64, lng: f64) -> Vec<(String, f64)> {
    let (_, v) = srv.get(&format!("/v1/couriers/nearby?lat={lat}&lng={lng}&k=50&radius_m=100"), Some(&srv.dispatcher(tenant))).await;
    v["items"].as_array().unwrap().iter().map(|i| (i["courier"]["id"].as_str().unwrap().to_owned(), i["distance_m"].as_f64().unwrap())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_courier_sending_garbage_affects_nobody_else() {
    garbage_affects_nobody_else(Port::Http).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_courier_sending_garbage_to_the_ingest_port_affects_nobody_else() {
    garbage_affects_nobody_else(Port::Ingest).await;
}

async fn garbage_affects_nobody_else(port: Port) {
    let (srv, _d) = server().await;
    let tok = |c: &str| srv.token(Role::Courier, c, "t1", None);
    let mut a = srv.courier(port, &tok("a")).await;
    let mut b = srv.courier(port, &tok("b")).await;
    let now = now_ms();

    // Each bad message gets an error frame and the connection stays open.
    a.send_raw("{{{ not json").await;
    a.expect("malformed_json", |v| t(v) == "error" && v["code"] == "malformed_json").await;
    a.send(json!({"t":"loc","lat":200.0,"lng":13.4,"ts":now})).await;
    a.expect("bad_coordinates", |v| t(v) == "error" && v["code"] == "bad_coordinates").await;
    a.send(json!({"t":"loc","lat":52.5,"lng":13.4,"ts":now + 3_600_000})).await;
    a.expect("bad_timestamp", |v| t(v) == "error" && v["code"] == "bad_timestamp").await;
    a.send(json!({"t":"loc","lat":"NaN","lng":13.4,"ts":now})).await;
    a.expect("malformed", |v| t(v) == "error" && v["code"] == "malformed_json").await;
    a.send(json!({"t":"teleport"})).await;
    a.expect("unknown type", |v| t(v) == "error").await;
    a.send(json!({"t":"locs","items":[]})).await;
    a.expect("bad_batch", |v| t(v) == "error" && v["code"] == "bad_batch").await;
    a.send(json!({"t":"offer_reply","order_id":"ghost","accept":true})).await;
    a.expect("unknown order", |v| t(v) == "error" && v["code"] == "not_found").await;
    a.send(json!({"t":"loc","lat":52.5,"lng":13.4,"ts":now})).await;
    eventually("a's valid fix lands after its bad ones", || async { nearby_ids(&srv, "t1", 52.5, 13.4).await.iter().any(|(id, _)| id == "a").then_some(()) }).await;

    // An oversized frame closes that socket with 1009; b is untouched.
    a.send_raw(&"x".repeat(100 * 1024)).await;
    let close = a.expect_close().await.expect("a close frame");
    assert_eq!(close.code, CloseCode::Size, "{close:?}");
    b.send(json!({"t":"loc","lat":52.6,"lng":13.5,"ts":now})).await;
    eventually("b still ingests", || async { nearby_ids(&srv, "t1", 52.6, 13.5).await.iter().any(|(id, _)| id == "b").then_some(()) }).await;

    // Garbage on repeat closes with a policy reason.
    let mut c = srv.courier(port, &tok("c")).await;
    for _ in 0..25 {
        c.send_raw("garbage").await;
    }
    let close = c.expect_close().await.expect("c close frame");
    assert_eq!(close.code, CloseCode::Policy);
    assert_eq!(close.reason.as_str(), "too many invalid messages");

    // A flood past the rate limit: told, then closed with a reason.
    let mut d = srv.courier(port, &tok("d")).await;
    for i in 0..1_000 {
        d.send(json!({"t":"loc","lat":52.5,"lng":13.4,"ts":now + i})).await;
    }
    d.expect("rate_limited", |v| t(v) == "error" && v["code"] == "rate_limited").await;
    let close = d.expect_close().await.expect("d close frame");
    assert_eq!((close.code, close.reason.as_str()), (CloseCode::Policy, "rate limit exceeded"));

    // So is a flood of pings (each answered with a pong): before, they were never counted.
    let mut e = srv.courier(port, &tok("e")).await;
    for _ in 0..1_000 {
        let _ = futures_util::SinkExt::send(&mut e.s, tokio_tungstenite::tungstenite::Message::Ping(vec![1u8].into())).await;
    }
    let close = e.expect_close().await.expect("e close frame");
    assert_eq!((close.code, close.reason.as_str()), (CloseCode::Policy, "rate limit exceeded"));

    // b is still connected and served.
    // A small, plausible move (about 13 m in 1 s); a big jump would be held back as suspect.
    b.send(json!({"t":"loc","lat":52.6001,"lng":13.5001,"ts":now + 1000})).await;
    eventually("b still served after the others were closed", || async {
        nearby_ids(&srv, "t1", 52.6001, 13.5001).await.iter().any(|(id, d)| id == "b" && *d < 1.0).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn osmand_accepts_what_traccar_client_sends() {
    let (srv, _d) = server().await;
    let disp = srv.dispatcher("t1");
    let (s, v) = srv.put("/v1/couriers/c9", &disp, json!({"device_id":"864895030279986","vehicle":"car"})).await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = srv.get("/v1/couriers/c9/device-key", Some(&disp)).await;
    assert_eq!(s, 200, "{v}");
    let key = v["key"].as_str().unwrap().to_owned();
    assert_eq!((v["device_id"].as_str(), key.len()), (Some("864895030279986"), 32), "{v}");
    let ts = now_ms() / 1000 - 30;
    // The query form (OsmAnd and Traccar Client before 9): speed in knots. Traccar Client keeps
    // the query of its server URL (`…/osmand?key=KEY`) in front of the report's fields.
    let url = format!("{}/osmand?key={key}&id=864895030279986&timestamp={ts}&lat=52.5163&lon=13.3777&speed=10.0&bearing=87.5&altitude=34.0&accuracy=5.0&batt=87", srv.base);
    let r = srv.http.get(url).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let c = eventually("the query fix reaches the courier", || async {
        let (_, c) = srv.get("/v1/couriers/c9", Some(&disp)).await;
        (c["position"]["lat"].as_f64() == Some(52.5163)).then_some(c)
    })
    .await;
    let speed = c["position"]["speed"].as_f64().unwrap();
    assert!((speed - 5.144).abs() < 0.01, "10 knots is 5.144 m/s, got {speed}");
    // The JSON body of Traccar Client 9+: speed in m/s, ISO timestamp.
    let iso = "2099-01-01T00:00:00.000Z";
    let body = |ts: &str, lat: f64| json!({"location":{"timestamp":ts,"coords":{"latitude":lat,"longitude":13.3790,"accuracy":4.0,"speed":3.5,"heading":90.0,"altitude":35.0},"is_moving":true,"odometer":1200,"event":"motionchange","battery":{"level":0.82,"is_charging":false},"activity":{"type":"in_vehicle"}},"device_id":"864895030279986"});
    // A fix from the far future (a clock gone wrong) is dropped, but answered 200: the client
    // keeps a position until it is, and a 400 left it stuck at the head of its queue.
    let r = srv.http.post(format!("{}/osmand?key={key}", srv.base)).json(&body(iso, 52.6)).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200, "a known device's report is answered 200");
    let now_iso = {
        let secs = now_ms() / 1000 - 10;
        // RFC 3339 from Unix seconds, UTC.
        let days = secs.div_euclid(86_400);
        let rem = secs.rem_euclid(86_400);
        let (y, m, d) = civil_from_days(days);
        format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.000Z", rem / 3600, rem % 3600 / 60, rem % 60)
    };
    let r = srv.http.post(format!("{}/osmand?key={key}", srv.base)).json(&body(&now_iso, 52.5170)).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    // Had the 2099 fix been taken, this one would be older than it and not move the courier.
    srv.courier_at(&disp, "c9", 52.517).await;
    let metrics = srv.http.get(format!("{}/metrics", srv.base)).send().await.unwrap().text().await.unwrap();
    assert!(metrics.lines().any(|l| l.starts_with("hexfleet_osmand_dropped_total{reason=\"bad_timestamp\"}")), "{metrics}");
    // A form body, with the key in it (POST with an empty query) or in the URL.
    let form = format!("deviceid=864895030279986&timestamp={}&lat=52.5175&lon=13.38&key={key}", now_ms() / 1000 - 5);
    // (Under `/v1` as well as at the root.)
    let r = srv.http.post(format!("{}/v1/osmand", srv.base)).header("content-type", "application/x-www-form-urlencoded").body(form).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let form = format!("deviceid=864895030279986&timestamp={}&lat=52.5176&lon=13.38", now_ms() / 1000 - 4);
    let r = srv.http.post(format!("{}/osmand?key={key}", srv.base)).header("content-type", "application/x-www-form-urlencoded").body(form).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    srv.courier_at(&disp, "c9", 52.5176).await;
    // Unknown devices: 400 for the query form, 404 for JSON, as Traccar answers.
    let r = srv.http.get(format!("{}/osmand?id=unknown&lat=52.5&lon=13.4&key={key}", srv.base)).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let unknown_answer: serde_json::Value = r.json().await.unwrap();
    let mut unknown = body(&now_iso, 52.5);
    unknown["device_id"] = json!("unknown");
    let r = srv.http.post(format!("{}/osmand", srv.base)).json(&unknown).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 404);
    // A registered device without its key, or with a wrong one (another device's, or another
    // tenant's for this device), is refused exactly as an unknown one, and moves nobody.
    let fix = |lat: f64, key: &str| format!("{}/osmand?id=864895030279986&timestamp={}&lat={lat}&lon=13.38{key}", srv.base, now_ms() / 1000 - 2);
    let keys = hexfleet_gateway::auth::Keys::new(SECRET);
    let other_tenant = keys.device_key("t2", "c9", "864895030279986");
    let other_device = keys.device_key("t1", "c9", "864895030279987");
    let other_courier = keys.device_key("t1", "c8", "864895030279986");
    let bad_keys =
        [String::new(), "&key=".into(), format!("&key={other_tenant}"), format!("&key={other_device}"), format!("&key={other_courier}"), format!("&key={}", &key[..31])];
    for bad in bad_keys {
        let r = srv.http.get(fix(53.0, &bad)).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 400, "{bad:?}");
        let answer: serde_json::Value = r.json().await.unwrap();
        assert_eq!(answer["error"]["code"], unknown_answer["error"]["code"], "{bad:?}");
        assert_eq!(
            answer["error"]["message"].as_str().unwrap().replace("864895030279986", "unknown"),
            unknown_answer["error"]["message"].as_str().unwrap(),
            "{bad:?}: the answer tells nothing an unknown device's does not"
        );
    }
    let r = srv.http.post(format!("{}/osmand", srv.base)).json(&body(&now_iso, 53.0)).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 404, "JSON without a key");
    let metrics = srv.http.get(format!("{}/metrics", srv.base)).send().await.unwrap().text().await.unwrap();
    // (Other tests of this binary share the recorder: at least these seven.)
    let bad_keys = metrics.lines().find_map(|l| l.strip_prefix("hexfleet_osmand_bad_key_total ")).and_then(|v| v.trim().parse::<f64>().ok());
    assert!(bad_keys.is_some_and(|n| n >= 7.0), "{bad_keys:?} in {metrics}");
    let (_, c) = srv.get("/v1/couriers/c9", Some(&disp)).await;
    assert_eq!(c["position"]["lat"].as_f64(), Some(52.5176), "no refused report moved the courier: {c}");
    // Bad coordinates.
    let r = srv.http.get(format!("{}/osmand?id=864895030279986&lat=95&lon=13.4&key={key}", srv.base)).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 400);
    // -1 for an unknown speed, bearing, accuracy or battery (iOS's invalid values, passed on
    // by Traccar Client): the fix is kept without them, not dropped.
    let url = format!("{}/osmand?key={key}&id=864895030279986&timestamp={}&lat=52.5180&lon=13.38&speed=-1&bearing=-1&accuracy=-1&batt=-1", srv.base, now_ms() / 1000 - 1);
    assert_eq!(srv.http.get(url).send().await.unwrap().status().as_u16(), 200);
    srv.courier_at(&disp, "c9", 52.518).await;
    let (_, c) = srv.get("/v1/couriers/c9", Some(&disp)).await;
    assert!(c["position"]["speed"].is_null() && c["position"]["heading"].is_null(), "unknown values left out: {c}");
    // A body over the limit: 413 in the error shape.
    let big = "x".repeat(hexfleet_gateway::api::MAX_JSON_BODY + 1);
    let r = srv.http.post(format!("{}/osmand?key={key}", srv.base)).header("content-type", "application/json").body(big).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 413);
    let answer: serde_json::Value = r.json().await.unwrap();
    assert_eq!(answer["error"]["code"], "payload_too_large", "{answer}");
    // Who may read the key: the courier itself and staff, not another courier or a customer.
    let (s, v) = srv.get("/v1/couriers/c9/device-key", Some(&srv.token(Role::Courier, "c9", "t1", None))).await;
    assert_eq!((s, v["key"].as_str()), (200, Some(key.as_str())), "{v}");
    assert_eq!(srv.get("/v1/couriers/c9/device-key", Some(&srv.token(Role::Courier, "c8", "t1", None))).await.0, 403);
    assert_eq!(srv.get("/v1/couriers/c9/device-key", Some(&srv.token(Role::Customer, "u", "t1", Some("o1")))).await.0, 403);
    assert_eq!(srv.get("/v1/couriers/c9/device-key", None).await.0, 401);
    // A courier without a device has no key.
    assert_eq!(srv.put("/v1/couriers/c8", &disp, json!({"vehicle":"bike"})).await.0, 200);
    let (s, v) = srv.get("/v1/couriers/c8/device-key", Some(&disp)).await;
    assert_eq!((s, v["error"]["code"].as_str()), (409, Some("conflict")), "{v}");
    // A new device id is a new key: the old one no longer works.
    assert_eq!(srv.put("/v1/couriers/c9", &disp, json!({"device_id":"864895030279987"})).await.0, 200);
    let r = srv.http.get(format!("{}/osmand?key={key}&id=864895030279987&lat=52.5&lon=13.4", srv.base)).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 400, "the old device's key");
    let r = srv.http.get(format!("{}/osmand?key={other_device}&id=864895030279987&lat=52.5&lon=13.4", srv.base)).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200, "the new device's key");
    // The old device given to another courier (a phone handed over): the key c9 had for it
    // does not report as c8; c8's own key does.
    assert_eq!(srv.put("/v1/couriers/c8", &disp, json!({"device_id":"864895030279986"})).await.0, 200);
    let r = srv.http.get(format!("{}/osmand?key={key}&id=864895030279986&lat=52.5&lon=13.4", srv.base)).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 400, "the key of the device's previous courier");
    let (s, v) = srv.get("/v1/couriers/c8/device-key", Some(&disp)).await;
    assert_eq!((s, v["key"].as_str()), (200, Some(other_courier.as_str())), "{v}");
    let r = srv.http.get(format!("{}/osmand?key={other_courier}&id=864895030279986&lat=52.5&lon=13.4", srv.base)).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200, "the device's key for its courier now");
}

/// A courier may rename itself and go on or off shift, not change what dispatch gives it
/// (capacity, vehicle) or which tracker reports as it (device_id): those are staff's (403).
/// Before, a courier could raise its own capacity to 100, or claim any free device id and read
/// its key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_courier_changes_only_its_name_and_shift_itself() {
    let (srv, _d) = server().await;
    let disp = srv.dispatcher("t1");
    assert_eq!(srv.put("/v1/couriers/c1", &disp, json!({"capacity":2,"vehicle":"bike"})).await.0, 200);
    let me = srv.token(Role::Courier, "c1", "t1", None);
    for body in [json!({"capacity":100}), json!({"vehicle":"car"}), json!({"device_id":"imei-1"}), json!({"name":"x","capacity":2})] {
        let (s, v) = srv.put("/v1/couriers/c1", &me, body.clone()).await;
        assert_eq!((s, v["error"]["code"].as_str()), (403, Some("forbidden")), "{body}: {v}");
    }
    let (s, v) = srv.put("/v1/couriers/c1", &me, json!({"name":"Ana","on_shift":false})).await;
    assert_eq!((s, v["name"].as_str(), v["on_shift"].as_bool()), (200, Some("Ana"), Some(false)), "{v}");
    let (_, c) = srv.get("/v1/couriers/c1", Some(&disp)).await;
    assert_eq!((c["capacity"].as_u64(), c["vehicle"].as_str(), c["device_id"].as_str()), (Some(2), Some("bike"), None), "{c}");
    // Another courier may not change it at all; staff may change everything.
    assert_eq!(srv.put("/v1/couriers/c1", &srv.token(Role::Courier, "c2", "t1", None), json!({"name":"y"})).await.0, 403);
    assert_eq!(srv.put("/v1/couriers/c1", &disp, json!({"capacity":3,"device_id":"imei-1"})).await.0, 200);
}

/// `--osmand-keyless`: reports without a key are taken (Traccar's own behaviour, for devices
/// whose URL cannot carry one); a report with a wrong key is still refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn osmand_keyless_takes_reports_without_a_key_but_not_with_a_wrong_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = fast_config(dir.path().join("k.db").to_str().unwrap());
    cfg.osmand_keyless = true;
    let srv = TestServer::start(cfg).await;
    let disp = srv.dispatcher("t1");
    assert_eq!(srv.put("/v1/couriers/c9", &disp, json!({"device_id":"imei-9"})).await.0, 200);
    let r = srv.http.get(format!("{}/osmand?id=imei-9&lat=52.51&lon=13.4", srv.base)).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    srv.courier_at(&disp, "c9", 52.51).await;
    let r = srv.http.get(format!("{}/osmand?id=imei-9&lat=52.52&lon=13.4&key=00112233445566778899aabbccddeeff", srv.base)).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 400);
}

/// Days since 1970-01-01 → (year, month, day), Howard Hinnant's algorithm.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_on_node_b_sees_a_courier_on_node_a_through_redis() {
    let Some(url) = redis_or_skip().await else { return };
    let prefix = format!("hexfleet:test:{}:", uuid_like());
    let dir = tempfile::tempdir().unwrap();
    let mut cfg_a = fast_config(dir.path().join("a.db").to_str().unwrap());
    cfg_a.redis_url = Some(url.clone());
    cfg_a.redis_prefix = prefix.clone();
    cfg_a.node_id = "node-a".into();
    let mut cfg_b = fast_config(dir.path().join("b.db").to_str().unwrap());
    cfg_b.redis_url = Some(url.clone());
    cfg_b.redis_prefix = prefix;
    cfg_b.node_id = "node-b".into();
    let a = TestServer::start(cfg_a).await;
    let b = TestServer::start(cfg_b).await;
    let mut console = b.ws("/v1/ws/console", &b.dispatcher("mn")).await;
    console.send(json!({"t":"subscribe","bbox":[13.0, 52.0, 14.0, 53.0]})).await;
    console.expect("snapshot", |v| t(v) == "couriers" && v["snapshot"] == true).await;
    let mut courier = a.ws("/v1/ws/courier", &a.token(Role::Courier, "ca", "mn", None)).await;
    let t0 = now_ms() - 10_000;
    courier.send(json!({"t":"loc","lat":52.52,"lng":13.40,"ts":t0})).await;
    let batch = console
        .expect("courier from node a", |v| t(v) == "couriers" && v["items"].as_array().is_some_and(|i| i.iter().any(|c| c["id"] == "ca")))
        .await;
    let item = batch["items"].as_array().unwrap().iter().find(|c| c["id"] == "ca").unwrap().clone();
    assert_eq!(item["lat"], 52.52);
    // Another tenant's console on node b does not see it.
    let mut other = b.ws("/v1/ws/console", &b.dispatcher("other")).await;
    other.send(json!({"t":"subscribe","bbox":[13.0, 52.0, 14.0, 53.0]})).await;
    other.expect("snapshot", |v| t(v) == "couriers" && v["snapshot"] == true).await;
    courier.send(json!({"t":"loc","lat":52.5201,"lng":13.4001,"ts":t0 + 2_000})).await;
    console.expect("second position", |v| t(v) == "couriers" && v["items"].as_array().is_some_and(|i| i.iter().any(|c| c["lat"] == 52.5201))).await;
    // Stats arrive every second; if the other tenant had seen "ca" it would be in a couriers batch.
    let leaked = other.try_expect(|v| t(v) == "couriers" && v["items"].as_array().is_some_and(|i| i.iter().any(|c| c["id"] == "ca")));
    assert!(tokio::time::timeout(std::time::Duration::from_millis(1500), leaked).await.is_err(), "tenant isolation across nodes");
}

/// A node hears a tenant's updates through Redis only while it has a session of that tenant:
/// its channel is subscribed before the session's snapshot, and dropped once the last session
/// of the tenant closes. (Before, every node heard every update of every tenant and fell
/// behind; BENCHMARKS.md, "Two nodes, 20k courier sockets".)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_listens_to_a_tenants_channel_only_while_it_has_its_sessions() {
    let Some(url) = redis_or_skip().await else { return };
    let prefix = format!("hexfleet:test:{}:", uuid_like());
    let dir = tempfile::tempdir().unwrap();
    let node = |name: &str| {
        let mut cfg = fast_config(dir.path().join(format!("{name}.db")).to_str().unwrap());
        cfg.redis_url = Some(url.clone());
        cfg.redis_prefix = prefix.clone();
        cfg.node_id = name.into();
        cfg
    };
    let a = TestServer::start(node("node-a")).await;
    let b = TestServer::start(node("node-b")).await;
    let (east, west) = (format!("{prefix}fanout:t:east"), format!("{prefix}fanout:t:west"));
    assert_eq!(subscribers(&url, &east).await, 0);
    assert_eq!(subscribers(&url, &format!("{prefix}fanout")).await, 2, "zone changes reach every node");

    // A courier of `east` on node A: A listens to `east` (without market leases, several
    // nodes may run one tenant), nobody listens to `west`.
    let mut courier = a.ws("/v1/ws/courier", &a.token(Role::Courier, "ce", "east", None)).await;
    let t0 = now_ms() - 10_000;
    courier.send(json!({"t":"loc","lat":52.52,"lng":13.40,"ts":t0})).await;
    a.courier_at(&a.dispatcher("east"), "ce", 52.52).await;
    assert_eq!(subscribers(&url, &east).await, 1);

    // A console of `east` on node B: B listens before the console gets its snapshot, and
    // hears A's courier.
    let mut console = b.ws("/v1/ws/console", &b.dispatcher("east")).await;
    console.send(json!({"t":"subscribe","bbox":[13.0, 52.0, 14.0, 53.0]})).await;
    console.expect("snapshot", |v| t(v) == "couriers" && v["snapshot"] == true).await;
    assert_eq!(subscribers(&url, &east).await, 2);
    assert_eq!(subscribers(&url, &west).await, 0, "no session of west anywhere");
    courier.send(json!({"t":"loc","lat":52.5201,"lng":13.4001,"ts":t0 + 2_000})).await;
    console.expect("A's courier through redis", |v| t(v) == "couriers" && v["items"].as_array().is_some_and(|i| i.iter().any(|c| c["lat"] == 52.5201))).await;

    // The console closes: B stops listening to `east`; A still does.
    console.s.close(None).await.unwrap();
    eventually("node b left the east channel", || async { (subscribers(&url, &east).await == 1).then_some(()) }).await;
    // The courier leaves: nobody listens any more.
    courier.s.close(None).await.unwrap();
    eventually("node a left the east channel", || async { (subscribers(&url, &east).await == 0).then_some(()) }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_console_gets_stats_and_courier_batches_while_couriers_stream() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(fast_config(dir.path().join("s.db").to_str().unwrap())).await;
    let mut console = srv.ws("/v1/ws/console", &srv.dispatcher("t1")).await;
    console.send(json!({"t":"subscribe","bbox":[13.0, 52.0, 14.0, 53.0]})).await;
    console.expect("snapshot", |v| t(v) == "couriers" && v["snapshot"] == true).await;
    let mut courier = srv.ws("/v1/ws/courier", &srv.token(Role::Courier, "c1", "t1", None)).await;
    let t0 = now_ms() - 10_000;
    courier.send(json!({"t":"loc","lat":52.52,"lng":13.40,"ts":t0})).await;
    console.expect("the courier in a batch", |v| t(v) == "couriers" && v["items"].as_array().is_some_and(|i| i.iter().any(|c| c["id"] == "c1" && c["status"].is_string()))).await;
    let stats = console.expect("stats", |v| t(v) == "stats").await;
    assert!(stats["couriers_online"].as_u64().is_some_and(|n| n >= 1), "{stats}");
    assert!(stats["orders_open"].is_u64() && stats["ingest_per_s"].is_number(), "{stats}");

    // The figures are the tenant's own: another fleet's console on the same node sees none of
    // t1's couriers, orders or fixes, and t1's sees its own.
    let order = json!({"id":"o1","pickup":{"lat":52.5,"lng":13.4},"dropoff":{"lat":52.51,"lng":13.41}});
    assert_eq!(srv.post("/v1/orders", &srv.dispatcher("t1"), order).await.0, 201);
    let mut other = srv.ws("/v1/ws/console", &srv.dispatcher("t2")).await;
    other.send(json!({"t":"subscribe","bbox":[13.0, 52.0, 14.0, 53.0]})).await;
    for i in 1..=30 {
        courier.send(json!({"t":"loc","lat":52.52,"lng":13.40 + f64::from(i) * 1e-5,"ts":t0 + i64::from(i) * 100})).await;
    }
    let mine = console.expect("t1's stats with its order and fixes", |v| t(v) == "stats" && v["orders_open"] == 1 && v["ingest_per_s"].as_f64().is_some_and(|r| r > 0.0)).await;
    assert_eq!(mine["couriers_online"], 1, "{mine}");
    let theirs = other.expect("t2's stats", |v| t(v) == "stats").await;
    assert_eq!((theirs["couriers_online"].as_u64(), theirs["orders_open"].as_u64(), theirs["ingest_per_s"].as_f64()), (Some(0), Some(0), Some(0.0)), "{theirs}");
}

/// The console page and its icon are served without a token (the page asks for one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_page_and_favicon_are_served() {
    let (srv, _d) = server().await;
    let r = srv.http.get(format!("{}/", srv.base)).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
    assert!(r.text().await.unwrap().contains("<html"));
    let r = srv.http.get(format!("{}/favicon.ico", srv.base)).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.headers()["content-type"], "image/svg+xml");
    assert!(r.text().await.unwrap().starts_with("<svg"));
}

/// A courier app that sends its first frame right behind the handshake, without waiting for the
/// 101 (both in one write), is served: the ingest port keeps the bytes it read past the head.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ingest_port_keeps_a_frame_sent_with_the_handshake() {
    use futures_util::StreamExt as _;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio_tungstenite::tungstenite::protocol::frame::{Frame, coding::{Data, OpCode}};

    let (srv, _d) = server().await;
    let ingest = srv.ingest.clone().unwrap();
    let token = srv.token(Role::Courier, "early", "t1", None);
    let mut bytes = format!(
        "GET /v1/ws/courier?token={token} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    .into_bytes();
    let mut frame = Frame::message(r#"{"t":"teleport"}"#, OpCode::Data(Data::Text), true);
    frame.header_mut().mask = Some([7, 1, 9, 3]);
    frame.format(&mut bytes).unwrap();
    let mut tcp = tokio::net::TcpStream::connect(ingest.trim_start_matches("ws://")).await.unwrap();
    tcp.write_all(&bytes).await.unwrap();
    // The 101, byte by byte up to the blank line, so nothing after it is consumed here.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(tokio::time::timeout(DEADLINE, tcp.read_u8()).await.expect("handshake answered").unwrap());
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    // RFC 6455's sample key and its answer.
    assert!(head.to_ascii_lowercase().contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="), "{head}");
    let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(tcp, tokio_tungstenite::tungstenite::protocol::Role::Client, None).await;
    let answer = tokio::time::timeout(DEADLINE, ws.next()).await.expect("an answer to the early frame").unwrap().unwrap();
    let v: serde_json::Value = serde_json::from_str(answer.to_text().unwrap()).unwrap();
    assert_eq!((v["t"].as_str(), v["code"].as_str()), (Some("error"), Some("malformed_json")), "{v}");
}

/// A TCP connection to `to` from the local address `ip` (any of 127.0.0.0/8 on Linux).
async fn tcp_from(ip: &str, to: &str) -> tokio::net::TcpStream {
    let s = tokio::net::TcpSocket::new_v4().unwrap();
    s.bind(format!("{ip}:0").parse().unwrap()).unwrap();
    s.connect(to.parse().unwrap()).await.unwrap()
}

/// Reads a refusal to its end: (status, the error code of its JSON body, its Retry-After).
async fn refusal(mut tcp: tokio::net::TcpStream) -> (u16, String, Option<String>) {
    use tokio::io::AsyncReadExt as _;
    let mut answer = String::new();
    tokio::time::timeout(DEADLINE, tcp.read_to_string(&mut answer)).await.expect("answered and closed").unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no blank line in {answer:?}"));
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let retry = head.lines().find_map(|l| l.to_ascii_lowercase().strip_prefix("retry-after: ").map(str::to_owned));
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:?}"));
    (status, v["error"]["code"].as_str().unwrap_or_default().to_owned(), retry)
}

/// Sends a courier's WebSocket handshake on `tcp` and returns the answer's status.
async fn handshake(mut tcp: tokio::net::TcpStream, token: &str) -> u16 {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let head = format!(
        "GET /v1/ws/courier?token={token} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    while !answer.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout(DEADLINE, tcp.read_u8()).await.expect("handshake answered") {
            Ok(b) => answer.push(b),
            Err(_) => break,
        }
    }
    let answer = String::from_utf8_lossy(&answer).into_owned();
    answer.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("no status in {answer:?}"))
}

/// The ingest port's connection caps: over the per-address cap a client gets 429, over the
/// total cap 503, both with the API's JSON error and Retry-After, before anything is read; the
/// couriers already connected keep streaming, and a closed connection frees its place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ingest_port_caps_connections_in_all_and_per_address() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = fast_config(dir.path().join("h.db").to_str().unwrap());
    cfg.ingest_limits = hexfleet_gateway::ingest::Limits { max_connections: Some(3), max_per_ip: Some(2) };
    let srv = TestServer::start(cfg).await;
    let at = srv.ingest.clone().unwrap().trim_start_matches("ws://").to_owned();
    let tok = |c: &str| srv.token(Role::Courier, c, "t1", None);
    let now = now_ms();

    // 127.0.0.1: a streaming courier and an idle connection fill its two places.
    let mut a = srv.courier(Port::Ingest, &tok("a")).await;
    a.send(json!({"t":"loc","lat":52.5,"lng":13.4,"ts":now})).await;
    srv.courier_at(&srv.dispatcher("t1"), "a", 52.5).await;
    let _idle_1 = tcp_from("127.0.0.1", &at).await;
    let (status, code, retry) = refusal(tcp_from("127.0.0.1", &at).await).await;
    assert_eq!((status, code.as_str(), retry.as_deref()), (429, "too_many_connections", Some("5")));

    // Another address takes the third place; a fourth connection is over the total cap.
    let idle_2 = tcp_from("127.0.0.2", &at).await;
    let (status, code, retry) = refusal(tcp_from("127.0.0.3", &at).await).await;
    assert_eq!((status, code.as_str(), retry.as_deref()), (503, "over_capacity", Some("5")));

    // The courier already in is untouched.
    a.send(json!({"t":"loc","lat":52.5001,"lng":13.4,"ts":now + 1_000})).await;
    srv.courier_at(&srv.dispatcher("t1"), "a", 52.5001).await;

    // Closing the idle connection frees its place (once the server sees it end).
    drop(idle_2);
    eventually("a place is free again", || async {
        (handshake(tcp_from("127.0.0.3", &at).await, &tok("b")).await == 101).then_some(())
    })
    .await;
}

/// A node that cannot keep up with what it hears from other nodes drops the backlog instead of
/// queueing it without bound (redis-rs queues unread messages in memory), and goes on hearing
/// new messages after subscribing again. Each delivery is quick (0.1 ms), as in real overload:
/// the valve must see a queue that stays full, not slow messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_falls_behind_the_fan_out_drops_the_backlog() {
    use hexfleet_gateway::relay::Relay;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};
    let Some(url) = redis_or_skip().await else { return };
    let prefix = format!("hexfleet:test:{}:", uuid_like());
    let delivered = std::sync::Arc::new(AtomicUsize::new(0));
    let last = std::sync::Arc::new(parking_lot::Mutex::new(String::new()));
    let gaps = std::sync::Arc::new(AtomicUsize::new(0));
    let (d, l, g) = (delivered.clone(), last.clone(), gaps.clone());
    let shutdown = tokio_util::sync::CancellationToken::new();
    // The backlog may last 300 ms.
    let relay = Relay::start(
        "slow",
        &url,
        &prefix,
        (Duration::from_secs(1), Duration::from_millis(300)),
        move |_, payload| {
            let t = Instant::now();
            while t.elapsed() < Duration::from_micros(100) {
                std::hint::spin_loop();
            }
            d.fetch_add(1, Ordering::Relaxed);
            *l.lock() = String::from_utf8_lossy(payload).into_owned();
        },
        move |_| {
            g.fetch_add(1, Ordering::Relaxed);
        },
        |_| std::collections::HashSet::new(),
        shutdown.clone(),
    )
    .await
    .unwrap();
    let mut c = redis::Client::open(url.as_str()).unwrap().get_multiplexed_async_connection().await.unwrap();
    // 30,000 messages: 3 s of delivering.
    for _ in 0..3 {
        let mut pipe = redis::pipe();
        for i in 0..10_000 {
            pipe.cmd("PUBLISH").arg(format!("{prefix}fanout")).arg(format!("m{i}")).ignore();
        }
        pipe.query_async::<()>(&mut c).await.unwrap();
    }
    eventually("the backlog is dropped", || async { (relay.lag_resets() >= 1).then_some(()) }).await;
    // Subscribed again: a new message arrives; much of the backlog never did.
    eventually("a message after the reset", || {
        let mut c = c.clone();
        let (prefix, last) = (prefix.clone(), last.clone());
        async move {
            let _: i64 = redis::cmd("PUBLISH").arg(format!("{prefix}fanout")).arg("after").query_async(&mut c).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
            (*last.lock() == "after").then_some(())
        }
    })
    .await;
    let n = delivered.load(Ordering::Relaxed);
    assert!(n < 25_000, "the backlog was dropped, not delivered: {n}");
    // The sessions the dropped messages fed were told to start again, once per reset.
    assert_eq!(gaps.load(Ordering::Relaxed), relay.lag_resets() as usize, "a gap per dropped backlog");
    shutdown.cancel();
}

/// A node's graceful stop: updates it makes once its shutdown has begun (requests in flight,
/// the fleet's last changes) still reach the other nodes' consoles and tracking pages, until
/// the server finishes the fan-out after releasing its markets. (The publisher stopped at
/// the shutdown signal, and each such update was dropped and logged as "redis fan-out queue
/// full": the failover drill saw four at one SIGTERM.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updates_made_while_a_node_stops_still_reach_the_other_nodes() {
    use futures_util::StreamExt as _;
    use hexfleet_actors::domain::{DomainEvent, EntityKind, TenantId};
    use hexfleet_actors::publish::{Publisher as _, Update};
    use std::time::Duration;
    let Some(url) = redis_or_skip().await else { return };
    let prefix = format!("hexfleet:test:{}:", uuid_like());
    // Another node, hearing everything under the prefix.
    let mut other = redis::Client::open(url.as_str()).unwrap().get_async_pubsub().await.unwrap();
    other.psubscribe(format!("{prefix}*")).await.unwrap();
    let mut heard = other.into_on_message();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let broker = hexfleet_gateway::broker::Broker::with_redis("stopping", &url, &prefix, Duration::from_secs(1), shutdown.clone())
        .await
        .unwrap();
    let event = |id: &str| {
        Update::Event(std::sync::Arc::new(DomainEvent {
            tenant: TenantId::new("t1"),
            entity: EntityKind::Order,
            entity_id: id.into(),
            kind: "order.delivered".into(),
            actor: "courier:c1".into(),
            reason: None,
            ts: 1,
            attrs: vec![],
        }))
    };
    shutdown.cancel();
    // Let the publisher see the signal first (it used to stop at once).
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
    broker.publish(event("while-stopping"));
    let m = tokio::time::timeout(Duration::from_secs(10), heard.next())
        .await
        .expect("an update made during the shutdown reached the other node")
        .unwrap();
    let payload: String = m.get_payload().unwrap();
    assert!(payload.contains("while-stopping"), "{payload}");
    // Finished: nothing more goes out, quietly (the node is about to exit).
    broker.finish_fanout(Duration::from_secs(5)).await;
    broker.publish(event("after-finish"));
    broker.finish_fanout(Duration::from_secs(5)).await;
}

/// With Redis hanging, new sessions do not queue behind each other's subscriptions: ten
/// consoles opened at once all get their snapshot (one after another, each waiting up to 2 s
/// for an answer that never comes, the last would wait 20 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_do_not_queue_behind_a_hanging_redis() {
    let Some(url) = redis_or_skip().await else { return };
    let upstream = url.trim_start_matches("redis://").trim_end_matches('/').to_owned();
    let proxy = Proxy::start(upstream).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = fast_config(dir.path().join("b.db").to_str().unwrap());
    cfg.redis_url = Some(format!("redis://{}", proxy.addr));
    cfg.redis_prefix = format!("hexfleet:test:{}:", uuid_like());
    let b = TestServer::start(cfg).await;
    proxy.stall();
    let started = std::time::Instant::now();
    let consoles = (0..10).map(|i| {
        let (b, token) = (&b, b.dispatcher(&format!("hang{i}")));
        async move {
            let mut console = b.ws("/v1/ws/console", &token).await;
            console.send(json!({"t":"subscribe","bbox":[13.0, 52.0, 14.0, 53.0]})).await;
            console.expect("snapshot", |v| t(v) == "couriers" && v["snapshot"] == true).await;
        }
    });
    futures_util::future::join_all(consoles).await;
    let took = started.elapsed();
    assert!(took < std::time::Duration::from_secs(10), "ten consoles took {took:?} with Redis hanging");
    proxy.restore();
}

/// A server whose WebSocket pings, idle and write timeouts are these (ms).
async fn server_with_sockets(ping_every_ms: u64, idle_ms: u64, write_ms: u64) -> (TestServer, tempfile::TempDir) {
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = fast_config(dir.path().join("s.db").to_str().unwrap());
    cfg.sockets = hexfleet_gateway::ws::SocketTimes {
        ping_every: Duration::from_millis(ping_every_ms),
        idle: Duration::from_millis(idle_ms),
        write: Duration::from_millis(write_ms),
    };
    (TestServer::start(cfg).await, dir)
}

/// A customer's tracking page cannot send pings (browsers can't), and a quiet order sends
/// nothing: the server pings it, so a page that answers stays open past the idle timeout,
/// while one that answers nothing (gone without a close) is dropped at that timeout.
/// A tracking page flooding its read-only stream with pings (each answered) is told once
/// (`rate_limited`) and then closed with the policy reason. Before, pings were not counted at
/// all; and text floods end sooner, as invalid messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tracking_page_flooding_its_stream_is_told_then_closed() {
    let (srv, _d) = server().await;
    let order = json!({"id":"o1","pickup":{"lat":-45.0,"lng":170.0},"dropoff":{"lat":-45.01,"lng":170.01}});
    assert_eq!(srv.post("/v1/orders", &srv.dispatcher("t1"), order).await.0, 201);
    let mut page = srv.ws("/v1/ws/track/o1", &srv.token(Role::Customer, "u1", "t1", Some("o1"))).await;
    page.expect("the order's state", |v| t(v) == "order_update").await;
    for _ in 0..1_000 {
        let _ = futures_util::SinkExt::send(&mut page.s, tokio_tungstenite::tungstenite::Message::Ping(vec![1u8].into())).await;
    }
    page.expect("rate_limited", |v| t(v) == "error" && v["code"] == "rate_limited").await;
    let close = page.expect_close().await.expect("a close frame");
    assert_eq!((close.code, close.reason.as_str()), (CloseCode::Policy, "rate limit exceeded"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_tracking_page_is_pinged_and_kept_while_a_silent_one_is_dropped() {
    use futures_util::StreamExt as _;
    use std::time::Duration;
    use tokio_tungstenite::tungstenite::Message;
    let (srv, _dir) = server_with_sockets(200, 1_000, 1_000).await;
    // Far from any courier: nothing happens to it.
    let order = json!({"id":"o1","pickup":{"lat":-45.0,"lng":170.0},"dropoff":{"lat":-45.01,"lng":170.01}});
    assert_eq!(srv.post("/v1/orders", &srv.dispatcher("t1"), order).await.0, 201);
    let customer = srv.token(Role::Customer, "u1", "t1", Some("o1"));
    let mut page = srv.ws("/v1/ws/track/o1", &customer).await;
    let mut silent = srv.ws("/v1/ws/track/o1", &customer).await;
    page.expect("the order's state", |v| t(v) == "order_update").await;

    // Reading (tungstenite answers each ping with a pong) for three idle timeouts.
    let pings = page.read_answering_pings("the page", Duration::from_millis(3_000)).await;
    assert!(pings >= 5, "{pings} pings in 3 s at one per 200 ms");
    // The other one read nothing, so it answered nothing: its session is gone, and so is its
    // socket (reading it now, tungstenite's pong to a ping it holds meets the closed socket
    // before the close frame does).
    assert_eq!(srv.running.as_ref().unwrap().state.broker.session_counts().1, 1, "one tracking session left");
    let ended = tokio::time::timeout(DEADLINE, async {
        loop {
            match silent.s.next().await {
                Some(Ok(Message::Close(_)) | Err(_)) | None => return,
                Some(Ok(_)) => {}
            }
        }
    });
    ended.await.expect("the silent page's socket was closed");
}

/// A console that stops reading (an app suspended in the background, a hostile client) while
/// the server has a lot to send: its session gives up on the write and is dropped, instead of
/// waiting in that write for good with its place in the broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_console_that_stops_reading_is_dropped_instead_of_waited_for() {
    use hexfleet_actors::domain::{CourierId, Fix, LatLng, TenantId};
    let (srv, _dir) = server_with_sockets(60_000, 60_000, 300).await;
    let state = srv.running.as_ref().unwrap().state.clone();
    // 1,000 couriers: a snapshot of the world is about 120 KB.
    let tenant = TenantId::new("t1");
    for i in 0..1_000 {
        let id = CourierId::new(format!("c{i}"));
        state.fleet.ensure_courier(&tenant, &id).await.unwrap();
        let pos = LatLng::new(52.0 + i as f64 * 1e-4, 13.4).unwrap();
        state.fleet.ingest(&tenant, &id, [Fix { pos, ts: now_ms(), speed: None, heading: None, acc: None }]).unwrap();
    }
    // A client with a small receive buffer that keeps asking for the world and reads nothing
    // (snapshots are at most one per `SNAPSHOT_GAP`: it asks until it is dropped).
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let tcp = sock.connect(srv.running.as_ref().unwrap().addr).await.unwrap();
    let url = format!("{}/v1/ws/console?token={}", srv.ws, srv.dispatcher("t1"));
    let (ws, _) = tokio_tungstenite::client_async(url, tokio_tungstenite::MaybeTlsStream::Plain(tcp)).await.unwrap();
    let mut console = Ws { s: ws };
    eventually("the console's session", || async { (state.broker.session_counts().2 == 1).then_some(()) }).await;
    let asking = async {
        while state.broker.session_counts().2 == 1 {
            // Unchecked: the session may be gone by the time this is sent.
            let world = json!({"t":"subscribe","bbox":[-180.0,-90.0,180.0,90.0]}).to_string();
            let _ = futures_util::SinkExt::send(&mut console.s, tokio_tungstenite::tungstenite::Message::Text(world.into())).await;
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(20), asking).await.expect("the stalled console dropped");
    // The server is fine for everyone else.
    let mut other = srv.ws("/v1/ws/console", &srv.dispatcher("t1")).await;
    other.send(json!({"t":"subscribe","bbox":[13.0, 52.0, 14.0, 53.0]})).await;
    other.expect("a snapshot", |v| t(v) == "couriers" && v["snapshot"] == true).await;
    drop(console);
}

/// A console flooding subscribes past its rate limit is refused (one `rate_limited` error),
/// not served a snapshot per message: each one builds a whole snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_console_past_its_rate_limit_is_refused_not_served() {
    let (srv, _d) = server().await;
    let mut console = srv.ws("/v1/ws/console", &srv.dispatcher("t1")).await;
    let n = 300;
    for _ in 0..n {
        console.send(json!({"t":"subscribe","bbox":[13.0, 52.0, 13.1, 52.1]})).await;
    }
    // Counting the snapshots served up to a marker sent once the bucket has refilled (50 a
    // second: 100 ms gives it five), which is answered after everything before it.
    let mut snapshots = 0;
    let mut refused = 0;
    loop {
        let v = console.expect("any message", |_| true).await;
        if t(&v) == "couriers" && v["snapshot"] == true {
            snapshots += 1;
        }
        if t(&v) == "error" && v["code"] == "rate_limited" {
            refused += 1;
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            console.send_raw("not json").await;
        }
        if t(&v) == "error" && v["code"] == "malformed_json" {
            break;
        }
    }
    assert!(refused >= 1);
    assert!(snapshots < n - 50, "{snapshots} snapshots served for {n} subscribes");
}

/// A socket does not outlive its token: courier (both ports), console and tracking sessions
/// close with 1008 "token expired" once `exp` (plus the 5 s leeway) passes, while a session
/// whose token is still valid goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_close_when_their_token_expires() {
    let (srv, _d) = server().await;
    let disp = srv.dispatcher("t1");
    let order = json!({"id":"o1","pickup":{"lat":52.5,"lng":13.4},"dropoff":{"lat":52.51,"lng":13.41}});
    assert_eq!(srv.post("/v1/orders", &disp, order).await.0, 201);
    let short = |role: Role, sub: &str, order: Option<&str>| srv.keys.mint(role, sub, "t1", order, std::time::Duration::from_secs(1));
    let mut sockets = vec![
        ("courier, HTTP port", srv.courier(Port::Http, &short(Role::Courier, "c1", None)).await),
        ("courier, ingest port", srv.courier(Port::Ingest, &short(Role::Courier, "c2", None)).await),
        ("console", srv.ws("/v1/ws/console", &short(Role::Dispatcher, "d", None)).await),
        ("tracking", srv.ws("/v1/ws/track/o1", &short(Role::Customer, "u", Some("o1"))).await),
    ];
    let lasting = srv.token(Role::Courier, "c3", "t1", None);
    let mut stays = srv.courier(Port::Ingest, &lasting).await;
    for (what, ws) in &mut sockets {
        let close = ws.expect_close().await.unwrap_or_else(|| panic!("{what}: a close frame"));
        assert_eq!((close.code, close.reason.as_str()), (CloseCode::Policy, "token expired"), "{what}");
    }
    stays.send(json!({"t":"loc","lat":52.52,"lng":13.4,"ts":now_ms()})).await;
    srv.courier_at(&disp, "c3", 52.52).await;
}

/// Shutdown closes every kind of socket with 1001 "server shutting down" (the apps and pages
/// reconnect at once, to a node that stays), and none of them holds the server's graceful stop
/// (which gives open connections 5 s before dropping them without a close frame).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_every_socket_with_going_away_without_waiting_for_them() {
    let (mut srv, _d) = server().await;
    let disp = srv.dispatcher("t1");
    let order = json!({"id":"o1","pickup":{"lat":52.5,"lng":13.4},"dropoff":{"lat":52.51,"lng":13.41}});
    assert_eq!(srv.post("/v1/orders", &disp, order).await.0, 201);
    let mut console = srv.ws("/v1/ws/console", &disp).await;
    console.send(json!({"t":"subscribe","bbox":[13.0,52.0,14.0,53.0]})).await;
    let mut sockets = vec![
        ("courier, HTTP port", srv.courier(Port::Http, &srv.token(Role::Courier, "c1", "t1", None)).await),
        ("courier, ingest port", srv.courier(Port::Ingest, &srv.token(Role::Courier, "c2", "t1", None)).await),
        ("console", console),
        ("tracking", srv.ws("/v1/ws/track/o1", &srv.token(Role::Customer, "u", "t1", Some("o1"))).await),
    ];
    // Each session is running: it has answered or sent something.
    for (what, ws) in &mut sockets[2..] {
        ws.expect(what, |_| true).await;
    }
    let started = std::time::Instant::now();
    let closes = async {
        let mut got = Vec::new();
        for (what, ws) in &mut sockets {
            let close = ws.expect_close().await.unwrap_or_else(|| panic!("{what}: a close frame"));
            got.push((*what, close.code, close.reason.to_string()));
            // Reading on sends the reply to the close, as a browser or an app does at once.
            while let Some(Ok(_)) = futures_util::StreamExt::next(&mut ws.s).await {}
        }
        got
    };
    let ((), got) = tokio::join!(srv.stop(), closes);
    let took = started.elapsed();
    for (what, code, reason) in got {
        assert_eq!((code, reason.as_str()), (CloseCode::Away, "server shutting down"), "{what}");
    }
    assert!(took < std::time::Duration::from_secs(4), "the server took {took:?} to stop");
}

/// A courier socket's idle timeout, on both ports: a courier that keeps sending stays open for
/// several idle periods (the one deadline the session keeps is moved on, not fired), and one
/// that goes silent is closed with "idle timeout" once the idle time has passed since its
/// last frame, not earlier.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_courier_socket_is_kept_while_it_sends_and_closed_once_idle() {
    use futures_util::StreamExt as _;
    use std::time::Duration;
    use tokio_tungstenite::tungstenite::Message;
    // Long enough that a test host starved for a moment does not leave a gap of that length
    // between two of the 100 ms sends.
    let idle = Duration::from_millis(1_000);
    let (srv, _dir) = server_with_sockets(60_000, idle.as_millis() as u64, 1_000).await;
    let one = async |port: Port, sub: &str| {
        let mut ws = srv.courier(port, &srv.token(Role::Courier, sub, "t1", None)).await;
        // A fix every 100 ms for three idle periods; nothing may close the socket meanwhile.
        let until = tokio::time::Instant::now() + idle * 3;
        let mut last_sent = tokio::time::Instant::now();
        while tokio::time::Instant::now() < until {
            ws.send(json!({"t":"loc","lat":52.52,"lng":13.4,"ts":now_ms()})).await;
            last_sent = tokio::time::Instant::now();
            match tokio::time::timeout(Duration::from_millis(100), ws.s.next()).await {
                Err(_) | Ok(Some(Ok(Message::Text(_) | Message::Ping(_) | Message::Pong(_)))) => {}
                Ok(other) => panic!("{port:?}: a courier that sends was closed: {other:?}"),
            }
        }
        let close = ws.expect_close().await.unwrap_or_else(|| panic!("{port:?}: a close frame"));
        let after = last_sent.elapsed();
        assert_eq!((close.code, close.reason.as_str()), (CloseCode::Normal, "idle timeout"), "{port:?}");
        // The server heard the last frame after it was sent, and waits the idle time from then.
        assert!(after >= idle - Duration::from_millis(5), "{port:?}: closed {after:?} after the last frame (idle {idle:?})");
    };
    tokio::join!(one(Port::Http, "c1"), one(Port::Ingest, "c2"));
}

/// A parked courier may send a fix less often than the idle time (the protocol asks for one
/// every `--courier-stale-s`, 120 s, against a 90 s idle time): once quiet, its socket is
/// pinged, and an app whose WebSocket answers (tungstenite does while it reads) stays connected
/// on both ports. One that answers nothing (gone without a close) is still dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_courier_that_answers_pings_stays_connected() {
    use std::time::Duration;
    let (srv, _dir) = server_with_sockets(200, 1_000, 1_000).await;
    let state = srv.running.as_ref().unwrap().state.clone();
    // Reads nothing, so answers no ping.
    let mut gone = srv.courier(Port::Http, &srv.token(Role::Courier, "gone", "t1", None)).await;
    gone.send(json!({"t":"loc","lat":52.52,"lng":13.4,"ts":now_ms()})).await;
    let one = async |port: Port, sub: &str| {
        let mut ws = srv.courier(port, &srv.token(Role::Courier, sub, "t1", None)).await;
        ws.send(json!({"t":"loc","lat":52.52,"lng":13.4,"ts":now_ms()})).await;
        // Quiet for three idle times, reading.
        let pings = ws.read_answering_pings(&format!("{port:?}: a parked courier"), Duration::from_millis(3_000)).await;
        assert!(pings >= 5, "{port:?}: {pings} pings in 3 s, quiet for 200 ms before each");
        ws
    };
    let (mut c1, mut c2) = tokio::join!(one(Port::Http, "c1"), one(Port::Ingest, "c2"));
    assert_eq!(state.broker.session_counts().0, 2, "the courier that answered nothing was dropped, not the others");
    // Still served: a fix sent now is taken (11 m on from the first: a plausible move).
    for (ws, sub) in [(&mut c1, "c1"), (&mut c2, "c2")] {
        ws.send(json!({"t":"loc","lat":52.5201,"lng":13.4,"ts":now_ms()})).await;
        srv.courier_at(&srv.dispatcher("t1"), sub, 52.5201).await;
    }
    drop(gone);
}

/// Refusals are in the error shape everywhere: a path no route serves is a JSON 404, a method
/// a path does not serve a JSON 405 with `Allow`. A plain
/// GET of the courier socket (no upgrade) is refused before the courier is registered (a
/// durable write, an event, webhooks).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_paths_and_plain_gets_of_sockets_get_json_errors_and_change_nothing() {
    let (srv, _d) = server().await;
    let disp = srv.dispatcher("t1");
    for path in ["/v1/nope", "/nope", "/v1/orders/o1/nope"] {
        let (s, v) = srv.get(path, Some(&disp)).await;
        assert_eq!((s, v["error"]["code"].as_str()), (404, Some("not_found")), "{path}: {v}");
    }
    // A method the path does not serve: 405 in the error shape, with `Allow` (RFC 9110); and
    // `OPTIONS` says what is served.
    for (method, path, allow) in [
        (reqwest::Method::DELETE, "/v1/orders", "POST, OPTIONS"),
        (reqwest::Method::POST, "/v1/zones/z1", "GET, HEAD, PUT, DELETE, OPTIONS"),
        (reqwest::Method::PATCH, "/v1/couriers/c1", "GET, HEAD, PUT, OPTIONS"),
        (reqwest::Method::POST, "/v1/ws/console", "GET, HEAD, OPTIONS"),
        (reqwest::Method::PUT, "/osmand", "GET, HEAD, POST, OPTIONS"),
        (reqwest::Method::TRACE, "/healthz", "GET, HEAD, OPTIONS"),
    ] {
        let r = srv.http.request(method.clone(), format!("{}{path}", srv.base)).bearer_auth(&disp).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 405, "{method} {path}");
        assert_eq!(r.headers()["allow"], allow, "{method} {path}");
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "method_not_allowed", "{v}");
        let r = srv.http.request(reqwest::Method::OPTIONS, format!("{}{path}", srv.base)).send().await.unwrap();
        assert_eq!((r.status().as_u16(), r.headers()["allow"].to_str().unwrap()), (204, allow), "OPTIONS {path}");
    }
    // HEAD is GET's answer without the body.
    let get = srv.http.get(format!("{}/v1/couriers/nearby?lat=52.5&lng=13.4", srv.base)).bearer_auth(&disp).send().await.unwrap();
    let head = srv.http.head(format!("{}/v1/couriers/nearby?lat=52.5&lng=13.4", srv.base)).bearer_auth(&disp).send().await.unwrap();
    assert_eq!((head.status().as_u16(), get.status().as_u16()), (200, 200));
    assert_eq!(head.headers().get("content-type"), get.headers().get("content-type"));
    assert!(head.bytes().await.unwrap().is_empty(), "no body");
    assert_eq!(srv.http.head(format!("{}/healthz", srv.base)).send().await.unwrap().status().as_u16(), 200);
    let (s, v) = srv.get("/v1/ws/courier", Some(&srv.token(Role::Courier, "newbie", "t1", None))).await;
    assert_eq!((s, v["error"]["code"].as_str()), (400, Some("not_websocket")), "{v}");
    assert_eq!(srv.get("/v1/couriers/newbie", Some(&disp)).await.0, 404, "not registered");
    let (_, events) = srv.get("/v1/events?entity=courier&id=newbie", Some(&disp)).await;
    assert_eq!(events["items"].as_array().map(Vec::len), Some(0), "{events}");
}

/// `--http-limit-per-ip`: an address past its burst gets 429 `rate_limited` with
/// `Retry-After` (WebSocket upgrades count too), while another address, an exempt one, and the
/// probes are served; behind a trusted proxy the last `X-Forwarded-For` hop is the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_flooding_the_http_port_is_held_back_and_no_one_else_is() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = fast_config(dir.path().join("s.db").to_str().unwrap());
    cfg.http_limit = hexfleet_gateway::http_limit::HttpLimitConfig {
        per_s: 1,
        burst: 3,
        trust_forwarded_for: true,
        exempt: vec!["127.0.0.3/32".parse().unwrap()],
    };
    let mut srv = TestServer::start(cfg).await;
    let disp = srv.dispatcher("t1");
    let from = |ip: &str| reqwest::Client::builder().local_address(ip.parse::<std::net::IpAddr>().unwrap()).build().unwrap();
    let (a, b, exempt) = (from("127.0.0.1"), from("127.0.0.2"), from("127.0.0.3"));
    let get = |c: &reqwest::Client, path: &str| c.get(format!("{}{path}", srv.base)).bearer_auth(&disp).send();
    for _ in 0..3 {
        assert_eq!(get(&a, "/v1/orders/o1").await.unwrap().status().as_u16(), 404, "within the burst");
    }
    // Past it (one more token a second: a slow machine may see one more request through).
    let mut r = get(&a, "/v1/orders/o1").await.unwrap();
    for _ in 0..3 {
        if r.status().as_u16() == 429 {
            break;
        }
        r = get(&a, "/v1/orders/o1").await.unwrap();
    }
    assert_eq!(r.status().as_u16(), 429);
    let retry: u64 = r.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry), "{retry}");
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "rate_limited", "{v}");
    // A socket upgrade from the same address is refused the same way, before the handshake
    // (a token comes back each second: a slow machine may see one upgrade through).
    let mut refused = false;
    for _ in 0..3 {
        match tokio_tungstenite::connect_async(format!("{}/v1/ws/console?token={disp}", srv.base.replace("http", "ws"))).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                assert_eq!(resp.status().as_u16(), 429);
                refused = true;
                break;
            }
            Ok(_) => continue,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(refused, "an upgrade past the limit gets 429");
    assert_eq!(get(&a, "/healthz").await.unwrap().status().as_u16(), 200, "probes are never limited");
    assert_eq!(get(&a, "/v1/metrics").await.unwrap().status().as_u16(), 200, "nor the scrape");
    for _ in 0..10 {
        assert_eq!(get(&exempt, "/v1/orders/o1").await.unwrap().status().as_u16(), 404, "an exempt address");
    }
    assert_eq!(get(&b, "/v1/orders/o1").await.unwrap().status().as_u16(), 404, "another address has its own budget");
    // Trusted X-Forwarded-For: the last hop is the client, each with its own budget.
    let via = |client: &str| b.get(format!("{}/v1/orders/o1", srv.base)).bearer_auth(&disp).header("x-forwarded-for", format!("198.51.100.1, {client}")).send();
    for _ in 0..3 {
        assert_eq!(via("203.0.113.9").await.unwrap().status().as_u16(), 404);
    }
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(via("203.0.113.9").await.unwrap().status().as_u16());
    }
    assert!(statuses.contains(&429), "that client's budget is spent: {statuses:?}");
    assert_eq!(via("203.0.113.10").await.unwrap().status().as_u16(), 404, "another client behind the same proxy");
    srv.stop().await;
}

/// Every operation the OpenAPI document lists is routed (without a token: 401, not 404 or 405),
/// so the document cannot list a route the server does not have.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_operation_is_served() {
    let (mut srv, _d) = server().await;
    let (s, spec) = srv.get("/v1/openapi.json", None).await;
    assert_eq!(s, 200);
    let mut n = 0;
    for (path, item) in spec["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            let url = format!("{}{}", srv.base, path.replace("{id}", "x1"));
            let m = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let r = srv.http.request(m, &url).send().await.unwrap();
            let status = r.status().as_u16();
            let v: serde_json::Value = r.json().await.unwrap_or_default();
            assert_eq!((status, v["error"]["code"].as_str()), (401, Some("unauthorized")), "{method} {path}: {v}");
            n += 1;
        }
    }
    assert!(n >= 24, "{n} operations");
    srv.stop().await;
}

/// Subscribes in a burst (a map panned fast) are coalesced: the console gets a snapshot at
/// once, then one for the last box once `SNAPSHOT_GAP` has passed, not one per subscribe, and
/// that one holds what is in the last box.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_subscribes_gets_the_last_boxs_snapshot_not_one_each() {
    use hexfleet_actors::domain::{CourierId, Fix, LatLng, TenantId};
    let (srv, _d) = server().await;
    let state = srv.running.as_ref().unwrap().state.clone();
    let (tenant, c1) = (TenantId::new("t1"), CourierId::new("c1"));
    state.fleet.ensure_courier(&tenant, &c1).await.unwrap();
    state.fleet.ingest(&tenant, &c1, [Fix { pos: LatLng::new(52.5, 13.5).unwrap(), ts: now_ms(), speed: None, heading: None, acc: None }]).unwrap();
    // In the index snapshot (what a console snapshot reads), not only in its record.
    let (min, max) = (LatLng::new(52.0, 13.0).unwrap(), LatLng::new(53.0, 14.0).unwrap());
    eventually("c1 indexed", || async { state.fleet.couriers_in_bbox(&tenant, min, max).await.iter().any(|c| c.id == c1).then_some(()) }).await;
    let mut console = srv.ws("/v1/ws/console", &srv.dispatcher("t1")).await;
    let n = 40;
    for i in 0..n {
        // Boxes far from the courier, then the one around it.
        console.send(json!({"t":"subscribe","bbox":[i as f64 * 0.001, 0.0, 0.1, 0.1]})).await;
    }
    console.send(json!({"t":"subscribe","bbox":[13.0, 52.0, 14.0, 53.0]})).await;
    let mut snapshots = 0;
    loop {
        let v = console.expect("a snapshot with c1", |v| t(v) == "couriers" && v["snapshot"] == true).await;
        snapshots += 1;
        if v["items"].as_array().is_some_and(|items| items.iter().any(|c| c["id"] == "c1")) {
            break;
        }
        assert!(v["items"].as_array().is_some_and(Vec::is_empty), "{v}");
    }
    assert!(snapshots <= 4, "{snapshots} snapshots for {} subscribes", n + 1);
}
