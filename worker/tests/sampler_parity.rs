//! The SDE sampler against the reference formulas (ALGORITHM.md §2, written out in
//! `tests/golden/flux/make_goldens.py`), the rollout against a 4-step diffusers trajectory, and
//! the PPO ratio of an unchanged model.

mod flux_common;
mod numerics;

use dancegrpo_worker::flux::checkpoint::Resident;
use dancegrpo_worker::flux::{FluxTransformer, WeightPolicy, load_flux};
use dancegrpo_worker::sampler::rollout::{FirstStepMemo, rollout_with_noise};
use dancegrpo_worker::sampler::{
    Conditioning, Next, NoiseKey, Schedule, recompute_log_prob, rollout, sde_step,
};
use flux_common::{F32_FORWARD_REL, SDE_STEP_REL, golden, golden_dir, max_abs, rel_err};
use tch::{Device, Kind, Tensor};

/// σ schedule and integer timesteps: the 16-step, shift-3 values of ALGORITHM.md §2.1, and the
/// golden 4-step schedule bit for bit.
#[test]
fn schedule_matches_reference() {
    let s = Schedule::new(16, 3.0).unwrap();
    assert_eq!(
        s.timesteps,
        [1000, 978, 954, 928, 900, 868, 833, 794, 750, 700, 642, 576, 500, 409, 300, 166]
    );
    assert_eq!(s.sigmas.len(), 17);
    assert_eq!(s.sigmas[16], 0.0);
    let g = golden("sampler.safetensors");
    let s4 = Schedule::new(4, 3.0).unwrap();
    assert_eq!(s4.sigmas, Vec::<f32>::try_from(&g["sigmas"]).unwrap());
    assert_eq!(s4.timesteps, Vec::<i64>::try_from(&g["timesteps"]).unwrap());
    let g16 = golden("sde_step.safetensors");
    assert_eq!(s.sigmas, Vec::<f32>::try_from(&g16["sigmas"]).unwrap());
    assert!(Schedule::new(0, 3.0).is_err());
}

/// One SDE step at the first, a middle and the last index (σ' = 0): mean, next latent, x0
/// and log-prob within f32 rounding of the reference; the std is ALGORITHM.md's 0.0442 / 0.1225.
#[test]
fn sde_step_matches_reference() {
    let g = golden("sde_step.safetensors");
    let s = Schedule::new(16, 3.0).unwrap();
    for i in [0usize, 7, 15] {
        let out = sde_step(
            &g[&format!("v_{i}")],
            &g[&format!("x_{i}")],
            &s,
            i,
            0.3,
            Next::Noise(&g[&format!("noise_{i}")]),
        )
        .unwrap();
        for (name, t) in
            [("mean", &out.mean), ("next", &out.next), ("x0", &out.x0), ("logp", &out.log_prob)]
        {
            let e = rel_err(t, &g[&format!("{name}_{i}")]);
            assert!(e <= SDE_STEP_REL, "step {i} {name}: relative error {e}");
        }
        // Given the sampled next latent back, the log-prob is the same.
        let again = sde_step(
            &g[&format!("v_{i}")],
            &g[&format!("x_{i}")],
            &s,
            i,
            0.3,
            Next::Given(&out.next),
        )
        .unwrap();
        assert!(again.log_prob.equal(&out.log_prob));
    }
    let s0 = sde_step(&g["v_0"], &g["x_0"], &s, 0, 0.3, Next::Given(&g["next_0"])).unwrap().std;
    let s15 =
        sde_step(&g["v_15"], &g["x_15"], &s, 15, 0.3, Next::Given(&g["next_15"])).unwrap().std;
    assert!((s0 - 0.0442).abs() < 5e-5 && (s15 - 0.1225).abs() < 5e-5, "{s0} {s15}");
    assert!(sde_step(&g["v_0"], &g["x_0"], &s, 16, 0.3, Next::Given(&g["next_0"])).is_err());
}

struct Setup {
    g: std::collections::BTreeMap<String, Tensor>,
    sched: Schedule,
    eta: f64,
}

fn setup() -> Setup {
    let g = golden("sampler.safetensors");
    let p = Vec::<f64>::try_from(&g["params"]).unwrap();
    Setup { sched: Schedule::new(p[0] as usize, p[1]).unwrap(), eta: p[2], g }
}

fn cond<'a>(g: &'a std::collections::BTreeMap<String, Tensor>) -> Conditioning<'a> {
    Conditioning {
        encoder_hidden_states: &g["encoder_hidden_states"],
        pooled_projections: &g["pooled_projections"],
        guidance: 3.5,
        img_ids: &g["img_ids"],
        txt_ids: &g["txt_ids"],
    }
}

fn model(policy: WeightPolicy) -> FluxTransformer {
    let m = load_flux(&golden_dir().join("tiny/transformer"), Device::Cpu, policy).unwrap();
    // Keep the VarStore alive with the model: its tensors are shallow handles, so leaking the
    // store is not needed; dropping it leaves the model's variables valid.
    m.model
}

/// The full 4-step trajectory (batch 2, same initial noise, stored step noise): latents, log-probs
/// and the last x0 against diffusers + the reference formulas; the log-prob recomputation too.
#[test]
fn rollout_matches_reference_trajectory() {
    let Setup { g, sched, eta } = setup();
    let m = model(WeightPolicy::Frozen(Kind::Float));
    let init = g["init_noise"].repeat([2, 1, 1]);
    let tr = rollout_with_noise(&m, &mut Resident, &cond(&g), &init, &sched, eta, None, |i| {
        Ok(g["step_noise"].get(i as i64))
    })
    .unwrap();
    // Four steps, each adding Δσ·v (Σ|Δσ| ≤ 1) from one forward: the forward's bound carries
    // over to the latents and x0. The log-probs (≈ −0.5, absolute) see only the rounding of
    // z' − μ over the step's std (see train_loop_parity.rs), ≈ 1e-6.
    let e = rel_err(&tr.latents, &g["latents"]);
    assert!(e <= F32_FORWARD_REL, "latents: relative error {e}");
    let e = max_abs(&tr.log_probs, &g["log_probs"]);
    assert!(e <= 1e-4, "log-probs: max abs error {e}");
    let e = rel_err(&tr.x0, &g["x0"].select(1, 3));
    assert!(e <= F32_FORWARD_REL, "x0: relative error {e}");
    let lat = &g["latents"];
    for i in 0..sched.steps() {
        let lp = recompute_log_prob(
            &m,
            &cond(&g),
            &lat.select(1, i as i64),
            &lat.select(1, i as i64 + 1),
            &sched,
            i,
            eta,
        )
        .unwrap();
        // A fresh forward at the stored latents: its error in μ over the std (Δσ/s ≈ 1.3, |v| ≈
        // 2, so 2.6·F32_FORWARD_REL's estimate of 4.3e-6 ≈ 1e-5 per element, not assumed to cancel).
        let e = max_abs(&lp, &g["log_probs_recomputed"].select(1, i as i64));
        assert!(e <= 1e-4, "recomputed log-prob step {i}: {e}");
    }
}

fn ratios(
    m: &FluxTransformer,
    g: &std::collections::BTreeMap<String, Tensor>,
    sched: &Schedule,
    eta: f64,
) -> Tensor {
    let keys: Vec<NoiseKey> =
        (0..2).map(|member| NoiseKey { seed: 7, prompt: 3, member }).collect();
    let tr = rollout(m, &cond(g), &keys, sched, eta, true, None).unwrap();
    let mut out = vec![];
    for i in 0..sched.steps() {
        let lp = recompute_log_prob(
            m,
            &cond(g),
            &tr.latents.select(1, i as i64),
            &tr.latents.select(1, i as i64 + 1),
            sched,
            i,
            eta,
        )
        .unwrap();
        assert!(lp.requires_grad(), "the recomputed log-prob must carry gradient");
        out.push((lp.detach() - tr.log_probs.select(1, i as i64)).exp());
    }
    Tensor::stack(&out, 1)
}

/// The on-policy ratio `exp(logp_recomputed − logp_rollout)` of an unchanged model is exactly 1
/// in f32 (trainable f32 master weights, gradient on in the recomputation).
#[test]
fn ratio_is_exactly_one_in_f32() {
    let Setup { g, sched, eta } = setup();
    let m = model(WeightPolicy::TrainableF32);
    let r = ratios(&m, &g, &sched, eta);
    let ones = r.ones_like();
    assert!(r.equal(&ones), "ratios {r:?}");
}

/// In bf16 compute on f32 masters (the DanceGRPO set-up), with the same batch shape in rollout and
/// training, the ratio is within 1e-3 of 1.
#[test]
fn ratio_within_1e_3_in_bf16() {
    let Setup { g, sched, eta } = setup();
    let mut m = model(WeightPolicy::TrainableF32);
    m.set_compute_kind(Kind::BFloat16);
    let r = ratios(&m, &g, &sched, eta);
    let dev = (r - 1.0).abs().max().double_value(&[]);
    assert!(dev <= 1e-3, "max |ratio − 1| = {dev}");
}

/// Seeded noise: the same (seed, prompt, member) gives the same trajectory; another member of the
/// group shares the initial latent (init_same_noise) but not the path.
#[test]
fn rollout_is_reproducible_from_keys() {
    let Setup { g, sched, eta } = setup();
    let m = model(WeightPolicy::Frozen(Kind::Float));
    let keys: Vec<NoiseKey> =
        (0..2).map(|member| NoiseKey { seed: 11, prompt: 5, member }).collect();
    let a = rollout(&m, &cond(&g), &keys, &sched, eta, true, None).unwrap();
    let b = rollout(&m, &cond(&g), &keys, &sched, eta, true, None).unwrap();
    assert!(a.latents.equal(&b.latents) && a.log_probs.equal(&b.log_probs));
    let z0 = a.latents.select(1, 0);
    assert!(z0.get(0).equal(&z0.get(1)), "init_same_noise: one initial latent per group");
    assert!(
        !a.latents.get(0).select(0, 1).equal(&a.latents.get(1).select(0, 1)),
        "members must differ after a step"
    );
    let other = rollout(
        &m,
        &cond(&g),
        &[NoiseKey { seed: 12, prompt: 5, member: 0 }, keys[1]],
        &sched,
        eta,
        true,
        None,
    )
    .unwrap();
    assert!(!other.latents.get(0).equal(&a.latents.get(0)));
    // The initial noise is bf16-representable and standard normal-ish.
    let init = keys[0].initial(1024, 64, true).unwrap();
    assert!(init.equal(&init.to_kind(Kind::BFloat16).to_kind(Kind::Float)));
    let std = init.std(true).double_value(&[]);
    assert!((std - 1.0).abs() < 0.02, "std {std}");
}

/// The first-step memo only saves work: members of a group roll out bit for bit as without it,
/// the second member's first forward is the first's, and another prompt misses.
#[test]
fn first_step_memo_changes_nothing_but_the_work() {
    let Setup { g, sched, eta } = setup();
    let m = model(WeightPolicy::Frozen(Kind::Float));
    let embeds = g["encoder_hidden_states"].narrow(0, 0, 1);
    let pooled = g["pooled_projections"].narrow(0, 0, 1);
    let other_embeds = &embeds * 0.5;
    let mut memo = FirstStepMemo::default();
    for (i, (prompt, member)) in [(5, 0), (5, 1), (6, 0)].into_iter().enumerate() {
        let c = Conditioning {
            encoder_hidden_states: if i == 2 { &other_embeds } else { &embeds },
            pooled_projections: &pooled,
            ..cond(&g)
        };
        let key = [NoiseKey { seed: 11, prompt, member }];
        let with = rollout(&m, &c, &key, &sched, eta, true, Some(&mut memo)).unwrap();
        let without = rollout(&m, &c, &key, &sched, eta, true, None).unwrap();
        assert!(with.latents.equal(&without.latents), "latents of {prompt}/{member}");
        assert!(with.log_probs.equal(&without.log_probs), "log-probs of {prompt}/{member}");
        assert_eq!(memo.hits(), if i == 0 { 0 } else { 1 }, "after {prompt}/{member}");
    }
}
