//! Parsing of the OsmAnd / Traccar Client HTTP protocol (`GET|POST /osmand`).
//!
//! Real phone apps (Traccar Client, OsmAnd's live tracking) and many hardware trackers report
//! positions to a Traccar server in one of two forms, and this module turns either into
//! [`OsmandFix`] values:
//!
//! - a query string (or an `x-www-form-urlencoded` body when the query is empty):
//!   `?id=123456&timestamp=1377177267&lat=60.0&lon=30.0&speed=0.0&bearing=0.0&altitude=0&batt=87`
//!   → [`parse_query`];
//! - the JSON body of Traccar Client 9+ (`Content-Type: application/json`):
//!   `{"location":{"timestamp":"…Z","coords":{…},"battery":{…}},"device_id":"…"}`
//!   → [`parse_json`].
//!
//! The semantics follow Traccar's `OsmAndProtocolDecoder`:
//! - `id` and `deviceid` are synonyms; `lon` (not `lng`); `location=lat,lon` is accepted;
//! - query `speed` is in **knots** (converted here to m/s), JSON `coords.speed` is m/s;
//! - a numeric `timestamp` below `i32::MAX` is Unix seconds, otherwise Unix milliseconds;
//!   a value with a `T` is ISO-8601 / RFC 3339; `yyyy-MM-dd HH:mm:ss` is also accepted (read as
//!   UTC here, Traccar reads it in the server's zone); no timestamp means "now";
//! - JSON uses `-1` for "unknown" speed, heading and battery level; those become `None`;
//! - battery is a percentage in both forms (`batt=87`, `battery.level` 0.87 → 87).
//!
//! Unlike Traccar, a report without coordinates is an error (Traccar reuses the last known
//! position for cell/Wi-Fi-only reports; we have no such lookup here), and coordinates are
//! validated: no NaN or infinities, `|lat| <= 90`, `|lng| <= 180`.
//!
//! Pure: no I/O, no HTTP types. The gateway maps the device id to a courier (unknown device:
//! 400 for the query form, 404 for JSON, as Traccar does), checks the device key ([`key_of`];
//! Traccar has none) and applies the same ingest checks as the courier socket (future
//! timestamps, speed jumps).

use serde_json::Value;

/// Metres per second in one knot (1852 m per hour).
const MPS_PER_KNOT: f64 = 1852.0 / 3600.0;

/// Numeric timestamps below this are Unix seconds, above it Unix milliseconds (Traccar's rule).
const SECONDS_LIMIT: i64 = i32::MAX as i64;

/// One position report from an OsmAnd / Traccar Client device.
#[derive(Debug, Clone, PartialEq)]
pub struct OsmandFix {
    /// The device identifier the app was configured with; the gateway maps it to a courier.
    pub device_id: String,
    /// WGS84 latitude in degrees, validated to `[-90, 90]`.
    pub lat: f64,
    /// WGS84 longitude in degrees, validated to `[-180, 180]`.
    pub lng: f64,
    /// Fix time, Unix ms; the receive time when the device sent none.
    pub ts_ms: i64,
    /// Ground speed in m/s (the query form's knots are converted).
    pub speed_mps: Option<f32>,
    /// Course over ground in degrees.
    pub heading: Option<f32>,
    /// Altitude in metres.
    pub altitude: Option<f64>,
    /// Horizontal accuracy in metres.
    pub accuracy: Option<f32>,
    /// Battery level in percent (0–100).
    pub battery: Option<f32>,
}

/// Why a report could not be parsed. Messages are lowercase and safe to show to the client.
#[derive(Debug, thiserror::Error)]
pub enum OsmandError {
    #[error("missing device id (`id` or `deviceid`)")]
    MissingDeviceId,
    #[error("missing coordinates (`lat` and `lon`, or `location`)")]
    MissingCoordinates,
    #[error("invalid number for `{field}`: {value:?}")]
    BadNumber { field: &'static str, value: String },
    #[error("`{field}` is not finite or out of range: {value}")]
    OutOfRange { field: &'static str, value: f64 },
    #[error("invalid timestamp: {0:?}")]
    BadTimestamp(String),
    #[error("malformed json: {0}")]
    Json(#[from] serde_json::Error),
    #[error("json field `{0}` is missing or has the wrong type")]
    BadJsonField(&'static str),
    #[error("empty batch")]
    EmptyBatch,
}

/// Parses a query string or `x-www-form-urlencoded` body.
///
/// `raw` is the part after `?` (a leading `?` is tolerated). As in Traccar, the caller passes the
/// URL query if it is non-empty and the request body otherwise. Unknown keys (`hdop`, `cell`,
/// `wifi`, `valid`, custom attributes) are ignored; a repeated key keeps its last value.
pub fn parse_query(raw: &str, now_ms: i64) -> Result<OsmandFix, OsmandError> {
    let raw = raw.strip_prefix('?').unwrap_or(raw);
    let mut device_id = None;
    let mut lat = None;
    let mut lng = None;
    let mut ts_ms = None;
    let mut fix = OsmandFix {
        device_id: String::new(),
        lat: 0.0,
        lng: 0.0,
        ts_ms: now_ms,
        speed_mps: None,
        heading: None,
        altitude: None,
        accuracy: None,
        battery: None,
    };
    for (key, value) in form_pairs(raw) {
        match key.as_str() {
            "id" | "deviceid" => device_id = Some(value),
            "lat" => lat = Some(number("lat", &value)?),
            "lon" => lng = Some(number("lon", &value)?),
            "location" => {
                let (la, lo) = value.split_once(',').ok_or(OsmandError::BadNumber {
                    field: "location",
                    value: value.clone(),
                })?;
                lat = Some(number("location", la)?);
                lng = Some(number("location", lo)?);
            }
            "timestamp" => ts_ms = Some(parse_timestamp(&value)?),
            // A negative speed, bearing, accuracy or battery level means "unknown" (iOS
            // reports -1 for an invalid speed, course or accuracy, and Traccar Client passes it
            // on): the fix is kept without it, as in the JSON form.
            "speed" => fix.speed_mps = known(number("speed", &value)?).map(|v| (v * MPS_PER_KNOT) as f32),
            "bearing" | "heading" => fix.heading = known(number("bearing", &value)?).map(|v| v as f32),
            "altitude" => fix.altitude = Some(number("altitude", &value)?),
            "accuracy" => fix.accuracy = known(number("accuracy", &value)?).map(|v| v as f32),
            "batt" => fix.battery = known(number("batt", &value)?).map(|v| v as f32),
            _ => {}
        }
    }
    fix.device_id = device_id
        .filter(|id| !id.is_empty())
        .ok_or(OsmandError::MissingDeviceId)?;
    let (Some(lat), Some(lng)) = (lat, lng) else {
        return Err(OsmandError::MissingCoordinates);
    };
    (fix.lat, fix.lng) = check_coordinates(lat, lng)?;
    if let Some(ts) = ts_ms {
        fix.ts_ms = ts;
    }
    Ok(fix)
}

/// The device key of a query string or form body (`key=`; the last one if repeated). Traccar
/// Client keeps the query of its server URL, so a device is configured with
/// `https://HOST/osmand?key=KEY` and sends the key with every report, in either form.
pub fn key_of(raw: &str) -> Option<String> {
    form_pairs(raw.strip_prefix('?').unwrap_or(raw)).filter(|(k, _)| k == "key").last().map(|(_, v)| v)
}

/// Whether a query string carries a report (a device id): a `POST` whose URL holds only the
/// device key sends its report as a form body.
pub fn names_device(raw: &str) -> bool {
    form_pairs(raw.strip_prefix('?').unwrap_or(raw)).any(|(k, _)| k == "id" || k == "deviceid")
}

/// Parses the JSON body of Traccar Client 9+.
///
/// Traccar Client sends one object per request,
/// `{"location":{"timestamp","coords":{"latitude","longitude","speed","heading","accuracy",
/// "altitude",…},"battery":{"level","is_charging"},…},"device_id":"…"}`; Traccar's decoder reads
/// exactly that. Batches of the underlying background-geolocation library are also accepted:
/// `{"location":[…],"device_id"}` and a top-level array of single reports. A batch fails as a
/// whole if any item is bad.
pub fn parse_json(body: &[u8], now_ms: i64) -> Result<Vec<OsmandFix>, OsmandError> {
    let root: Value = serde_json::from_slice(body)?;
    let mut fixes = Vec::new();
    match &root {
        Value::Array(reports) => {
            for report in reports {
                parse_report(report, now_ms, &mut fixes)?;
            }
        }
        report => parse_report(report, now_ms, &mut fixes)?,
    }
    if fixes.is_empty() {
        return Err(OsmandError::EmptyBatch);
    }
    Ok(fixes)
}

/// One `{"location": {…} | [{…}, …], "device_id": …}` report.
fn parse_report(report: &Value, now_ms: i64, out: &mut Vec<OsmandFix>) -> Result<(), OsmandError> {
    let Value::Object(report) = report else {
        return Err(OsmandError::BadJsonField("location"));
    };
    let device_id = match report.get("device_id") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        // Some forks send it as a number; accept the digits.
        Some(Value::Number(n)) => n.to_string(),
        _ => return Err(OsmandError::MissingDeviceId),
    };
    match report.get("location") {
        Some(Value::Array(locations)) => {
            for location in locations {
                out.push(parse_location(&device_id, location, now_ms)?);
            }
        }
        Some(location @ Value::Object(_)) => {
            out.push(parse_location(&device_id, location, now_ms)?)
        }
        _ => return Err(OsmandError::BadJsonField("location")),
    }
    Ok(())
}

fn parse_location(
    device_id: &str,
    location: &Value,
    now_ms: i64,
) -> Result<OsmandFix, OsmandError> {
    let Value::Object(location) = location else {
        return Err(OsmandError::BadJsonField("location"));
    };
    let ts_ms = match location.get("timestamp") {
        None | Some(Value::Null) => now_ms,
        Some(Value::String(s)) => parse_timestamp(s)?,
        Some(Value::Number(n)) => {
            let ts = n
                .as_i64()
                .ok_or_else(|| OsmandError::BadTimestamp(n.to_string()))?;
            seconds_or_millis(ts)
        }
        Some(other) => return Err(OsmandError::BadTimestamp(other.to_string())),
    };
    let Some(Value::Object(coords)) = location.get("coords") else {
        return Err(OsmandError::MissingCoordinates);
    };
    let lat = json_number(coords, "latitude")?.ok_or(OsmandError::MissingCoordinates)?;
    let lng = json_number(coords, "longitude")?.ok_or(OsmandError::MissingCoordinates)?;
    let (lat, lng) = check_coordinates(lat, lng)?;
    // The geolocation library reports -1 for "unknown".
    let battery = match location.get("battery") {
        Some(Value::Object(battery)) => {
            json_number(battery, "level")?.and_then(known).map(|l| (l * 100.0) as f32)
        }
        _ => None,
    };
    Ok(OsmandFix {
        device_id: device_id.to_owned(),
        lat,
        lng,
        ts_ms,
        speed_mps: json_number(coords, "speed")?.and_then(known).map(|v| v as f32),
        heading: json_number(coords, "heading")?.and_then(known).map(|v| v as f32),
        altitude: json_number(coords, "altitude")?,
        accuracy: json_number(coords, "accuracy")?.and_then(known).map(|v| v as f32),
        battery,
    })
}

/// A numeric JSON field: absent or `null` is `None`, anything else that is not a number is an error.
fn json_number(
    obj: &serde_json::Map<String, Value>,
    field: &'static str,
) -> Result<Option<f64>, OsmandError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n.as_f64().map(Some).ok_or(OsmandError::BadJsonField(field)),
        Some(_) => Err(OsmandError::BadJsonField(field)),
    }
}

/// A speed, bearing, accuracy or battery level, unless negative (clients send -1 for
/// "unknown").
fn known(v: f64) -> Option<f64> {
    (v >= 0.0).then_some(v)
}

/// A finite decimal number. Rust's parser accepts `NaN` and `inf`; those are rejected here.
fn number(field: &'static str, value: &str) -> Result<f64, OsmandError> {
    match value.trim().parse::<f64>() {
        Ok(v) if v.is_finite() => Ok(v),
        Ok(v) => Err(OsmandError::OutOfRange { field, value: v }),
        Err(_) => Err(OsmandError::BadNumber {
            field,
            value: value.to_owned(),
        }),
    }
}

fn check_coordinates(lat: f64, lng: f64) -> Result<(f64, f64), OsmandError> {
    if !lat.is_finite() || lat.abs() > 90.0 {
        return Err(OsmandError::OutOfRange {
            field: "lat",
            value: lat,
        });
    }
    if !lng.is_finite() || lng.abs() > 180.0 {
        return Err(OsmandError::OutOfRange {
            field: "lon",
            value: lng,
        });
    }
    Ok((lat, lng))
}

fn seconds_or_millis(ts: i64) -> i64 {
    if ts < SECONDS_LIMIT {
        ts.saturating_mul(1000)
    } else {
        ts
    }
}

/// Unix seconds, Unix milliseconds, RFC 3339 / ISO-8601 (`2016-01-27T18:55:47Z`,
/// `2025-06-15T13:45:12.862Z`, `…+02:00`, no zone = UTC) or `yyyy-MM-dd HH:mm:ss` (UTC).
fn parse_timestamp(value: &str) -> Result<i64, OsmandError> {
    let value = value.trim();
    if let Ok(ts) = value.parse::<i64>() {
        return Ok(seconds_or_millis(ts));
    }
    parse_datetime(value).ok_or_else(|| OsmandError::BadTimestamp(value.to_owned()))
}

/// `YYYY-MM-DD[T ]HH:MM:SS[.fff…][Z|±HH[:MM]]` → Unix ms.
fn parse_datetime(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    let digits = |range: std::ops::Range<usize>| -> Option<i64> {
        let part = b.get(range)?;
        if part.is_empty() || !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        part.iter()
            .try_fold(0i64, |acc, d| Some(acc * 10 + i64::from(d - b'0')))
    };
    if b.len() < 19 || b[4] != b'-' || b[7] != b'-' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    if !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let (year, month, day) = (digits(0..4)?, digits(5..7)?, digits(8..10)?);
    let (hour, minute, second) = (digits(11..13)?, digits(14..16)?, digits(17..19)?);
    if !(1..=12).contains(&month)
        || day < 1
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let mut rest = &b[19..];
    let mut millis = 0;
    if let Some(frac) = rest.strip_prefix(b".").or_else(|| rest.strip_prefix(b",")) {
        let n = frac.iter().take_while(|c| c.is_ascii_digit()).count();
        if n == 0 {
            return None;
        }
        // Milliseconds from the first three digits; finer digits are truncated.
        for i in 0..3 {
            millis = millis * 10
                + frac
                    .get(i)
                    .filter(|_| i < n)
                    .map_or(0, |d| i64::from(d - b'0'));
        }
        rest = &frac[n..];
    }
    let offset_min = match rest {
        [] | [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), tz @ ..] => {
            // Digits and ':' only, checked before slicing: the split below is by byte.
            if !tz.iter().all(|c| c.is_ascii_digit() || *c == b':') {
                return None;
            }
            let tz = std::str::from_utf8(tz).ok()?;
            let (h, m) = match tz.len() {
                2 => (tz, "00"),
                4 => tz.split_at(2),
                5 if tz.as_bytes()[2] == b':' => (&tz[..2], &tz[3..]),
                _ => return None,
            };
            let (h, m) = (h.parse::<i64>().ok()?, m.parse::<i64>().ok()?);
            if h > 23 || m > 59 {
                return None;
            }
            if *sign == b'+' {
                h * 60 + m
            } else {
                -(h * 60 + m)
            }
        }
        _ => return None,
    };
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second - offset_min * 60;
    Some(secs * 1000 + millis)
}

fn is_leap(year: i64) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `application/x-www-form-urlencoded` pairs (the `form_urlencoded` crate): split on `&`, then
/// on the first `=`, `+` as space and `%XX` as a byte. Empty segments are skipped, a key without
/// `=` has an empty value, a malformed `%` escape is kept literally and invalid UTF-8 becomes
/// U+FFFD.
fn form_pairs(raw: &str) -> impl Iterator<Item = (String, String)> + '_ {
    form_urlencoded::parse(raw.as_bytes()).map(|(k, v)| (k.into_owned(), v.into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_700_000_000_000;

    #[test]
    fn the_device_key_is_read_from_a_query_or_a_form() {
        assert_eq!(key_of("?key=ab12&id=7").as_deref(), Some("ab12"));
        assert_eq!(key_of("id=7&lat=1&lon=2&key=ab%31").as_deref(), Some("ab1"), "percent-decoded");
        assert_eq!(key_of("id=7&key=a&key=b").as_deref(), Some("b"), "the last of a repeated key");
        assert_eq!(key_of("id=7&keys=a"), None);
        assert!(names_device("key=a&id=7") && names_device("?deviceid=7"));
        assert!(!names_device("key=a") && !names_device(""));
        // The key is no position field: a report with one parses as before.
        assert_eq!(q("id=7&lat=1&lon=2&key=k").device_id, "7");
    }

    fn q(raw: &str) -> OsmandFix {
        parse_query(raw, NOW).unwrap_or_else(|e| panic!("{raw}: {e}"))
    }

    fn q_err(raw: &str) -> OsmandError {
        match parse_query(raw, NOW) {
            Ok(fix) => panic!("{raw}: expected an error, got {fix:?}"),
            Err(e) => e,
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-6
    }

    // The query forms below are the requests in Traccar's `OsmAndProtocolDecoderTest`.

    #[test]
    fn traccar_query_iso_timestamp_percent_encoded() {
        let fix = q(
            "id=902064&lat=42.06288&lon=-88.23412&timestamp=2016-01-27T18%3A55%3A47Z&hdop=6.0&altitude=224.0&speed=0.0",
        );
        assert_eq!(fix.device_id, "902064");
        assert!(close(fix.lat, 42.06288) && close(fix.lng, -88.23412));
        assert_eq!(fix.ts_ms, 1_453_920_947_000);
        assert_eq!(fix.altitude, Some(224.0));
        assert_eq!(fix.speed_mps, Some(0.0));
    }

    #[test]
    fn traccar_query_millisecond_timestamp() {
        let fix = q("/?id=902064&lat=42.06288&lon=-88.23412&timestamp=1442068686579&hdop=6.0&altitude=224.0&speed=0.0"
            .trim_start_matches('/'));
        assert_eq!(fix.ts_ms, 1_442_068_686_579);
    }

    #[test]
    fn traccar_query_space_separated_timestamp_with_plus() {
        let fix = q(
            "lat=49.60688&lon=6.15788&timestamp=2014-06-04+09%3A10%3A11&altitude=384.7&speed=0.0&id=353861053849681",
        );
        assert_eq!(fix.device_id, "353861053849681");
        assert_eq!(fix.ts_ms, 1_401_873_011_000);
    }

    #[test]
    fn traccar_query_seconds_bearing_and_deviceid() {
        let fix = q(
            "?id=123456&timestamp=1377177267&lat=60.0&lon=30.0&speed=0.0&bearing=0.0&altitude=0&hdop=0.0",
        );
        assert_eq!(fix.ts_ms, 1_377_177_267_000);
        assert_eq!(fix.heading, Some(0.0));
        let fix =
            q("lat=60.0&lon=30.0&speed=0.0&heading=0.0&vacc=0&hacc=0&altitude=0&deviceid=123456");
        assert_eq!(fix.device_id, "123456");
        assert_eq!(fix.heading, Some(0.0));
        assert_eq!(fix.ts_ms, NOW, "no timestamp means now");
    }

    #[test]
    fn traccar_query_battery_location_and_custom_attributes() {
        let fix = q(
            "id=861001000719969&lat=41.666667&lon=-0.883333&altitude=350.059479&speed=0.000000&batt=87",
        );
        assert_eq!(fix.battery, Some(87.0));
        let fix = q("id=123456&timestamp=1377177267&location=60.0,30.0");
        assert_eq!((fix.lat, fix.lng), (60.0, 30.0));
        let fix = q(
            "id=123456789012345&timestamp=1504763810&lat=40.7232948571&lon=-74.0061408571&bearing=7.19889788244&speed=40&ignition=true&rpm=933&fuel=24",
        );
        assert!(close(f64::from(fix.heading.unwrap()), 7.198_897_882_44));
        // 40 knots = 20.5778 m/s.
        assert!(close(
            f64::from(fix.speed_mps.unwrap()),
            40.0 * 1852.0 / 3600.0
        ));
    }

    #[test]
    fn knots_are_converted_to_metres_per_second() {
        let fix = q("id=a&lat=1&lon=2&speed=1");
        assert!((f64::from(fix.speed_mps.unwrap()) - 0.514_444).abs() < 1e-5);
        let fix = q("id=a&lat=1&lon=2&speed=10");
        assert!((f64::from(fix.speed_mps.unwrap()) - 5.144_444).abs() < 1e-5);
    }

    #[test]
    fn accuracy_is_read() {
        let fix = q("id=a&lat=1&lon=2&accuracy=12.5");
        assert_eq!(fix.accuracy, Some(12.5));
    }

    #[test]
    fn timestamp_forms() {
        let ts = |v: &str| q(&format!("id=a&lat=1&lon=2&timestamp={v}")).ts_ms;
        assert_eq!(ts("0"), 0);
        assert_eq!(ts("1700000000"), 1_700_000_000_000);
        assert_eq!(
            ts("2147483646"),
            2_147_483_646_000,
            "below i32::MAX is seconds"
        );
        assert_eq!(
            ts("2147483647"),
            2_147_483_647,
            "from i32::MAX on it is milliseconds"
        );
        assert_eq!(ts("1700000000123"), 1_700_000_000_123);
        assert_eq!(ts("2023-11-14T22:13:20Z"), 1_700_000_000_000);
        assert_eq!(ts("2023-11-14T22%3A13%3A20.123Z"), 1_700_000_000_123);
        assert_eq!(ts("2023-11-14T22:13:20.123456789Z"), 1_700_000_000_123);
        assert_eq!(ts("2023-11-14T22:13:20.5Z"), 1_700_000_000_500);
        assert_eq!(ts("2023-11-15T00:13:20%2B02:00"), 1_700_000_000_000);
        assert_eq!(ts("2023-11-15T00:13:20%2B0200"), 1_700_000_000_000);
        assert_eq!(ts("2023-11-14T20:13:20-02:00"), 1_700_000_000_000);
        assert_eq!(
            ts("2023-11-14T22:13:20"),
            1_700_000_000_000,
            "no zone is utc"
        );
        assert_eq!(ts("2023-11-14+22:13:20"), 1_700_000_000_000, "space form");
        assert_eq!(ts("2024-02-29T00:00:00Z"), 1_709_164_800_000);
        assert_eq!(ts("1969-12-31T23:59:59Z"), -1000);
    }

    #[test]
    fn bad_timestamps() {
        for v in [
            "yesterday",
            "2023-13-01T00:00:00Z",
            "2023-02-29T00:00:00Z",
            "2023-11-14T24:00:00Z",
            "2023-11-14T22:13Z",
            "2023-11-14T22:13:20.Z",
            "2023-11-14T22:13:20+2",
            "2023-11-14T22:13:20Zjunk",
            "1.5e9",
            // A multi-byte character in the zone: refused, not a panic on the byte split.
            "2023-11-14T22:13:20-1%C3%A93",
            "2023-11-14T22:13:20%2B1%C3%A93",
        ] {
            let err = q_err(&format!("id=a&lat=1&lon=2&timestamp={v}"));
            assert!(matches!(err, OsmandError::BadTimestamp(_)), "{v}: {err}");
        }
    }

    #[test]
    fn bad_query_input() {
        assert!(matches!(
            q_err("timestamp=1377177267&lat=60.0&lon=30.0"),
            OsmandError::MissingDeviceId
        ));
        assert!(matches!(
            q_err("id=&lat=60.0&lon=30.0"),
            OsmandError::MissingDeviceId
        ));
        assert!(matches!(
            q_err("id=1&lat=60.0"),
            OsmandError::MissingCoordinates
        ));
        assert!(matches!(
            q_err("id=123456&timestamp=1377177267&cell=257,02,16,2224&wifi=00-14-22-01-23-45,-80"),
            OsmandError::MissingCoordinates
        ));
        assert!(matches!(
            q_err("id=1&lat=abc&lon=1"),
            OsmandError::BadNumber { field: "lat", .. }
        ));
        assert!(matches!(
            q_err("id=1&lat=NaN&lon=1"),
            OsmandError::OutOfRange { field: "lat", .. }
        ));
        assert!(matches!(
            q_err("id=1&lat=1&lon=inf"),
            OsmandError::OutOfRange { field: "lon", .. }
        ));
        assert!(matches!(
            q_err("id=1&lat=90.0001&lon=1"),
            OsmandError::OutOfRange { field: "lat", .. }
        ));
        assert!(matches!(
            q_err("id=1&lat=1&lon=-180.5"),
            OsmandError::OutOfRange { field: "lon", .. }
        ));
        assert!(matches!(
            q_err("id=1&location=60.0"),
            OsmandError::BadNumber {
                field: "location",
                ..
            }
        ));
        assert!(matches!(
            q_err("id=1&lat=1&lon=1&speed=fast"),
            OsmandError::BadNumber { field: "speed", .. }
        ));
        assert!(matches!(
            q_err("id=1&lat=1&lon=1&batt=NaN"),
            OsmandError::OutOfRange { .. }
        ));
        assert!(matches!(q_err(""), OsmandError::MissingDeviceId));
        // Boundaries are inclusive.
        let fix = q("id=1&lat=-90&lon=180");
        assert_eq!((fix.lat, fix.lng), (-90.0, 180.0));
    }

    #[test]
    fn error_messages_are_lowercase() {
        let e = q_err("id=1&lat=abc&lon=1");
        assert_eq!(e.to_string(), "invalid number for `lat`: \"abc\"");
        assert!(
            q_err("lat=1&lon=1")
                .to_string()
                .starts_with("missing device id")
        );
    }

    #[test]
    fn percent_decoding() {
        let value = |raw: &str| form_pairs(&format!("v={raw}")).next().unwrap().1;
        assert_eq!(value("a+b%20c"), "a b c");
        assert_eq!(value("%3a%3A"), "::");
        assert_eq!(value("caf%C3%A9"), "café");
        assert_eq!(value("100%"), "100%");
        assert_eq!(value("%4"), "%4");
        assert_eq!(value("%zz1"), "%zz1");
        assert_eq!(value("%FF"), "\u{FFFD}");
        assert_eq!(value("a=b"), "a=b", "split on the first `=`");
        let fix = q("id=phone%20one&lat=1&lon=2");
        assert_eq!(fix.device_id, "phone one");
        // Empty segments, keys without values, repeated keys (last wins).
        let fix = q("&&id=x&valid&lat=1&lat=3&lon=2&");
        assert_eq!(fix.lat, 3.0);
    }

    // The JSON bodies below are the ones in Traccar's `OsmAndProtocolDecoderTest`
    // (Traccar Client 9 on Android and iOS).

    const ANDROID: &str = r#"{"location":{"timestamp":"2025-06-15T13:45:12.862Z","coords":{"latitude":37.4219983,"longitude":-122.084,"accuracy":5,"speed":0,"heading":-1,"altitude":5},"is_moving":false,"odometer":0,"event":"motionchange","battery":{"level":1,"is_charging":false},"activity":{"type":"still"},"extras":{},"_":"&id=48241179&lat=37.4219983&lon=-122.084&timestamp=2025-06-15T13:45:12.862Z&"},"device_id":"48241179"}"#;
    const IOS: &str = r#"{"location":{"extras":{},"mock":true,"coords":{"speed_accuracy":-1,"speed":-1,"longitude":-122.406417,"ellipsoidal_altitude":0,"floor":null,"heading_accuracy":-1,"latitude":37.785834000000001,"accuracy":5,"altitude_accuracy":-1,"altitude":0,"heading":-1},"is_moving":false,"age":188,"odometer":0,"uuid":"2FB04C65-99CF-42AB-8DD3-EBCB4B108BF8","event":"motionchange","battery":{"level":-1,"is_charging":false},"activity":{"type":"unknown","confidence":100},"timestamp":"2025-05-09T04:11:30.579Z"},"device_id":"658765"}"#;
    const MOVING: &str = r#"{"location":{"event":"motionchange","is_moving":false,"uuid":"0e9a2473-a9a7-4c00-997b-fb97d2154e75","timestamp":"2021-07-21T08:06:34.444Z","odometer":0,"coords":{"latitude":-6.1148096,"longitude":106.6837015,"accuracy":3.8,"speed":18.67,"speed_accuracy":0.26,"heading":63,"heading_accuracy":0.28,"altitude":35.7,"altitude_accuracy":3.8},"activity":{"type":"still","confidence":100},"battery":{"is_charging":false,"level":0.79},"extras":{}},"device_id":"8737767034"}"#;

    fn j(body: &str) -> Vec<OsmandFix> {
        parse_json(body.as_bytes(), NOW).unwrap_or_else(|e| panic!("{body}: {e}"))
    }

    fn j_err(body: &str) -> OsmandError {
        match parse_json(body.as_bytes(), NOW) {
            Ok(fixes) => panic!("{body}: expected an error, got {fixes:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn traccar_client_android_json() {
        let fixes = j(ANDROID);
        assert_eq!(
            fixes,
            vec![OsmandFix {
                device_id: "48241179".into(),
                lat: 37.4219983,
                lng: -122.084,
                ts_ms: 1_749_995_112_862,
                speed_mps: Some(0.0),
                heading: None,
                altitude: Some(5.0),
                accuracy: Some(5.0),
                battery: Some(100.0),
            }]
        );
    }

    #[test]
    fn traccar_client_ios_json_unknowns_are_none() {
        let fix = &j(IOS)[0];
        assert_eq!(fix.device_id, "658765");
        assert!(close(fix.lat, 37.785834) && close(fix.lng, -122.406417));
        assert_eq!(fix.ts_ms, 1_746_763_890_579);
        assert_eq!(
            (fix.speed_mps, fix.heading, fix.battery),
            (None, None, None)
        );
        assert_eq!(fix.altitude, Some(0.0));
    }

    #[test]
    fn traccar_client_json_speed_is_already_metres_per_second() {
        let fix = &j(MOVING)[0];
        assert_eq!(fix.speed_mps, Some(18.67));
        assert_eq!(fix.heading, Some(63.0));
        assert_eq!(fix.accuracy, Some(3.8));
        assert!((fix.battery.unwrap() - 79.0).abs() < 1e-3);
        assert_eq!(fix.ts_ms, 1_626_854_794_444);
    }

    #[test]
    fn json_batches() {
        let batch = format!("[{ANDROID},{IOS}]");
        let fixes = j(&batch);
        assert_eq!(fixes.len(), 2);
        assert_eq!(fixes[1].device_id, "658765");
        let inner = r#"{"device_id":"d1","location":[
            {"timestamp":"2024-01-01T00:00:00Z","coords":{"latitude":1,"longitude":2}},
            {"timestamp":"2024-01-01T00:00:05Z","coords":{"latitude":1.1,"longitude":2.1}}]}"#;
        let fixes = j(inner);
        assert_eq!(fixes.len(), 2);
        assert_eq!(fixes[1].ts_ms - fixes[0].ts_ms, 5000);
        assert!(fixes.iter().all(|f| f.device_id == "d1"));
    }

    #[test]
    fn json_lenient_forms() {
        // Missing timestamp → now; numeric device id; numeric timestamps in s or ms.
        let fix = &j(r#"{"device_id":42,"location":{"coords":{"latitude":1,"longitude":2}}}"#)[0];
        assert_eq!((fix.device_id.as_str(), fix.ts_ms), ("42", NOW));
        let fix = &j(
            r#"{"device_id":"a","location":{"timestamp":1700000000,"coords":{"latitude":1,"longitude":2}}}"#,
        )[0];
        assert_eq!(fix.ts_ms, 1_700_000_000_000);
        let fix = &j(
            r#"{"device_id":"a","location":{"timestamp":1700000000123,"coords":{"latitude":1,"longitude":2}}}"#,
        )[0];
        assert_eq!(fix.ts_ms, 1_700_000_000_123);
    }

    #[test]
    fn bad_json_input() {
        assert!(matches!(j_err("{not json"), OsmandError::Json(_)));
        assert!(j_err("{not json").to_string().starts_with("malformed json"));
        assert!(matches!(
            j_err(r#"{"location":{"coords":{"latitude":1,"longitude":2}}}"#),
            OsmandError::MissingDeviceId
        ));
        assert!(matches!(
            j_err(r#"{"device_id":"","location":{"coords":{"latitude":1,"longitude":2}}}"#),
            OsmandError::MissingDeviceId
        ));
        assert!(matches!(
            j_err(r#"{"device_id":"a"}"#),
            OsmandError::BadJsonField("location")
        ));
        assert!(matches!(
            j_err(r#"{"device_id":"a","location":{"timestamp":"2024-01-01T00:00:00Z"}}"#),
            OsmandError::MissingCoordinates
        ));
        assert!(matches!(
            j_err(r#"{"device_id":"a","location":{"coords":{"latitude":1}}}"#),
            OsmandError::MissingCoordinates
        ));
        assert!(matches!(
            j_err(r#"{"device_id":"a","location":{"coords":{"latitude":"1","longitude":2}}}"#),
            OsmandError::BadJsonField("latitude")
        ));
        assert!(matches!(
            j_err(r#"{"device_id":"a","location":{"coords":{"latitude":91,"longitude":2}}}"#),
            OsmandError::OutOfRange { field: "lat", .. }
        ));
        assert!(matches!(
            j_err(r#"{"device_id":"a","location":{"coords":{"latitude":1,"longitude":-181}}}"#),
            OsmandError::OutOfRange { field: "lon", .. }
        ));
        assert!(matches!(
            j_err(
                r#"{"device_id":"a","location":{"timestamp":"soon","coords":{"latitude":1,"longitude":2}}}"#
            ),
            OsmandError::BadTimestamp(_)
        ));
        assert!(matches!(
            j_err(
                r#"{"device_id":"a","location":{"timestamp":true,"coords":{"latitude":1,"longitude":2}}}"#
            ),
            OsmandError::BadTimestamp(_)
        ));
        assert!(matches!(j_err("[]"), OsmandError::EmptyBatch));
        assert!(matches!(
            j_err(r#"{"device_id":"a","location":[]}"#),
            OsmandError::EmptyBatch
        ));
        assert!(matches!(
            j_err("[1]"),
            OsmandError::BadJsonField("location")
        ));
        // JSON has no NaN literal; serde_json rejects it as malformed.
        assert!(matches!(
            j_err(r#"{"device_id":"a","location":{"coords":{"latitude":NaN,"longitude":2}}}"#),
            OsmandError::Json(_)
        ));
        // One bad item fails the whole batch.
        let batch = format!(
            r#"[{ANDROID},{{"device_id":"a","location":{{"coords":{{"latitude":99,"longitude":2}}}}}}]"#
        );
        assert!(matches!(j_err(&batch), OsmandError::OutOfRange { .. }));
    }

    mod fuzz {
        use super::super::*;
        use proptest::prelude::*;

        const NOW: i64 = 1_764_000_000_000;

        /// Query strings built from the protocol's own keys, with values that are sometimes
        /// right, sometimes near misses, sometimes noise.
        fn query() -> impl Strategy<Value = String> {
            let key = prop::sample::select(vec!["id", "deviceid", "lat", "lon", "timestamp", "speed", "bearing", "heading", "accuracy", "batt", "key", "valid", "hdop", "altitude", "x"]);
            let value = prop_oneof![
                any::<f64>().prop_map(|f| f.to_string()),
                (-200.0..200.0f64).prop_map(|f| f.to_string()),
                any::<i64>().prop_map(|i| i.to_string()),
                "[0-9]{4}-[0-9]{2}-[0-9]{2}[T ][0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{1,9})?(Z|[+-][0-9]{2}(:?[0-9]{2})?)?",
                "[ -~]{0,24}",
                "(%[0-9A-Fa-f]{0,2}|\\+|[a-z0-9])*",
                Just("NaN".to_owned()),
                Just("inf".to_owned()),
            ];
            prop::collection::vec((key, value), 0..10).prop_map(|pairs| pairs.into_iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("&"))
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2_000))]

            /// No query panics; what is taken is a fix the fleet can hold.
            #[test]
            fn a_query_is_taken_or_refused_never_a_panic(raw in prop_oneof![query(), "\\PC{0,200}"]) {
                if let Ok(f) = parse_query(&raw, NOW) {
                    prop_assert!(f.lat.is_finite() && f.lng.is_finite() && f.lat.abs() <= 90.0 && f.lng.abs() <= 180.0, "{f:?}");
                    prop_assert!(!f.device_id.is_empty());
                }
                let _ = key_of(&raw);
                let _ = names_device(&raw);
            }

            /// No body panics either.
            #[test]
            fn a_json_body_is_taken_or_refused_never_a_panic(body in prop_oneof![
                prop::collection::vec(any::<u8>(), 0..300),
                "\\PC{0,300}".prop_map(String::into_bytes),
                (query(), any::<bool>()).prop_map(|(q, loc)| {
                    let fields: Vec<String> = q.split('&').filter_map(|p| p.split_once('=')).map(|(k, v)| format!("{k:?}:{}", v.parse::<f64>().map_or_else(|_| format!("{v:?}"), |f| if f.is_finite() { f.to_string() } else { "null".into() }))).collect();
                    let inner = format!("{{{}}}", fields.join(","));
                    if loc { format!(r#"{{"device_id":"d1","location":{{"timestamp":"2025-06-15T13:45:12Z","coords":{inner}}}}}"#) } else { inner }.into_bytes()
                }),
            ]) {
                if let Ok(fixes) = parse_json(&body, NOW) {
                    for f in fixes {
                        prop_assert!(f.lat.is_finite() && f.lng.is_finite() && f.lat.abs() <= 90.0 && f.lng.abs() <= 180.0, "{f:?}");
                    }
                }
            }

            /// Dates and offsets agree with the `time` crate, in both separators, with and
            /// without fractions and zones.
            #[test]
            fn a_datetime_is_read_as_the_time_crate_reads_it(
                year in 1i32..=9999, month in 1u8..=12, day in 1u8..=31, h in 0u8..24, m in 0u8..60, s in 0u8..60,
                millis in 0u16..1000, extra in 0u32..1000, offset in -(23 * 60 + 59)..=(23 * 60 + 59i32), form in 0u8..4, sep in prop::sample::select(vec!['T', ' ', 't']),
            ) {
                let Ok(month_t) = time::Month::try_from(month) else { return Ok(()) };
                let Ok(date) = time::Date::from_calendar_date(year, month_t, day) else {
                    // A day the month does not have is refused.
                    prop_assert_eq!(parse_datetime(&format!("{year:04}-{month:02}-{day:02}T00:00:00Z")), None);
                    return Ok(());
                };
                let (oh, om) = (offset.abs() / 60, offset.abs() % 60);
                let sign = if offset < 0 { '-' } else { '+' };
                let base = format!("{year:04}-{month:02}-{day:02}{sep}{h:02}:{m:02}:{s:02}.{millis:03}{extra:03}");
                let (text, off) = match form {
                    0 => (format!("{base}Z"), 0),
                    1 => (base.clone(), 0),
                    2 => (format!("{base}{sign}{oh:02}:{om:02}"), offset),
                    _ => (format!("{base}{sign}{oh:02}{om:02}"), offset),
                };
                let expected = date
                    .with_hms_milli(h, m, s, millis)
                    .unwrap()
                    .assume_offset(time::UtcOffset::from_whole_seconds(off * 60).unwrap())
                    .unix_timestamp_nanos()
                    / 1_000_000;
                prop_assert_eq!(parse_datetime(&text).map(i128::from), Some(expected), "{}", text);
            }
        }
    }
}
