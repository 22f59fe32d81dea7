//! The prompts file, read as DanceGRPO's `preprocess_flux_embedding.py` reads it: UTF-8
//! lines, each stripped, lines holding a CJK ideograph (U+4E00..U+9FFF) dropped, then the
//! first `max` kept. An item's index is its position after filtering.
//!
//! Unlike the reference, a blank line is an error (it would silently become an empty prompt
//! and shift every later index), and so is invalid UTF-8; both name the line.

use std::path::Path;

use super::DataError;

/// How to filter the prompts.
#[derive(Debug, Clone, Copy, Default)]
pub struct PromptFilter {
    /// Drop lines with CJK ideographs, as the reference does.
    pub drop_cjk: bool,
    /// Keep at most this many (the reference keeps 50 000).
    pub max: Option<usize>,
}

/// One prompt and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prompt {
    /// 1-based line in the file.
    pub line: usize,
    /// The stripped text.
    pub text: String,
}

/// True for a character in the CJK Unified Ideographs block, the reference's test.
pub fn is_cjk(c: char) -> bool {
    ('\u{4e00}'..='\u{9fff}').contains(&c)
}

/// Reads and filters `path`.
pub fn read_prompts(path: &Path, filter: PromptFilter) -> Result<Vec<Prompt>, DataError> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    let mut out = Vec::new();
    let mut lines = bytes.split(|&b| b == b'\n').enumerate().peekable();
    while let Some((i, raw)) = lines.next() {
        if filter.max.is_some_and(|m| out.len() >= m) {
            break;
        }
        let line = i + 1;
        let text = std::str::from_utf8(raw).map_err(|e| DataError::Prompt {
            path: path.to_owned(),
            line,
            message: format!("not UTF-8 (byte {} of the line)", e.valid_up_to() + 1),
        })?;
        let text = text.trim();
        if text.is_empty() {
            // The newline that ends the last line leaves one empty piece; that one is fine.
            if lines.peek().is_none() && raw.is_empty() {
                break;
            }
            return Err(DataError::Prompt {
                path: path.to_owned(),
                line,
                message: "blank line".into(),
            });
        }
        if filter.drop_cjk && text.chars().any(is_cjk) {
            continue;
        }
        out.push(Prompt { line, text: text.to_owned() });
    }
    Ok(out)
}
