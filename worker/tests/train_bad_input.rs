//! Bad input to the trainer gets a clear error: a prompt index outside the dataset (the
//! coordinator and a worker looking at different data), and a missing dataset.

use dancegrpo_proto::{JobConfig, WorkItem};
use dancegrpo_worker::device::Device;
use dancegrpo_worker::train::Trainer;

fn tiny_dataset(dir: &std::path::Path) -> std::path::PathBuf {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let out = dir.join("data");
    let st = std::process::Command::new(env!("CARGO_BIN_EXE_dancegrpo-worker"))
        .args(["preprocess", "--quiet", "--max-sequence-length", "8", "--model-dir"])
        .arg(root.join("tests/golden/text/model"))
        .arg("--prompts")
        .arg(root.join("deploy/demo/prompts.txt"))
        .arg("--out")
        .arg(&out)
        .status()
        .unwrap();
    assert!(st.success());
    out
}

fn cfg(data: &std::path::Path) -> JobConfig {
    JobConfig {
        pretrained_model_name_or_path: "tiny".into(),
        data_json_path: data.display().to_string(),
        h: 32,
        w: 32,
        num_generations: 4,
        sampling_steps: 4,
        rewards: vec![dancegrpo_proto::RewardConfig {
            name: "jpeg_compressibility".into(),
            weight: 1.0,
            model_dir: String::new(),
            on_cpu: false,
        }],
        ..JobConfig::default()
    }
}

#[test]
fn a_prompt_index_outside_the_dataset_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let data = tiny_dataset(dir.path());
    let mut t = Trainer::new(&cfg(&data), Device::Cpu, (0, 1)).unwrap();
    let item =
        |p| WorkItem { iteration: 0, prompt_index: p, group_id: 0, member_index: 0, seed: 1 };
    let ok = t.rollout(&[item(15)], None).unwrap();
    assert_eq!(ok.len(), 1);
    assert!(ok[0].outcome.as_ref().is_ok_and(|v| v[0].is_finite()), "{ok:?}");
    let e = t.rollout(&[item(16)], None).unwrap_err().to_string();
    assert!(e.contains("prompt index 16 is outside the dataset of 16 prompts"), "{e}");
    assert!(e.contains("different datasets"), "{e}");
}

#[test]
fn a_missing_dataset_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let e = Trainer::new(&cfg(&dir.path().join("nowhere")), Device::Cpu, (0, 1))
        .unwrap_err()
        .to_string();
    assert!(e.contains("nowhere"), "{e}");
}
