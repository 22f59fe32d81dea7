//! HPS forward (image + text towers, normalised features, scores) on a batch of 8, ours vs
//! open_clip on the same config and thread count, in one run; prints the ratio.
//!
//! `cargo bench -p dancegrpo-worker --profile dev --bench hps_forward -- [--threads N]
//! [--iters N] [--full]` (`--full` = real ViT-H-14 widths; default is a mid-size config).
//! Needs the reference venv's python (open-clip-torch) on PATH or in `DANCEGRPO_VENV`.

use std::process::Command;
use std::time::Instant;

use dancegrpo_worker::clip::{ClipConfig, ClipModel, l2_normalize};
use tch::{Device, Kind, Tensor};

const BATCH: i64 = 8;

fn mid_config() -> ClipConfig {
    ClipConfig::from_json(
        r#"{"embed_dim": 512,
            "vision_cfg": {"image_size": 224, "patch_size": 14, "width": 512, "layers": 8, "head_width": 64},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 8}}"#,
    )
    .expect("static config")
}

fn config_json(c: &ClipConfig) -> String {
    serde_json::json!({
        "embed_dim": c.embed_dim,
        "vision_cfg": {"image_size": c.vision_cfg.image_size, "patch_size": c.vision_cfg.patch_size,
            "width": c.vision_cfg.width, "layers": c.vision_cfg.layers, "head_width": c.vision_cfg.head_width},
        "text_cfg": {"context_length": c.text_cfg.context_length, "vocab_size": c.text_cfg.vocab_size,
            "width": c.text_cfg.width, "heads": c.text_cfg.heads, "layers": c.text_cfg.layers},
    })
    .to_string()
}

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

fn main() -> anyhow::Result<()> {
    let threads: i32 = arg("--threads").map(|s| s.parse()).transpose()?.unwrap_or(2);
    let iters: usize = arg("--iters").map(|s| s.parse()).transpose()?.unwrap_or(5);
    let cfg =
        if std::env::args().any(|a| a == "--full") { ClipConfig::vit_h_14() } else { mid_config() };
    tch::set_num_threads(threads);
    tch::manual_seed(0);
    let model = ClipModel::new(&cfg, Device::Cpu)?;
    tch::no_grad(|| {
        for (_, mut v) in model.var_store().variables() {
            let _ = v.normal_(0.0, 0.02);
        }
    });
    let s = cfg.vision_cfg.image_size;
    let pixels = Tensor::randn([BATCH, 3, s, s], (Kind::Float, Device::Cpu));
    let tokens = Tensor::randint_low(1, 49406, [BATCH, 77], (Kind::Int64, Device::Cpu));
    let _ = tokens.narrow(1, 0, 1).fill_(49406);
    let _ = tokens.narrow(1, 20, 1).fill_(49407);
    let _ = tokens.narrow(1, 21, 56).fill_(0);
    let mut times = Vec::new();
    for i in 0..=iters {
        let t0 = Instant::now();
        let scores = tch::no_grad(|| -> anyhow::Result<Vec<f64>> {
            let img = l2_normalize(&model.encode_image(&pixels)?)?;
            let txt = l2_normalize(&model.encode_text(&tokens)?)?;
            Ok(Vec::<f64>::try_from(&(img * txt).sum_dim_intlist(-1, false, Kind::Double))?)
        })?;
        assert_eq!(scores.len(), BATCH as usize);
        if i > 0 {
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    times.sort_by(f64::total_cmp);
    let ours = times[times.len() / 2];

    let python = std::env::var("DANCEGRPO_VENV")
        .map(|v| format!("{v}/bin/python"))
        .unwrap_or_else(|_| "python".into());
    let peer = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/hps_forward_peer.py");
    let out = Command::new(&python)
        .args([
            peer,
            &config_json(&cfg),
            &BATCH.to_string(),
            &threads.to_string(),
            &iters.to_string(),
        ])
        .output()?;
    anyhow::ensure!(out.status.success(), "peer failed: {}", String::from_utf8_lossy(&out.stderr));
    let peer: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let theirs = peer["median_ms"].as_f64().unwrap_or(f64::NAN);
    println!(
        "hps forward, batch {BATCH}, {} config, {threads} threads, median of {iters}: \
         dancegrpo {ours:.1} ms | open_clip {theirs:.1} ms (torch {}, open_clip {}) | ratio ours/open_clip = {:.3}",
        if std::env::args().any(|a| a == "--full") { "ViT-H-14" } else { "mid-size" },
        peer["torch"],
        peer["open_clip"],
        ours / theirs
    );
    Ok(())
}
