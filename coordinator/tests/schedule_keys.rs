//! The learning-rate schedule and reward-aggregation keys as a user writes them: in a file, an
//! environment variable or `--set`, each bad value reported once, naming its key.

use std::io::Write;

use dancegrpo_coordinator::config::load_job_config;
use dancegrpo_coordinator::error::Error;
use dancegrpo_proto::ConfigError;
use dancegrpo_proto::config::{LrScheduler, MultiRewardMix};

fn file(body: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    f.write_all(body.as_bytes()).unwrap();
    f
}

#[test]
fn every_layer_sets_the_keys() {
    let f = file("lr_scheduler = \"linear\"\nlr_warmup_steps = 20\n");
    let env = [("DANCEGRPO_MULTI_REWARD_MIX".to_string(), "reward_aggr".to_string())];
    let set = [("trimmed_ratio".to_string(), "0.25".to_string())];
    let c = load_job_config(Some(f.path()), env, &set).unwrap();
    assert_eq!((c.lr_scheduler, c.lr_warmup_steps), (LrScheduler::Linear, 20));
    assert_eq!((c.multi_reward_mix, c.trimmed_ratio), (MultiRewardMix::RewardAggr, 0.25));
}

#[test]
fn bad_values_name_their_keys_once_each() {
    let f = file(
        "lr_scheduler = \"cosine_with_restarts\"\nmulti_reward_mix = \"sum\"\n\
         trimmed_ratio = 1.5\nlr_warmup_steps = -1\n",
    );
    let e = load_job_config(Some(f.path()), [], &[]).unwrap_err();
    let Error::Config(ConfigError { problems }) = &e else { panic!("{e}") };
    for needle in [
        "lr_scheduler",
        "cosine_with_restarts",
        "multi_reward_mix",
        "trimmed_ratio must be in [0, 1) (got 1.5)",
        "lr_warmup_steps",
    ] {
        assert!(problems.iter().any(|p| p.contains(needle)), "{needle} in: {problems:#?}");
    }
    assert_eq!(problems.len(), 4, "{problems:#?}");
}
