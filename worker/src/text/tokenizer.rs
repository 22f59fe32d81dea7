//! The two prompt tokenizers, through the `tokenizers` crate, set up exactly as transformers
//! 5 sets them up (its tokenizers are this same library underneath), then padded and
//! truncated to a fixed length the way FLUX's `encode_prompt` asks:
//! `padding="max_length", truncation=True`.
//!
//! - T5 (`tokenizer_2/`): `tokenizer.json` when present (FLUX.1-dev ships one); otherwise
//!   `spiece.model`, converted as transformers' `T5Tokenizer` does (unigram pieces, the
//!   model's precompiled normaliser, metaspace, `</s>` appended, 100 `<extra_id_*>` tokens).
//! - CLIP (`tokenizer/`): `tokenizer.json` when present, otherwise `vocab.json` +
//!   `merges.txt` with transformers' `CLIPTokenizer` pipeline (NFC, whitespace runs to one
//!   space, lower case, CLIP's split regex, byte-level BPE with `</w>`, `<|startoftext|>`
//!   ... `<|endoftext|>`).

use std::path::Path;

use tokenizers::models::bpe::BPE;
use tokenizers::models::unigram::Unigram;
use tokenizers::normalizers::{Lowercase, NFC, Precompiled, Replace, Sequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::whitespace::WhitespaceSplit;
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{
    AddedToken, NormalizerWrapper, PaddingDirection, PaddingParams, PaddingStrategy,
    PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer, TruncationDirection, TruncationParams,
    TruncationStrategy,
};

use super::TextError;

/// A tokenizer that always yields exactly `len` ids (truncated, then padded on the right).
#[derive(Debug, Clone)]
pub struct FixedLenTokenizer {
    inner: Tokenizer,
    len: usize,
    source: String,
}

impl FixedLenTokenizer {
    fn new(mut inner: Tokenizer, len: usize, pad: &str, source: String) -> Result<Self, TextError> {
        let pad_id = inner
            .token_to_id(pad)
            .ok_or_else(|| TextError::Tokenizer(format!("{source}: no pad token {pad:?}")))?;
        inner.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(len),
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id,
            pad_type_id: 0,
            pad_token: pad.to_owned(),
        }));
        inner
            .with_truncation(Some(TruncationParams {
                direction: TruncationDirection::Right,
                max_length: len,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(|e| TextError::Tokenizer(format!("{source}: {e}")))?;
        Ok(Self { inner, len, source })
    }

    /// The fixed length.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: the length is at least one token.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Token ids of `text`, special tokens included, exactly `len()` of them.
    pub fn encode(&self, text: &str) -> Result<Vec<i64>, TextError> {
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| TextError::Tokenizer(format!("{}: {e}", self.source)))?;
        Ok(enc.get_ids().iter().map(|&i| i64::from(i)).collect())
    }
}

fn tok_err(path: &Path, e: impl std::fmt::Display) -> TextError {
    TextError::Tokenizer(format!("{}: {e}", path.display()))
}

/// Loads FLUX's T5 tokenizer from `dir` (`tokenizer.json`, else `spiece.model`).
pub fn load_t5(dir: &Path, len: usize) -> Result<FixedLenTokenizer, TextError> {
    let json = dir.join("tokenizer.json");
    let spm = dir.join("spiece.model");
    let (tok, source) = if json.is_file() {
        (Tokenizer::from_file(&json).map_err(|e| tok_err(&json, e))?, json)
    } else if spm.is_file() {
        (t5_from_spiece(&spm)?, spm)
    } else {
        return Err(TextError::Tokenizer(format!(
            "{}: neither tokenizer.json nor spiece.model",
            dir.display()
        )));
    };
    FixedLenTokenizer::new(tok, len, "<pad>", source.display().to_string())
}

/// Loads FLUX's CLIP tokenizer from `dir` (`tokenizer.json`, else `vocab.json` + `merges.txt`).
pub fn load_clip(dir: &Path, len: usize) -> Result<FixedLenTokenizer, TextError> {
    let json = dir.join("tokenizer.json");
    let specials = clip_specials(dir)?;
    if json.is_file() {
        let tok = Tokenizer::from_file(&json).map_err(|e| tok_err(&json, e))?;
        return FixedLenTokenizer::new(tok, len, &specials.pad, json.display().to_string());
    }
    let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
    for f in [&vocab, &merges] {
        if !f.is_file() {
            return Err(TextError::Tokenizer(format!("{}: missing", f.display())));
        }
    }
    let bpe = BPE::from_file(&vocab.to_string_lossy(), &merges.to_string_lossy())
        .unk_token(specials.unk.clone())
        .end_of_word_suffix("</w>".into())
        .continuing_subword_prefix(String::new())
        .build()
        .map_err(|e| tok_err(&vocab, e))?;
    let ws =
        Replace::new(tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()), " ")
            .map_err(|e| tok_err(&vocab, e))?;
    let normalizer = Sequence::new(vec![
        NormalizerWrapper::from(NFC),
        NormalizerWrapper::from(ws),
        NormalizerWrapper::from(Lowercase),
    ]);
    let split = Split::new(
        SplitPattern::Regex(
            r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
                .into(),
        ),
        SplitDelimiterBehavior::Removed,
        true,
    )
    .map_err(|e| tok_err(&vocab, e))?;
    let pre = PreSequence::new(vec![
        PreTokenizerWrapper::from(split),
        PreTokenizerWrapper::from(ByteLevel::new(false, true, true)),
    ]);
    let mut tok = Tokenizer::new(bpe);
    tok.with_normalizer(Some(normalizer)).map_err(|e| tok_err(&vocab, e))?;
    tok.with_pre_tokenizer(Some(pre));
    let id = |t: &str| {
        tok.token_to_id(t)
            .ok_or_else(|| TextError::Tokenizer(format!("{}: no token {t:?}", vocab.display())))
    };
    let (bos_id, eos_id) = (id(&specials.bos)?, id(&specials.eos)?);
    tok.with_post_processor(Some(
        RobertaProcessing::new((specials.eos.clone(), eos_id), (specials.bos.clone(), bos_id))
            .trim_offsets(false)
            .add_prefix_space(false),
    ));
    let added: Vec<AddedToken> = [&specials.bos, &specials.eos, &specials.unk, &specials.pad]
        .into_iter()
        .map(|t| AddedToken::from(t.clone(), true))
        .collect();
    tok.add_special_tokens(added).map_err(|e| tok_err(&vocab, e))?;
    FixedLenTokenizer::new(tok, len, &specials.pad, vocab.display().to_string())
}

struct ClipSpecials {
    bos: String,
    eos: String,
    unk: String,
    pad: String,
}

/// CLIP's special tokens: transformers' defaults, overridden by `special_tokens_map.json`.
fn clip_specials(dir: &Path) -> Result<ClipSpecials, TextError> {
    let mut s = ClipSpecials {
        bos: "<|startoftext|>".into(),
        eos: "<|endoftext|>".into(),
        unk: "<|endoftext|>".into(),
        pad: "<|endoftext|>".into(),
    };
    let path = dir.join("special_tokens_map.json");
    if path.is_file() {
        let text = std::fs::read_to_string(&path).map_err(|e| TextError::io(&path, e))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| tok_err(&path, e))?;
        let get = |k: &str| {
            v.get(k)
                .and_then(|x| x.as_str().or_else(|| x.get("content")?.as_str()))
                .map(str::to_owned)
        };
        for (k, slot) in [
            ("bos_token", &mut s.bos),
            ("eos_token", &mut s.eos),
            ("unk_token", &mut s.unk),
            ("pad_token", &mut s.pad),
        ] {
            if let Some(t) = get(k) {
                *slot = t;
            }
        }
    }
    Ok(s)
}

/// The parts of SentencePiece's `ModelProto` a unigram T5 tokenizer needs.
#[derive(Clone, PartialEq, prost::Message)]
struct SpmModel {
    #[prost(message, repeated, tag = "1")]
    pieces: Vec<SpmPiece>,
    #[prost(message, optional, tag = "2")]
    trainer: Option<SpmTrainer>,
    #[prost(message, optional, tag = "3")]
    normalizer: Option<SpmNormalizer>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct SpmPiece {
    #[prost(string, optional, tag = "1")]
    piece: Option<String>,
    #[prost(float, optional, tag = "2")]
    score: Option<f32>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct SpmTrainer {
    #[prost(int32, optional, tag = "3")]
    model_type: Option<i32>,
    #[prost(bool, optional, tag = "35")]
    byte_fallback: Option<bool>,
    #[prost(int32, optional, tag = "40")]
    unk_id: Option<i32>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct SpmNormalizer {
    #[prost(bytes = "vec", optional, tag = "2")]
    precompiled_charsmap: Option<Vec<u8>>,
}

/// transformers' `T5Tokenizer` built from `spiece.model` (its default `extra_ids=100`).
fn t5_from_spiece(path: &Path) -> Result<Tokenizer, TextError> {
    let bytes = std::fs::read(path).map_err(|e| TextError::io(path, e))?;
    let m = <SpmModel as prost::Message>::decode(bytes.as_slice())
        .map_err(|e| tok_err(path, format!("not a SentencePiece model: {e}")))?;
    let trainer = m.trainer.unwrap_or_default();
    // TrainerSpec.model_type: 1 = UNIGRAM (the default when absent).
    if trainer.model_type.unwrap_or(1) != 1 {
        return Err(tok_err(path, "only unigram SentencePiece models are supported"));
    }
    let mut vocab: Vec<(String, f64)> = m
        .pieces
        .iter()
        .map(|p| (p.piece.clone().unwrap_or_default(), f64::from(p.score.unwrap_or(0.0))))
        .collect();
    let extra: Vec<String> = (0..100).rev().map(|i| format!("<extra_id_{i}>")).collect();
    vocab.extend(extra.iter().map(|e| (e.clone(), 0.0)));
    let unk = usize::try_from(trainer.unk_id.unwrap_or(0)).map_err(|e| tok_err(path, e))?;
    let model = Unigram::from(vocab, Some(unk), trainer.byte_fallback.unwrap_or(false))
        .map_err(|e| tok_err(path, e))?;
    let mut tok = Tokenizer::new(model);
    if let Some(map) = m.normalizer.and_then(|n| n.precompiled_charsmap).filter(|m| !m.is_empty()) {
        let p = Precompiled::from(&map).map_err(|e| tok_err(path, e))?;
        tok.with_normalizer(Some(p)).map_err(|e| tok_err(path, e))?;
    }
    let pre = PreSequence::new(vec![
        PreTokenizerWrapper::from(WhitespaceSplit),
        PreTokenizerWrapper::from(Metaspace::new('▁', PrependScheme::Always, true)),
    ]);
    tok.with_pre_tokenizer(Some(pre));
    let eos = tok.token_to_id("</s>").ok_or_else(|| tok_err(path, "no </s> piece"))?;
    let template: TemplateProcessing = serde_json::from_value(serde_json::json!({
        "type": "TemplateProcessing",
        "single": [{"Sequence": {"id": "A", "type_id": 0}},
                   {"SpecialToken": {"id": "</s>", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}},
                 {"SpecialToken": {"id": "</s>", "type_id": 0}},
                 {"Sequence": {"id": "B", "type_id": 0}},
                 {"SpecialToken": {"id": "</s>", "type_id": 0}}],
        "special_tokens": {"</s>": {"id": "</s>", "ids": [eos], "tokens": ["</s>"]}}
    }))
    .map_err(|e| tok_err(path, e))?;
    tok.with_post_processor(Some(template));
    let mut specials: Vec<AddedToken> =
        ["<pad>", "</s>", "<unk>"].iter().map(|t| AddedToken::from(*t, true)).collect();
    specials.extend(extra.into_iter().map(|e| AddedToken::from(e, true)));
    tok.add_special_tokens(specials).map_err(|e| tok_err(path, e))?;
    Ok(tok)
}
