//! The checks before anything starts: every file the job's workers will read is resolved and
//! checked here, without libtorch, and every problem is reported at once. Without them a
//! missing reward model or a truncated shard fails on every worker, after the world formed.
//!
//! Cost at FLUX.1-dev size: the transformer's three shards (23.8 GB), the VAE, and the HPS
//! files (about 3.9 GB) are memory-mapped and only their headers or zip directories are read:
//! a few MB of I/O and well under a second. A reference-layout dataset is checked by `stat`
//! for every file, and fully for the first prompt's.

use std::path::{Path, PathBuf};

use dancegrpo_proto::config::MODEL_REWARDS;
use dancegrpo_proto::files::{self, FileError};
use dancegrpo_proto::rewards::check_model_dir;
use dancegrpo_proto::{JobConfig, layout};

use crate::error::{Error, Result};
use crate::outputs::{self, TrainerState};

/// The built-in model preset, which has no files.
const TINY: &str = "tiny";

/// Checks the job's files; every problem at once, as [`Error::Preflight`].
pub fn check(cfg: &JobConfig) -> Result<()> {
    let mut problems = Vec::new();
    for (i, r) in cfg.rewards.iter().enumerate() {
        let Some(name) = r.canonical_name().filter(|n| MODEL_REWARDS.contains(n)) else { continue };
        let at = format!("rewards[{i}] ({name}) model_dir");
        let found = check_model_dir(name, Path::new(&r.model_dir));
        problems.extend(found.iter().map(|e| shown(&at, e)));
    }
    let model = &cfg.pretrained_model_name_or_path;
    if model != TINY {
        let at = "pretrained_model_name_or_path";
        let path = Path::new(model);
        let mut found = files::check_flux(path);
        if path.exists() {
            found.extend(files::check_vae(path));
        }
        problems.extend(found.iter().map(|e| shown(at, e)));
    }
    match outputs::dataset_len(cfg) {
        Err(e) => problems.push(format!("data_json_path: {e}")),
        Ok(_) => problems.extend(data(cfg).iter().map(|e| shown("data_json_path", e))),
    }
    match outputs::resolve_resume(cfg) {
        // The message names the key already.
        Err(Error::InvalidRequest(m)) => problems.push(m),
        Err(e) => problems.push(format!("resume_from_checkpoint: {e}")),
        Ok(Some(dir)) => {
            if let Err(e) = TrainerState::read(&dir) {
                problems.push(format!("resume_from_checkpoint: {e}"));
            }
            for f in safetensors_under(&dir) {
                if let Err(e) = files::check_safetensors(&f) {
                    problems.push(shown("resume_from_checkpoint", &e));
                }
            }
        }
        Ok(None) => {}
    }
    if problems.is_empty() { Ok(()) } else { Err(Error::Preflight(problems)) }
}

fn shown(key: &str, e: &FileError) -> String {
    format!("{key}: {e}")
}

/// The prompt dataset's files: the own layout's shards (each header checked against its file),
/// or the reference layout's three `torch.save` files per prompt.
fn data(cfg: &JobConfig) -> Vec<FileError> {
    let p = Path::new(&cfg.data_json_path);
    let dir = if p.is_dir() { p } else { p.parent().unwrap_or(Path::new(".")) };
    let manifest = if p.is_dir() { p.join(layout::DATA_MANIFEST) } else { p.to_path_buf() };
    let text = |f: &Path| std::fs::read_to_string(f).ok();
    let json = |f: &Path| text(f).and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
    // What cannot be read at all is `dataset_len`'s error.
    if let Some(m) = json(&manifest).filter(|v| v.get("shards").is_some()) {
        let shards = m["shards"].as_array().cloned().unwrap_or_default();
        return shards
            .iter()
            .filter_map(|s| s.as_str())
            .filter_map(|s| files::check_safetensors(&dir.join(s)).err())
            .collect();
    }
    let index = if p.is_dir() { p.join(layout::REFERENCE_INDEX) } else { p.to_path_buf() };
    let Some(serde_json::Value::Array(items)) = json(&index) else { return vec![] };
    let mut problems = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let paths: Vec<PathBuf> = [
            ("prompt_embed", "prompt_embed_path"),
            ("pooled_prompt_embeds", "pooled_prompt_embeds_path"),
            ("text_ids", "text_ids"),
        ]
        .iter()
        .filter_map(|(sub, key)| Some(dir.join(sub).join(item.get(*key)?.as_str()?)))
        .collect();
        for f in &paths {
            if !f.is_file() {
                problems.push(FileError {
                    path: f.clone(),
                    message: format!("missing (named by prompt {i} of {})", index.display()),
                });
            } else if i == 0
                && let Err(e) = files::check_torch_save(f)
            {
                problems.push(e);
            }
        }
        // A dataset with thousands of missing files says so without listing them all.
        if problems.len() >= 20 {
            problems.push(FileError {
                path: index.clone(),
                message: "more files are missing or damaged; stopped listing at 20".into(),
            });
            break;
        }
    }
    problems
}

/// Every `.safetensors` file under `dir`.
fn safetensors_under(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else if p.extension().is_some_and(|x| x == "safetensors") {
                found.push(p);
            }
        }
    }
    found.sort();
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use dancegrpo_proto::RewardConfig;

    fn safetensors(path: &Path) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let data = [0u8; 8];
        let v =
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2], &data).unwrap();
        safetensors::serialize_to_file([("w", v)], None, path).unwrap();
    }

    fn truncate(path: &Path) {
        let b = std::fs::read(path).unwrap();
        std::fs::write(path, &b[..b.len() - 1]).unwrap();
    }

    #[test]
    fn every_missing_or_damaged_file_is_reported_at_once_with_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // A diffusers model whose shard is cut short and whose VAE has no config.
        let model = d.join("flux");
        safetensors(&model.join("transformer/diffusion_pytorch_model.safetensors"));
        std::fs::write(model.join("transformer/config.json"), "{}").unwrap();
        truncate(&model.join("transformer/diffusion_pytorch_model.safetensors"));
        // An own-layout dataset naming a shard that is not there.
        let data = d.join("data");
        std::fs::create_dir(&data).unwrap();
        let manifest = serde_json::json!({"shards": ["shard-00000.safetensors"], "items": [{}]});
        std::fs::write(data.join("manifest.json"), manifest.to_string()).unwrap();
        // A checkpoint to resume from whose optimizer shard is cut short.
        let ck = d.join("checkpoint-4");
        safetensors(&ck.join("optimizer.safetensors"));
        truncate(&ck.join("optimizer.safetensors"));
        std::fs::write(ck.join("trainer_state.json"), "{").unwrap();
        let cfg = JobConfig {
            pretrained_model_name_or_path: model.display().to_string(),
            data_json_path: data.display().to_string(),
            resume_from_checkpoint: ck.display().to_string(),
            rewards: vec![RewardConfig {
                name: "hpsv2".into(),
                weight: 1.0,
                model_dir: d.join("hps_ckpt").display().to_string(),
                on_cpu: false,
            }],
            ..JobConfig::default()
        };
        let Err(Error::Preflight(p)) = check(&cfg) else { panic!("{:?}", check(&cfg)) };
        let want = [
            "rewards[0] (hpsv2) model_dir: ",
            "pretrained_model_name_or_path: ",
            "pretrained_model_name_or_path: ",
            "pretrained_model_name_or_path: ",
            "data_json_path: ",
            "resume_from_checkpoint: ",
            "resume_from_checkpoint: ",
        ];
        assert_eq!(p.len(), want.len(), "{p:#?}");
        for (got, want) in p.iter().zip(want) {
            assert!(got.starts_with(want), "{got} does not start with {want}");
        }
        assert!(p[0].contains("HPS model dir does not exist"), "{}", p[0]);
        assert!(p[1].contains("truncated or padded safetensors file"), "{}", p[1]);
        assert!(p[2].contains("flux/config.json"), "no vae/: the root's: {}", p[2]);
        assert!(p[3].contains("flux/diffusion_pytorch_model.safetensors"), "{}", p[3]);
        assert!(p[4].contains("shard-00000.safetensors"), "{}", p[4]);
        assert!(p[5].contains("trainer_state.json is not a trainer state"), "{}", p[5]);
        assert!(p[6].contains("optimizer.safetensors"), "{}", p[6]);

        // Mended one by one, nothing but the trainer state is left.
        safetensors(&model.join("transformer/diffusion_pytorch_model.safetensors"));
        std::fs::create_dir(model.join("vae")).unwrap();
        std::fs::write(model.join("vae/config.json"), "{}").unwrap();
        safetensors(&model.join("vae/diffusion_pytorch_model.safetensors"));
        safetensors(&data.join("shard-00000.safetensors"));
        safetensors(&ck.join("optimizer.safetensors"));
        let hps = d.join("hps_ckpt");
        std::fs::create_dir(&hps).unwrap();
        safetensors(&hps.join("HPS_v2.1_compressed.safetensors"));
        std::fs::write(hps.join("bpe_simple_vocab_16e6.txt.gz"), b"vocab").unwrap();
        let Err(Error::Preflight(p)) = check(&cfg) else { panic!() };
        assert_eq!(p.len(), 1, "only the trainer state is left: {p:#?}");
    }

    /// The goldens are written by the reference packages as users' files are (`torch.save`
    /// zips, sharded diffusers folders): they pass, and a copy cut short does not.
    #[test]
    fn files_as_the_reference_writes_them_pass_and_a_truncated_copy_fails() {
        let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden");
        let cfg = JobConfig {
            pretrained_model_name_or_path: golden.join("flux/tiny").display().to_string(),
            data_json_path: golden.join("text/ref_layout").display().to_string(),
            rewards: vec![RewardConfig {
                name: "hpsv2".into(),
                weight: 1.0,
                model_dir: golden.join("hps/tiny_hps").display().to_string(),
                on_cpu: false,
            }],
            ..JobConfig::default()
        };
        check(&cfg).unwrap();

        let dir = tempfile::tempdir().unwrap();
        let hps = dir.path().join("hps");
        std::fs::create_dir(&hps).unwrap();
        for f in ["HPS_v2.1_compressed.pt", "bpe_simple_vocab_16e6.txt.gz"] {
            std::fs::copy(golden.join("hps/tiny_hps").join(f), hps.join(f)).unwrap();
        }
        let pt = hps.join("HPS_v2.1_compressed.pt");
        let b = std::fs::read(&pt).unwrap();
        std::fs::write(&pt, &b[..b.len() * 3 / 4]).unwrap();
        let cfg = JobConfig {
            rewards: vec![RewardConfig {
                model_dir: hps.display().to_string(),
                ..cfg.rewards[0].clone()
            }],
            ..cfg
        };
        let Err(Error::Preflight(p)) = check(&cfg) else { panic!("{:?}", check(&cfg)) };
        assert_eq!(p.len(), 1, "{p:#?}");
        assert!(p[0].contains("HPS_v2.1_compressed.pt") && p[0].contains("truncated"), "{}", p[0]);
    }

    /// PickScore and the CLIP score are checked as transformers folders: the golden ones pass,
    /// an HPS directory named for one does not.
    #[test]
    fn transformers_clip_folders_are_checked_as_such() {
        let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden");
        let reward = |name: &str, dir: &str| RewardConfig {
            name: name.into(),
            weight: 1.0,
            model_dir: golden.join(dir).display().to_string(),
            on_cpu: false,
        };
        let cfg = JobConfig {
            pretrained_model_name_or_path: golden.join("flux/tiny").display().to_string(),
            data_json_path: golden.join("text/ref_layout").display().to_string(),
            rewards: vec![
                reward("pickscore", "hf_clip/pickscore_tiny"),
                reward("clip_score", "hf_clip/clip_tiny"),
            ],
            ..JobConfig::default()
        };
        check(&cfg).unwrap();
        let cfg = JobConfig { rewards: vec![reward("pickscore", "hps/tiny_hps")], ..cfg };
        let Err(Error::Preflight(p)) = check(&cfg) else { panic!("{:?}", check(&cfg)) };
        assert_eq!(p.len(), 1, "{p:#?}");
        assert!(p[0].starts_with("rewards[0] (pickscore) model_dir: "), "{}", p[0]);
        assert!(p[0].contains("holds neither model.safetensors nor pytorch_model.bin"), "{}", p[0]);
    }

    #[test]
    fn a_reference_dataset_names_its_missing_files() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let item = |n: u32| {
            serde_json::json!({"prompt_embed_path": format!("{n}.pt"),
                "pooled_prompt_embeds_path": format!("{n}.pt"), "text_ids": format!("{n}.pt"),
                "caption": "a cat"})
        };
        std::fs::write(
            d.join("videos2caption.json"),
            serde_json::json!([item(0), item(1)]).to_string(),
        )
        .unwrap();
        for sub in ["prompt_embed", "pooled_prompt_embeds", "text_ids"] {
            std::fs::create_dir(d.join(sub)).unwrap();
            // The legacy torch.save magic is enough for the check of the first prompt.
            std::fs::write(d.join(sub).join("0.pt"), b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j").unwrap();
        }
        let cfg = JobConfig { data_json_path: d.display().to_string(), ..JobConfig::default() };
        let found = data(&cfg);
        assert_eq!(found.len(), 3, "{found:#?}");
        assert!(found.iter().all(|e| e.message.contains("missing (named by prompt 1")));
        assert!(found[0].path.ends_with("prompt_embed/1.pt"));
    }
}
