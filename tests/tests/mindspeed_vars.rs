//! MindSpeed-MM's variables in `deploy/launch.sh` and `deploy/preprocess.sh`: a user's variable
//! block from `posttrain_flux_dancegrpo.sh` / `preprocess_flux_rl_embeddings.sh`, copied as it
//! is, runs that job. Both scripts run for real, as a user runs them (from the folder that the
//! relative paths are relative to, as MindSpeed-MM's root is), on tiny models on CPU.
//!
//! The job config given to `launch.sh` names, for every key a MindSpeed-MM variable sets, a path
//! that does not exist (or another place): the job only starts, and only writes where the test
//! looks, when every variable reached its key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use dancegrpo_e2e::scripts::{self, logs};
use dancegrpo_e2e::{bin, bin_dir, free_port, tiny_dataset, workspace_root};

fn mkdirs(p: &Path) {
    std::fs::create_dir_all(p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
}

fn write(p: &Path, body: &str) {
    mkdirs(p.parent().expect("a parent"));
    std::fs::write(p, body).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
}

fn symlink(target: &Path, link: &Path) {
    mkdirs(link.parent().expect("a parent"));
    std::os::unix::fs::symlink(target, link).expect("symlink");
}

fn golden() -> PathBuf {
    workspace_root().join("tests/golden")
}

/// One tensor of a safetensors file: dtype, shape, bytes.
type Tensor = (String, Vec<u64>, Vec<u8>);

/// A safetensors file's header (as JSON) and its data section.
fn read_safetensors(path: &Path) -> (serde_json::Value, Vec<u8>) {
    let b = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let n = u64::from_le_bytes(b[..8].try_into().expect("8 bytes")) as usize;
    let header = serde_json::from_slice(&b[8..8 + n]).expect("a JSON header");
    (header, b[8 + n..].to_vec())
}

fn tensors(path: &Path) -> BTreeMap<String, Tensor> {
    let (header, data) = read_safetensors(path);
    let mut out = BTreeMap::new();
    for (name, t) in header.as_object().expect("an object") {
        if name == "__metadata__" {
            continue;
        }
        let shape = t["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap()).collect();
        let at = |i: usize| t["data_offsets"][i].as_u64().unwrap() as usize;
        let dtype = t["dtype"].as_str().unwrap().to_string();
        out.insert(name.clone(), (dtype, shape, data[at(0)..at(1)].to_vec()));
    }
    out
}

fn write_safetensors(path: &Path, tensors: &BTreeMap<String, Tensor>) {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut data = Vec::new();
    for (name, (dtype, shape, bytes)) in tensors {
        let offsets = [data.len(), data.len() + bytes.len()];
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": offsets}),
        );
        data.extend_from_slice(bytes);
    }
    let mut h = serde_json::Value::Object(header).to_string().into_bytes();
    h.resize(h.len().div_ceil(8) * 8, b' ');
    let mut file = (h.len() as u64).to_le_bytes().to_vec();
    file.extend(h);
    file.extend(data);
    mkdirs(path.parent().expect("a parent"));
    std::fs::write(path, file).expect("write safetensors");
}

/// A FLUX.1-dev-shaped folder at `at`, as MindSpeed-MM's `ckpt/flux`: the tiny text encoders and
/// tokenizers of `tests/golden/text/model`, the tiny VAE of `tests/golden/flux/tiny`, and its
/// transformer made to read those encoders' 32-wide outputs (two input projections widened) and
/// given one single-stream block instead of two, so that a model trained from this folder is
/// told apart from the built-in `tiny` preset by its checkpoint.
fn flux_folder(at: &Path) {
    for part in ["text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"] {
        symlink(&golden().join("text/model").join(part), &at.join(part));
    }
    symlink(&golden().join("flux/tiny/vae"), &at.join("vae"));
    let src = golden().join("flux/tiny/transformer");
    let mut all = BTreeMap::new();
    for e in std::fs::read_dir(&src).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            all.extend(tensors(&p));
        }
    }
    all.retain(|name, _| !name.starts_with("single_transformer_blocks.1."));
    for name in ["context_embedder.weight", "time_text_embed.text_embedder.linear_1.weight"] {
        let (dtype, shape, bytes) = all.get_mut(name).expect(name);
        assert_eq!(dtype, "F32");
        let (rows, cols) = (shape[0] as usize, shape[1] as usize);
        let mut wide = Vec::new();
        for r in 0..rows {
            wide.extend_from_slice(&bytes[r * cols * 4..(r + 1) * cols * 4]);
            for c in cols..32 {
                wide.extend_from_slice(&(0.02 * ((r * 32 + c) as f32).sin()).to_le_bytes());
            }
        }
        *shape = vec![rows as u64, 32];
        *bytes = wide;
    }
    let dst = at.join("transformer");
    write_safetensors(&dst.join("diffusion_pytorch_model.safetensors"), &all);
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    config["joint_attention_dim"] = 32.into();
    config["pooled_projection_dim"] = 32.into();
    config["num_single_layers"] = 1.into();
    write(&dst.join("config.json"), &config.to_string());
}

/// The files under `dir`, by name (no subfolders).
fn files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// A port free now whose successor is too: MASTER_PORT, and the c10d store on MASTER_PORT + 1.
fn two_free_ports() -> u16 {
    loop {
        let p = free_port();
        if p < u16::MAX && std::net::TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
            return p;
        }
    }
}

#[test]
fn preprocess_sh_takes_mindspeeds_variables_and_merges_what_preprocess_makes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    flux_folder(&d.join("models/flux"));
    let mut prompts = std::fs::read_to_string(workspace_root().join("deploy/demo/prompts.txt"))
        .expect("the demo prompts");
    // MindSpeed-MM drops lines with CJK characters; so does `preprocess`.
    prompts.insert_str(0, "一只猫坐在窗台上\n");
    write(&d.join("prompts/mine.txt"), &prompts);
    let bins = bin_dir().display().to_string();
    // MindSpeed-MM's variable block (not its defaults, so each one is seen to be read), two
    // local "devices", and 11 of the 16 prompts in shards of 3: 4 shards, 2 per rank.
    let run = scripts::run(
        "preprocess.sh",
        d,
        &[
            ("NPUS_PER_NODE", "2"),
            ("MASTER_ADDR", "localhost"),
            ("MASTER_PORT", "19002"),
            ("NNODES", "1"),
            ("NODE_RANK", "0"),
            ("LOAD_PATH", "models/flux"),
            ("OUTPUT_DIR", "out/embeddings"),
            ("PROMPT_DIR", "prompts/mine.txt"),
            ("SAMPLE_NUM", "11"),
            ("DEVICE", "cpu"),
            ("BIN_DIR", &bins),
            ("OMP_NUM_THREADS", "1"),
            ("PREPROCESS_ARGS", "--shard-size 3 --max-sequence-length 8"),
        ],
        Duration::from_secs(120),
    );
    assert!(
        run.status.success(),
        "preprocess.sh failed ({}):\n{}\n{}",
        run.status,
        run.output,
        logs(d)
    );
    for rank in 0..2 {
        assert!(
            run.output.contains(&format!("rank {rank}/2: 11 prompts in 4 shards; wrote 2")),
            "rank {rank} did not encode its 2 shards:\n{}",
            run.output
        );
    }

    // What one `preprocess` process makes of the same prompts.
    let st = Command::new(bin("dancegrpo-worker"))
        .args(["preprocess", "--model-dir", "models/flux", "--prompts", "prompts/mine.txt"])
        .args(["--out", "reference", "--max-prompts", "11", "--shard-size", "3"])
        .args(["--max-sequence-length", "8", "--quiet"])
        .current_dir(d)
        .env_remove("RANK")
        .env_remove("WORLD_SIZE")
        .env("OMP_NUM_THREADS", "1")
        .stdout(Stdio::null())
        .status()
        .expect("run preprocess");
    assert!(st.success(), "the reference preprocess failed");
    let (got, want) = (d.join("out/embeddings"), d.join("reference"));
    assert_eq!(files(&got), files(&want), "the dataset's files");
    assert_eq!(files(&want).len(), 5, "4 shards and the manifest: {:?}", files(&want));
    let manifest = |dir: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap()
    };
    assert_eq!(manifest(&got), manifest(&want), "manifest.json");
    assert_eq!(manifest(&got)["items"][0]["caption"], prompts.lines().nth(1).unwrap());
    for name in files(&want).into_iter().filter(|n| n.ends_with(".safetensors")) {
        // The metadata's order is not fixed: the headers are compared as JSON.
        let (gh, gd) = read_safetensors(&got.join(&name));
        let (wh, wd) = read_safetensors(&want.join(&name));
        assert_eq!(gh, wh, "{name}: header");
        assert!(gd == wd, "{name}: the embeddings differ");
    }
}

/// MindSpeed-MM's `data_dancegrpo.json` and `model_dancegrpo.json`, as its repository has them.
const DATA_JSON: &str = r#"{
    "dataset_param": {
        "basic_parameters": {
            "data_path": "./data/rl_embeddings/videos2caption.json"
        }
    }
}
"#;
const MODEL_JSON: &str = r#"{
    "task": "t2i",
    "reward": {
        "model_id": "CLIP-ViT-H-14",
        "model_name": "ViT-H-14",
        "ckpt_dir": "./ckpt/hps_ckpt",
        "pretrained": "open_clip_pytorch_model.bin",
        "load_pt": "HPS_v2.1_compressed.pt"
    },
    "diffusion": {
        "model_id": "FLUX"
    }
}
"#;

/// A small job whose every MindSpeed-MM-set key points where nothing is (or elsewhere).
const CONFIG: &str = r#"job_name = "mindspeed-vars"
pretrained_model_name_or_path = "config_flux_not_here"
data_json_path = "config_data_not_here"
output_dir = "config_out"
reward_log = "config_reward.txt"
num_generations = 4
sampling_steps = 4
h = 32
w = 32
gradient_accumulation_steps = 2
max_train_steps = 2
checkpointing_steps = 2
sample_grid_every = 0
gradient_checkpointing = false

[[rewards]]
name = "hpsv2"
model_dir = "config_hps_not_here"
"#;

/// MindSpeed-MM's variable block of `posttrain_flux_dancegrpo.sh`, its values as shipped.
const BLOCK: &[(&str, &str)] = &[
    ("MM_DATA", "./examples/dancegrpo/data_dancegrpo.json"),
    ("MM_MODEL", "./examples/dancegrpo/model_dancegrpo.json"),
    ("MM_TOOL", "./mindspeed_mm/tools/tools.json"),
    ("LOAD_PATH", "ckpt/flux"),
    ("SAVE_PATH", "save_dir"),
    ("HPS_REWARD_SAVE_PATH", "./hps_reward.txt"),
];

#[test]
fn launch_sh_runs_the_job_of_a_mindspeed_variable_block() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A MindSpeed-MM root's layout: ckpt/flux, ckpt/hps_ckpt, data/rl_embeddings (as
    // deploy/preprocess.sh writes it: manifest.json, no videos2caption.json), the two JSONs.
    flux_folder(&d.join("ckpt/flux"));
    symlink(&golden().join("hps/tiny_hps"), &d.join("ckpt/hps_ckpt"));
    let data = d.join("data/rl_embeddings");
    mkdirs(&data);
    for name in files(tiny_dataset()) {
        std::fs::copy(tiny_dataset().join(&name), data.join(&name)).unwrap();
    }
    write(&d.join("examples/dancegrpo/data_dancegrpo.json"), DATA_JSON);
    write(&d.join("examples/dancegrpo/model_dancegrpo.json"), MODEL_JSON);
    write(&d.join("job.toml"), CONFIG);
    let bins = bin_dir().display().to_string();
    let port = two_free_ports().to_string();
    let mut vars: Vec<(&str, &str)> = vec![
        ("DEVICE", "cpu"),
        ("NNODES", "1"),
        ("NODE_RANK", "0"),
        ("NPUS_PER_NODE", "2"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", &port),
        ("BIN_DIR", &bins),
        ("CONFIG", "job.toml"),
        ("OMP_NUM_THREADS", "1"),
    ];
    vars.extend_from_slice(BLOCK);

    let run = scripts::run("launch.sh", d, &vars, Duration::from_secs(180));
    assert!(
        run.status.success(),
        "launch.sh failed ({}):\n{}\n{}",
        run.status,
        run.output,
        logs(d)
    );
    assert!(
        run.output.contains("MM_TOOL=./mindspeed_mm/tools/tools.json ignored"),
        "{}",
        run.output
    );
    // HPS_REWARD_SAVE_PATH: the reward log, relative to the directory the job ran in.
    let rewards = std::fs::read_to_string(d.join("hps_reward.txt"))
        .unwrap_or_else(|e| panic!("no ./hps_reward.txt ({e}):\n{}\n{}", run.output, logs(d)));
    let rewards: Vec<f64> = rewards
        .lines()
        .map(|l| l.parse().unwrap_or_else(|e| panic!("{l:?} is not a float: {e}")))
        .collect();
    assert_eq!(rewards.len(), 2, "one line per iteration: {rewards:?}");
    assert!(rewards.iter().all(|r| r.is_finite()), "{rewards:?}");
    // SAVE_PATH: the checkpoints and the job's database.
    let ck = d.join("save_dir/checkpoint-2/transformer");
    for f in ["save_dir/dancegrpo.sqlite", "save_dir/checkpoint-2/transformer/config.json"] {
        assert!(d.join(f).is_file(), "no {f}:\n{}\n{}", run.output, logs(d));
    }
    // LOAD_PATH: the model trained is the one there, with its one single-stream block.
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ck.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["num_single_layers"], 1, "{config}");
    let trained = tensors(&ck.join("diffusion_pytorch_model.safetensors"));
    assert_eq!(trained["context_embedder.weight"].1, [32, 32]);
    assert!(!trained.keys().any(|k| k.starts_with("single_transformer_blocks.1.")));
    // MM_DATA and MM_MODEL: the job found its data and its HPS model only through them, and
    // nothing went where the config file pointed.
    for stray in ["config_out", "config_reward.txt"] {
        assert!(!d.join(stray).exists(), "{stray} was written");
    }
    assert!(files(&d.join("logs")).iter().any(|n| n.starts_with("coordinator_")), "logs/");
    assert!(run.took < Duration::from_secs(60), "the job took {:?}", run.took);

    // A DANCEGRPO_<KEY> variable beats the MindSpeed-MM variable for its key; and a coordinator
    // that cannot start (no such model) ends the script at once, its workers stopped. Its
    // checks name every missing file: the data_path of this MM_DATA, which has no manifest
    // beside it to fall back on, is one.
    write(
        &d.join("examples/dancegrpo/data_elsewhere.json"),
        &DATA_JSON.replace("/rl_embeddings/", "/elsewhere/"),
    );
    let mut again = vars.clone();
    again.retain(|(k, _)| !["SAVE_PATH", "HPS_REWARD_SAVE_PATH", "MM_DATA"].contains(k));
    again.extend([
        ("SAVE_PATH", "save_dir_2"),
        ("HPS_REWARD_SAVE_PATH", "./hps_reward_2.txt"),
        ("MM_DATA", "./examples/dancegrpo/data_elsewhere.json"),
        ("DANCEGRPO_PRETRAINED_MODEL_NAME_OR_PATH", "env_flux_not_here"),
    ]);
    let run = scripts::run("launch.sh", d, &again, Duration::from_secs(60));
    assert!(!run.status.success(), "launch.sh succeeded:\n{}", run.output);
    for needle in [
        "LOAD_PATH=ckpt/flux not used: DANCEGRPO_PRETRAINED_MODEL_NAME_OR_PATH=env_flux_not_here",
        "pretrained_model_name_or_path: env_flux_not_here: does not exist",
        "./data/elsewhere/videos2caption.json: not found",
        "the coordinator exited (status 1) before the workers; stopping them",
    ] {
        assert!(run.output.contains(needle), "{needle:?} not in:\n{}", run.output);
    }
    assert!(!run.output.contains("config_"), "the config file's paths:\n{}", run.output);
    assert!(!d.join("hps_reward_2.txt").exists() && !d.join("save_dir_2").exists());
    assert!(run.took < Duration::from_secs(20), "stopping took {:?}", run.took);

    // Without CONFIG, the variables not set take MindSpeed-MM's defaults: elsewhere, where
    // its ./examples/dancegrpo/model_dancegrpo.json is not, that is an error that says so.
    let elsewhere = d.join("elsewhere");
    mkdirs(&elsewhere);
    let run = scripts::run(
        "launch.sh",
        &elsewhere,
        &[
            ("DEVICE", "cpu"),
            ("NPUS_PER_NODE", "1"),
            ("BIN_DIR", &bins),
            ("LOAD_PATH", "ckpt/flux"),
        ],
        Duration::from_secs(20),
    );
    assert!(!run.status.success(), "{}", run.output);
    let needle = "MM_MODEL=./examples/dancegrpo/model_dancegrpo.json does not exist \
                  (MindSpeed-MM's default, used because LOAD_PATH set without CONFIG)";
    assert!(run.output.contains(needle), "{needle:?} not in:\n{}", run.output);
}
