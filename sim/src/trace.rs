//! Recorded GPS traces: parsers for CSV `id,ts,lat,lng`, GPX 1.1 track points and the
//! headerless-timestamp Denver CSV (`latitude,longitude` at ~1 Hz), and a replayer that drives a
//! trace as a courier over the real socket, time-scaled.

use std::path::Path;

use anyhow::{bail, Context as _};

/// One recorded fix. `ts` is Unix ms for timestamped formats, or ms since the first fix for
/// formats without timestamps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TraceFix {
    pub ts: i64,
    pub lat: f64,
    pub lng: f64,
}

/// A trace: one device's fixes in time order.
#[derive(Debug, Clone, PartialEq)]
pub struct Trace {
    pub id: String,
    pub fixes: Vec<TraceFix>,
}

impl Trace {
    /// Duration from first to last fix, ms.
    pub fn duration_ms(&self) -> i64 {
        match (self.fixes.first(), self.fixes.last()) {
            (Some(a), Some(b)) => b.ts - a.ts,
            _ => 0,
        }
    }

    /// Largest speed between consecutive fixes with a positive time gap, m/s.
    pub fn max_speed(&self) -> f64 {
        self.fixes
            .windows(2)
            .filter(|w| w[1].ts > w[0].ts)
            .map(|w| {
                let d = crate::geomath::distance_m(
                    crate::geomath::LatLng::new(w[0].lat, w[0].lng),
                    crate::geomath::LatLng::new(w[1].lat, w[1].lng),
                );
                d / ((w[1].ts - w[0].ts) as f64 / 1000.0)
            })
            .fold(0.0, f64::max)
    }
}

fn check_coords(lat: f64, lng: f64, line: usize) -> anyhow::Result<()> {
    if !crate::geomath::LatLng::new(lat, lng).is_valid() {
        bail!("line {line}: coordinates out of range: {lat},{lng}");
    }
    Ok(())
}

/// Parses CSV `id,ts,lat,lng` (header optional; `ts` in Unix ms, or Unix s when below 1e11).
/// Rows are grouped by id, each trace sorted by time.
pub fn parse_csv_id_ts(text: &str) -> anyhow::Result<Vec<Trace>> {
    let mut traces: Vec<Trace> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let cols: Vec<&str> = line.split(',').map(str::trim).collect();
        if cols.len() < 4 {
            bail!("line {}: expected id,ts,lat,lng, got {line:?}", i + 1);
        }
        let Ok(ts) = cols[1].parse::<f64>() else {
            if i == 0 {
                continue; // header
            }
            bail!("line {}: bad ts {:?}", i + 1, cols[1]);
        };
        let lat: f64 = cols[2].parse().with_context(|| format!("line {}: bad lat", i + 1))?;
        let lng: f64 = cols[3].parse().with_context(|| format!("line {}: bad lng", i + 1))?;
        check_coords(lat, lng, i + 1)?;
        let ts = if ts < 1e11 { (ts * 1000.0) as i64 } else { ts as i64 };
        let id = cols[0];
        let fix = TraceFix { ts, lat, lng };
        match traces.iter_mut().find(|t| t.id == id) {
            Some(t) => t.fixes.push(fix),
            None => traces.push(Trace { id: id.to_owned(), fixes: vec![fix] }),
        }
    }
    for t in &mut traces {
        t.fixes.sort_by_key(|f| f.ts);
    }
    Ok(traces)
}

/// Parses a `latitude,longitude` CSV without timestamps, assuming one fix every `period_ms`.
pub fn parse_csv_lat_lng(id: &str, text: &str, period_ms: i64) -> anyhow::Result<Trace> {
    let mut fixes = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let mut cols = line.split(',').map(str::trim);
        let (Some(a), Some(b)) = (cols.next(), cols.next()) else {
            bail!("line {}: expected latitude,longitude, got {line:?}", i + 1);
        };
        let (Ok(lat), Ok(lng)) = (a.parse::<f64>(), b.parse::<f64>()) else {
            if i == 0 {
                continue; // header
            }
            bail!("line {}: bad number in {line:?}", i + 1);
        };
        check_coords(lat, lng, i + 1)?;
        fixes.push(TraceFix { ts: fixes.len() as i64 * period_ms, lat, lng });
    }
    Ok(Trace { id: id.to_owned(), fixes })
}

/// Parses GPX track points (`<trkpt lat=".." lon=".."><time>ISO-8601</time>`). Points without a
/// time get one second after the previous point, or, before the first timed point, one second
/// before the next (a first point without a time used to be put at 1970, and a replay then
/// waited decades for the second fix).
pub fn parse_gpx(id: &str, text: &str) -> anyhow::Result<Trace> {
    let mut points: Vec<(Option<i64>, f64, f64)> = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("<trkpt") {
        rest = &rest[start + "<trkpt".len()..];
        let tag_end = rest.find('>').context("unterminated <trkpt")?;
        let attrs = &rest[..tag_end];
        let point = points.len() + 1;
        let lat = attr(attrs, "lat").with_context(|| format!("trkpt {point}"))?.with_context(|| format!("trkpt {point} without lat"))?;
        let lng = attr(attrs, "lon").with_context(|| format!("trkpt {point}"))?.with_context(|| format!("trkpt {point} without lon"))?;
        if !crate::geomath::LatLng::new(lat, lng).is_valid() {
            bail!("trkpt {point}: coordinates out of range: {lat},{lng}");
        }
        let self_closing = attrs.trim_end().ends_with('/');
        let body_end = if self_closing { 0 } else { rest.find("</trkpt>").unwrap_or(rest.len()) };
        let body = &rest[tag_end..body_end.max(tag_end)];
        let ts = match (body.find("<time>"), body.find("</time>")) {
            (Some(a), Some(b)) if b > a => Some(parse_iso8601_ms(body[a + 6..b].trim()).with_context(|| format!("bad time in point {point}"))?),
            _ => None,
        };
        points.push((ts, lat, lng));
        rest = &rest[body_end.max(tag_end)..];
    }
    if points.is_empty() {
        bail!("no <trkpt> in gpx");
    }
    let first_timed = points.iter().enumerate().find_map(|(k, p)| p.0.map(|t| (k, t)));
    let mut fixes: Vec<TraceFix> = Vec::with_capacity(points.len());
    for (i, &(ts, lat, lng)) in points.iter().enumerate() {
        let ts = match (ts, first_timed) {
            (Some(ts), _) => ts,
            (None, Some((k, t))) if i < k => t - (k - i) as i64 * 1000,
            (None, _) => fixes.last().map_or(0, |f: &TraceFix| f.ts + 1000),
        };
        fixes.push(TraceFix { ts, lat, lng });
    }
    fixes.sort_by_key(|f| f.ts);
    Ok(Trace { id: id.to_owned(), fixes })
}

/// The value of attribute `name` in the inside of a start tag: `Ok(None)` when absent, an
/// error when present but not a number. Attributes may be separated by any whitespace and
/// quoted with `"` or `'`.
fn attr(attrs: &str, name: &str) -> anyhow::Result<Option<f64>> {
    let mut rest = attrs;
    loop {
        rest = rest.trim_start_matches(|c: char| c.is_whitespace() || c == '/');
        if rest.is_empty() {
            return Ok(None);
        }
        let eq = rest.find('=').with_context(|| format!("malformed attributes {attrs:?}"))?;
        let key = rest[..eq].trim();
        let after = rest[eq + 1..].trim_start();
        let quote = after.chars().next().filter(|c| *c == '"' || *c == '\'').with_context(|| format!("unquoted attribute in {attrs:?}"))?;
        let end = after[1..].find(quote).with_context(|| format!("unterminated attribute in {attrs:?}"))?;
        let value = &after[1..1 + end];
        if key == name {
            let v = value.trim().parse::<f64>().with_context(|| format!("attribute {name}={value:?} is not a number"))?;
            return Ok(Some(v));
        }
        rest = &after[end + 2..];
    }
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.fff][Z|±HH:MM|±HHMM|±HH]` to Unix ms.
pub fn parse_iso8601_ms(s: &str) -> anyhow::Result<i64> {
    let b = s.as_bytes();
    if b.len() < 19 || b[4] != b'-' || b[7] != b'-' || (b[10] != b'T' && b[10] != b' ') || b[13] != b':' || b[16] != b':'
    {
        bail!("not ISO-8601: {s:?}");
    }
    let num = |r: std::ops::Range<usize>| -> anyhow::Result<i64> {
        s.get(r).context("short")?.parse::<i64>().with_context(|| format!("not ISO-8601: {s:?}"))
    };
    let (y, mo, d, h, mi, se) = (num(0..4)?, num(5..7)?, num(8..10)?, num(11..13)?, num(14..16)?, num(17..19)?);
    let mut rest = &s[19..];
    let mut ms = 0i64;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits: String = frac.chars().take_while(char::is_ascii_digit).collect();
        if digits.is_empty() {
            bail!("no digits after the decimal point: {s:?}");
        }
        let padded = format!("{:0<3}", &digits[..digits.len().min(3)]);
        ms = padded.parse().unwrap_or(0);
        rest = &frac[digits.len()..];
    }
    let offset_min = match rest {
        "" | "Z" | "z" => 0,
        o if o.is_ascii() && (o.starts_with('+') || o.starts_with('-')) && matches!(o.len(), 3 | 5 | 6) => {
            let sign = if o.starts_with('-') { -1 } else { 1 };
            let (hh, mm) = match o.len() {
                3 => (&o[1..3], "00"),
                5 => (&o[1..3], &o[3..5]),
                _ if o.as_bytes()[3] == b':' => (&o[1..3], &o[4..6]),
                _ => bail!("bad zone {o:?}"),
            };
            let hh: i64 = hh.parse().context("bad offset")?;
            let mm: i64 = mm.parse().context("bad offset")?;
            sign * (hh * 60 + mm)
        }
        o => bail!("bad zone {o:?}"),
    };
    if !((1..=12).contains(&mo) && (1..=31).contains(&d) && h < 24 && mi < 60 && se <= 60) {
        bail!("date or time out of range: {s:?}");
    }
    let days = days_from_civil(y, mo, d);
    Ok(((days * 86_400 + h * 3600 + mi * 60 + se - offset_min * 60) * 1000) + ms)
}

/// Days since 1970-01-01 (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Loads any supported trace file: `.gpx`, CSV with `id,ts,lat,lng`, or `latitude,longitude` CSV
/// (assumed 1 Hz).
pub fn load(path: &Path) -> anyhow::Result<Vec<Trace>> {
    load_with_period(path, 1000)
}

/// [`load`], with `period_ms` between fixes of a `latitude,longitude` CSV.
pub fn load_with_period(path: &Path, period_ms: i64) -> anyhow::Result<Vec<Trace>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("trace").to_owned();
    let is_gpx = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gpx")) || text.trim_start().starts_with("<?xml");
    if is_gpx {
        return Ok(vec![parse_gpx(&stem, &text)?]);
    }
    let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    let ncols = first.split(',').count();
    if ncols >= 4 {
        parse_csv_id_ts(&text)
    } else {
        Ok(vec![parse_csv_lat_lng(&stem, &text, period_ms)?])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso8601() {
        assert_eq!(parse_iso8601_ms("1970-01-01T00:00:00Z").unwrap(), 0);
        assert_eq!(parse_iso8601_ms("2020-12-18T06:15:50Z").unwrap(), 1_608_272_150_000);
        assert_eq!(parse_iso8601_ms("2020-12-18T07:15:50.250+01:00").unwrap(), 1_608_272_150_250);
        assert!(parse_iso8601_ms("yesterday").is_err());
    }

    #[test]
    fn csv_with_ids_groups_and_sorts() {
        let t = parse_csv_id_ts("id,ts,lat,lng\na,2000,52.5,13.4\nb,1000,52.6,13.5\na,1000,52.4,13.3\n").unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].id, "a");
        assert_eq!(t[0].fixes[0].ts, 1_000_000); // seconds become ms
        assert_eq!(t[0].fixes[0].lat, 52.4);
        assert!(parse_csv_id_ts("a,1,95,0\n").is_err());
    }

    /// Every bad input is an error naming the line or point, never a panic.
    #[test]
    fn garbage_gives_clear_errors() {
        let err = |r: anyhow::Result<Vec<Trace>>| format!("{:#}", r.unwrap_err());
        assert!(err(parse_csv_id_ts("id,ts,lat,lng\na,1000,52.5,13.4\nb,xyz,52.5,13.4\n")).contains("line 3: bad ts"));
        assert!(err(parse_csv_id_ts("a,1000,52.5\n")).contains("line 1: expected id,ts,lat,lng"));
        assert!(err(parse_csv_id_ts("a,1000,north,13.4\n")).contains("line 1: bad lat"));
        assert!(err(parse_csv_id_ts("a,1000,52.5,NaN\n")).contains("line 1: coordinates out of range"));
        assert!(err(parse_csv_id_ts("a,1000,52.5,181\n")).contains("out of range"));
        let one = |r: anyhow::Result<Trace>| format!("{:#}", r.unwrap_err());
        assert!(one(parse_csv_lat_lng("d", "latitude,longitude\n39.6,-104.9\n39.6;-104.9\n", 1000)).contains("line 3"));
        assert!(one(parse_csv_lat_lng("d", "latitude,longitude\n39.6,-104.9\n\u{0}\u{1},zz\n", 1000)).contains("line 3: bad number"));
        assert!(one(parse_csv_lat_lng("d", "39.6,-104.9\n91,0\n", 1000)).contains("line 2: coordinates out of range"));
        assert!(one(parse_gpx("g", "<gpx></gpx>")).contains("no <trkpt>"));
        assert!(one(parse_gpx("g", "garbage \u{fffd} <trkpt")).contains("unterminated"));
        assert!(one(parse_gpx("g", r#"<trkpt lon="13.7"></trkpt>"#)).contains("trkpt 1 without lat"));
        assert!(one(parse_gpx("g", r#"<trkpt lat="x" lon="13.7"></trkpt>"#)).contains("not a number"));
        assert!(one(parse_gpx("g", r#"<trkpt lat=45 lon="13.7"></trkpt>"#)).contains("unquoted"));
        assert!(one(parse_gpx("g", r#"<trkpt lat="45" lon="13.7"><time>noon</time></trkpt>"#)).contains("bad time in point 1"));
        assert!(one(parse_gpx("g", r#"<trkpt lat="95" lon="13.7"/>"#)).contains("out of range"));
        for bad in ["", "2020-13", "2020-12-18T06:15:5xZ", "2020-12-18T06:15:50+1", "2020-12-18T06:15:50.Z", "２０２０-12-18T06:15:50Z", "2020-12-18T06:15:50+0é0", "2020-12-18T06:15:50+01-00", "2020-13-01T00:00:00Z", "2020-12-18T25:00:00Z"] {
            assert!(parse_iso8601_ms(bad).is_err(), "{bad:?} accepted");
        }
        assert!(load(Path::new("/nonexistent/trace.gpx")).is_err());
    }

    #[test]
    fn gpx_attributes_any_whitespace_and_order() {
        let g = "<trkpt\n\tlon=\"13.8\"\n\tlat='45.2' ele=\"3\"><time>2020-12-18T06:15:50Z</time></trkpt>";
        let t = parse_gpx("x", g).unwrap();
        assert_eq!((t.fixes[0].lat, t.fixes[0].lng), (45.2, 13.8));
    }

    #[test]
    fn gpx_inline() {
        let g = r#"<gpx><trk><trkseg><trkpt lat="45.1" lon="13.7"><time>2020-12-18T06:15:50Z</time></trkpt>
            <trkpt lon='13.8' lat='45.2'/></trkseg></trk></gpx>"#;
        let t = parse_gpx("x", g).unwrap();
        assert_eq!(t.fixes.len(), 2);
        assert_eq!(t.fixes[1].lng, 13.8);
        assert_eq!(t.fixes[1].ts, t.fixes[0].ts + 1000);
    }

    /// Points before the first timed one are put a second apart before it, not at 1970 (a
    /// replay waited decades for the second fix).
    #[test]
    fn gpx_untimed_first_points_precede_the_first_time() {
        let g = r#"<trkpt lat="1" lon="1"/><trkpt lat="1" lon="1.0001"/><trkpt lat="1" lon="1.0002"><time>2020-01-01T00:00:00Z</time></trkpt><trkpt lat="1" lon="1.0003"/>"#;
        let t = parse_gpx("g", g).unwrap();
        let t0 = parse_iso8601_ms("2020-01-01T00:00:00Z").unwrap();
        let ts: Vec<i64> = t.fixes.iter().map(|f| f.ts).collect();
        assert_eq!(ts, vec![t0 - 2000, t0 - 1000, t0, t0 + 1000]);
        assert_eq!(t.fixes[0].lng, 1.0, "in file order");
    }

    /// ISO 8601 zone offsets without the colon, or hours only, as some GPX writers put them.
    #[test]
    fn iso8601_offset_forms() {
        let want = parse_iso8601_ms("2020-12-18T06:15:50Z").unwrap();
        for s in ["2020-12-18T07:15:50+01:00", "2020-12-18T07:15:50+0100", "2020-12-18T07:15:50+01", "2020-12-18T05:45:50-0030"] {
            assert_eq!(parse_iso8601_ms(s).unwrap(), want, "{s}");
        }
    }
}
