//! open_clip's `SimpleTokenizer` (CLIP byte-level BPE), exactly as HPSv2 calls it: clean-up
//! ([`super::text_clean::clean`]), pre-tokenising regex, BPE with `</w>` word ends, SOT/EOT,
//! truncation to the context with the last id forced to EOT, zero padding.
//!
//! Why not the `tokenizers` crate: it needs a `tokenizer.json` that is not shipped next to
//! the HPS weights (only `bpe_simple_vocab_16e6.txt.gz` is), it has no ftfy/html clean-up, and
//! it pads and truncates differently; what remains (greedy lowest-rank merging) is short.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::sync::Mutex;

use regex::Regex;

use super::RewardError;
use super::text_clean::clean;

/// Id of `<start_of_text>`.
pub const SOT: i64 = 49406;
/// Id of `<end_of_text>`.
pub const EOT: i64 = 49407;
/// Number of merges open_clip uses from the file (`49152 - 256 - 2`).
const MERGES: usize = 49152 - 256 - 2;

/// GPT-2's reversible byte → printable-character table, in the vocabulary's order: the
/// printable bytes first (each maps to itself), then the rest (mapped to U+0100 onwards).
/// Returns `(byte, char)` pairs in that order.
fn bytes_to_unicode() -> Vec<(u8, char)> {
    let printable = |b: u32| {
        (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b)
    };
    let mut pairs: Vec<(u8, char)> = (0..=255u32)
        .filter(|b| printable(*b))
        .map(|b| (b as u8, char::from_u32(b).unwrap_or('\0')))
        .collect();
    let rest = (0..=255u32).filter(|b| !printable(*b));
    for (n, b) in rest.enumerate() {
        pairs.push((b as u8, char::from_u32(256 + n as u32).unwrap_or('\0')));
    }
    pairs
}

/// The CLIP BPE tokenizer.
#[derive(Debug)]
pub struct ClipTokenizer {
    encoder: HashMap<String, i64>,
    ranks: HashMap<(String, String), usize>,
    byte_encoder: [char; 256],
    pattern: Regex,
    context_length: usize,
    cache: Mutex<HashMap<String, Vec<i64>>>,
}

impl ClipTokenizer {
    /// Loads `bpe_simple_vocab_16e6.txt.gz` (gzip) or its unpacked text.
    pub fn from_file(path: &Path) -> Result<Self, RewardError> {
        let bad = |m: String| RewardError::Vocab(format!("{}: {m}", path.display()));
        let raw = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        let text = if raw.starts_with(&[0x1f, 0x8b]) {
            let mut s = String::new();
            flate2::read::GzDecoder::new(raw.as_slice())
                .read_to_string(&mut s)
                .map_err(|e| bad(format!("gunzip: {e}")))?;
            s
        } else {
            String::from_utf8(raw).map_err(|e| bad(e.to_string()))?
        };
        Self::from_merges_text(&text).map_err(|e| bad(e.to_string()))
    }

    /// Builds the vocabulary from the merges file's text (header line first).
    pub fn from_merges_text(text: &str) -> Result<Self, RewardError> {
        let lines: Vec<&str> = text.split('\n').collect();
        if lines.len() < MERGES + 1 {
            return Err(RewardError::Vocab(format!(
                "has {} lines, needs at least {} merges after the header",
                lines.len(),
                MERGES
            )));
        }
        let mut merges = Vec::with_capacity(MERGES);
        for (i, line) in lines[1..=MERGES].iter().enumerate() {
            let mut parts = line.split_whitespace();
            match (parts.next(), parts.next(), parts.next()) {
                (Some(a), Some(b), None) => merges.push((a.to_string(), b.to_string())),
                _ => {
                    return Err(RewardError::Vocab(format!(
                        "line {}: not a merge: {line:?}",
                        i + 2
                    )));
                }
            }
        }
        let table = bytes_to_unicode();
        let mut byte_encoder = ['\0'; 256];
        for (b, c) in &table {
            byte_encoder[*b as usize] = *c;
        }
        let mut vocab: Vec<String> = table.iter().map(|(_, c)| c.to_string()).collect();
        vocab.extend(table.iter().map(|(_, c)| format!("{c}</w>")));
        vocab.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
        vocab.push("<start_of_text>".into());
        vocab.push("<end_of_text>".into());
        let encoder = vocab.into_iter().enumerate().map(|(i, v)| (v, i as i64)).collect();
        let ranks = merges.into_iter().enumerate().map(|(i, m)| (m, i)).collect();
        // open_clip's pattern, compiled case-insensitively like `regex.IGNORECASE` there.
        let pattern = Regex::new(
            r"(?i)<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
        )
        .map_err(|e| RewardError::Vocab(e.to_string()))?;
        Ok(Self {
            encoder,
            ranks,
            byte_encoder,
            pattern,
            context_length: 77,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// Token positions per prompt (77).
    pub fn context_length(&self) -> usize {
        self.context_length
    }

    /// BPE of one pre-token (already byte-encoded), as ids.
    fn bpe(&self, token: &str) -> Result<Vec<i64>, RewardError> {
        if let Some(ids) = self.cache.lock().ok().and_then(|c| c.get(token).cloned()) {
            return Ok(ids);
        }
        let mut word: Vec<String> = token.chars().map(String::from).collect();
        if let Some(last) = word.last_mut() {
            last.push_str("</w>");
        }
        while word.len() > 1 {
            // The adjacent pair with the lowest merge rank; merge all its occurrences left to right.
            let best = word
                .windows(2)
                .filter_map(|w| self.ranks.get(&(w[0].clone(), w[1].clone())).map(|r| (*r, w)))
                .min_by_key(|(r, _)| *r)
                .map(|(_, w)| (w[0].clone(), w[1].clone()));
            let Some((first, second)) = best else { break };
            let mut merged = Vec::with_capacity(word.len());
            let mut i = 0;
            while i < word.len() {
                if i + 1 < word.len() && word[i] == first && word[i + 1] == second {
                    merged.push(format!("{first}{second}"));
                    i += 2;
                } else {
                    merged.push(std::mem::take(&mut word[i]));
                    i += 1;
                }
            }
            word = merged;
        }
        let ids = word
            .iter()
            .map(|w| {
                self.encoder.get(w).copied().ok_or_else(|| {
                    RewardError::Vocab(format!("BPE produced '{w}', not in the vocabulary"))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if let Ok(mut c) = self.cache.lock() {
            c.insert(token.to_string(), ids.clone());
        }
        Ok(ids)
    }

    /// Token ids of `text` without SOT/EOT (open_clip's `encode`).
    pub fn encode(&self, text: &str) -> Result<Vec<i64>, RewardError> {
        let text = clean(text);
        let mut ids = Vec::new();
        for m in self.pattern.find_iter(&text) {
            let piece = m.as_str();
            if piece == "<start_of_text>" {
                ids.push(SOT);
                continue;
            }
            if piece == "<end_of_text>" {
                ids.push(EOT);
                continue;
            }
            let encoded: String = piece.bytes().map(|b| self.byte_encoder[b as usize]).collect();
            ids.extend(self.bpe(&encoded)?);
        }
        Ok(ids)
    }

    /// One row of `context_length` ids: SOT, tokens, EOT; truncated with the last id forced
    /// to EOT; padded with 0. A prompt with no tokens after clean-up (empty, all whitespace) is an
    /// error: open_clip would score it against a bare SOT/EOT pair.
    pub fn tokenize(&self, text: &str) -> Result<Vec<i64>, RewardError> {
        let body = self.encode(text)?;
        if body.is_empty() {
            return Err(RewardError::Input(format!(
                "empty prompt {text:?} (no tokens after clean-up)"
            )));
        }
        let mut ids = vec![SOT];
        ids.extend(body);
        ids.push(EOT);
        if ids.len() > self.context_length {
            ids.truncate(self.context_length);
            ids[self.context_length - 1] = EOT;
        }
        ids.resize(self.context_length, 0);
        Ok(ids)
    }

    /// [`Self::tokenize`] for a batch, as an int64 tensor `[N, context_length]`.
    pub fn tokenize_batch(&self, texts: &[String]) -> Result<tch::Tensor, RewardError> {
        let mut flat = Vec::with_capacity(texts.len() * self.context_length);
        for (i, t) in texts.iter().enumerate() {
            flat.extend(self.tokenize(t).map_err(|e| match e {
                RewardError::Input(m) => RewardError::Input(format!("prompt {i}: {m}")),
                e => e,
            })?);
        }
        Ok(tch::Tensor::from_slice(&flat).view([texts.len() as i64, self.context_length as i64]))
    }
}
