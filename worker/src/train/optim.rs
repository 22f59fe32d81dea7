//! AdamW over f32 master weights, its learning-rate schedule ([`LrSchedule`], diffusers'
//! `get_scheduler` curves) and the global gradient-norm clip, matching
//! `torch.optim.AdamW` (single-tensor path: `foreach=False`, `amsgrad=False`,
//! `maximize=False`) and `torch.nn.utils.clip_grad_norm_` (norm type 2) bit for bit on CPU.
//!
//! The state is kept per named parameter ([`ParamState`]) and the update touches one
//! (parameter, gradient, state) at a time, so a sharded optimizer in which each rank owns a
//! subset of the parameters can reuse [`ParamState::update`] unchanged.
//!
//! Bit-exactness comes from running torch's ops in torch's order with the same scalars: the
//! host arithmetic on the hyperparameters is f64, like Python floats, and the tensor ops are
//! the same ATen kernels. tch exposes `addcmul_`/`addcdiv_` only with `value = 1`; ATen
//! evaluates `self + value·t1·t2` (and `… / t2`) left to right, so scaling `t1` first gives the
//! identical result.

use std::collections::BTreeMap;
use std::path::Path;

use dancegrpo_proto::JobConfig;
use dancegrpo_proto::config::LrScheduler;
use tch::{Kind, Tensor};

use super::checkpoint::{CheckpointError, write_safetensors};
use crate::flux::error::ModelError;
use crate::flux::weights::TensorSet;

/// What can go wrong in the optimizer.
#[derive(Debug, thiserror::Error)]
pub enum OptimError {
    /// A parameter AdamW cannot train (not f32, no gradient, listed twice), or a gradient
    /// the shim could not drop.
    #[error("bad input: {0}")]
    Param(String),
    /// The state file: writing it, or reading one that does not fit the parameters.
    #[error(transparent)]
    State(#[from] CheckpointError),
    /// libtorch reported an error.
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
}

/// The optimizer's result.
pub type Result<T, E = OptimError> = std::result::Result<T, E>;

/// AdamW's hyperparameters (torch's names; `betas = (beta1, beta2)`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// Learning rate.
    pub lr: f64,
    /// Decay of the first moment.
    pub beta1: f64,
    /// Decay of the second moment.
    pub beta2: f64,
    /// Added to the denominator.
    pub eps: f64,
    /// Decoupled weight decay (multiplies the weight by `1 − lr·weight_decay`).
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// DanceGRPO's settings (ALGORITHM.md §5): lr 1e-5, betas (0.9, 0.999), eps 1e-8,
    /// weight decay 1e-4.
    fn default() -> Self {
        Self { lr: 1e-5, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 1e-4 }
    }
}

/// A learning-rate schedule: the learning rate of each optimizer step, as a function of how
/// many steps the optimizer took before it, like diffusers' `get_scheduler` (a `LambdaLR`
/// stepped after every `optimizer.step()`). A function of the optimizer's own step count,
/// which its state file keeps, so a resumed job continues the curve where it stopped. An
/// update skipped for a non-finite gradient is no step and does not advance it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    /// The learning rate the factor multiplies (`learning_rate`).
    pub base_lr: f64,
    /// The curve.
    pub scheduler: LrScheduler,
    /// Warmup steps.
    pub warmup_steps: u64,
    /// Steps of the whole run (`num_training_steps`).
    pub training_steps: u64,
}

impl LrSchedule {
    /// The schedule of a job.
    pub fn of(cfg: &JobConfig) -> Self {
        Self {
            base_lr: cfg.learning_rate,
            scheduler: cfg.lr_scheduler,
            warmup_steps: u64::from(cfg.lr_warmup_steps),
            training_steps: cfg.total_optimizer_steps(),
        }
    }

    /// The learning rate of step `step` (0-based): `base_lr · factor`, in `LambdaLR`'s order.
    pub fn lr(&self, step: u64) -> f64 {
        self.base_lr * self.scheduler.factor(step, self.warmup_steps, self.training_steps)
    }
}

/// The AdamW state of one parameter (torch's `exp_avg`, `exp_avg_sq` and `step`).
#[derive(Debug)]
pub struct ParamState {
    /// First moment, like the parameter.
    pub exp_avg: Tensor,
    /// Second moment, like the parameter.
    pub exp_avg_sq: Tensor,
    /// Updates applied to this parameter. Per parameter, as in torch: a parameter without a
    /// gradient at some step is skipped, and its bias correction lags behind.
    pub step: u64,
}

impl ParamState {
    /// Fresh state for `param` (zero moments on its device).
    pub fn new(param: &Tensor) -> Result<Self> {
        Ok(Self { exp_avg: param.f_zeros_like()?, exp_avg_sq: param.f_zeros_like()?, step: 0 })
    }

    /// One step of torch's `_single_tensor_adamw` on `param`, in place. Call under `no_grad`.
    pub fn update(&mut self, param: &Tensor, grad: &Tensor, cfg: &AdamWConfig) -> Result<()> {
        // The in-place ops return aliases of their receiver, which are dropped.
        let mut param = param.shallow_clone();
        self.step += 1;
        if cfg.weight_decay != 0.0 {
            let _ = param.f_mul_scalar_(1.0 - cfg.lr * cfg.weight_decay)?;
        }
        let _ = self.exp_avg.f_lerp_(grad, 1.0 - cfg.beta1)?;
        let _ = self
            .exp_avg_sq
            .f_mul_scalar_(cfg.beta2)?
            .f_addcmul_(&grad.f_mul_scalar(1.0 - cfg.beta2)?, grad)?;
        // Python's `**` is C `pow`, which `powf` also calls; `step` is an exact float in torch.
        let step = self.step as f64;
        let bias_correction1 = 1.0 - cfg.beta1.powf(step);
        let bias_correction2 = 1.0 - cfg.beta2.powf(step);
        let step_size = cfg.lr / bias_correction1;
        let bias_correction2_sqrt = bias_correction2.powf(0.5);
        let denom = self
            .exp_avg_sq
            .f_sqrt()?
            .f_div_scalar(bias_correction2_sqrt)?
            .f_add_scalar_(cfg.eps)?;
        let _ = param.f_addcdiv_(&self.exp_avg.f_mul_scalar(-step_size)?, &denom)?;
        Ok(())
    }
}

/// Drops `t`'s gradient, as torch's `zero_grad(set_to_none=True)` (its default) does: the next
/// backward takes its gradient as computed instead of adding it to zeros, which saves a fill
/// and an add per parameter and gives the same values.
pub fn clear_grad(t: &Tensor) -> Result<()> {
    // SAFETY: a live tensor; the shim only resets its grad field, under no other borrow.
    let r = unsafe { crate::dist::ffi::dg_clear_grad(t.as_ptr().cast_mut().cast()) };
    crate::dist::ffi::check(r).map_err(OptimError::Param)
}

/// AdamW over named trainable f32 tensors.
#[derive(Debug)]
pub struct AdamW {
    params: Vec<(String, Tensor)>,
    state: Vec<ParamState>,
    cfg: AdamWConfig,
    steps_taken: u64,
    schedule: Option<LrSchedule>,
}

/// Key of the optimizer's own step count in a saved state file.
pub(crate) const STEPS_KEY: &str = "steps_taken";

impl AdamW {
    /// An optimizer over `params` (f32 tensors that require grad, unique names).
    pub fn new(params: Vec<(String, Tensor)>, cfg: AdamWConfig) -> Result<Self> {
        if let Some((name, _)) = params.iter().find(|(_, p)| !p.requires_grad()) {
            return Err(OptimError::Param(format!("parameter {name} does not require grad")));
        }
        Self::over(params, cfg)
    }

    /// An optimizer over f32 tensors whose gradients come from elsewhere
    /// ([`Self::step_with`]): the flat shards of a sharded trainer.
    pub fn over(params: Vec<(String, Tensor)>, cfg: AdamWConfig) -> Result<Self> {
        let mut seen = std::collections::HashSet::new();
        for (name, p) in &params {
            if p.kind() != Kind::Float {
                return Err(OptimError::Param(format!(
                    "parameter {name} is {:?}; AdamW keeps f32 master weights",
                    p.kind()
                )));
            }
            if !seen.insert(name.as_str()) {
                return Err(OptimError::Param(format!("parameter {name} is listed twice")));
            }
        }
        let state = params.iter().map(|(_, p)| ParamState::new(p)).collect::<Result<_>>()?;
        Ok(Self { params, state, cfg, steps_taken: 0, schedule: None })
    }

    /// The same optimizer with its learning rate following `schedule`: each step uses
    /// `schedule.lr(steps taken before it)`, replacing `cfg.lr` and any [`Self::set_lr`].
    pub fn with_schedule(mut self, schedule: LrSchedule) -> Self {
        self.schedule = Some(schedule);
        self.cfg.lr = schedule.lr(self.steps_taken);
        self
    }

    /// The learning rate the next [`Self::step`] uses.
    pub fn lr(&self) -> f64 {
        self.schedule.map_or(self.cfg.lr, |s| s.lr(self.steps_taken))
    }

    /// The parameters, in the order given.
    pub fn params(&self) -> &[(String, Tensor)] {
        &self.params
    }

    /// The hyperparameters.
    pub fn config(&self) -> &AdamWConfig {
        &self.cfg
    }

    /// Changes the learning rate (for a schedule).
    pub fn set_lr(&mut self, lr: f64) {
        self.cfg.lr = lr;
    }

    /// The per-parameter states, in parameter order.
    pub fn state(&self) -> &[ParamState] {
        &self.state
    }

    /// Every parameter's gradient, for the all-reduce: the tensors share storage with the
    /// gradients, so an in-place reduction is what [`Self::clip_grad_norm`] and [`Self::step`]
    /// see. A parameter without a gradient gets a zero one first (which then takes part in
    /// the update, as it would in DDP, where every rank has a gradient for every parameter).
    pub fn grads(&self) -> Result<Vec<Tensor>> {
        self.params
            .iter()
            .map(|(_, p)| {
                if !p.grad().defined() {
                    // tch cannot assign `.grad`; a backward of 0·p accumulates a zero one.
                    tch::with_grad(|| p.f_mul_scalar(0.0)?.f_sum(Kind::Float)?.f_backward())?;
                }
                Ok(p.grad())
            })
            .collect()
    }

    /// `torch.nn.utils.clip_grad_norm_(params, max_norm)`: scales every gradient in place by
    /// `min(max_norm / (‖g‖₂ + 1e-6), 1)` and returns the total norm before clipping.
    /// Parameters without a gradient are ignored.
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> Result<f64> {
        let _guard = tch::no_grad_guard();
        let mut grads: Vec<Tensor> =
            self.params.iter().map(|(_, p)| p.grad()).filter(Tensor::defined).collect();
        let Some(first) = grads.first() else { return Ok(0.0) };
        let device = first.device();
        // A 1-D input with a scalar `ord` and no `dim` makes linalg_norm call
        // linalg_vector_norm, which is what `_foreach_norm` runs per tensor on CPU.
        let norm = |t: &Tensor| t.f_flatten(0, -1)?.f_linalg_norm(2.0, None::<i64>, false, None);
        let norms = grads
            .iter()
            .map(|g| norm(g)?.f_to_device(device))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let total = norm(&Tensor::f_stack(&norms, 0)?)?;
        let coef = clip_coefficient(&total, max_norm)?;
        for g in &mut grads {
            let _ = g.f_mul_(&coef.f_to_device(g.device())?)?;
        }
        Ok(total.f_double_value(&[])?)
    }

    /// One AdamW update of every parameter that has a gradient (torch skips the others), at
    /// the schedule's learning rate for this step when there is a schedule.
    pub fn step(&mut self) -> Result<()> {
        let grads: Vec<Tensor> = self.params.iter().map(|(_, p)| p.grad()).collect();
        self.step_with(&grads)
    }

    /// [`Self::step`] with the gradients given, one per parameter in order (undefined ones
    /// skip their parameter, as a missing `.grad` does).
    pub fn step_with(&mut self, grads: &[Tensor]) -> Result<()> {
        if grads.len() != self.params.len() {
            return Err(OptimError::Param(format!(
                "{} gradients for {} parameters",
                grads.len(),
                self.params.len()
            )));
        }
        let _guard = tch::no_grad_guard();
        self.cfg.lr = self.lr();
        for (((_, p), s), g) in self.params.iter().zip(&mut self.state).zip(grads) {
            if g.defined() {
                s.update(p, g, &self.cfg)?;
            }
        }
        self.steps_taken += 1;
        Ok(())
    }

    /// The per-parameter states, to restore them from another layout (a sharded checkpoint).
    pub(crate) fn state_mut(&mut self) -> &mut [ParamState] {
        &mut self.state
    }

    /// Sets the optimizer's own step count (restoring), and the schedule's rate with it.
    pub(crate) fn set_steps_taken(&mut self, steps: u64) {
        self.steps_taken = steps;
        if let Some(s) = self.schedule {
            self.cfg.lr = s.lr(steps);
        }
    }

    /// Drops every gradient (torch's default `zero_grad()`, see [`clear_grad`]). Handles from
    /// [`Self::grads`] taken before then belong to no parameter any more.
    pub fn zero_grad(&mut self) -> Result<()> {
        for (_, p) in &self.params {
            clear_grad(p)?;
        }
        Ok(())
    }

    /// How many times [`Self::step`] ran (including before a [`Self::load`]).
    pub fn steps_taken(&self) -> u64 {
        self.steps_taken
    }

    fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::with_capacity(3 * self.params.len() + 1);
        for ((name, _), s) in self.params.iter().zip(&self.state) {
            out.push((format!("exp_avg.{name}"), s.exp_avg.shallow_clone()));
            out.push((format!("exp_avg_sq.{name}"), s.exp_avg_sq.shallow_clone()));
            out.push((format!("step.{name}"), step_tensor(s.step)?));
        }
        out.push((STEPS_KEY.to_string(), step_tensor(self.steps_taken)?));
        Ok(out)
    }

    /// Writes the state as safetensors: `exp_avg.<name>`, `exp_avg_sq.<name>` (f32, the
    /// parameter's shape), `step.<name>` and `steps_taken` (i64 scalars).
    pub fn save(&self, path: &Path) -> Result<()> {
        Ok(write_safetensors(path, &self.state_tensors()?)?)
    }

    /// Restores a state written by [`Self::save`] for the same parameters. Every key must be
    /// present with the same shape, and the file must hold nothing else.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let expected: BTreeMap<String, Vec<i64>> =
            self.state_tensors()?.into_iter().map(|(k, t)| (k, t.size())).collect();
        Ok(self.read_state(path, &expected)?)
    }

    fn read_state(
        &mut self,
        path: &Path,
        expected: &BTreeMap<String, Vec<i64>>,
    ) -> Result<(), CheckpointError> {
        let file = TensorSet::open(path)?;
        check_keys(&file, expected)?;
        let _guard = tch::no_grad_guard();
        for ((name, _), s) in self.params.iter().zip(&mut self.state) {
            s.exp_avg.f_copy_(&file.tensor(&format!("exp_avg.{name}"))?)?;
            s.exp_avg_sq.f_copy_(&file.tensor(&format!("exp_avg_sq.{name}"))?)?;
            s.step = read_step(&file, &format!("step.{name}"))?;
        }
        self.steps_taken = read_step(&file, STEPS_KEY)?;
        if let Some(s) = self.schedule {
            self.cfg.lr = s.lr(self.steps_taken);
        }
        Ok(())
    }
}

/// `clip_grad_norm_`'s scale from the total norm (a 0-d tensor): `min(max_norm / (total +
/// 1e-6), 1)`. `max_norm / (total + 1e-6)` on a tensor is `reciprocal(total + 1e-6) *
/// max_norm` (`Tensor.__rtruediv__`); torch multiplies even when the clamped coefficient is 1.
pub fn clip_coefficient(total: &Tensor, max_norm: f64) -> Result<Tensor> {
    let coef = total.f_add_scalar(1e-6)?.f_reciprocal()?.f_mul_scalar(max_norm)?;
    Ok(coef.f_clamp_max(1.0)?)
}

pub(crate) fn step_tensor(step: u64) -> Result<Tensor> {
    Ok(Tensor::f_from_slice(&[step as i64])?.f_reshape([] as [i64; 0])?)
}

pub(crate) fn read_step(file: &TensorSet, key: &str) -> Result<u64, CheckpointError> {
    let v = file.tensor(key)?.f_int64_value(&[])?;
    u64::try_from(v).map_err(|_| CheckpointError::format(file.path(), format!("{key} is {v}")))
}

/// The file holds exactly `expected`'s keys with those shapes.
pub(crate) fn check_keys(
    file: &TensorSet,
    expected: &BTreeMap<String, Vec<i64>>,
) -> Result<(), ModelError> {
    let missing: Vec<String> =
        expected.keys().filter(|k| file.shape(k).is_none()).cloned().collect();
    if !missing.is_empty() {
        return Err(ModelError::Missing {
            keys: missing,
            source_desc: file.path().display().to_string(),
        });
    }
    for (key, want) in expected {
        let found = file.shape(key).unwrap_or_default();
        if &found != want {
            return Err(ModelError::Shape {
                key: key.clone(),
                expected: want.clone(),
                found,
                file: file.file_of(key).to_path_buf(),
            });
        }
    }
    if let Some(key) = file.keys().into_iter().find(|k| !expected.contains_key(k)) {
        let file = file.file_of(&key).to_path_buf();
        return Err(ModelError::Unexpected { key, file });
    }
    Ok(())
}
