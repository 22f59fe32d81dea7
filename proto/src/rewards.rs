//! The rewards a job may name: the registry of names and the config of one reward. Its own
//! file so that a new reward is registered in one place, apart from the job's other keys.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// One reward model, with the weight of its loss term.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RewardConfig {
    /// Registered reward name, e.g. `hpsv2` or `jpeg_compressibility`.
    pub name: String,
    /// Weight of this reward's clipped loss in the total loss.
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
];

/// The rewards that score with a model, which `model_dir` must hold.
pub const MODEL_REWARDS: &[&str] = &["hpsv2"];

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
