//! TensorBoard scalar event files, written by rank 0 into `<run.dir>/tensorboard/`.
//!
//! The format is TFRecord: each record is `u64 length (LE) | masked crc32c(length) | data |
//! masked crc32c(data)`, and each data is a serialized `tensorflow.Event`. Only the fields
//! scalars need are declared here; their numbers are TensorFlow's (event.proto, summary.proto).

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use prost::Message;

#[derive(Clone, PartialEq, prost::Message)]
pub struct Event {
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    #[prost(int64, tag = "2")]
    pub step: i64,
    #[prost(string, optional, tag = "3")]
    pub file_version: Option<String>,
    #[prost(message, optional, tag = "5")]
    pub summary: Option<Summary>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Summary {
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<SummaryValue>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SummaryValue {
    #[prost(string, tag = "1")]
    pub tag: String,
    #[prost(float, optional, tag = "2")]
    pub simple_value: Option<f32>,
}

/// CRC-32C (Castagnoli), the checksum TFRecord uses.
pub fn crc32c(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0x82F6_3B78 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
            *e = c;
        }
        t
    });
    let mut crc = !0u32;
    for &b in data {
        crc = table[((crc ^ b as u32) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// TFRecord's masking: a CRC of data that itself holds CRCs is weak, so it is rotated and offset.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c(data);
    (crc.rotate_right(15)).wrapping_add(0xa282_ead8)
}

/// One TFRecord frame around `data`.
pub fn frame(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    out
}

/// Where rank 0 writes events: `$FERROCLIP_TENSORBOARD_DIR`, else `<run.dir>/tensorboard` when
/// the run directory is local. Event files are appended to, which object stores cannot do.
pub fn events_dir(run_dir: &str) -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os("FERROCLIP_TENSORBOARD_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let local = run_dir.strip_prefix("file://").unwrap_or(run_dir);
    if local.contains("://") {
        return Err(format!(
            "run.dir {run_dir} is an object store: set FERROCLIP_TENSORBOARD_DIR to a local or mounted directory for TensorBoard events"
        ));
    }
    Ok(Path::new(local).join("tensorboard"))
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// An open event file. A new file per writer: TensorBoard merges every file of a directory,
/// so a later rank 0 (after a regroup) simply adds its own.
pub struct EventWriter {
    out: BufWriter<File>,
    path: PathBuf,
}

impl EventWriter {
    pub fn create(dir: &Path, writer_id: &str) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let now = unix_now();
        let id: String = writer_id
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let path = dir.join(format!(
            "events.out.tfevents.{}.{id}.{}",
            now as u64,
            std::process::id()
        ));
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)?;
        let mut w = Self {
            out: BufWriter::new(file),
            path,
        };
        w.write_event(&Event {
            wall_time: now,
            step: 0,
            file_version: Some("brain.Event:2".into()),
            summary: None,
        })?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One event holding every scalar of `step`; flushed so TensorBoard sees it while the run goes.
    pub fn scalars(&mut self, step: u64, values: &[(String, f64)]) -> std::io::Result<()> {
        let value = values
            .iter()
            .filter(|(_, v)| v.is_finite())
            .map(|(tag, v)| SummaryValue {
                tag: tag.clone(),
                simple_value: Some(*v as f32),
            })
            .collect();
        self.write_event(&Event {
            wall_time: unix_now(),
            step: step as i64,
            file_version: None,
            summary: Some(Summary { value }),
        })
    }

    fn write_event(&mut self, e: &Event) -> std::io::Result<()> {
        self.out.write_all(&frame(&e.encode_to_vec()))?;
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_go_beside_a_local_run_only() {
        if std::env::var_os("FERROCLIP_TENSORBOARD_DIR").is_some() {
            return;
        }
        assert_eq!(
            events_dir("/runs/a").unwrap(),
            Path::new("/runs/a/tensorboard")
        );
        assert_eq!(
            events_dir("file:///runs/a").unwrap(),
            Path::new("/runs/a/tensorboard")
        );
        assert!(events_dir("s3://bucket/runs/a").is_err());
    }

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        // The CRC-32C check value of "123456789" (RFC 3720, appendix B.4).
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn frames_carry_length_and_checksums() {
        let f = frame(b"abc");
        assert_eq!(f.len(), 8 + 4 + 3 + 4);
        assert_eq!(u64::from_le_bytes(f[..8].try_into().unwrap()), 3);
        assert_eq!(
            u32::from_le_bytes(f[8..12].try_into().unwrap()),
            masked_crc32c(&3u64.to_le_bytes())
        );
        assert_eq!(&f[12..15], b"abc");
        assert_eq!(
            u32::from_le_bytes(f[15..].try_into().unwrap()),
            masked_crc32c(b"abc")
        );
    }

    #[test]
    fn an_event_file_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path(), "w/0").unwrap();
        w.scalars(3, &[("loss/total".into(), 2.5), ("lr".into(), f64::NAN)])
            .unwrap();
        let bytes = std::fs::read(w.path()).unwrap();
        let mut events = Vec::new();
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            let len = u64::from_le_bytes(rest[..8].try_into().unwrap()) as usize;
            let data = &rest[12..12 + len];
            let crc = u32::from_le_bytes(rest[12 + len..16 + len].try_into().unwrap());
            assert_eq!(crc, masked_crc32c(data));
            events.push(Event::decode(data).unwrap());
            rest = &rest[16 + len..];
        }
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].file_version.as_deref(), Some("brain.Event:2"));
        assert_eq!(events[1].step, 3);
        let values = &events[1].summary.as_ref().unwrap().value;
        assert_eq!(values.len(), 1, "non-finite values are left out");
        assert_eq!(values[0].tag, "loss/total");
        assert_eq!(values[0].simple_value, Some(2.5));
    }
}
