//! Sharded training with a bf16 forward (what accelerators run), on one rank on the CPU: the
//! weights are gathered as bf16, their gradients come back bf16 and accumulate into the f32
//! slices. That is bit for bit the unsharded trainer's f32 masters cast at use, since a cast's
//! backward is the upcast of the bf16 gradient: after two accumulation windows of two
//! micro-steps each, the masters and both moments are equal, and the gathered replica is the
//! masters cast to bf16.

mod numerics;

use dancegrpo_worker::flux::checkpoint::{forward_backward_checkpointed, forward_backward_with};
use dancegrpo_worker::flux::{FluxInputs, FluxTransformer, ModelError};
use dancegrpo_worker::latents::img_ids;
use dancegrpo_worker::train::optim::{AdamW, AdamWConfig};
use dancegrpo_worker::train::policy::tiny_flux_config;
use dancegrpo_worker::train::shard::{Gathering, Sharded};
use dancegrpo_worker::train::step::{UpdateStats, apply_sharded_update, apply_update};
use tch::nn::VarStore;
use tch::{Kind, Tensor};

/// A tiny model with weights from a fixed host sequence (no global generator: tests run in
/// parallel), and its trainable weights by sorted name.
fn model() -> (VarStore, FluxTransformer, Vec<(String, Tensor)>) {
    let vs = VarStore::new(tch::Device::Cpu);
    let mut m = FluxTransformer::new(&vs.root(), &tiny_flux_config(), Kind::Float).unwrap();
    m.set_compute_kind(Kind::BFloat16);
    let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    tch::no_grad(|| {
        for (i, (_, v)) in named.iter_mut().enumerate() {
            let n = v.numel() as i64;
            let x = (Tensor::arange(n, (Kind::Float, tch::Device::Cpu)) * 0.37 + i as f64).sin();
            v.copy_(&(x * 0.2).view(v.size().as_slice()));
        }
    });
    (vs, m, named)
}

fn inputs(step: i64) -> [Tensor; 7] {
    let f = |n: i64, shape: &[i64], phase: f64| {
        ((Tensor::arange(n, (Kind::Float, tch::Device::Cpu)) * 0.11 + phase).cos()).view(shape)
    };
    let s = step as f64;
    [
        f(16 * 64, &[1, 16, 64], s),
        f(8 * 32, &[1, 8, 32], 2.0 + s),
        f(32, &[1, 32], 3.0 + s),
        Tensor::from_slice(&[0.25f32 + 0.1 * s as f32]),
        Tensor::from_slice(&[3.5f32]),
        img_ids(64, 64).unwrap(),
        Tensor::zeros([8, 3], (Kind::Float, tch::Device::Cpu)),
    ]
}

fn loss(v: &Tensor) -> Result<Tensor, ModelError> {
    Ok(v.to_kind(Kind::Float).square().mean(Kind::Float))
}

#[test]
fn a_bf16_sharded_step_equals_f32_masters_cast_at_use() {
    tch::set_num_threads(1);
    let cfg = AdamWConfig { lr: 1e-3, ..AdamWConfig::default() };
    // No clip (a norm far above the gradient's): the two sum the global norm in other orders.
    let max_norm = 1e9;

    let (_vs_a, a, named_a) = model();
    let handles = named_a.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect();
    let mut opt_a = AdamW::new(handles, cfg).unwrap();
    let (_vs_b, b, named_b) = model();
    let (mut shard, masters) = Sharded::cut(&named_b, 0, 1, Kind::BFloat16).unwrap();
    let mut opt_b = AdamW::over(masters, cfg).unwrap();
    assert!(named_b.iter().all(|(_, t)| t.kind() == Kind::BFloat16), "the replica is bf16");
    shard.release_blocks().unwrap();

    let (mut sa, mut sb) = (UpdateStats::default(), UpdateStats::default());
    for step in 0..4 {
        let [h, e, p, t, g, ii, ti] = inputs(step);
        let i = FluxInputs {
            hidden_states: &h,
            encoder_hidden_states: &e,
            pooled_projections: &p,
            timestep: &t,
            guidance: Some(&g),
            img_ids: &ii,
            txt_ids: &ti,
        };
        let la = forward_backward_checkpointed(&a, &i, loss).unwrap();
        let mut w = Gathering { shard: &mut shard, opt: &opt_b, group: None };
        let lb = forward_backward_with(&b, &i, &mut w, loss).unwrap();
        assert!(la.equal(&lb), "step {step}: the losses differ");
        if step % 2 == 1 {
            apply_update(&mut opt_a, None, max_norm, &mut sa).unwrap();
            apply_sharded_update(&mut shard, &mut opt_b, None, max_norm, &mut sb).unwrap();
        }
    }
    assert_eq!((sa.optimizer_steps, sb.optimizer_steps), (2, 2));
    shard.gather_all(&opt_b, None).unwrap();

    // Unit by unit: A's weights and moments in the layout's order are B's slices.
    let layout = shard.layout().clone();
    let by_name = |n: &str| named_a.iter().position(|(k, _)| k == n).unwrap();
    for (u, unit) in layout.units.iter().enumerate() {
        let flat = |of: &dyn Fn(usize) -> Tensor| {
            let parts: Vec<Tensor> =
                unit.params.iter().map(|(n, _)| of(by_name(n)).reshape([-1])).collect();
            Tensor::cat(&parts, 0)
        };
        let weights = flat(&|i| named_a[i].1.detach());
        let avg = flat(&|i| opt_a.state()[i].exp_avg.shallow_clone());
        let sq = flat(&|i| opt_a.state()[i].exp_avg_sq.shallow_clone());
        let n = unit.numel;
        let master = opt_b.params()[u].1.narrow(0, 0, n);
        assert!(weights.equal(&master), "{}: the masters differ", unit.name);
        assert!(avg.equal(&opt_b.state()[u].exp_avg.narrow(0, 0, n)), "{}: exp_avg", unit.name);
        assert!(
            sq.equal(&opt_b.state()[u].exp_avg_sq.narrow(0, 0, n)),
            "{}: exp_avg_sq",
            unit.name
        );
        // The gathered replica is the masters cast, bit for bit.
        let replica = flat(&|i| named_b[i].1.detach());
        assert_eq!(replica.kind(), Kind::BFloat16);
        assert!(replica.equal(&master.to_kind(Kind::BFloat16)), "{}: the replica", unit.name);
    }
    // The update moved the weights.
    let (_vs_c, _c, start) = model();
    assert!(!named_a[0].1.detach().equal(&start[0].1.detach()));
}
