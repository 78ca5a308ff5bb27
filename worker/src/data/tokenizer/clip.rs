//! OpenAI CLIP's byte-level BPE (`open_clip.tokenizer.SimpleTokenizer`), on integer ids.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::sync::OnceLock;

use regex::Regex;

use super::{clean, TokenizerError};

/// Merges used by CLIP: the first 49152 - 256 - 2 lines after the header.
const NUM_MERGES: usize = 49152 - 256 - 2;
pub const SOT: i64 = 49406;
pub const EOT: i64 = 49407;
pub const VOCAB_SIZE: usize = 49408;

pub struct ClipBpe {
    /// Id of each byte as a word-inner symbol; `+ 256` is the same byte ending a word (`</w>`).
    byte_id: [u32; 256],
    /// (left id, right id) → (merge rank, merged id).
    merges: HashMap<(u32, u32), (u32, u32)>,
}

impl ClipBpe {
    /// Load `bpe_simple_vocab_16e6.txt.gz`.
    pub fn load(path: &Path) -> Result<Self, TokenizerError> {
        let io = |e: std::io::Error| TokenizerError::Io(path.to_path_buf(), e);
        let file = std::fs::File::open(path).map_err(io)?;
        let mut text = String::new();
        flate2::read::GzDecoder::new(file)
            .read_to_string(&mut text)
            .map_err(io)?;
        let merges: Vec<(&str, &str)> = text
            .split('\n')
            .skip(1)
            .take(NUM_MERGES)
            .enumerate()
            .map(|(i, line)| {
                let mut parts = line.split_whitespace();
                match (parts.next(), parts.next(), parts.next()) {
                    (Some(a), Some(b), None) => Ok((a, b)),
                    _ => Err(TokenizerError::BadMerges(path.to_path_buf(), i + 2)),
                }
            })
            .collect::<Result<_, _>>()?;
        if merges.len() != NUM_MERGES {
            return Err(TokenizerError::BadMerges(
                path.to_path_buf(),
                merges.len() + 2,
            ));
        }

        // vocab = byte symbols, byte symbols + "</w>", merged symbols, specials; later
        // duplicates win, as with Python's dict(zip(vocab, range(...))).
        let byte_chars = bytes_to_unicode();
        let mut vocab: Vec<String> = Vec::with_capacity(VOCAB_SIZE);
        let order = byte_order();
        vocab.extend(order.iter().map(|&b| byte_chars[b as usize].to_string()));
        vocab.extend(
            order
                .iter()
                .map(|&b| format!("{}</w>", byte_chars[b as usize])),
        );
        vocab.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
        vocab.push("<start_of_text>".into());
        vocab.push("<end_of_text>".into());
        let encoder: HashMap<&str, u32> = vocab
            .iter()
            .enumerate()
            .map(|(i, s)| (s.as_str(), i as u32))
            .collect();

        let mut byte_id = [0u32; 256];
        for b in 0..256 {
            byte_id[b] = encoder[byte_chars[b].to_string().as_str()];
        }
        let mut table = HashMap::with_capacity(merges.len());
        for (rank, (a, b)) in merges.iter().enumerate() {
            let merged = format!("{a}{b}");
            match (encoder.get(a), encoder.get(b), encoder.get(merged.as_str())) {
                (Some(&ia), Some(&ib), Some(&im)) => {
                    table.insert((ia, ib), (rank as u32, im));
                }
                // A merge of symbols that never occur cannot fire; Python would never reach it.
                _ => continue,
            }
        }
        Ok(Self {
            byte_id,
            merges: table,
        })
    }

    /// BPE ids of the cleaned caption, without start/end tokens.
    pub fn encode(&self, text: &str) -> Vec<i64> {
        let text = clean::clean_lower(text);
        let mut ids = Vec::new();
        for m in word_re().find_iter(&text) {
            match m.as_str() {
                "<start_of_text>" => ids.push(SOT),
                "<end_of_text>" => ids.push(EOT),
                word => self.bpe(word.as_bytes(), &mut ids),
            }
        }
        ids
    }

    fn bpe(&self, bytes: &[u8], out: &mut Vec<i64>) {
        let Some((&last, inner)) = bytes.split_last() else {
            return;
        };
        let mut word: Vec<u32> = inner.iter().map(|&b| self.byte_id[b as usize]).collect();
        word.push(self.byte_id[last as usize] + 256);
        while word.len() > 1 {
            // The lowest-ranked pair present, then merge every occurrence left to right.
            let best = word
                .windows(2)
                .filter_map(|w| {
                    self.merges
                        .get(&(w[0], w[1]))
                        .map(|&(r, m)| (r, w[0], w[1], m))
                })
                .min();
            let Some((_, first, second, merged)) = best else {
                break;
            };
            let mut next = Vec::with_capacity(word.len());
            let mut i = 0;
            while i < word.len() {
                if i + 1 < word.len() && word[i] == first && word[i + 1] == second {
                    next.push(merged);
                    i += 2;
                } else {
                    next.push(word[i]);
                    i += 1;
                }
            }
            word = next;
        }
        out.extend(word.into_iter().map(i64::from));
    }
}

/// The word split of OpenCLIP (`regex` module semantics; the text is already lower-case).
fn word_re() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| {
        Regex::new(
            r"(?i)<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
        )
        .expect("static regex")
    })
}

/// GPT-2's byte → printable char table; bytes in `byte_order` order get chars 256.. in turn.
fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..=255u8 {
        table[b as usize] = if is_printable_byte(b) {
            char::from(b)
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap_or('\0')
        };
    }
    table
}

fn is_printable_byte(b: u8) -> bool {
    matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF)
}

/// Byte order of the first 256 vocab entries: printable bytes first, then the rest.
fn byte_order() -> Vec<u8> {
    let mut order: Vec<u8> = (0..=255u8).filter(|&b| is_printable_byte(b)).collect();
    order.extend((0..=255u8).filter(|&b| !is_printable_byte(b)));
    order
}
