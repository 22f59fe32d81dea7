//! The rewards a job may name: the registry of names, the config of one reward, and the files
//! each model reward's `model_dir` must hold. Its own file so that a new reward is registered in
//! one place, apart from the job's other keys.

use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::files::{FileError, HpsFiles, check_weights};

/// One reward model, with the weight of its loss term.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RewardConfig {
    /// Registered reward name, e.g. `hpsv2` or `jpeg_compressibility`.
    pub name: String,
    /// Weight of this reward: of its clipped loss in the total loss (`advantage_aggr`), or of
    /// its score in the weighted sum that gets one advantage (`reward_aggr`).
    #[serde(default = "one")]
    pub weight: f64,
    /// Directory with the reward model's weights, for rewards that have any.
    #[serde(default)]
    pub model_dir: String,
    /// Run the reward model on the CPU to save accelerator memory.
    #[serde(default)]
    pub on_cpu: bool,
}

/// The rewards a job may name in `[[rewards]] name`, the canonical name first, then the
/// aliases it also answers to.
pub const REWARDS: &[(&str, &[&str])] = &[
    ("hpsv2", &["hps", "hps_v2.1"]),
    ("jpeg_compressibility", &[]),
    ("jpeg_incompressibility", &[]),
    ("brightness", &[]),
    ("contrast", &[]),
    ("pickscore", &["pick_score", "pickscore_v1"]),
    ("clip_score", &["clipscore", "clip"]),
];

/// The rewards that score with a model, which `model_dir` must hold.
pub const MODEL_REWARDS: &[&str] = &["hpsv2", "pickscore", "clip_score"];

/// The model rewards whose `model_dir` is a Hugging Face folder in the transformers
/// `CLIPModel` layout (see [`HfClipFiles`]).
pub const HF_CLIP_REWARDS: &[&str] = &["pickscore", "clip_score"];

/// Checks the model directory of the model reward `name` (canonical) as its worker will load
/// it, without libtorch: every problem found. Rewards without a model have nothing to check.
pub fn check_model_dir(name: &str, dir: &Path) -> Vec<FileError> {
    if HF_CLIP_REWARDS.contains(&name) {
        HfClipFiles::check(dir)
    } else if MODEL_REWARDS.contains(&name) {
        HpsFiles::check(dir)
    } else {
        Vec::new()
    }
}

/// The weight files of a transformers folder, in order of preference.
pub const HF_WEIGHT_FILES: [&str; 2] = ["model.safetensors", "pytorch_model.bin"];

/// The files a transformers `CLIPModel` folder (what `save_pretrained` writes and the model hub
/// serves, e.g. `yuvalkirstain/PickScore_v1`, `openai/clip-vit-large-patch14`) resolves to.
#[derive(Clone, Debug, PartialEq)]
pub struct HfClipFiles {
    /// `config.json` (a `CLIPConfig`).
    pub config: PathBuf,
    /// `model.safetensors`, else `pytorch_model.bin` (a `torch.save` of the state dict).
    pub weights: PathBuf,
    /// `preprocessor_config.json` (a `CLIPImageProcessor`); `None`: that class's defaults.
    pub preprocessor: Option<PathBuf>,
    /// The tokenizer: `tokenizer.json` when present (transformers prefers it too), otherwise
    /// the BPE files `vocab.json` and `merges.txt`.
    pub tokenizer: Vec<PathBuf>,
    /// `tokenizer_config.json`, when present (special tokens, `model_max_length`).
    pub tokenizer_config: Option<PathBuf>,
    /// `special_tokens_map.json`, when present (its tokens win over tokenizer_config's).
    pub special_tokens_map: Option<PathBuf>,
}

impl HfClipFiles {
    /// Resolves the files in `dir`; a missing required file is an error naming it.
    pub fn discover(dir: &Path) -> Result<Self, FileError> {
        let err = |path: &Path, message: String| FileError { path: path.to_path_buf(), message };
        if !dir.is_dir() {
            return Err(err(dir, "CLIP model dir does not exist".into()));
        }
        let optional = |name: &str| Some(dir.join(name)).filter(|p| p.is_file());
        let required = |name: &str, what: &str| {
            let p = dir.join(name);
            if p.is_file() { Ok(p) } else { Err(err(&p, format!("missing ({what})"))) }
        };
        let weights = HF_WEIGHT_FILES.iter().find_map(|f| optional(f)).ok_or_else(|| {
            err(dir, format!("holds neither {} nor {}", HF_WEIGHT_FILES[0], HF_WEIGHT_FILES[1]))
        })?;
        Ok(Self {
            config: required("config.json", "the CLIPConfig")?,
            weights,
            preprocessor: optional("preprocessor_config.json"),
            tokenizer: match optional("tokenizer.json") {
                Some(t) => vec![t],
                None => vec![
                    required("vocab.json", "the tokenizer's BPE vocabulary")?,
                    required("merges.txt", "the tokenizer's BPE merges")?,
                ],
            },
            tokenizer_config: optional("tokenizer_config.json"),
            special_tokens_map: optional("special_tokens_map.json"),
        })
    }

    /// [`HfClipFiles::discover`], then the weight file's integrity and that every JSON file
    /// parses: every problem.
    pub fn check(dir: &Path) -> Vec<FileError> {
        let files = match Self::discover(dir) {
            Err(e) => return vec![e],
            Ok(f) => f,
        };
        let mut problems: Vec<FileError> =
            check_weights(&files.weights).err().into_iter().collect();
        let optional = [&files.preprocessor, &files.tokenizer_config, &files.special_tokens_map];
        let json = std::iter::once(&files.config)
            .chain(files.tokenizer.iter().filter(|p| p.extension().is_some_and(|e| e == "json")))
            .chain(optional.into_iter().flatten());
        for p in json {
            let parsed = std::fs::read_to_string(p).map_err(|e| e.to_string()).and_then(|t| {
                serde_json::from_str::<serde_json::Value>(&t).map_err(|e| format!("not JSON: {e}"))
            });
            if let Err(message) = parsed {
                problems.push(FileError { path: p.clone(), message });
            }
        }
        problems
    }
}

impl RewardConfig {
    /// The canonical name of the configured reward, `None` when no reward has this name.
    pub fn canonical_name(&self) -> Option<&'static str> {
        REWARDS
            .iter()
            .find(|(name, aliases)| *name == self.name || aliases.contains(&self.name.as_str()))
            .map(|(name, _)| *name)
    }
}

fn one() -> f64 {
    1.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transformers_folder_names_what_it_lacks_and_what_is_damaged() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let e = HfClipFiles::check(&d.join("nope"));
        assert!(e[0].message.contains("does not exist"), "{e:?}");
        let e = HfClipFiles::check(d);
        assert!(e[0].message.contains("holds neither model.safetensors nor pytorch_model.bin"));
        std::fs::write(d.join("pytorch_model.bin"), b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j").unwrap();
        let e = HfClipFiles::check(d);
        assert!(e[0].path.ends_with("config.json") && e[0].message.contains("missing"), "{e:?}");
        for f in ["config.json", "vocab.json", "merges.txt"] {
            std::fs::write(d.join(f), "{}").unwrap();
        }
        assert_eq!(HfClipFiles::check(d), []);
        std::fs::write(d.join("preprocessor_config.json"), "{").unwrap();
        std::fs::write(d.join("model.safetensors"), b"short").unwrap();
        let e = HfClipFiles::check(d);
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(e[0].path.ends_with("model.safetensors"), "preferred over the .bin: {e:?}");
        assert!(
            e[1].path.ends_with("preprocessor_config.json") && e[1].message.contains("not JSON")
        );
        assert_eq!(check_model_dir("pickscore", d), e);
        assert_eq!(check_model_dir("brightness", d), []);
        assert!(check_model_dir("hpsv2", d)[0].message.contains("HPS_v2.1_compressed"));
    }
}
