//! A streaming reader of tar archives (ustar, GNU long names, pax `path`), member by member from
//! a byte stream: a webdataset shard is read as it downloads, never whole. Truncation and
//! corrupt headers are errors naming the archive and the offset.

use bytes::{Buf, Bytes, BytesMut};
use futures::{Stream, StreamExt};

use crate::error::ShardsError;

const BLOCK: usize = 512;

/// One regular file of the archive.
#[derive(Debug)]
pub struct Member {
    pub name: String,
    pub data: Bytes,
}

/// Reads members from a stream of chunks (an object store GET).
pub struct TarReader<S> {
    stream: S,
    buf: BytesMut,
    url: String,
    /// Bytes of the archive consumed so far (for error messages).
    offset: u64,
    done: bool,
}

impl<S, E> TarReader<S>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: Into<object_store::Error>,
{
    pub fn new(url: &str, stream: S) -> Self {
        Self {
            stream,
            buf: BytesMut::new(),
            url: url.to_string(),
            offset: 0,
            done: false,
        }
    }

    fn bad(&self, message: String) -> ShardsError {
        ShardsError::bad_input(&self.url, message)
    }

    /// Buffers at least `n` bytes; false if the stream ended first.
    async fn fill(&mut self, n: usize) -> Result<bool, ShardsError> {
        while self.buf.len() < n {
            match self.stream.next().await {
                Some(Ok(chunk)) => self.buf.extend_from_slice(&chunk),
                Some(Err(e)) => return Err(ShardsError::store(&self.url, e.into())),
                None => return Ok(false),
            }
        }
        Ok(true)
    }

    fn take(&mut self, n: usize) -> Bytes {
        self.offset += n as u64;
        self.buf.split_to(n).freeze()
    }

    /// The next regular file, or None at the end of the archive.
    pub async fn next_member(&mut self) -> Result<Option<Member>, ShardsError> {
        // A GNU long name or a pax `path` names the member that follows it.
        let mut long_name: Option<String> = None;
        loop {
            if self.done {
                return Ok(None);
            }
            let at = self.offset;
            if !self.fill(BLOCK).await? {
                if self.buf.is_empty() {
                    // No end-of-archive blocks: many writers leave them out.
                    self.done = true;
                    return Ok(None);
                }
                return Err(self.bad(format!(
                    "truncated tar: the archive ends inside a header at byte {at}"
                )));
            }
            let header = self.take(BLOCK);
            if header.iter().all(|&b| b == 0) {
                self.done = true;
                return Ok(None);
            }
            let h = Header::parse(&header).map_err(|m| self.bad(format!("byte {at}: {m}")))?;
            let name = long_name.take().unwrap_or_else(|| h.name.clone());
            let padded = h.size.div_ceil(BLOCK as u64) * BLOCK as u64;
            let size = usize::try_from(h.size)
                .map_err(|_| self.bad(format!("member {name}: size {} too large", h.size)))?;
            let padded = usize::try_from(padded).unwrap_or(usize::MAX);
            if !self.fill(padded).await? {
                return Err(self.bad(format!(
                    "truncated tar: the archive ends inside member {name} ({} of {} bytes)",
                    self.buf.len().min(size),
                    size
                )));
            }
            let mut data = self.take(padded);
            data.truncate(size);
            match h.kind {
                b'0' | 0 | b'7' => return Ok(Some(Member { name, data })),
                b'L' => {
                    long_name = Some(c_string(&data));
                }
                b'x' => long_name = pax_path(&data).or(long_name),
                // Directories, links, global pax headers, ...: nothing to read.
                _ => {}
            }
        }
    }
}

/// The fields of a header block that a reader of regular files needs.
struct Header {
    name: String,
    size: u64,
    kind: u8,
}

impl Header {
    fn parse(b: &Bytes) -> Result<Header, String> {
        let stored = octal(&b[148..156]).ok_or("corrupt tar header (checksum field)")?;
        let sum: u64 = b
            .iter()
            .enumerate()
            .map(|(i, &x)| {
                if (148..156).contains(&i) {
                    32
                } else {
                    u64::from(x)
                }
            })
            .sum();
        if sum != stored {
            return Err(format!(
                "corrupt tar header (checksum {stored} stored, {sum} computed)"
            ));
        }
        let size = if b[124] & 0x80 != 0 {
            // GNU base-256 for sizes of 8 GiB and more.
            b[125..136]
                .iter()
                .fold(0u64, |acc, &x| acc.wrapping_shl(8) | u64::from(x))
        } else {
            octal(&b[124..136]).ok_or("corrupt tar header (size field)")?
        };
        let mut name = c_string(&b[0..100]);
        if &b[257..262] == b"ustar" {
            let prefix = c_string(&b[345..500]);
            if !prefix.is_empty() {
                name = format!("{prefix}/{name}");
            }
        }
        Ok(Header {
            name,
            size,
            kind: b[156],
        })
    }
}

fn c_string(b: &[u8]) -> String {
    let end = b.iter().position(|&x| x == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

fn octal(b: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(b).ok()?;
    let s = s.trim_matches(|c: char| c == '\0' || c == ' ');
    if s.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(s, 8).ok()
}

/// The `path` record of a pax extended header ("LEN path=VALUE\n" records).
fn pax_path(mut data: &[u8]) -> Option<String> {
    let mut path = None;
    while !data.is_empty() {
        let space = data.iter().position(|&b| b == b' ')?;
        let len: usize = std::str::from_utf8(&data[..space]).ok()?.parse().ok()?;
        if len <= space || len > data.len() {
            return path;
        }
        let record = &data[space + 1..len];
        if let Some(v) = record.strip_prefix(b"path=") {
            path = Some(String::from_utf8_lossy(v.strip_suffix(b"\n").unwrap_or(v)).into_owned());
        }
        data.advance(len);
    }
    path
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A ustar header + data block for `name` (the tests' tar writer).
    pub(crate) fn entry(name: &str, data: &[u8], kind: u8) -> Vec<u8> {
        let mut h = [0u8; BLOCK];
        h[..name.len()].copy_from_slice(name.as_bytes());
        h[100..107].copy_from_slice(b"0000644");
        h[124..135].copy_from_slice(format!("{:011o}", data.len()).as_bytes());
        h[136..147].copy_from_slice(b"00000000000");
        h[156] = kind;
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
        let mut out = h.to_vec();
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(BLOCK) * BLOCK, 0);
        out
    }

    async fn read_all(bytes: Vec<u8>, chunk: usize) -> Result<Vec<(String, Vec<u8>)>, ShardsError> {
        let chunks: Vec<Result<Bytes, object_store::Error>> = bytes
            .chunks(chunk)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        let mut r = TarReader::new("t.tar", futures::stream::iter(chunks));
        let mut out = Vec::new();
        while let Some(m) = r.next_member().await? {
            out.push((m.name, m.data.to_vec()));
        }
        Ok(out)
    }

    #[tokio::test]
    async fn members_come_out_whole_across_any_chunking_with_long_names() {
        let long = format!("{}/x.txt", "d".repeat(120));
        let mut tar = entry("a/1.jpg", &[7u8; 700], b'0');
        tar.extend(entry("././@LongLink", format!("{long}\0").as_bytes(), b'L'));
        tar.extend(entry("ignored", b"hello", b'0'));
        let record = " path=b/from-pax.json\n";
        let pax = format!("{}{record}", record.len() + 2);
        tar.extend(entry("PaxHeader", pax.as_bytes(), b'x'));
        tar.extend(entry("short", b"{}", b'0'));
        tar.extend(entry("dir/", b"", b'5'));
        tar.extend([0u8; 1024]);
        for chunk in [1, 100, 512, 4096] {
            let got = read_all(tar.clone(), chunk).await.unwrap();
            let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
            assert_eq!(
                names,
                ["a/1.jpg", long.as_str(), "b/from-pax.json"],
                "{chunk}"
            );
            assert_eq!(got[0].1, vec![7u8; 700]);
            assert_eq!(got[1].1, b"hello");
        }
    }

    #[tokio::test]
    async fn truncation_and_corruption_name_the_archive() {
        let mut tar = entry("a/1.jpg", &[7u8; 700], b'0');
        tar.truncate(900);
        let e = read_all(tar, 64).await.unwrap_err().to_string();
        assert!(
            e.contains("t.tar") && e.contains("truncated tar") && e.contains("a/1.jpg"),
            "{e}"
        );
        let mut tar = entry("a/1.jpg", b"x", b'0');
        tar[10] ^= 0xff;
        let e = read_all(tar, 64).await.unwrap_err().to_string();
        assert!(e.contains("t.tar") && e.contains("checksum"), "{e}");
        let tar = entry("a/1.jpg", b"x", b'0')[..300].to_vec();
        let e = read_all(tar, 64).await.unwrap_err().to_string();
        assert!(e.contains("inside a header"), "{e}");
    }
}
