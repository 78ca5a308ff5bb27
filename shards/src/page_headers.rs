//! A bounded walk over a row group's page headers (Thrift compact protocol), run before the
//! parquet crate decodes them. parquet 60.1 skips an unknown field's `list<bool>` (or a map of
//! bools) as zero bytes per element, so a corrupt header claiming 2^31 of them spins for seconds
//! in a release build and most of a minute in a debug one (found by `fuzz_shard_reader`). This
//! walk reads each header byte for byte as the crate does, checks that every field the crate
//! knows has the type the crate reads it as (else the two readings part ways), and stops when the
//! booleans it counts exceed the bytes there are: a writer spends one byte on each.

use parquet::file::metadata::ParquetMetaData;

/// The crate's skip depth (`ThriftCompactInputProtocol::skip`).
const DEPTH: u32 = 64;

// Compact-protocol field types.
const STOP: u8 = 0;
const TRUE: u8 = 1;
const FALSE: u8 = 2;
const BYTE: u8 = 3;
const I16: u8 = 4;
const I32: u8 = 5;
const I64: u8 = 6;
const DOUBLE: u8 = 7;
const BINARY: u8 = 8;
const LIST: u8 = 9;
const SET: u8 = 10;
const MAP: u8 = 11;
const STRUCT: u8 = 12;
const UUID: u8 = 13;

/// The structs of a page header as parquet 60.1 reads them: (field id, wire type) of the fields
/// it knows; any other field is skipped by its wire type.
#[derive(Clone, Copy)]
enum Shape {
    PageHeader,
    DataPage,
    IndexPage,
    DictionaryPage,
    DataPageV2,
    Statistics,
}

impl Shape {
    /// The wire type of known field `id` (BOOL for either boolean), and the struct it holds.
    fn field(self, id: i16) -> Option<(u8, Option<Shape>)> {
        use Shape::*;
        let s = |shape| Some((STRUCT, Some(shape)));
        match (self, id) {
            (PageHeader, 1..=4) => Some((I32, None)),
            (PageHeader, 5) => s(DataPage),
            (PageHeader, 6) => s(IndexPage),
            (PageHeader, 7) => s(DictionaryPage),
            (PageHeader, 8) => s(DataPageV2),
            (DataPage, 1..=4) => Some((I32, None)),
            (DataPage, 5) | (DataPageV2, 8) => s(Statistics),
            (DictionaryPage, 1 | 2) => Some((I32, None)),
            (DictionaryPage, 3) | (DataPageV2, 7) | (Statistics, 7 | 8) => Some((TRUE, None)),
            (DataPageV2, 1..=6) => Some((I32, None)),
            (Statistics, 1 | 2 | 5 | 6) => Some((BINARY, None)),
            (Statistics, 3 | 4 | 9) => Some((I64, None)),
            _ => None,
        }
    }
}

struct Walk<'a> {
    buf: &'a [u8],
    pos: usize,
    /// Booleans inside collections so far: each costs the crate's skipper an iteration and no
    /// byte.
    bools: u64,
}

impl Walk<'_> {
    fn byte(&mut self) -> Result<u8, String> {
        let b = *self
            .buf
            .get(self.pos)
            .ok_or_else(|| format!("ends inside a page header at byte {}", self.pos))?;
        self.pos += 1;
        Ok(b)
    }

    fn varint(&mut self) -> Result<u64, String> {
        let (mut v, mut shift) = (0u64, 0u32);
        loop {
            let b = self.byte()?;
            v |= u64::from(b & 0x7f).wrapping_shl(shift);
            if b & 0x80 == 0 {
                return Ok(v);
            }
            shift = shift.saturating_add(7);
        }
    }

    fn zigzag(&mut self) -> Result<i64, String> {
        let v = self.varint()?;
        Ok((v >> 1) as i64 ^ -((v & 1) as i64))
    }

    fn skip_bytes(&mut self, n: u64) -> Result<(), String> {
        let end = usize::try_from(n)
            .ok()
            .and_then(|n| self.pos.checked_add(n))
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| format!("a page header field of {n} bytes at byte {}", self.pos))?;
        self.pos = end;
        Ok(())
    }

    /// `n` booleans of a collection: free for the crate's skipper, a byte each for a writer.
    fn count_bools(&mut self, n: u64) -> Result<(), String> {
        self.bools = self.bools.saturating_add(n);
        if self.bools > self.buf.len() as u64 {
            return Err(format!(
                "a page header declares {} booleans in a column chunk of {} bytes",
                self.bools,
                self.buf.len()
            ));
        }
        Ok(())
    }

    /// A collection's element type as the crate maps it (1 and 2 are both bool).
    fn element(&mut self, t: u8) -> Result<u8, String> {
        match t {
            1 | 2 => Ok(TRUE),
            3..=13 => Ok(t),
            _ => Err(format!(
                "invalid Thrift element type {t} before byte {}",
                self.pos
            )),
        }
    }

    /// A field of wire type `t`, skipped as the crate's `skip_till_depth` does.
    fn skip(&mut self, t: u8, depth: u32) -> Result<(), String> {
        if depth == 0 {
            return Err("page header nested too deep".into());
        }
        match t {
            TRUE | FALSE => Ok(()),
            BYTE => self.byte().map(drop),
            I16 | I32 | I64 => self.varint().map(drop),
            DOUBLE => self.skip_bytes(8),
            BINARY => {
                let n = self.varint()?;
                self.skip_bytes(n)
            }
            UUID => self.skip_bytes(16),
            STRUCT => loop {
                let (t, _) = self.field_header(0)?;
                if t == STOP {
                    return Ok(());
                }
                self.skip(t, depth - 1)?;
            },
            LIST | SET => {
                let h = self.byte()?;
                if h == 0 {
                    return Ok(());
                }
                let e = self.element(h & 0x0f)?;
                let n = match h >> 4 {
                    15 => self.size()?,
                    n => u64::from(n),
                };
                self.elements(&[e], n, depth)
            }
            MAP => {
                let n = self.size()?;
                if n == 0 {
                    return Ok(());
                }
                let kv = self.byte()?;
                let (k, v) = (self.element(kv >> 4)?, self.element(kv & 0x0f)?);
                self.elements(&[k, v], n, depth)
            }
            _ => Err(format!("invalid Thrift type {t} before byte {}", self.pos)),
        }
    }

    /// A collection's size (the crate reads it as an i32).
    fn size(&mut self) -> Result<u64, String> {
        let n = self.varint()?;
        if n > i32::MAX as u64 {
            return Err(format!("a collection of {n} elements in a page header"));
        }
        Ok(n)
    }

    /// `n` collection elements, each of the types in `types` (one, or a map's key and value).
    fn elements(&mut self, types: &[u8], n: u64, depth: u32) -> Result<(), String> {
        let bools = types.iter().filter(|&&t| t == TRUE).count() as u64;
        self.count_bools(bools.saturating_mul(n))?;
        if types.iter().all(|&t| t == TRUE) {
            return Ok(());
        }
        // Every other element reads at least a byte, so this loop ends with the buffer.
        for _ in 0..n {
            for &t in types {
                self.skip(t, depth - 1)?;
            }
        }
        Ok(())
    }

    /// A field header: (wire type, id), with `last` the previous field's id.
    fn field_header(&mut self, last: i16) -> Result<(u8, i16), String> {
        let b = self.byte()?;
        let t = b & 0x0f;
        if t == STOP {
            return Ok((STOP, 0));
        }
        if t > UUID {
            return Err(format!("invalid Thrift type {t} before byte {}", self.pos));
        }
        let id = match b >> 4 {
            0 => self.zigzag()? as i16,
            d => last
                .checked_add(i16::from(d))
                .ok_or_else(|| format!("field id overflow before byte {}", self.pos))?,
        };
        Ok((t, id))
    }

    /// A struct the crate reads field by field; returns PageHeader's field 3 (the compressed
    /// page size) when `shape` is a page header.
    fn read(&mut self, shape: Shape) -> Result<Option<i64>, String> {
        let (mut last, mut size) = (0i16, None);
        loop {
            let (t, id) = self.field_header(last)?;
            if t == STOP {
                return Ok(size);
            }
            match shape.field(id) {
                None => self.skip(t, DEPTH)?,
                Some((want, inner)) => {
                    let same = t == want || (want == TRUE && t == FALSE);
                    if !same {
                        return Err(format!(
                            "page header field {id} has Thrift type {t}, not {want}, before byte {}",
                            self.pos
                        ));
                    }
                    match (inner, want) {
                        (Some(s), _) => {
                            self.read(s)?;
                        }
                        (None, TRUE) => {}
                        (None, BINARY) => self.skip(BINARY, DEPTH)?,
                        (None, _) => {
                            let v = self.zigzag()?;
                            if matches!(shape, Shape::PageHeader) && id == 3 {
                                size = Some(v);
                            }
                        }
                    }
                }
            }
            last = id;
        }
    }
}

/// Walks the pages of one column chunk (`chunk`: its bytes): each header, then its compressed
/// page, up to the chunk's end.
pub fn check_chunk(chunk: &[u8]) -> Result<(), String> {
    let mut w = Walk {
        buf: chunk,
        pos: 0,
        bools: 0,
    };
    while w.pos < chunk.len() {
        let at = w.pos;
        let size = w
            .read(Shape::PageHeader)?
            .ok_or_else(|| format!("the page header at byte {at} has no compressed size"))?;
        if size < 0 {
            return Err(format!(
                "the page header at byte {at} gives a compressed size of {size}"
            ));
        }
        w.skip_bytes(size as u64)?;
    }
    Ok(())
}

/// Walks every column chunk of row group `rg`, whose bytes `data` holds from file offset
/// `base` on (the block reader's prefetched range, or the whole file with `base` 0).
pub fn check_row_group(
    meta: &ParquetMetaData,
    rg: usize,
    data: &[u8],
    base: u64,
) -> Result<(), String> {
    for (c, col) in meta.row_group(rg).columns().iter().enumerate() {
        let chunk = crate::pq::chunk_range(col)
            .ok()
            .and_then(|r| {
                let s = usize::try_from(r.start.checked_sub(base)?).ok()?;
                let e = usize::try_from(r.end.checked_sub(base)?).ok()?;
                data.get(s..e)
            })
            .ok_or_else(|| format!("row group {rg}, column {c}: byte range outside the file"))?;
        check_chunk(chunk).map_err(|m| format!("row group {rg}, column {c}: {m}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A page header: type 0, sizes, then `extra` fields, then stop.
    fn header(compressed: u8, extra: &[u8]) -> Vec<u8> {
        // Field 1 (delta 1, i32) = 0, field 2 = 2×8 zigzag, field 3 = compressed.
        let mut h = vec![0x15, 0x00, 0x15, 16, 0x15, compressed * 2];
        h.extend_from_slice(extra);
        h.push(0);
        h
    }

    #[test]
    fn walks_headers_and_pages_to_the_chunk_end() {
        let mut chunk = header(3, &[]);
        chunk.extend_from_slice(&[9, 9, 9]);
        chunk.extend(header(0, &[]));
        check_chunk(&chunk).unwrap();
        // One page byte short.
        let short = &chunk[..chunk.len() - 1];
        assert!(check_chunk(short).is_err());
    }

    #[test]
    fn a_list_of_more_booleans_than_bytes_is_an_error() {
        // Field 9 (delta 6 from 3, a list): bools (type 1), count 15 → varint 0x7fff_ffff.
        let huge = header(0, &[0x69, 0xf1, 0xff, 0xff, 0xff, 0xff, 0x07]);
        let e = check_chunk(&huge).unwrap_err();
        assert!(e.contains("2147483647 booleans"), "{e}");
        // A few booleans, bytes to spare: the crate's reading, accepted.
        let few = header(0, &[0x69, 0x31]);
        check_chunk(&few).unwrap();
        // A map of bools to bools counts both.
        let map = header(0, &[0x6b, 0xff, 0xff, 0xff, 0xff, 0x07, 0x11]);
        assert!(check_chunk(&map).unwrap_err().contains("booleans"));
    }

    #[test]
    fn a_known_field_of_another_type_is_an_error() {
        // Field 3 as a list instead of an i32: the crate would read it as a varint.
        let h = vec![0x15, 0x00, 0x15, 16, 0x19, 0x00, 0x00];
        let e = check_chunk(&h).unwrap_err();
        assert!(e.contains("field 3 has Thrift type 9"), "{e}");
    }

    #[test]
    fn nested_lists_of_booleans_share_one_budget() {
        // A list of 15+ lists (count 40), each of 14 booleans: 560 booleans in ~60 bytes.
        let mut extra = vec![0x69, 0xf9, 40];
        extra.extend([0xe1; 40]);
        let e = check_chunk(&header(0, &extra)).unwrap_err();
        assert!(e.contains("booleans"), "{e}");
    }
}
