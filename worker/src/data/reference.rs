//! The DanceGRPO reference layout (also what MindSpeed-MM's FLUX preprocessing writes):
//! `videos2caption.json`, a list of `{"prompt_embed_path", "pooled_prompt_embeds_path",
//! "text_ids", "caption"}`, the paths relative to `prompt_embed/`, `pooled_prompt_embeds/`
//! and `text_ids/` beside it, each file a `torch.save` of one tensor.

use std::path::{Path, PathBuf};

use tch::Kind;

use super::{DataError, DatasetSpec, PromptDataset, PromptItem};
use crate::pt;

/// The index file's name.
pub const INDEX: &str = dancegrpo_proto::layout::REFERENCE_INDEX;

#[derive(Debug, Clone, serde::Deserialize)]
struct Entry {
    prompt_embed_path: String,
    pooled_prompt_embeds_path: String,
    text_ids: String,
    caption: String,
}

/// A reference-layout directory.
#[derive(Debug)]
pub struct ReferenceDataset {
    dir: PathBuf,
    entries: Vec<Entry>,
    spec: DatasetSpec,
}

impl ReferenceDataset {
    /// Reads the index, checks every referenced file exists, and takes the shapes from the
    /// first item (the others are checked when read or verified).
    pub fn open(dir: &Path) -> Result<Self, DataError> {
        let index = dir.join(INDEX);
        let text = std::fs::read_to_string(&index).map_err(|e| DataError::io(&index, e))?;
        let raw: Vec<serde_json::Value> = serde_json::from_str(&text)
            .map_err(|e| DataError::malformed(&index, format!("not a JSON list: {e}")))?;
        let mut entries = Vec::with_capacity(raw.len());
        for (i, v) in raw.into_iter().enumerate() {
            let e: Entry = serde_json::from_value(v).map_err(|e| DataError::Entry {
                path: index.clone(),
                index: i,
                message: e.to_string(),
            })?;
            entries.push(e);
        }
        let mut ds = Self {
            dir: dir.to_owned(),
            entries,
            spec: DatasetSpec {
                prompt_embeds_shape: vec![],
                pooled_shape: vec![],
                kind: Kind::BFloat16,
            },
        };
        for i in 0..ds.entries.len() {
            for p in ds.paths(i) {
                if !p.is_file() {
                    return Err(DataError::Entry {
                        path: index.clone(),
                        index: i,
                        message: format!("missing file {}", p.display()),
                    });
                }
            }
        }
        if !ds.entries.is_empty() {
            let [pe, pooled, _] = ds.paths(0);
            let (pe, pooled) = (pt::read_info(&pe)?, pt::read_info(&pooled)?);
            for (info, path, rank) in
                [(&pe, ds.paths(0)[0].clone(), 2), (&pooled, ds.paths(0)[1].clone(), 1)]
            {
                if info.shape.len() != rank || !is_float(info.kind) {
                    return Err(DataError::malformed(
                        &path,
                        format!(
                            "expected a {rank}-D float tensor, found {:?} {:?}",
                            info.kind, info.shape
                        ),
                    ));
                }
            }
            ds.spec = DatasetSpec {
                prompt_embeds_shape: pe.shape,
                pooled_shape: pooled.shape,
                kind: pe.kind,
            };
        }
        Ok(ds)
    }

    fn paths(&self, i: usize) -> [PathBuf; 3] {
        let e = &self.entries[i];
        [
            self.dir.join("prompt_embed").join(&e.prompt_embed_path),
            self.dir.join("pooled_prompt_embeds").join(&e.pooled_prompt_embeds_path),
            self.dir.join("text_ids").join(&e.text_ids),
        ]
    }

    fn check(&self, path: &Path, kind: Kind, shape: &[i64], want: &[i64]) -> Result<(), DataError> {
        if shape != want || kind != self.spec.kind {
            return Err(DataError::malformed(
                path,
                format!(
                    "tensor is {kind:?} {shape:?}, the dataset's is {:?} {want:?}",
                    self.spec.kind
                ),
            ));
        }
        Ok(())
    }

    fn check_text_ids(&self, path: &Path, info: &pt::PtTensorInfo) -> Result<(), DataError> {
        // DanceGRPO saves one row ([3]); a full [L, 3] is accepted too.
        let l = self.spec.prompt_embeds_shape[0];
        if info.shape != [3] && info.shape != [l, 3] {
            return Err(DataError::malformed(
                path,
                format!("text_ids shape {:?}, expected [3] or [{l}, 3]", info.shape),
            ));
        }
        Ok(())
    }
}

fn is_float(k: Kind) -> bool {
    matches!(k, Kind::BFloat16 | Kind::Half | Kind::Float | Kind::Double)
}

impl PromptDataset for ReferenceDataset {
    fn len(&self) -> usize {
        self.entries.len()
    }

    fn caption(&self, index: usize) -> Result<&str, DataError> {
        self.entries
            .get(index)
            .map(|e| e.caption.as_str())
            .ok_or(DataError::OutOfRange { index, len: self.entries.len() })
    }

    fn get(&self, index: usize) -> Result<PromptItem, DataError> {
        let caption = self.caption(index)?.to_owned();
        let [pe_path, pooled_path, ids_path] = self.paths(index);
        let pe = pt::load(&pe_path)?;
        let pooled = pt::load(&pooled_path)?;
        let ids = pt::load(&ids_path)?;
        self.check(&pe_path, pe.kind(), &pe.size(), &self.spec.prompt_embeds_shape)?;
        self.check(&pooled_path, pooled.kind(), &pooled.size(), &self.spec.pooled_shape)?;
        let l = self.spec.prompt_embeds_shape[0];
        if ids.size() != [3] && ids.size() != [l, 3] {
            return Err(DataError::malformed(
                &ids_path,
                format!("text_ids shape {:?}, expected [3] or [{l}, 3]", ids.size()),
            ));
        }
        // Training rebuilds [L, 3] from the saved row, as DanceGRPO's `text_ids.repeat(512, 1)`.
        let text_ids = if ids.dim() == 1 { ids.f_repeat([l, 1])? } else { ids };
        Ok(PromptItem { caption, prompt_embeds: pe, pooled_prompt_embeds: pooled, text_ids })
    }

    fn spec(&self) -> &DatasetSpec {
        &self.spec
    }

    fn verify(&self) -> Vec<DataError> {
        let mut errs = Vec::new();
        for i in 0..self.entries.len() {
            let [pe, pooled, ids] = self.paths(i);
            let r = (|| {
                let a = pt::read_info(&pe)?;
                self.check(&pe, a.kind, &a.shape, &self.spec.prompt_embeds_shape)?;
                let b = pt::read_info(&pooled)?;
                self.check(&pooled, b.kind, &b.shape, &self.spec.pooled_shape)?;
                self.check_text_ids(&ids, &pt::read_info(&ids)?)
            })();
            if let Err(e) = r {
                errs.push(e);
            }
        }
        errs
    }

    fn layout(&self) -> &'static str {
        "reference (videos2caption.json + .pt)"
    }
}
