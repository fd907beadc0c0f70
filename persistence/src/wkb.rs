//! Zone geometry as OGC Well-Known Binary (WKB): the storage format of `zones.geometry`.
//!
//! Why WKB and not GeoJSON text: binary IEEE-754 doubles round-trip every coordinate bit for
//! bit, while JSON float parsing in `serde_json` is only exact with its workspace-wide
//! `float_roundtrip` feature (which would slow the gateway's GPS parsing). WKB is also what
//! PostGIS reads (`ST_GeomFromWKB`), should the schema grow spatial columns.
//!
//! Written: little-endian 2-D `MultiPolygon` (type 6). Read: either byte order, `MultiPolygon`
//! or a single `Polygon` (type 3, e.g. a hand-edited row), 2-D only.

use geo::{Coord, LineString, MultiPolygon, Polygon};

const WKB_POLYGON: u32 = 3;
const WKB_MULTIPOLYGON: u32 = 6;
/// Little-endian (NDR) byte-order marker.
const NDR: u8 = 1;

/// Encodes a multipolygon as little-endian WKB.
pub(crate) fn encode(mp: &MultiPolygon<f64>) -> Vec<u8> {
    let points: usize = mp.0.iter().map(|p| p.exterior().0.len() + p.interiors().iter().map(|r| r.0.len()).sum::<usize>()).sum();
    let mut out = Vec::with_capacity(9 + mp.0.len() * 13 + points * 16);
    out.push(NDR);
    out.extend_from_slice(&WKB_MULTIPOLYGON.to_le_bytes());
    out.extend_from_slice(&len_u32(mp.0.len()).to_le_bytes());
    for p in &mp.0 {
        out.push(NDR);
        out.extend_from_slice(&WKB_POLYGON.to_le_bytes());
        out.extend_from_slice(&len_u32(1 + p.interiors().len()).to_le_bytes());
        for ring in std::iter::once(p.exterior()).chain(p.interiors()) {
            out.extend_from_slice(&len_u32(ring.0.len()).to_le_bytes());
            for c in &ring.0 {
                out.extend_from_slice(&c.x.to_le_bytes());
                out.extend_from_slice(&c.y.to_le_bytes());
            }
        }
    }
    out
}

fn len_u32(n: usize) -> u32 {
    u32::try_from(n).expect("geometry has fewer than 2^32 parts")
}

/// Decodes WKB written by [`encode`] (or any 2-D WKB Polygon / MultiPolygon).
pub(crate) fn decode(bytes: &[u8]) -> Result<MultiPolygon<f64>, String> {
    let mut r = Reader { bytes, pos: 0, little: true };
    let ty = r.header()?;
    let mp = match ty {
        WKB_MULTIPOLYGON => {
            let n = r.count(9)?;
            let mut polys = Vec::with_capacity(n);
            for _ in 0..n {
                if r.header()? != WKB_POLYGON {
                    return Err("multipolygon member is not a polygon".into());
                }
                polys.push(r.polygon()?);
            }
            MultiPolygon(polys)
        }
        WKB_POLYGON => MultiPolygon(vec![r.polygon()?]),
        other => return Err(format!("unsupported wkb geometry type {other}")),
    };
    if r.pos != bytes.len() {
        return Err(format!("{} trailing bytes", bytes.len() - r.pos));
    }
    Ok(mp)
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    little: bool,
}

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let end = self.pos.checked_add(N).filter(|&e| e <= self.bytes.len()).ok_or("wkb is truncated")?;
        let mut a = [0u8; N];
        a.copy_from_slice(&self.bytes[self.pos..end]);
        self.pos = end;
        Ok(a)
    }

    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take::<4>()?;
        Ok(if self.little { u32::from_le_bytes(b) } else { u32::from_be_bytes(b) })
    }

    fn f64(&mut self) -> Result<f64, String> {
        let b = self.take::<8>()?;
        Ok(if self.little { f64::from_le_bytes(b) } else { f64::from_be_bytes(b) })
    }

    /// Reads a byte-order marker and a geometry type (which then governs the rest).
    fn header(&mut self) -> Result<u32, String> {
        self.little = match self.take::<1>()?[0] {
            0 => false,
            1 => true,
            b => return Err(format!("bad wkb byte order {b}")),
        };
        self.u32()
    }

    /// Reads an element count, refusing one the remaining bytes cannot hold (each element takes
    /// at least `min_size` bytes), so a corrupt count cannot make us allocate wildly.
    fn count(&mut self, min_size: usize) -> Result<usize, String> {
        let n = self.u32()? as usize;
        if n.saturating_mul(min_size) > self.bytes.len() - self.pos {
            return Err(format!("wkb count {n} exceeds the data"));
        }
        Ok(n)
    }

    fn polygon(&mut self) -> Result<Polygon<f64>, String> {
        let rings = self.count(4)?;
        if rings == 0 {
            return Ok(Polygon::new(LineString::new(Vec::new()), Vec::new()));
        }
        let mut all = Vec::with_capacity(rings);
        for _ in 0..rings {
            let n = self.count(16)?;
            let mut coords = Vec::with_capacity(n);
            for _ in 0..n {
                let x = self.f64()?;
                let y = self.f64()?;
                coords.push(Coord { x, y });
            }
            all.push(LineString::new(coords));
        }
        let exterior = all.remove(0);
        Ok(Polygon::new(exterior, all))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(pts: &[(f64, f64)]) -> LineString<f64> {
        LineString::new(pts.iter().map(|&(x, y)| Coord { x, y }).collect())
    }

    #[test]
    fn round_trip_is_bit_exact() {
        let mp = MultiPolygon(vec![
            Polygon::new(
                ring(&[(13.0, 52.0), (13.1 + 0.2, 52.0), (13.3, 52.3), (13.0, 52.0)]),
                vec![ring(&[(13.1, 52.1), (13.15, 52.1000000000001), (13.12, 52.2), (13.1, 52.1)])],
            ),
            Polygon::new(ring(&[(-0.0, 1e-300), (5e-324, 2.0), (1.0, 1.0), (-0.0, 1e-300)]), vec![]),
        ]);
        let back = decode(&encode(&mp)).unwrap();
        let bits = |m: &MultiPolygon<f64>| -> Vec<u64> {
            m.0.iter()
                .flat_map(|p| std::iter::once(p.exterior()).chain(p.interiors()).flat_map(|r| r.0.iter()).collect::<Vec<_>>())
                .flat_map(|c| [c.x.to_bits(), c.y.to_bits()])
                .collect()
        };
        assert_eq!(bits(&back), bits(&mp));
        assert_eq!(back, mp);
    }

    #[test]
    fn reads_big_endian_polygon() {
        let mut b = vec![0u8];
        b.extend_from_slice(&WKB_POLYGON.to_be_bytes());
        b.extend_from_slice(&1u32.to_be_bytes());
        b.extend_from_slice(&4u32.to_be_bytes());
        for (x, y) in [(0.0f64, 0.0f64), (1.0, 0.0), (1.0, 1.0), (0.0, 0.0)] {
            b.extend_from_slice(&x.to_be_bytes());
            b.extend_from_slice(&y.to_be_bytes());
        }
        let mp = decode(&b).unwrap();
        assert_eq!(mp.0.len(), 1);
        assert_eq!(mp.0[0].exterior().0.len(), 4);
    }

    #[test]
    fn rejects_garbage() {
        assert!(decode(&[]).is_err());
        assert!(decode(&[1, 6, 0, 0, 0, 255, 255, 255, 255]).is_err());
        let mut ok = encode(&MultiPolygon(vec![]));
        ok.push(0);
        assert!(decode(&ok).is_err());
    }
}
