//! Sharded training (`fsdp_sharding_strategy = full`) end to end, in real worker processes over
//! Gloo: the same weights and optimizer state as the unsharded trainer on 1, 2 and 3 ranks
//! (3 pads every unit), with gradient accumulation and a clip that clips; a bit-identical
//! resume; and a checkpoint of 2 ranks resumed by 3.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use dancegrpo_e2e::{read_bytes as read, train_n};

/// One iteration: 4 trajectories per rank, 2 per optimizer step (accumulation), so 2 optimizer
/// steps, with a clip far below the tiny model's gradient norm (checked from metrics.jsonl).
const JOB: &str = "job_name = \"shard\"\nmax_train_steps = 1\ncheckpointing_steps = 1\n\
                   gradient_checkpointing = true\nmax_grad_norm = 1e-4\nlearning_rate = 1e-3\n";

const WEIGHTS: &str = "transformer/diffusion_pytorch_model.safetensors";
const OPTIMIZER: &str = "optimizer.safetensors";

/// Every tensor of a safetensors file, or of the shards its `<file>.index.json` lists, by
/// name, as f32 (bf16 widened exactly; the i64 step counts too).
fn tensors(path: &Path) -> BTreeMap<String, Vec<f32>> {
    let index = PathBuf::from(format!("{}.index.json", path.display()));
    if !path.exists() && index.exists() {
        let json: serde_json::Value = serde_json::from_slice(&read(&index)).unwrap();
        let mut files: Vec<&str> =
            json["weight_map"].as_object().unwrap().values().map(|v| v.as_str().unwrap()).collect();
        files.sort();
        files.dedup();
        let dir = path.parent().unwrap();
        return files.into_iter().flat_map(|f| tensors(&dir.join(f))).collect();
    }
    let bytes = read(path);
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let data = view.data();
            let values = match view.dtype() {
                safetensors::Dtype::F32 => data
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
                safetensors::Dtype::BF16 => data
                    .chunks_exact(2)
                    .map(|c| f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16))
                    .collect(),
                safetensors::Dtype::I64 => data
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f32)
                    .collect(),
                other => panic!("{name} in {}: unexpected {other:?}", path.display()),
            };
            (name, values)
        })
        .collect()
}

/// The training state a checkpoint holds, under one set of names whoever wrote it:
/// `master.<w>`, `exp_avg.<w>`, `exp_avg_sq.<w>`, `step.<w>` for every weight w, and
/// `steps_taken`. An unsharded job's masters are its transformer and its moments
/// `optimizer.safetensors`; a sharded job's are every rank's flat slices in `optimizer/`, put
/// end to end per unit and cut by `layout.json`.
fn state(ck: &Path) -> BTreeMap<String, Vec<f32>> {
    let layout = ck.join("optimizer/layout.json");
    if !layout.exists() {
        let mut out: BTreeMap<String, Vec<f32>> = tensors(&ck.join(WEIGHTS))
            .into_iter()
            .map(|(k, v)| (format!("master.{k}"), v))
            .collect();
        out.extend(tensors(&ck.join(OPTIMIZER)));
        return out;
    }
    let json: serde_json::Value = serde_json::from_slice(&read(&layout)).unwrap();
    let world = json["world"].as_u64().unwrap();
    let ranks: Vec<_> = (0..world)
        .map(|r| tensors(&ck.join(format!("optimizer/rank-{r:05}-of-{world:05}.safetensors"))))
        .collect();
    let mut out = BTreeMap::from([(
        "steps_taken".to_string(),
        vec![json["steps_taken"].as_f64().unwrap() as f32],
    )]);
    for unit in json["units"].as_array().unwrap() {
        let name = unit["name"].as_str().unwrap();
        for key in ["master", "exp_avg", "exp_avg_sq"] {
            let flat: Vec<f32> =
                ranks.iter().flat_map(|r| r[&format!("{key}.{name}")].iter().copied()).collect();
            let mut at = 0;
            for p in unit["params"].as_array().unwrap() {
                let n: usize =
                    p[1].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).product();
                let w = p[0].as_str().unwrap();
                out.insert(format!("{key}.{w}"), flat[at..at + n].to_vec());
                out.insert(format!("step.{w}"), vec![unit["step"].as_f64().unwrap() as f32]);
                at += n;
            }
            assert!(flat[at..].iter().all(|&v| v == 0.0), "{key}.{name}: the padding is not zero");
        }
    }
    out
}

/// f32 rounded to the nearest bf16 (ties to even), as torch casts; finite values.
fn bf16(v: f32) -> f32 {
    let b = v.to_bits();
    f32::from_bits((b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF_0000)
}

/// Every file of a checkpoint, by its path inside it, with its bytes.
fn files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.insert(p.strip_prefix(dir).unwrap().to_path_buf(), read(&p));
            }
        }
    }
    out
}

/// The largest |a − b| over every tensor of two states, relative to the tensor's largest |a|
/// (each tensor on its own scale: the second moments are squares of gradients, far below the
/// weights); both must hold the same names and sizes.
fn max_diff(a: &BTreeMap<String, Vec<f32>>, b: &BTreeMap<String, Vec<f32>>) -> (f32, String) {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>(), "names differ");
    let mut worst = (0f32, String::new());
    for (name, x) in a {
        let y = &b[name];
        assert_eq!(x.len(), y.len(), "{name}: sizes differ");
        let scale = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let mut d = 0f32;
        for (p, q) in x.iter().zip(y) {
            assert!(p.is_finite() && q.is_finite(), "{name}: not finite");
            d = d.max((p - q).abs());
        }
        if d > 0.0 && d / scale > worst.0 {
            worst = (d / scale, format!("{name} (|diff| {d:e}, max |value| {scale:e})"));
        }
    }
    worst
}

/// The masters only.
fn masters(s: &BTreeMap<String, Vec<f32>>) -> BTreeMap<String, Vec<f32>> {
    s.iter()
        .filter(|(k, _)| k.starts_with("master."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The pre-clip gradient norms of metrics.jsonl.
fn grad_norms(out: &Path) -> Vec<f64> {
    String::from_utf8(read(&out.join("metrics.jsonl")))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["grad_norm"].as_f64().unwrap()
        })
        .collect()
}

/// The tolerance of the weights and moments after two optimizer steps, relative to each
/// tensor's largest value. The sharded trainer adds the same gradients in another order: each
/// transition's gradient is averaged over the ranks before it is accumulated (the unsharded
/// trainer accumulates, then averages), and the global norm is a sum of per-rank squared norms.
/// Each rounds a gradient's last f32 bits (relative 1e-7). The second step's gradients are
/// taken at the first step's slightly different weights, and sums that nearly cancel (a bias's
/// gradient over all tokens) magnify that relative error. Measured over N = 1, 2, 3, clipped
/// and not: at most 1.4e-5 (a bias whose whole value is the two updates, 2e-3); one rank
/// without a clip, where the order is the same, is bit-identical. 1e-4 is 7 times that, and
/// far below what a real fault does: gradients summed instead of averaged, a missing unit or a
/// wrong slice change the moments by their own size (relative 1).
const TOL: f32 = 1e-4;

#[test]
fn sharded_training_matches_the_unsharded_trainer_on_one_two_and_three_ranks() {
    let owns = "training state sharded (full): this rank owns";
    let untrained = train_n(&JOB.replace("learning_rate = 1e-3", "learning_rate = 1e-12"), 1);
    let untrained = masters(&state(&untrained.path("out/checkpoint-1")));
    for n in [1, 2, 3] {
        // With the clip at 1e-4, far below the gradient's norm, and with no clip at all, which
        // leaves the gradients' scale (the average over ranks) in the moments.
        for clip in ["1e-4", "1e9"] {
            let job = JOB.replace("max_grad_norm = 1e-4", &format!("max_grad_norm = {clip}"));
            let plain = train_n(&job, n);
            let sharded = train_n(&format!("{job}fsdp_sharding_strategy = \"full\"\n"), n);
            assert_eq!(sharded.logs().matches(owns).count(), n as usize, "{}", sharded.logs());
            assert!(!plain.logs().contains(owns), "the default is not sharded");
            // Each block's gather after the first of a pass was started while the block before
            // it ran; one rank has nothing to prefetch.
            let logs = sharded.logs();
            let line = logs.lines().find(|l| l.contains("sharded update:")).expect("a report");
            let none = line.contains("sharded update: 0 of ");
            assert_eq!(none, n == 1, "N = {n}: {line}");
            eprintln!("N = {n}: {line}");
            let (a, b) = (plain.path("out"), sharded.path("out"));
            assert_eq!(
                read(&a.join("reward.txt")),
                read(&b.join("reward.txt")),
                "N = {n}: the first rollout runs on the same weights"
            );
            let norms = grad_norms(&b);
            if clip == "1e-4" {
                assert!(
                    norms.iter().all(|&g| g > 1e-3),
                    "N = {n}: the clip did not clip: {norms:?}"
                );
            }
            let (sa, sb) = (state(&a.join("checkpoint-1")), state(&b.join("checkpoint-1")));
            let (d, at) = max_diff(&sa, &sb);
            eprintln!("N = {n}, max_grad_norm {clip}: the state differs by {d:e} at most: {at}");
            assert!(d <= TOL, "N = {n}, max_grad_norm {clip}: differs by {d:e} > {TOL:e}");
            if n == 1 && clip == "1e9" {
                assert_eq!(d, 0.0, "one rank, no clip: the same sums in the same order");
            }
            // The exported transformer is the masters in bf16 (the default), under their
            // diffusers names, and nothing else.
            let export = tensors(&b.join("checkpoint-1").join(WEIGHTS));
            assert_eq!(export.len(), masters(&sb).len());
            for (name, values) in &export {
                let master = &sb[&format!("master.{name}")];
                assert!(
                    values.iter().zip(master).all(|(e, m)| *e == bf16(*m)),
                    "{name}: the export is not the master in bf16"
                );
            }
            // The update moved the weights: the comparison is not of two untrained models.
            let (moved, _) = max_diff(&masters(&sa), &untrained);
            assert!(moved > 0.5, "N = {n}: the weights hardly moved ({moved:e})");
        }
    }
}

/// 4 iterations, checkpointed every 2, on 2 sharded ranks.
const LONG: &str = "job_name = \"shard-resume\"\nmax_train_steps = 4\ncheckpointing_steps = 2\n\
                    gradient_checkpointing = true\nfsdp_sharding_strategy = \"full\"\n";

#[test]
fn a_sharded_job_resumes_bit_identically_and_on_another_world_size() {
    let straight = train_n(LONG, 2);
    let a = straight.path("out");
    let from = a.join("checkpoint-2").display().to_string();
    let resumed = train_n(&format!("{LONG}resume_from_checkpoint = {from:?}\n"), 2);
    let b = resumed.path("out");
    assert!(!b.join("checkpoint-2").exists(), "the resumed job started after step 2");
    assert_eq!(read(&a.join("reward.txt")), read(&b.join("reward.txt")), "reward logs differ");
    let (fa, fb) = (files(&a.join("checkpoint-4")), files(&b.join("checkpoint-4")));
    assert_eq!(fa.keys().collect::<Vec<_>>(), fb.keys().collect::<Vec<_>>());
    for (f, bytes) in &fa {
        assert!(bytes == &fb[f], "{} differs after the resume", f.display());
    }
    // The export is written unit by unit: one shard per unit (1 root + 2 + 2 blocks); the
    // state one file per rank.
    let shards =
        |prefix: &str| fa.keys().filter(|p| p.to_string_lossy().starts_with(prefix)).count();
    assert_eq!(shards("transformer/diffusion_pytorch_model-"), 5, "{:?}", fa.keys());
    assert_eq!(shards("optimizer/rank-"), 2, "{:?}", fa.keys());
    // The misspelled key of the reference's launch script, on 3 ranks, from the 2 ranks'
    // checkpoint: the state is cut again for 3 and training goes on from step 2.
    let wider = train_n(
        &format!(
            "{}resume_from_checkpoint = {from:?}\n",
            LONG.replace("fsdp_sharding_strategy", "fsdp_sharding_startegy")
        ),
        3,
    );
    let c = wider.path("out");
    let rewards = String::from_utf8(read(&c.join("reward.txt"))).unwrap();
    let first = String::from_utf8(read(&a.join("reward.txt"))).unwrap();
    let lines = |s: &str| s.lines().map(str::to_string).collect::<Vec<_>>();
    // One mean reward per iteration: 1-2 come from the checkpoint, 3-4 are trained by 3 ranks.
    assert_eq!(lines(&rewards).len(), 4, "{rewards}");
    assert_eq!(lines(&rewards)[..2], lines(&first)[..2], "the first two iterations are kept");
    let (moved, _) = max_diff(
        &masters(&state(&c.join("checkpoint-4"))),
        &masters(&state(&a.join("checkpoint-2"))),
    );
    assert!(moved > 0.0, "3 ranks did not train after the resume");
    // The unsharded trainer reads a sharded job's checkpoint too (its shards and indexes).
    let plain = train_n(
        &format!(
            "{}resume_from_checkpoint = {from:?}\n",
            LONG.replace("fsdp_sharding_strategy = \"full\"\n", "")
        ),
        2,
    );
    assert!(plain.path("out/checkpoint-4").join(WEIGHTS).exists(), "{}", plain.logs());
    assert!(!plain.logs().contains("training state sharded"), "{}", plain.logs());
    // From the sharded masters, exactly: it goes on as the sharded job does, within the
    // tolerance of two sums in another order.
    let (d, at) =
        max_diff(&state(&a.join("checkpoint-4")), &state(&plain.path("out/checkpoint-4")));
    assert!(d <= TOL, "the unsharded continuation differs by {d:e} > {TOL:e} at {at}");
    let steps = state(&c.join("checkpoint-4"))["steps_taken"][0];
    let before = state(&a.join("checkpoint-2"))["steps_taken"][0];
    assert!(steps > before, "the optimizer's step count went from {before} to {steps}");
}

/// Both rollout modes of a sharded job (`rollout_weights`): a replica gathered once per
/// iteration, and a gather of each block for each forward (the default, `auto`, until the
/// memory planner chooses). Two iterations, so that the second rollout reads the updated
/// masters; on 2 and 3 ranks (3 pads every unit). The trajectories are the same bit for bit,
/// so the rewards and the whole checkpoint are too.
#[test]
fn both_rollout_modes_give_bit_identical_trajectories() {
    let job = "job_name = \"rollout-modes\"\nmax_train_steps = 2\ncheckpointing_steps = 2\n\
               gradient_checkpointing = true\nfsdp_sharding_strategy = \"full\"\n";
    let prefetched = |logs: &str| -> Vec<String> {
        logs.lines()
            .filter(|l| l.contains("gathers prefetched") && l.contains("rollout"))
            .map(str::to_string)
            .collect()
    };
    for n in [2, 3] {
        let replica = train_n(&format!("{job}rollout_weights = \"replica\"\n"), n);
        let gather = train_n(&format!("{job}rollout_weights = \"gather\"\n"), n);
        let auto = train_n(job, n);
        assert!(prefetched(&replica.logs()).is_empty(), "{}", replica.logs());
        for (mode, c) in [("gather", &gather), ("auto", &auto)] {
            let lines = prefetched(&c.logs());
            // One report per rollout call, per rank; each block's gather after the first of a
            // forward came from a prefetch.
            assert!(lines.len() >= 2 * n as usize, "{mode}, N = {n}: {lines:?}");
            assert!(
                lines.iter().all(|l| !l.contains("sharded rollout: 0 of")),
                "{mode}, N = {n}: {lines:?}"
            );
            let (a, b) = (replica.path("out"), c.path("out"));
            assert_eq!(
                read(&a.join("reward.txt")),
                read(&b.join("reward.txt")),
                "{mode}, N = {n}: the rewards differ"
            );
            let (fa, fb) = (files(&a.join("checkpoint-2")), files(&b.join("checkpoint-2")));
            assert_eq!(fa.keys().collect::<Vec<_>>(), fb.keys().collect::<Vec<_>>());
            for (f, bytes) in &fa {
                assert!(bytes == &fb[f], "{mode}, N = {n}: {} differs", f.display());
            }
        }
    }
}

/// The reference's LoRA launch sets `--fsdp_sharding_startegy full` too: a LoRA job under
/// `full` shards nothing (its adapters are all-reduced as under `none`), says so, and writes the
/// same checkpoint once, from rank 0.
#[test]
fn a_lora_job_under_full_trains_as_under_none() {
    let job = "job_name = \"lora-full\"\nmax_train_steps = 2\ncheckpointing_steps = 2\n";
    let lora = "[lora]\nrank = 4\nalpha = 8.0\n";
    let none = train_n(&format!("{job}{lora}"), 2);
    let full = train_n(&format!("{job}fsdp_sharding_startegy = \"full\"\n{lora}"), 2);
    assert!(full.logs().contains("with LoRA: the adapters are replicated"), "{}", full.logs());
    assert!(!full.logs().contains("training state sharded"), "{}", full.logs());
    let (a, b) = (files(&none.path("out/checkpoint-2")), files(&full.path("out/checkpoint-2")));
    assert!(a.keys().any(|p| p.ends_with("adapter_model.safetensors")), "{:?}", a.keys());
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (f, bytes) in &a {
        assert!(bytes == &b[f], "{} differs", f.display());
    }
}
