//! Rollout (ALGORITHM.md §2.3) and the recomputation of a stored transition's log-prob under
//! the current weights (§5 step 7).

use tch::{Kind, Tensor};

use super::noise::NoiseKey;
use super::schedule::Schedule;
use super::step::{Next, sde_step};
use super::{Result, SamplerError};
use crate::flux::checkpoint::{BlockWeights, Resident, forward_backward_with};
use crate::flux::error::ModelError;
use crate::flux::{FluxInputs, FluxTransformer};

/// The prompt side of the transformer call, constant over a trajectory.
#[derive(Debug)]
pub struct Conditioning<'a> {
    /// T5 states `[B, T, joint_dim]`.
    pub encoder_hidden_states: &'a Tensor,
    /// CLIP pooled vector `[B, pooled_dim]`.
    pub pooled_projections: &'a Tensor,
    /// Distilled guidance (3.5 for DanceGRPO); ignored by models without guidance embeds.
    pub guidance: f64,
    /// Image ids `[N, 3]`.
    pub img_ids: &'a Tensor,
    /// Text ids `[T, 3]`.
    pub txt_ids: &'a Tensor,
}

/// What a rollout keeps for training.
#[derive(Debug)]
pub struct Trajectory {
    /// `z_0 … z_S`, `[B, S+1, N, C]` f32.
    pub latents: Tensor,
    /// Log-prob of each transition, `[B, S]` f32.
    pub log_probs: Tensor,
    /// x0 prediction of the last step `[B, N, C]` f32: what gets decoded.
    pub x0: Tensor,
}

/// Calls `f` with the transformer inputs at `z` for step `i`; the model sees the quantised σ.
/// Generic over `f`'s error so that a caller's loss passes through unchanged.
fn with_inputs<T, E: From<SamplerError>>(
    model: &FluxTransformer,
    cond: &Conditioning<'_>,
    z: &Tensor,
    sched: &Schedule,
    i: usize,
    f: impl FnOnce(&FluxInputs<'_>) -> Result<T, E>,
) -> Result<T, E> {
    let b = z.size()[0];
    // New tensors come from `z` (its device and f32), never from a tch::Device (NPU note).
    let timestep_and_guidance = || -> Result<(Tensor, Tensor)> {
        let row = z.f_flatten(1, -1)?.f_narrow(1, 0, 1)?.f_reshape([b])?;
        Ok((row.f_full_like(sched.model_sigma(i) as f64)?, row.f_full_like(cond.guidance)?))
    };
    let (t, g) = timestep_and_guidance()?;
    f(&FluxInputs {
        hidden_states: z,
        encoder_hidden_states: cond.encoder_hidden_states,
        pooled_projections: cond.pooled_projections,
        timestep: &t,
        guidance: model.config().guidance_embeds.then_some(&g),
        img_ids: cond.img_ids,
        txt_ids: cond.txt_ids,
    })
}

/// The velocity at `z` for step `i`, with the blocks' weights from `weights`.
fn velocity(
    model: &FluxTransformer,
    weights: &mut dyn BlockWeights,
    cond: &Conditioning<'_>,
    z: &Tensor,
    sched: &Schedule,
    i: usize,
) -> Result<Tensor> {
    with_inputs(model, cond, z, sched, i, |inputs| Ok(model.forward_with(inputs, weights)?))
}

/// The first step's velocity of the last trajectory rolled out, kept for the next one.
///
/// Under `init_same_noise` (the reference's default) every member of a group starts from the
/// same latent with the same prompt, so their first forward is one computation: the memo runs
/// it once per group and hands the result to the other members. It compares the inputs
/// themselves, so a different prompt, latent or step simply misses. The weights are not
/// compared: whoever changes them calls [`FirstStepMemo::clear`].
#[derive(Debug, Default)]
pub struct FirstStepMemo {
    entry: Option<MemoEntry>,
    hits: u64,
}

#[derive(Debug)]
struct MemoEntry {
    inputs: [Tensor; 5],
    guidance: f64,
    sigma: f32,
    velocity: Tensor,
}

impl FirstStepMemo {
    /// Forgets the kept velocity (the weights changed).
    pub fn clear(&mut self) {
        self.entry = None;
    }

    /// Forwards saved so far.
    pub fn hits(&self) -> u64 {
        self.hits
    }

    fn velocity(
        &mut self,
        model: &FluxTransformer,
        cond: &Conditioning<'_>,
        z: &Tensor,
        sched: &Schedule,
    ) -> Result<Tensor> {
        let inputs =
            [z, cond.encoder_hidden_states, cond.pooled_projections, cond.img_ids, cond.txt_ids];
        let sigma = sched.model_sigma(0);
        if let Some(e) = &self.entry {
            let same = e.guidance == cond.guidance
                && e.sigma == sigma
                && e.inputs.iter().zip(inputs).all(|(a, b)| a.size() == b.size() && a.equal(b));
            if same {
                self.hits += 1;
                return Ok(e.velocity.shallow_clone());
            }
        }
        let v = velocity(model, &mut Resident, cond, z, sched, 0)?;
        self.entry = Some(MemoEntry {
            inputs: inputs.map(Tensor::shallow_clone),
            guidance: cond.guidance,
            sigma,
            velocity: v.shallow_clone(),
        });
        Ok(v)
    }
}

/// Samples `B` trajectories from the initial latents `init` `[B, N, C]` with the SDE. `noise(i)`
/// gives the standard normal noise `[B, N, C]` of transition `i`. Runs without grad. With a
/// `memo`, the first forward is shared with the previous trajectory when its inputs are equal.
/// The blocks' weights come from `weights` ([`Resident`]: the model's own).
#[allow(clippy::too_many_arguments)]
pub fn rollout_with_noise(
    model: &FluxTransformer,
    weights: &mut dyn BlockWeights,
    cond: &Conditioning<'_>,
    init: &Tensor,
    sched: &Schedule,
    eta: f64,
    mut memo: Option<&mut FirstStepMemo>,
    mut noise: impl FnMut(usize) -> Result<Tensor>,
) -> Result<Trajectory> {
    let _guard = tch::no_grad_guard();
    let mut z = init.f_to_kind(Kind::Float)?;
    let mut latents = vec![z.shallow_clone()];
    let mut log_probs = Vec::with_capacity(sched.steps());
    let mut x0 = None;
    for i in 0..sched.steps() {
        let v = match memo.as_deref_mut() {
            Some(m) if i == 0 => m.velocity(model, cond, &z, sched)?,
            _ => velocity(model, weights, cond, &z, sched, i)?,
        };
        let n = noise(i)?.f_to_other(&z, false, false)?;
        let out = sde_step(&v, &z, sched, i, eta, Next::Noise(&n))?;
        z = out.next;
        latents.push(z.shallow_clone());
        log_probs.push(out.log_prob);
        x0 = Some(out.x0);
    }
    Ok(Trajectory {
        latents: Tensor::f_stack(&latents, 1)?,
        log_probs: Tensor::f_stack(&log_probs, 1)?,
        x0: x0.ok_or_else(|| SamplerError::Input("empty schedule".into()))?,
    })
}

/// Samples one trajectory per key (row `b` of `cond` belongs to `keys[b]`), with the noise
/// drawn from the keys: reproducible from (seed, prompt, member) on any device. `memo` as in
/// [`rollout_with_noise`].
pub fn rollout(
    model: &FluxTransformer,
    cond: &Conditioning<'_>,
    keys: &[NoiseKey],
    sched: &Schedule,
    eta: f64,
    init_same_noise: bool,
    memo: Option<&mut FirstStepMemo>,
) -> Result<Trajectory> {
    rollout_with(model, &mut Resident, cond, keys, sched, eta, init_same_noise, memo)
}

/// [`rollout`] with the blocks' weights from `weights` (a sharded rollout's gather per
/// forward). A memo would skip a forward on one rank only, so a gathering caller passes none.
#[allow(clippy::too_many_arguments)]
pub fn rollout_with(
    model: &FluxTransformer,
    weights: &mut dyn BlockWeights,
    cond: &Conditioning<'_>,
    keys: &[NoiseKey],
    sched: &Schedule,
    eta: f64,
    init_same_noise: bool,
    memo: Option<&mut FirstStepMemo>,
) -> Result<Trajectory> {
    let n = cond.img_ids.size()[0];
    let c = model.config().in_channels;
    if keys.len() as i64 != cond.encoder_hidden_states.size()[0] {
        return Err(SamplerError::Input(format!(
            "{} noise keys for a batch of {}",
            keys.len(),
            cond.encoder_hidden_states.size()[0]
        )));
    }
    let init: Vec<Tensor> =
        keys.iter().map(|k| k.initial(n, c, init_same_noise)).collect::<Result<_>>()?;
    let init = Tensor::f_stack(&init, 0)?.f_to_other(
        &cond.encoder_hidden_states.f_to_kind(Kind::Float)?,
        false,
        false,
    )?;
    rollout_with_noise(model, weights, cond, &init, sched, eta, memo, |i| {
        let rows: Vec<Tensor> = keys.iter().map(|k| k.step(i, n, c)).collect::<Result<_>>()?;
        Ok(Tensor::f_stack(&rows, 0)?)
    })
}

/// The log-prob `[B]` of the stored transition `z → z_next` at step `i` under the current
/// weights, with gradient (when the model's variables require it).
pub fn recompute_log_prob(
    model: &FluxTransformer,
    cond: &Conditioning<'_>,
    z: &Tensor,
    z_next: &Tensor,
    sched: &Schedule,
    i: usize,
    eta: f64,
) -> Result<Tensor> {
    let v = velocity(model, &mut Resident, cond, z, sched, i)?;
    Ok(sde_step(&v, z, sched, i, eta, Next::Given(z_next))?.log_prob)
}

/// Like [`recompute_log_prob`] followed by `loss_fn(log_prob).backward()`, but with activation
/// checkpointing (see [`crate::flux::checkpoint`]). Returns the detached loss. `loss_fn`'s
/// error comes back as it is.
#[allow(clippy::too_many_arguments)]
pub fn backward_log_prob_checkpointed<E: From<SamplerError> + From<ModelError>>(
    model: &FluxTransformer,
    cond: &Conditioning<'_>,
    z: &Tensor,
    z_next: &Tensor,
    sched: &Schedule,
    i: usize,
    eta: f64,
    loss_fn: impl FnOnce(&Tensor) -> Result<Tensor, E>,
) -> Result<Tensor, E> {
    backward_log_prob_with(model, cond, z, z_next, sched, i, eta, &mut Resident, loss_fn)
}

/// [`backward_log_prob_checkpointed`] with the blocks' weights from `weights` (sharded
/// training).
#[allow(clippy::too_many_arguments)]
pub fn backward_log_prob_with<E: From<SamplerError> + From<ModelError>>(
    model: &FluxTransformer,
    cond: &Conditioning<'_>,
    z: &Tensor,
    z_next: &Tensor,
    sched: &Schedule,
    i: usize,
    eta: f64,
    weights: &mut dyn BlockWeights,
    loss_fn: impl FnOnce(&Tensor) -> Result<Tensor, E>,
) -> Result<Tensor, E> {
    with_inputs(model, cond, z, sched, i, |inputs| {
        forward_backward_with(model, inputs, weights, |v| {
            let step = sde_step(v, z, sched, i, eta, Next::Given(z_next)).map_err(E::from)?;
            loss_fn(&step.log_prob)
        })
    })
}
