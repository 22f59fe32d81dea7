//! Loading the job configuration and the coordinator's process settings.
//!
//! The job config is layered with the `config` crate: the file (TOML, JSON or YAML), then
//! `DANCEGRPO_<KEY>` environment variables (nested keys with `__`, e.g. `DANCEGRPO_LORA__RANK`),
//! then `--set key=value` flags. Unknown keys from any layer are errors, and every problem is
//! reported at once. A key's other spelling ([`Key::aliases`], e.g. the reference's
//! `fsdp_sharding_startegy`) is that key in every layer, so a later layer overrides either;
//! both spellings in one layer are an error.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use config::{Config, Environment, File, Source, Value};
use dancegrpo_proto::config::Key;
use dancegrpo_proto::{ConfigError, JobConfig};

use crate::error::{Error, Result};

/// Environment variables with the `DANCEGRPO_` prefix that configure processes, not the job.
const PROCESS_ENV: &[&str] = &[
    "venv",
    "ref_venv",
    "log",
    "log_format",
    "device",
    "coordinator",
    "bin_dir",
    "auth_token",
    "auth_token_file",
    "tls_cert",
    "tls_key",
    "tls_client_ca",
    "tls_ca",
    "tls_client_cert",
    "tls_client_key",
    "tls_domain",
    "metrics_listen",
    "heartbeat_interval_ms",
    "heartbeat_timeout_ms",
    "collective_timeout_s",
    "connect_timeout_s",
    "threads",
];

/// MindSpeed-MM's `--mm-model` / `--mm-data` files (`model_dancegrpo.json`,
/// `data_dancegrpo.json`), so users migrating from it can point at what they have.
#[derive(Clone, Debug, Default)]
pub struct MindSpeedFiles {
    /// `model_dancegrpo.json`: the HPS reward paths.
    pub model: Option<PathBuf>,
    /// `data_dancegrpo.json`: `dataset_param.basic_parameters.data_path`.
    pub data: Option<PathBuf>,
}

fn read_any(path: &Path) -> Result<serde_json::Value> {
    if !path.exists() {
        return Err(Error::ConfigLoad(format!("{} does not exist", path.display())));
    }
    Config::builder()
        .add_source(File::from(path))
        .build()
        .and_then(|c| c.try_deserialize())
        .map_err(|e| Error::ConfigLoad(format!("{}: {e}", path.display())))
}

/// The job-config keys that MindSpeed-MM's JSON files set, as a config layer.
pub fn mindspeed_layer(
    files: &MindSpeedFiles,
) -> Result<serde_json::Map<String, serde_json::Value>> {
    use serde_json::{Value, json};
    let mut layer = serde_json::Map::new();
    if let Some(p) = &files.model {
        let v = read_any(p)?;
        let r = &v["reward"];
        let field = |k: &str| r[k].as_str().map(str::to_string);
        match field("model_id").as_deref() {
            Some("CLIP-ViT-H-14") => {}
            other => {
                return Err(Error::ConfigLoad(format!(
                    "{}: reward.model_id must be \"CLIP-ViT-H-14\" (HPS-v2.1), got {other:?}",
                    p.display()
                )));
            }
        }
        let ckpt_dir = field("ckpt_dir").ok_or_else(|| {
            Error::ConfigLoad(format!("{}: reward.ckpt_dir is missing", p.display()))
        })?;
        // The HPS loader looks for the standard file names inside model_dir.
        for (key, standard) in
            [("pretrained", "open_clip_pytorch_model.bin"), ("load_pt", "HPS_v2.1_compressed.pt")]
        {
            if let Some(name) = field(key).filter(|n| n != standard) {
                return Err(Error::ConfigLoad(format!(
                    "{}: reward.{key} is {name:?}; rename the file in {ckpt_dir} to {standard}",
                    p.display()
                )));
            }
        }
        layer.insert(
            "rewards".into(),
            json!([{"name": "hpsv2", "weight": 1.0, "model_dir": ckpt_dir}]),
        );
    }
    if let Some(p) = &files.data {
        let v = read_any(p)?;
        let path =
            v["dataset_param"]["basic_parameters"]["data_path"].as_str().ok_or_else(|| {
                Error::ConfigLoad(format!(
                    "{}: dataset_param.basic_parameters.data_path is missing",
                    p.display()
                ))
            })?;
        layer.insert("data_json_path".into(), Value::String(path.into()));
    }
    Ok(layer)
}

/// Loads, merges and validates the job config.
///
/// `env` is the process environment (passed in so tests need not touch the real one).
pub fn load_job_config(
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
    overrides: &[(String, String)],
) -> Result<JobConfig> {
    load_job_config_with(file, &MindSpeedFiles::default(), env, overrides)
}

/// [`load_job_config`] with MindSpeed-MM's JSON files layered between the file and the
/// environment.
pub fn load_job_config_with(
    file: Option<&Path>,
    mindspeed: &MindSpeedFiles,
    env: impl IntoIterator<Item = (String, String)>,
    overrides: &[(String, String)],
) -> Result<JobConfig> {
    let keys = JobConfig::keys();
    let mut problems = Vec::new();
    let mut builder = Config::builder();
    if let Some(f) = file {
        if !f.exists() {
            return Err(Error::ConfigLoad(format!("config file {} does not exist", f.display())));
        }
        let table = File::from(f).collect().map_err(|e| Error::ConfigLoad(e.to_string()))?;
        let from = f.display().to_string();
        let mut seen = BTreeMap::new();
        let table = table
            .into_iter()
            .map(|(name, value)| match Key::find(&keys, &name) {
                Some(k) => {
                    set_once(&mut seen, &k.name, &name, &from, &mut problems);
                    (k.name.clone(), value)
                }
                // Reported with the merged table's other unknown keys.
                None => (name, value),
            })
            .collect();
        builder = builder.add_source(Layer(table));
    }
    let ms = mindspeed_layer(mindspeed)?;
    if !ms.is_empty() {
        let text = serde_json::Value::Object(ms).to_string();
        builder = builder.add_source(File::from_str(&text, config::FileFormat::Json));
    }

    let mut env_map = std::collections::HashMap::new();
    let mut seen = BTreeMap::new();
    for (k, v) in env {
        let Some(rest) = k.strip_prefix("DANCEGRPO_") else { continue };
        let key = rest.to_ascii_lowercase();
        if PROCESS_ENV.contains(&key.as_str()) {
            continue;
        }
        let top = key.split("__").next().unwrap_or_default();
        let Some(known) = Key::find(&keys, top) else {
            problems.push(format!("unknown key `{key}` (from environment variable {k})"));
            continue;
        };
        let key = format!("{}{}", known.name, &key[top.len()..]);
        set_once(&mut seen, &key, &k, "the environment", &mut problems);
        env_map.insert(format!("DANCEGRPO_{}", key.to_ascii_uppercase()), v);
    }
    builder = builder.add_source(
        Environment::with_prefix("DANCEGRPO")
            .prefix_separator("_")
            .separator("__")
            .try_parsing(true)
            .source(Some(env_map)),
    );
    let mut seen = BTreeMap::new();
    for (k, v) in overrides {
        let top = k.split('.').next().unwrap_or_default();
        let Some(known) = Key::find(&keys, top) else {
            problems.push(format!("unknown key `{k}` (from --set)"));
            continue;
        };
        let key = format!("{}{}", known.name, &k[top.len()..]);
        set_once(&mut seen, &key, k, "--set", &mut problems);
        builder = builder
            .set_override(key.as_str(), v.as_str())
            .map_err(|e| Error::ConfigLoad(e.to_string()))?;
    }

    let merged = builder.build().map_err(|e| Error::ConfigLoad(e.to_string()))?;
    let table: BTreeMap<String, Value> =
        merged.try_deserialize().map_err(|e| Error::ConfigLoad(e.to_string()))?;
    // Every key is checked on its own, so an unknown key or a bad value hides no other
    // problem: the user fixes the file once.
    let mut good = Config::builder();
    for (key, value) in &table {
        let Some(k) = Key::get(&keys, key) else {
            problems.push(format!("unknown key `{key}`"));
            continue;
        };
        let unknown = unknown_sub_keys(key, value, &k.sub);
        if !unknown.is_empty() {
            problems.extend(unknown.into_iter().map(|at| format!("unknown key `{at}`")));
            continue;
        }
        let alone = Config::builder()
            .set_override(key.as_str(), value.clone())
            .and_then(|b| b.build())
            .and_then(|c| c.try_deserialize::<JobConfig>());
        match alone {
            Ok(_) => {
                good = good
                    .set_override(key.as_str(), value.clone())
                    .map_err(|e| Error::ConfigLoad(e.to_string()))?;
            }
            // An enum's unknown value gets the accepted ones, not the deserializer's words.
            Err(_) if !k.values.is_empty() && !is_one_of(value, &k.values) => {
                let shown = value.clone().into_string().unwrap_or_else(|_| value.to_string());
                problems.push(format!("{key} = {shown:?} is not one of: {}", k.values.join(", ")))
            }
            Err(e) => problems.push(e.to_string()),
        }
    }
    // The well-formed keys are validated even when others are not (those stay at their
    // defaults here, which the checks accept).
    let good = good.build().and_then(|c| c.try_deserialize::<JobConfig>());
    match good {
        Ok(job) if problems.is_empty() => {
            job.validate()?;
            Ok(job)
        }
        Ok(job) => {
            problems.extend(job.validate().err().map(|e| e.problems).unwrap_or_default());
            Err(ConfigError { problems }.into())
        }
        Err(e) => {
            problems.push(e.to_string());
            Err(ConfigError { problems }.into())
        }
    }
}

/// Notes that the layer `from` sets `key` spelled `spelled` (an alias, an environment variable);
/// the same key spelled two ways in one layer is a problem naming both.
fn set_once(
    seen: &mut BTreeMap<String, String>,
    key: &str,
    spelled: &str,
    from: &str,
    problems: &mut Vec<String>,
) {
    match seen.get(key) {
        Some(first) if first != spelled => problems.push(format!(
            "`{key}` is set twice in {from}, as `{first}` and as `{spelled}` (two spellings of \
             one key): keep one"
        )),
        Some(_) => {}
        None => {
            seen.insert(key.to_string(), spelled.to_string());
        }
    }
}

/// A layer read and respelled here: the file's table with its keys as the job config names
/// them.
#[derive(Clone, Debug)]
struct Layer(config::Map<String, Value>);

impl Source for Layer {
    fn clone_into_box(&self) -> Box<dyn Source + Send + Sync> {
        Box::new(self.clone())
    }

    fn collect(&self) -> std::result::Result<config::Map<String, Value>, config::ConfigError> {
        Ok(self.0.clone())
    }
}

/// The keys of a table (`[lora]`) or of each table in an array (`[[rewards]]`) under `key`
/// that `sub` does not know, as `lora.x` or `rewards[1].x`.
fn unknown_sub_keys(key: &str, value: &Value, sub: &[Key]) -> Vec<String> {
    if sub.is_empty() {
        return vec![];
    }
    let tables: Vec<(String, config::Map<String, Value>)> = match value.clone().into_array() {
        Ok(list) => list
            .into_iter()
            .enumerate()
            .filter_map(|(i, v)| v.into_table().ok().map(|t| (format!("{key}[{i}]"), t)))
            .collect(),
        Err(_) => {
            value.clone().into_table().map(|t| vec![(key.to_string(), t)]).unwrap_or_default()
        }
    };
    tables
        .iter()
        .flat_map(|(at, t)| {
            t.keys().filter(|n| Key::get(sub, n).is_none()).map(move |n| format!("{at}.{n}"))
        })
        .collect()
}

/// How many workers make the world.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Topology {
    /// Number of nodes (`NNODES`).
    pub nnodes: u32,
    /// Workers per node (`NPUS_PER_NODE`), if known; then ranks are `node × npus + local`.
    pub npus_per_node: Option<u32>,
    /// Total number of workers.
    pub world_size: u32,
}

impl Topology {
    /// `world_size` wins when given; otherwise `nnodes × npus_per_node`.
    pub fn new(nnodes: u32, npus_per_node: u32, world_size: Option<u32>) -> Result<Self> {
        match world_size {
            Some(0) => Err(Error::InvalidRequest("world size must be >= 1".into())),
            Some(w) => Ok(Self { nnodes, npus_per_node: None, world_size: w }),
            None if nnodes == 0 || npus_per_node == 0 => Err(Error::InvalidRequest(format!(
                "NNODES ({nnodes}) and NPUS_PER_NODE ({npus_per_node}) must be >= 1"
            ))),
            None => Ok(Self {
                nnodes,
                npus_per_node: Some(npus_per_node),
                world_size: nnodes * npus_per_node,
            }),
        }
    }
}

/// Process settings of a running coordinator.
#[derive(Clone, Debug)]
pub struct CoordinatorSettings {
    /// The job to run.
    pub job: JobConfig,
    /// Expected workers.
    pub topology: Topology,
    /// The embedded database.
    pub db_path: PathBuf,
    /// How often workers heartbeat.
    pub heartbeat_interval: Duration,
    /// A worker silent for this long is lost.
    pub heartbeat_timeout: Duration,
    /// Port of the c10d TCPStore that rank 0 hosts.
    pub store_port: u16,
    /// Where the gRPC server listens.
    pub listen: SocketAddr,
    /// On a restart, go on with the given config where it differs from the job's stored one
    /// (`--adopt-config`); otherwise such a restart is refused.
    pub adopt_config: bool,
}

/// Whether `value` is a string among `values`.
fn is_one_of(value: &Value, values: &[String]) -> bool {
    value.clone().into_string().is_ok_and(|s| values.contains(&s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn every_process_flag_variable_is_not_a_job_key() {
        // launch.sh gives node 0's coordinator the workers' environment too: a variable of
        // either binary that the job config refused would stop the job from starting.
        let mains = [include_str!("bin/main.rs"), include_str!("../../worker/src/bin/main.rs")];
        let mut seen = 0;
        for src in mains {
            for part in src.split("env = \"DANCEGRPO_").skip(1) {
                let var = part.split('"').next().unwrap().to_ascii_lowercase();
                assert!(
                    PROCESS_ENV.contains(&var.as_str()),
                    "DANCEGRPO_{} not in PROCESS_ENV",
                    var.to_uppercase()
                );
                seen += 1;
            }
        }
        assert!(seen >= 8, "only {seen} variables found");
    }

    fn file(ext: &str, body: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::Builder::new().suffix(ext).tempfile().unwrap();
        f.write_all(body.as_bytes()).unwrap();
        f
    }

    #[test]
    fn file_then_env_then_flags() {
        let f = file(".toml", "num_generations = 4\neta = 0.5\nsampling_steps = 8\n");
        let env = [
            ("DANCEGRPO_ETA".to_string(), "0.7".to_string()),
            ("DANCEGRPO_SAMPLING_STEPS".to_string(), "10".to_string()),
            ("DANCEGRPO_VENV".to_string(), "/somewhere".to_string()),
            ("HOME".to_string(), "/root".to_string()),
        ];
        let c =
            load_job_config(Some(f.path()), env, &[("sampling_steps".into(), "6".into())]).unwrap();
        assert_eq!(c.num_generations, 4, "file");
        assert_eq!(c.eta, 0.7, "env beats file");
        assert_eq!(c.sampling_steps, 6, "flag beats env");
        assert_eq!(c.shift, 3.0, "reference default");
    }

    #[test]
    fn unknown_keys_from_every_layer_are_reported_together() {
        let f = file(".toml", "num_generation = 4\n[lora]\nrank = 4\nalpha = 8\nrnak = 3\n");
        let env = [("DANCEGRPO_SAMPLING_STEP".to_string(), "3".to_string())];
        let e = load_job_config(Some(f.path()), env, &[("etaa".into(), "1".into())])
            .unwrap_err()
            .to_string();
        for needle in ["`num_generation`", "`lora.rnak`", "DANCEGRPO_SAMPLING_STEP", "`etaa`"] {
            assert!(e.contains(needle), "{needle} missing from: {e}");
        }
    }

    #[test]
    fn unknown_keys_bad_types_and_bad_values_are_reported_together() {
        let body = "num_generation = 4\nsampling_steps = \"many\"\nguidance = \"x\"\neta = -1\n\
                    h = 100\n[[rewards]]\nname = \"hpsv2\"\nwieght = 2\n";
        let f = file(".toml", body);
        let e =
            load_job_config(Some(f.path()), [], &[("clip_range".into(), "-3".into())]).unwrap_err();
        let Error::Config(ConfigError { problems }) = &e else { panic!("{e}") };
        for needle in [
            "unknown key `num_generation`",
            "unknown key `rewards[0].wieght`",
            "sampling_steps",
            "guidance",
            "eta must be > 0 (got -1)",
            "h must be a positive multiple of 16 (got 100)",
            "clip_range must be > 0 (got -3)",
        ] {
            assert_eq!(
                problems.iter().filter(|p| p.contains(needle)).count(),
                1,
                "{needle} once in: {problems:#?}"
            );
        }
        assert_eq!(problems.len(), 7, "{problems:#?}");
    }

    #[test]
    fn malformed_values_and_bad_ranges() {
        let f = file(".json", r#"{"num_generations": "many"}"#);
        let e = load_job_config(Some(f.path()), [], &[]).unwrap_err().to_string();
        assert!(e.contains("num_generations"), "{e}");
        let f = file(".yaml", "eta: -1\nh: 100\n");
        let e = load_job_config(Some(f.path()), [], &[]).unwrap_err().to_string();
        assert!(e.contains("eta must be > 0") && e.contains("h must be"), "{e}");
        let e = load_job_config(Some(Path::new("/nonexistent.toml")), [], &[]).unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
    }

    #[test]
    fn mindspeed_json_files_set_reward_and_data_paths() {
        let model = file(
            ".json",
            r#"{"task": "t2i", "reward": {"model_id": "CLIP-ViT-H-14", "model_name": "ViT-H-14",
                "ckpt_dir": "./ckpt/hps_ckpt", "pretrained": "open_clip_pytorch_model.bin",
                "load_pt": "HPS_v2.1_compressed.pt"}, "diffusion": {"model_id": "FLUX"}}"#,
        );
        let data = file(
            ".json",
            r#"{"dataset_param": {"basic_parameters": {"data_path": "./data/rl/videos2caption.json"}}}"#,
        );
        let files =
            MindSpeedFiles { model: Some(model.path().into()), data: Some(data.path().into()) };
        let c = load_job_config_with(None, &files, [], &[]).unwrap();
        assert_eq!(c.data_json_path, "./data/rl/videos2caption.json");
        assert_eq!(c.rewards.len(), 1);
        assert_eq!(
            (c.rewards[0].name.as_str(), c.rewards[0].model_dir.as_str()),
            ("hpsv2", "./ckpt/hps_ckpt")
        );
        // The environment still overrides them.
        let env = [("DANCEGRPO_DATA_JSON_PATH".to_string(), "other.json".to_string())];
        assert_eq!(
            load_job_config_with(None, &files, env, &[]).unwrap().data_json_path,
            "other.json"
        );

        let bad = file(".json", r#"{"reward": {"model_id": "PickScore", "ckpt_dir": "x"}}"#);
        let files = MindSpeedFiles { model: Some(bad.path().into()), data: None };
        let e = load_job_config_with(None, &files, [], &[]).unwrap_err().to_string();
        assert!(e.contains("reward.model_id must be \"CLIP-ViT-H-14\""), "{e}");
    }

    #[test]
    fn topology() {
        assert_eq!(Topology::new(2, 8, None).unwrap().world_size, 16);
        assert_eq!(Topology::new(2, 8, Some(3)).unwrap().world_size, 3);
        assert!(Topology::new(1, 0, None).is_err());
    }

    /// The known keys of `--set` and of `DANCEGRPO_*` come from the type: a key added to
    /// `JobConfig` is accepted by both, and every key (with the keys of its tables) is
    /// documented, or this fails.
    #[test]
    fn every_key_of_the_type_is_documented_and_accepted_by_set_and_the_environment() {
        let defaults = serde_json::to_value(JobConfig::default()).unwrap();
        let mut scalars = 0;
        for k in JobConfig::keys() {
            assert!(!k.doc.trim().is_empty(), "`{}` is not documented", k.name);
            for s in &k.sub {
                assert!(!s.doc.trim().is_empty(), "`{}.{}` is not documented", k.name, s.name);
            }
            let value = match &defaults[&k.name] {
                serde_json::Value::String(s) if !s.is_empty() => s.clone(),
                v @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_)) => v.to_string(),
                // Empty strings, lists and tables: their keys are checked below and in
                // `unknown_keys_from_every_layer_are_reported_together`.
                _ => continue,
            };
            scalars += 1;
            let via_set = load_job_config(None, [], &[(k.name.clone(), value.clone())])
                .unwrap_or_else(|e| panic!("--set {}={value}: {e}", k.name));
            let var = format!("DANCEGRPO_{}", k.name.to_ascii_uppercase());
            let via_env = load_job_config(None, [(var.clone(), value.clone())], &[])
                .unwrap_or_else(|e| panic!("{var}={value}: {e}"));
            assert_eq!(via_set, JobConfig::default(), "--set {}={value}", k.name);
            assert_eq!(via_env, JobConfig::default(), "{var}={value}");
        }
        assert!(scalars >= 30, "only {scalars} plain keys tried");
        // The keys of a table, through both layers.
        let lora = [("lora.rank", "4"), ("lora.alpha", "8")].map(|(k, v)| (k.into(), v.into()));
        assert_eq!(load_job_config(None, [], &lora).unwrap().lora.unwrap().rank, 4);
        let env = [("DANCEGRPO_LORA__RANK", "4"), ("DANCEGRPO_LORA__ALPHA", "8")]
            .map(|(k, v)| (k.to_string(), v.to_string()));
        assert_eq!(load_job_config(None, env, &[]).unwrap().lora.unwrap().alpha, 8.0);
    }

    /// An enum key's unknown value is reported with the values it accepts, whatever the
    /// layer (MindSpeed-MM's default, `hybrid_full`, is not built yet).
    #[test]
    fn an_unknown_value_of_an_enum_key_lists_the_accepted_ones() {
        let set = [("fsdp_sharding_strategy".to_string(), "hybrid_full".to_string())];
        let e = load_job_config(None, [], &set).unwrap_err().to_string();
        assert!(
            e.contains("fsdp_sharding_strategy = \"hybrid_full\" is not one of: none, full"),
            "{e}"
        );
        let bad = file(".toml", "lr_scheduler = \"cosine_with_restarts\"\n");
        let e = load_job_config(Some(bad.path()), [], &[]).unwrap_err().to_string();
        assert!(e.contains("lr_scheduler = \"cosine_with_restarts\" is not one of: constant, constant_with_warmup, cosine, linear"), "{e}");
    }

    /// The reference's `fsdp_sharding_startegy` is `fsdp_sharding_strategy` in the file, the
    /// environment and `--set`; a later layer overrides either spelling, and both spellings in
    /// one layer are refused, naming both.
    #[test]
    fn a_keys_other_spelling_is_that_key_in_every_layer_but_not_both_in_one() {
        use dancegrpo_proto::ShardingStrategy;
        let full =
            JobConfig { fsdp_sharding_strategy: ShardingStrategy::Full, ..JobConfig::default() };
        let pair = |k: &str, v: &str| (k.to_string(), v.to_string());
        let misspelled = file(".toml", "fsdp_sharding_startegy = \"full\"\n");
        assert_eq!(load_job_config(Some(misspelled.path()), [], &[]).unwrap(), full, "file");
        let yaml = file(".yaml", "fsdp_sharding_startegy: full\n");
        assert_eq!(load_job_config(Some(yaml.path()), [], &[]).unwrap(), full, "yaml file");
        let env = [pair("DANCEGRPO_FSDP_SHARDING_STARTEGY", "full")];
        assert_eq!(load_job_config(None, env, &[]).unwrap(), full, "environment");
        let set = [pair("fsdp_sharding_startegy", "full")];
        assert_eq!(load_job_config(None, [], &set).unwrap(), full, "--set");
        // Layers override each other across the spellings.
        let set = [pair("fsdp_sharding_strategy", "none")];
        let c = load_job_config(Some(misspelled.path()), [], &set).unwrap();
        assert_eq!(c, JobConfig::default(), "--set beats the file");
        let env = [pair("DANCEGRPO_FSDP_SHARDING_STRATEGY", "none")];
        let c = load_job_config(Some(misspelled.path()), env, &[]).unwrap();
        assert_eq!(c, JobConfig::default(), "the environment beats the file");
        let env = [pair("DANCEGRPO_FSDP_SHARDING_STRATEGY", "none")];
        let set = [pair("fsdp_sharding_startegy", "full")];
        assert_eq!(load_job_config(None, env, &set).unwrap(), full, "--set beats the environment");

        let problems = |e: Error| match e {
            Error::Config(ConfigError { problems }) => problems,
            e => panic!("{e}"),
        };
        let both =
            file(".toml", "fsdp_sharding_strategy = \"full\"\nfsdp_sharding_startegy = \"full\"\n");
        let p = problems(load_job_config(Some(both.path()), [], &[]).unwrap_err());
        assert_eq!(p.len(), 1, "{p:#?}");
        for needle in ["`fsdp_sharding_strategy`", "`fsdp_sharding_startegy`", "set twice in /"] {
            assert!(p[0].contains(needle), "{needle} missing from {p:#?}");
        }
        let env = [
            pair("DANCEGRPO_FSDP_SHARDING_STRATEGY", "full"),
            pair("DANCEGRPO_FSDP_SHARDING_STARTEGY", "none"),
        ];
        let p = problems(load_job_config(None, env, &[]).unwrap_err());
        assert_eq!(p.len(), 1, "{p:#?}");
        for needle in [
            "DANCEGRPO_FSDP_SHARDING_STRATEGY`",
            "DANCEGRPO_FSDP_SHARDING_STARTEGY`",
            "set twice in the environment",
        ] {
            assert!(p[0].contains(needle), "{needle} missing from {p:#?}");
        }
        let set = [pair("fsdp_sharding_startegy", "full"), pair("fsdp_sharding_strategy", "full")];
        let p = problems(load_job_config(None, [], &set).unwrap_err());
        assert_eq!(
            p,
            ["`fsdp_sharding_strategy` is set twice in --set, as `fsdp_sharding_startegy` and as \
              `fsdp_sharding_strategy` (two spellings of one key): keep one"]
        );
        // The same spelling twice is a plain override.
        let set = [pair("eta", "0.5"), pair("eta", "0.7")];
        assert_eq!(load_job_config(None, [], &set).unwrap().eta, 0.7);
    }

    /// `deploy/configs/defaults.toml` is what `config --print-defaults` writes (regenerate with
    /// `dancegrpo-coordinator config --print-defaults > deploy/configs/defaults.toml`), it loads
    /// as the defaults, and the shipped recipes use only keys it documents.
    #[test]
    fn shipped_files_agree_with_the_type() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/configs");
        let shipped = std::fs::read_to_string(dir.join("defaults.toml")).unwrap();
        assert!(shipped == JobConfig::defaults_toml(), "defaults.toml is stale: regenerate it");
        let loaded = load_job_config(Some(&dir.join("defaults.toml")), [], &[]).unwrap();
        assert_eq!(loaded, JobConfig::default());
        for recipe in ["dancegrpo_flux.toml", "demo.toml"] {
            let text = std::fs::read_to_string(dir.join(recipe)).unwrap();
            let table: toml::Table = text.parse().unwrap();
            for key in table.keys() {
                assert!(
                    shipped.contains(&format!("\n{key} ="))
                        || shipped.contains(&format!("[{key}]")),
                    "{recipe}: `{key}` is not in defaults.toml"
                );
            }
        }
    }

    #[test]
    fn shipped_configs_load_and_validate() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/configs");
        let recipe = load_job_config(Some(&dir.join("dancegrpo_flux.toml")), [], &[]).unwrap();
        recipe.validate().unwrap();
        assert_eq!((recipe.num_generations, recipe.sampling_steps), (12, 16));
        let demo = load_job_config(Some(&dir.join("demo.toml")), [], &[]).unwrap();
        demo.validate().unwrap();
        assert_eq!(demo.pretrained_model_name_or_path, "tiny");
    }
}
