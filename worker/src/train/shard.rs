//! FSDP's FULL_SHARD over the c10d shim (`fsdp_sharding_strategy = full`,
//! `../shared/docs/SHARDING.md`).
//!
//! The transformer's trainable weights are cut into units, one per block plus a root unit (the
//! embedders, `norm_out`, `proj_out`), as the reference's FSDP wrap does. A unit's weights are
//! laid out in one flat f32 vector, in name order, padded with zeros to a multiple of the world
//! size N; rank r owns elements `[r·s, (r+1)·s)` with `s = ⌈numel / N⌉` ([`Layout`], a pure
//! function of the weights' names and shapes and of N). For each unit a rank holds only its
//! slice of the master weights, of the gradient and of both AdamW moments.
//!
//! - **Training.** The checkpointed backward (`flux::checkpoint`) asks for each block's weights
//!   before it runs: they are all-gathered into a full buffer the model's variables then view,
//!   and the buffer is freed after the block's forward. The next block's gather is started
//!   before the current block computes (c10d works are asynchronous), so that it arrives
//!   while this one runs: two units' weights at most. After a block's recomputation and
//!   backward its gradient is reduce-scattered (averaged) into this rank's slice and freed.
//!   The root unit stays gathered through the update (the stem and the head run with a
//!   graph); its gradient is reduced after every transition.
//! - **Dtype.** Weights are gathered in the forward's dtype: bf16 on accelerators, cast from
//!   the f32 master before the all-gather (half the bytes; a cast is elementwise, so the
//!   values are those of casting after it), f32 on the CPU. A bf16 weight's gradient is bf16,
//!   which is what a cast-at-use f32 master's gradient is before its upcast; it accumulates
//!   into the f32 slice, so sharded and unsharded steps agree bit for bit on one rank
//!   (`tests/shard_bf16.rs`).
//! - **Update.** The global gradient norm is the square root of the all-reduced sum of the
//!   slices' squared norms; clip and AdamW run on the slices. The padding stays zero: its
//!   gradient is zero, so weight decay and the moments keep it there.
//! - **Rollout.** Sampling runs on a replica of the whole model in the forward's dtype,
//!   gathered once after each update (SHARDING.md's replica mode), so a rank rolls out without
//!   its peers; the replica is dropped while the update runs.
//! - **Checkpoints** ([`Sharded::save`]): each rank writes its own f32 slices of the masters
//!   and moments ([`super::shard_files`]); the transformer is exported as a diffusers folder,
//!   one unit at a time, in bf16 unless `export_weight_type = fp32`. A restore on any N reads
//!   the elements it owns under its own layout from the slices that cover them, so a resume
//!   into another world size is the same read as a resume into the same one, and bit-exact
//!   (the masters are saved, not the export).
//!
//! Cost at FLUX.1-dev size (P = 11.90 B, N = 8), per rank:
//! - the sharded state is 16P/N = 22.2 GiB;
//! - the rollout replica is 2P = 22.2 GiB in bf16 (4P = 44 GiB on the CPU, in f32);
//! - one unit's gathered weights and its full f32 gradient are 2 × 340 M + 4 × 340 M bytes =
//!   1.9 GiB.
//!
//! Per iteration, each rank moves:
//! - one all-gather of the model in bf16 per training forward and per recomputation;
//! - one reduce-scatter of its f32 gradient per transition;
//! - one all-gather for the replica.
//!
//! Each of those is about (N−1)/N of the model's bytes. A checkpoint gathers the model once,
//! in the export dtype (2P bytes in bf16), one unit at a time, and each rank writes its 16P/N
//! bytes of state in parallel (22.2 GiB per rank at N = 8).

use std::collections::BTreeMap;
use std::path::Path;

use dancegrpo_proto::files::DIFFUSERS_INDEX;
use tch::{Kind, Tensor};

use super::TrainError;
use super::checkpoint::{shard_file, write_index, write_safetensors, write_transformer_config};
use super::optim::{AdamW, STEPS_KEY, check_keys, clear_grad, clip_coefficient, read_step};
use super::shard_files::{self, OPTIMIZER_DIR, SavedLayout, SavedShards};
use crate::dist::{Pending, ProcessGroup, ReduceOp};
use crate::flux::FluxConfig;
use crate::flux::ModelError;
use crate::flux::checkpoint::{Block, BlockWeights};
use crate::flux::weights::TensorSet;

/// A weight's name and shape.
type Shape = (String, Vec<i64>);

/// One unit of the flat layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unit {
    /// `root`, `transformer_blocks.{i}` or `single_transformer_blocks.{i}`.
    pub name: String,
    /// Its weights in flat order (by name), with their shapes.
    pub params: Vec<(String, Vec<i64>)>,
    /// Elements before padding.
    pub numel: i64,
    /// Elements each rank owns: `⌈numel / N⌉`.
    pub shard: i64,
}

impl Unit {
    /// Elements of the padded flat vector (`shard · N`).
    pub fn padded(&self, world: u32) -> i64 {
        self.shard * i64::from(world)
    }
}

/// Where every trainable weight lives in the flat, sharded vectors of a world of N ranks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// N.
    pub world: u32,
    /// The root unit, then the double blocks, then the single blocks, in order.
    pub units: Vec<Unit>,
    doubles: usize,
}

/// The unit a weight belongs to: `(0, 0)` root, `(1, i)` double block i, `(2, i)` single.
fn unit_of(name: &str) -> Result<(u8, usize), TrainError> {
    for (kind, prefix) in [(1, "transformer_blocks."), (2, "single_transformer_blocks.")] {
        if let Some(rest) = name.strip_prefix(prefix) {
            let index = rest.split('.').next().and_then(|i| i.parse().ok()).ok_or_else(|| {
                TrainError::Invalid(format!("weight {name}: no block index after {prefix}"))
            })?;
            return Ok((kind, index));
        }
    }
    Ok((0, 0))
}

impl Layout {
    /// The layout of `params` (diffusers names and shapes) over `world` ranks.
    pub fn new(params: &[(String, Vec<i64>)], world: u32) -> Result<Self, TrainError> {
        if world == 0 {
            return Err(TrainError::Invalid("a world of 0 ranks".into()));
        }
        let mut groups: BTreeMap<(u8, usize), Vec<Shape>> = BTreeMap::new();
        for (name, shape) in params {
            groups.entry(unit_of(name)?).or_default().push((name.clone(), shape.clone()));
        }
        groups.entry((0, 0)).or_default();
        for (kind, what) in [(1u8, "transformer_blocks"), (2, "single_transformer_blocks")] {
            let indices: Vec<usize> =
                groups.keys().filter(|(k, _)| *k == kind).map(|(_, i)| *i).collect();
            if indices.iter().enumerate().any(|(want, &got)| want != got) {
                return Err(TrainError::Invalid(format!(
                    "the {what} are not numbered 0, 1, 2, ...: found {indices:?}"
                )));
            }
        }
        let doubles = groups.keys().filter(|(k, _)| *k == 1).count();
        let units = groups
            .into_iter()
            .map(|((kind, i), mut params)| {
                params.sort_by(|a, b| a.0.cmp(&b.0));
                let numel: i64 = params.iter().map(|(_, s)| s.iter().product::<i64>()).sum();
                let name = match kind {
                    0 => "root".to_string(),
                    1 => format!("transformer_blocks.{i}"),
                    _ => format!("single_transformer_blocks.{i}"),
                };
                let shard = (numel + i64::from(world) - 1) / i64::from(world);
                Unit { name, params, numel, shard }
            })
            .collect();
        Ok(Self { world, units, doubles })
    }

    /// The index of `block`'s unit.
    pub fn index(&self, block: Block) -> usize {
        match block {
            Block::Double(i) => 1 + i,
            Block::Single(i) => 1 + self.doubles + i,
        }
    }

    /// Elements one rank owns over every unit (its master, gradient and each moment).
    pub fn shard_elements(&self) -> i64 {
        self.units.iter().map(|u| u.shard).sum()
    }

    /// Elements of the whole model, without padding.
    pub fn elements(&self) -> i64 {
        self.units.iter().map(|u| u.numel).sum()
    }

    /// The largest unit's elements (what one gather or one unit's gradient holds).
    pub fn largest_unit(&self) -> i64 {
        self.units.iter().map(|u| u.padded(self.world)).max().unwrap_or(0)
    }
}

/// One rank's share of the training state.
#[derive(Debug)]
pub struct Sharded {
    layout: Layout,
    rank: u32,
    /// Per unit, the model's variables (handles on the policy's), in layout order.
    vars: Vec<Vec<Tensor>>,
    /// Per unit, this rank's gradient slice (f32, `shard` elements).
    grads: Vec<Tensor>,
    /// Per unit, whether the variables hold the gathered weights.
    present: Vec<bool>,
    /// Seconds spent in collectives since [`Self::take_communication_s`].
    communication_s: f64,
    /// The prefetched gather of the next unit the driver needs, started while the current one
    /// computes (one at a time: current plus next are the two units SHARDING.md counts).
    pending: Option<(usize, Pending)>,
    /// Whether [`Gathering`] prefetches (on; off only to measure what it hides).
    prefetch: bool,
    /// Gathers since [`Self::take_gathers`], and how many of them a prefetch served.
    gathers: (u64, u64),
    /// The dtype the weights are gathered in: the forward's (bf16 on accelerators, where a
    /// matmul casts its f32 weight to bf16 anyway, so gathering the cast is the same values
    /// in half the bytes; f32 on the CPU).
    kind: Kind,
}

/// Every rank's `shard` end to end (`padded` elements): an all-gather, or `shard` itself on
/// one rank.
fn gather_flat(
    shard: &Tensor,
    padded: i64,
    world: u32,
    group: Option<&mut ProcessGroup>,
) -> Result<Tensor, TrainError> {
    match group {
        Some(g) if world > 1 => {
            let mut full = shard.f_new_empty([padded], (shard.kind(), shard.device()))?;
            g.all_gather_into(&mut full, shard)?;
            Ok(full)
        }
        _ if world > 1 => Err(TrainError::Invalid("sharded weights need the process group".into())),
        _ => Ok(shard.shallow_clone()),
    }
}

/// `t` in `kind` (itself when it is).
fn cast(t: &Tensor, kind: Kind) -> Result<Tensor, TrainError> {
    Ok(if t.kind() == kind { t.shallow_clone() } else { t.f_to_kind(kind)? })
}

/// A 1-D view of `t`'s elements in the variables' flat order.
fn flat(t: &Tensor) -> Result<Tensor, TrainError> {
    Ok(t.f_reshape([-1])?)
}

/// `parts` end to end, zero-padded to `len` elements, in f32.
fn padded_cat(parts: &[Tensor], len: i64, anchor: &Tensor) -> Result<Tensor, TrainError> {
    let mut parts: Vec<Tensor> = parts
        .iter()
        .map(|t| Ok(flat(t)?.f_to_kind(Kind::Float)?))
        .collect::<Result<_, TrainError>>()?;
    let n: i64 = parts.iter().map(|t| t.numel() as i64).sum();
    if n < len {
        parts.push(anchor.f_new_zeros([len - n], (Kind::Float, anchor.device()))?);
    }
    Ok(Tensor::f_cat(&parts, 0)?)
}

impl Sharded {
    /// Cuts `trainable` (the policy's full weights, by name) into this rank's master slices:
    /// returns the state and the masters, named by unit, for the optimizer. The variables keep
    /// their full values: they are the rollout replica until [`Self::release_blocks`].
    pub fn cut(
        trainable: &[(String, Tensor)],
        rank: u32,
        world: u32,
        kind: Kind,
    ) -> Result<(Self, Vec<(String, Tensor)>), TrainError> {
        let _guard = tch::no_grad_guard();
        let shapes: Vec<(String, Vec<i64>)> =
            trainable.iter().map(|(n, t)| (n.clone(), t.size())).collect();
        let layout = Layout::new(&shapes, world)?;
        let by_name: BTreeMap<&str, &Tensor> =
            trainable.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let anchor = trainable
            .first()
            .map(|(_, t)| t.shallow_clone())
            .ok_or_else(|| TrainError::Invalid("no trainable weights to shard".into()))?;
        let (mut vars, mut grads, mut masters) = (Vec::new(), Vec::new(), Vec::new());
        for unit in &layout.units {
            let mut v: Vec<Tensor> =
                unit.params.iter().map(|(n, _)| by_name[n.as_str()].shallow_clone()).collect();
            let full = padded_cat(&v, unit.padded(world), &anchor)?;
            let master =
                full.f_narrow(0, i64::from(rank) * unit.shard, unit.shard)?.f_detach_copy()?;
            drop(full);
            if world == 1 {
                // One rank's master is the whole unit: its variables view it (or its cast) at
                // once and the loaded copy goes, unit by unit.
                let src = cast(&master, kind)?;
                let mut offset = 0;
                for (var, (_, shape)) in v.iter_mut().zip(&unit.params) {
                    let n: i64 = shape.iter().product();
                    var.f_set_data(&src.f_narrow(0, offset, n)?.f_view(shape.as_slice())?)?;
                    offset += n;
                }
            } else {
                // A larger world's replica is the loaded copy until the first update (then a
                // gather of the masters), in the gather's dtype.
                for var in &mut v {
                    if var.kind() != kind {
                        let c = var.f_to_kind(kind)?;
                        var.f_set_data(&c)?;
                    }
                }
            }
            grads.push(master.f_zeros_like()?);
            masters.push((unit.name.clone(), master));
            vars.push(v);
        }
        let present = vec![true; layout.units.len()];
        let shard = Self {
            layout,
            rank,
            vars,
            grads,
            present,
            communication_s: 0.0,
            pending: None,
            prefetch: true,
            gathers: (0, 0),
            kind,
        };
        Ok((shard, masters))
    }

    /// The layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Seconds spent in collectives since the last call.
    pub fn take_communication_s(&mut self) -> f64 {
        std::mem::take(&mut self.communication_s)
    }

    /// This rank, and the world size the state is cut for.
    pub fn place(&self) -> (u32, u32) {
        (self.rank, self.layout.world)
    }

    /// All-gathers unit `u`'s masters (or waits for their prefetch) and points its variables
    /// at the full weights; then starts gathering `next`, if given and not there yet.
    fn gather(
        &mut self,
        u: usize,
        next: Option<usize>,
        opt: &AdamW,
        mut group: Option<&mut ProcessGroup>,
    ) -> Result<(), TrainError> {
        let _guard = tch::no_grad_guard();
        if !self.present[u] {
            let world = self.layout.world;
            let start = std::time::Instant::now();
            self.gathers.0 += 1;
            let full = match self.pending.take() {
                Some((p, work)) if p == u => {
                    self.gathers.1 += 1;
                    work.wait()?
                }
                other => {
                    // A prefetch of another unit (the driver changed its mind) is finished
                    // and dropped; this one is gathered now.
                    if let Some((_, work)) = other {
                        drop(work.wait()?);
                    }
                    // Cast before the gather: elementwise, so the values of casting after it.
                    let src = cast(&opt.params()[u].1, self.kind)?;
                    gather_flat(
                        &src,
                        self.layout.units[u].padded(world),
                        world,
                        group.as_deref_mut(),
                    )?
                }
            };
            self.communication_s += start.elapsed().as_secs_f64();
            self.show(u, &full)?;
        }
        let next = next.filter(|&n| self.prefetch && !self.present[n] && self.pending.is_none());
        if let (Some(n), Some(g)) = (next, group.filter(|_| self.layout.world > 1)) {
            let src = cast(&opt.params()[n].1, self.kind)?;
            let full = src.f_new_empty(
                [self.layout.units[n].padded(self.layout.world)],
                (src.kind(), src.device()),
            )?;
            let start = std::time::Instant::now();
            self.pending = Some((n, g.start_all_gather_into(full, &src)?));
            self.communication_s += start.elapsed().as_secs_f64();
        }
        Ok(())
    }

    /// The gathers since the last call, and how many of them a prefetch had started.
    pub fn take_gathers(&mut self) -> (u64, u64) {
        std::mem::take(&mut self.gathers)
    }

    /// Turns the prefetch on or off (to measure the collective time it hides).
    pub fn set_prefetch(&mut self, on: bool) {
        self.prefetch = on;
    }

    /// Frees unit `u`'s full weights (the variables become empty).
    fn release(&mut self, u: usize) -> Result<(), TrainError> {
        if !self.present[u] {
            return Ok(());
        }
        let _guard = tch::no_grad_guard();
        for var in &mut self.vars[u] {
            let empty = var.f_new_empty([0], (var.kind(), var.device()))?;
            var.f_set_data(&empty)?;
        }
        self.present[u] = false;
        Ok(())
    }

    /// Reduce-scatters (averages) unit `u`'s full gradients into this rank's slice, adds them
    /// there, and drops them. A variable without a gradient contributes zeros.
    fn reduce(&mut self, u: usize, group: Option<&mut ProcessGroup>) -> Result<(), TrainError> {
        let _guard = tch::no_grad_guard();
        let unit = &self.layout.units[u];
        // One padded f32 buffer that each gradient is copied (and cast) into, and dropped
        // after: 4 bytes per weight of the unit at the peak, beyond the gradients themselves.
        let acc = &self.grads[u];
        let full =
            acc.f_new_zeros([unit.padded(self.layout.world)], (Kind::Float, acc.device()))?;
        let mut offset = 0;
        for (v, (_, shape)) in self.vars[u].iter().zip(&unit.params) {
            let n: i64 = shape.iter().product();
            let g = v.grad();
            if g.defined() {
                full.f_narrow(0, offset, n)?.f_copy_(&g.f_reshape([-1])?)?;
            }
            drop(g);
            clear_grad(v)?;
            offset += n;
        }
        let mine = match group {
            Some(g) if self.layout.world > 1 => {
                let mut out = self.grads[u].f_empty_like()?;
                let start = std::time::Instant::now();
                g.reduce_scatter(&mut out, &full, ReduceOp::Average)?;
                self.communication_s += start.elapsed().as_secs_f64();
                out
            }
            _ => full,
        };
        let _ = self.grads[u].f_add_(&mine)?;
        Ok(())
    }

    /// Forgets a prefetch of a group that is going away (a re-formed world): whatever it
    /// waits for is not wanted. Its work is waited for as it drops, which a broken group
    /// ends at once or at its timeout.
    pub fn forget_pending(&mut self) {
        if let Some((u, work)) = self.pending.take() {
            tracing::debug!(unit = u, "a prefetch of the old group is dropped");
            drop(work);
        }
    }

    /// Finishes and drops a prefetch left by a pass that ended early (an error): its unit's
    /// master may change, and every rank's next gather must be a fresh one.
    fn drain(&mut self) -> Result<(), TrainError> {
        if let Some((_, work)) = self.pending.take() {
            drop(work.wait()?);
        }
        Ok(())
    }

    /// Frees every block's weights (before the update); the root unit stays.
    pub fn release_blocks(&mut self) -> Result<(), TrainError> {
        self.drain()?;
        for u in 1..self.layout.units.len() {
            self.release(u)?;
        }
        Ok(())
    }

    /// Gathers every unit: the replica rollouts, the fingerprint and checkpoints read.
    pub fn gather_all(
        &mut self,
        opt: &AdamW,
        mut group: Option<&mut ProcessGroup>,
    ) -> Result<(), TrainError> {
        for u in 0..self.layout.units.len() {
            self.gather(u, None, opt, group.as_deref_mut())?;
        }
        Ok(())
    }

    /// Σ of each weight in f64, by name, from its gathered values (the replica's): each unit
    /// is gathered in turn and a block's weights go again after, so no more than one unit is
    /// there beyond the root.
    pub fn sums(
        &mut self,
        opt: &AdamW,
        mut group: Option<&mut ProcessGroup>,
    ) -> Result<BTreeMap<String, f64>, TrainError> {
        let mut out = BTreeMap::new();
        for u in 0..self.layout.units.len() {
            let was = self.present[u];
            self.gather(u, None, opt, group.as_deref_mut())?;
            for (v, (name, _)) in self.vars[u].iter().zip(&self.layout.units[u].params) {
                out.insert(name.clone(), v.f_sum(Kind::Double)?.f_double_value(&[])?);
            }
            if !was && u > 0 {
                self.release(u)?;
            }
        }
        Ok(out)
    }

    /// Drops every gradient, full and sharded.
    pub fn zero_grad(&mut self) -> Result<(), TrainError> {
        for (vars, g) in self.vars.iter().zip(&mut self.grads) {
            for v in vars {
                clear_grad(v)?;
            }
            let _ = g.f_zero_()?;
        }
        Ok(())
    }

    /// The update at the end of an accumulation window (every gradient already reduced, the
    /// root's by [`Gathering`]'s `finish`): the slices are clipped by the global norm and
    /// stepped by AdamW (unless the norm is not finite), the gradients dropped, and the root
    /// unit gathered again. Returns the norm.
    pub fn step(
        &mut self,
        opt: &mut AdamW,
        mut group: Option<&mut ProcessGroup>,
        max_norm: f64,
    ) -> Result<f64, TrainError> {
        self.drain()?;
        let total = {
            let _guard = tch::no_grad_guard();
            let norm = |t: &Tensor| t.f_linalg_norm(2.0, None::<i64>, false, None);
            let norms = self.grads.iter().map(norm).collect::<Result<Vec<_>, _>>()?;
            let mut sq = norm(&Tensor::f_stack(&norms, 0)?)?.f_square()?.f_reshape([1])?;
            if let Some(g) = group.as_deref_mut().filter(|_| self.layout.world > 1) {
                let start = std::time::Instant::now();
                g.all_reduce(&mut sq, ReduceOp::Sum)?;
                self.communication_s += start.elapsed().as_secs_f64();
            }
            let total = sq.f_sqrt()?.f_reshape([] as [i64; 0])?;
            let coef = clip_coefficient(&total, max_norm)?;
            for g in &mut self.grads {
                let _ = g.f_mul_(&coef)?;
            }
            total.f_double_value(&[])?
        };
        // A non-finite norm is the same on every rank (it is global): all skip the update.
        if total.is_finite() {
            opt.step_with(&self.grads)?;
        }
        self.zero_grad()?;
        // The masters of the root changed: its full weights are gathered again.
        self.present[0] = false;
        self.gather(0, None, opt, group)?;
        Ok(total)
    }

    /// Writes this rank's part of a checkpoint into `dir` (the checkpoint's temporary folder,
    /// the same path on every rank; rank 0 made `dir/optimizer`):
    /// - every rank its own slices, `optimizer/rank-RRRRR-of-NNNNN.safetensors`
    ///   ([`shard_files`](super::shard_files)), with no collective;
    /// - the transformer as a diffusers folder in `export` (bf16 by default), one shard per
    ///   unit with its index: each unit is all-gathered in `export` in turn and rank 0 writes
    ///   it, so no rank holds more than one unit beyond its own state;
    /// - rank 0 `optimizer/layout.json`.
    ///
    /// A rank whose write fails still joins every collective, and a last all-reduce tells all
    /// of them: every rank returns the error, and rank 0 publishes nothing.
    pub fn save(
        &self,
        opt: &AdamW,
        mut group: Option<&mut ProcessGroup>,
        dir: &Path,
        cfg: &FluxConfig,
        export: Kind,
    ) -> Result<(), TrainError> {
        let _guard = tch::no_grad_guard();
        let world = self.layout.world;
        let units = self.layout.units.len();
        let lead = self.rank == 0;
        if self.pending.is_some() {
            // Never on the normal path (a pass ends with no prefetch); the same on every rank.
            return Err(TrainError::Invalid("a checkpoint while a prefetch is pending".into()));
        }
        let mut failed: Option<TrainError> = None;
        // The first error of this rank; it goes on joining the collectives.
        fn keep(r: Result<(), TrainError>, failed: &mut Option<TrainError>) {
            if let (Err(e), None) = (r, &failed) {
                *failed = Some(e);
            }
        }
        let optimizer = dir.join(OPTIMIZER_DIR);
        let slices: Vec<[&Tensor; 3]> = opt
            .params()
            .iter()
            .zip(opt.state())
            .map(|((_, m), s)| [m, &s.exp_avg, &s.exp_avg_sq])
            .collect();
        keep(
            shard_files::write_rank(&optimizer, self.rank, world, &self.layout.units, &slices)
                .map(drop),
            &mut failed,
        );
        let transformer = if lead {
            let t = write_transformer_config(dir, cfg);
            let d = t.as_ref().ok().cloned();
            keep(t.map(drop).map_err(TrainError::from), &mut failed);
            d
        } else {
            None
        };
        let (mut weight_map, mut weight_bytes) = (BTreeMap::new(), 0u64);
        for (u, unit) in self.layout.units.iter().enumerate() {
            let src = cast(&opt.params()[u].1, export)?;
            let full = gather_flat(&src, unit.padded(world), world, group.as_deref_mut())?;
            drop(src);
            let Some(tdir) = transformer.as_ref().filter(|_| failed.is_none()) else { continue };
            let mut write = || -> Result<(), TrainError> {
                let mut weights = Vec::with_capacity(unit.params.len());
                let mut offset = 0;
                for (name, shape) in &unit.params {
                    let n: i64 = shape.iter().product();
                    weights.push((
                        name.clone(),
                        full.f_narrow(0, offset, n)?.f_view(shape.as_slice())?,
                    ));
                    offset += n;
                }
                let file = shard_file("diffusion_pytorch_model", u, units);
                write_safetensors(&tdir.join(&file), &weights)?;
                for (key, t) in &weights {
                    weight_map.insert(key.clone(), file.clone());
                    weight_bytes += (t.numel() * t.kind().elt_size_in_bytes()) as u64;
                }
                Ok(())
            };
            let r = write();
            keep(r, &mut failed);
        }
        if let Some(tdir) = transformer.as_ref().filter(|_| failed.is_none()) {
            let r = write_index(&tdir.join(DIFFUSERS_INDEX), &weight_map, weight_bytes)
                .map_err(TrainError::from)
                .and_then(|()| {
                    let steps: Vec<u64> = opt.state().iter().map(|s| s.step).collect();
                    SavedLayout::new(&self.layout, &steps, opt.steps_taken()).write(&optimizer)
                });
            keep(r, &mut failed);
        }
        // Everyone learns whether anyone failed.
        let mut bad = 0.0;
        if let Some(g) = group.filter(|_| world > 1) {
            let mut t = Tensor::from_slice(&[if failed.is_some() { 1f32 } else { 0.0 }]);
            if let Some((_, m)) = opt.params().first() {
                t = t.f_to_device(m.device())?;
            }
            g.all_reduce(&mut t, ReduceOp::Sum)?;
            bad = t.f_double_value(&[0])?;
        }
        match failed {
            Some(e) => Err(e),
            None if bad > 0.0 => Err(TrainError::Io(format!(
                "{} of {world} ranks could not write their part of the checkpoint in {}",
                bad as u32,
                dir.display()
            ))),
            None => Ok(()),
        }
    }

    /// Sets unit `u`'s variables to views of `full` (its padded flat weights).
    fn show(&mut self, u: usize, full: &Tensor) -> Result<(), TrainError> {
        let unit = &self.layout.units[u];
        let mut offset = 0;
        for (var, (_, shape)) in self.vars[u].iter_mut().zip(&unit.params) {
            let n: i64 = shape.iter().product();
            var.f_set_data(&full.f_narrow(0, offset, n)?.f_view(shape.as_slice())?)?;
            offset += n;
        }
        self.present[u] = true;
        Ok(())
    }

    /// Restores this rank's slices (masters and moments) from a sharded checkpoint written by
    /// any world size, reading only the files that cover them. The variables become the
    /// replica again (read from the saved masters, unit by unit) when `replica`, else only
    /// the root unit is there; no collective runs, so one rank may restore alone.
    pub fn load_saved(
        &mut self,
        opt: &mut AdamW,
        saved: &SavedShards,
        replica: bool,
    ) -> Result<(), TrainError> {
        saved.check(&self.layout)?;
        let _guard = tch::no_grad_guard();
        self.drain()?;
        for u in 0..self.layout.units.len() {
            let (shard, numel) = (self.layout.units[u].shard, self.layout.units[u].numel);
            let start = i64::from(self.rank) * shard;
            let read = |key: &str, dst: &Tensor| -> Result<(), TrainError> {
                dst.shallow_clone().f_copy_(&saved.range(u, key, start, shard)?)?;
                Ok(())
            };
            read("master", &opt.params()[u].1)?;
            let state = &mut opt.state_mut()[u];
            read("exp_avg", &state.exp_avg)?;
            read("exp_avg_sq", &state.exp_avg_sq)?;
            state.step = saved.layout.units[u].step;
            self.present[u] = false;
            let master = opt.params()[u].1.shallow_clone();
            if self.layout.world == 1 {
                // One rank's variables view the master itself (or its cast).
                self.show(u, &cast(&master, self.kind)?)?;
            } else if replica || u == 0 {
                let full =
                    saved.range(u, "master", 0, self.layout.units[u].padded(self.layout.world))?;
                debug_assert!(full.numel() as i64 >= numel);
                let full = cast(&full.f_to_device(master.device())?, self.kind)?;
                self.show(u, &full)?;
            } else {
                self.release(u)?;
            }
        }
        opt.set_steps_taken(saved.layout.steps_taken);
        Ok(())
    }

    /// Restores this rank's moments from an unsharded job's optimizer state ([`AdamW::save`]:
    /// one file, or its shards with an index); the masters are the weights it was cut from.
    /// Every key must be there with its shape, and the steps of a unit's weights agree.
    pub fn load(&self, opt: &mut AdamW, path: &Path) -> Result<(), TrainError> {
        let file = TensorSet::open(path)?;
        let mut expected = BTreeMap::new();
        for unit in &self.layout.units {
            for (name, shape) in &unit.params {
                expected.insert(format!("exp_avg.{name}"), shape.clone());
                expected.insert(format!("exp_avg_sq.{name}"), shape.clone());
                expected.insert(format!("step.{name}"), Vec::new());
            }
        }
        expected.insert(STEPS_KEY.to_string(), Vec::new());
        check_keys(&file, &expected).map_err(TrainError::Model)?;
        let _guard = tch::no_grad_guard();
        let world = self.layout.world;
        for (unit, state) in self.layout.units.iter().zip(opt.state_mut()) {
            let anchor = state.exp_avg.shallow_clone();
            let mut steps = Vec::new();
            for (name, _) in &unit.params {
                steps.push((name, read_step(&file, &format!("step.{name}"))?));
            }
            let step = steps.first().map_or(0, |(_, s)| *s);
            if let Some((name, s)) = steps.iter().find(|(_, s)| *s != step) {
                return Err(TrainError::Invalid(format!(
                    "{}: step.{name} is {s} but step.{} is {step}: a sharded unit ({}) steps \
                     all its weights together",
                    path.display(),
                    unit.params[0].0,
                    unit.name
                )));
            }
            for (key, dst) in
                [("exp_avg", &mut state.exp_avg), ("exp_avg_sq", &mut state.exp_avg_sq)]
            {
                let parts: Vec<Tensor> = unit
                    .params
                    .iter()
                    .map(|(n, _)| file.tensor(&format!("{key}.{n}")))
                    .collect::<Result<_, _>>()?;
                let parts: Vec<Tensor> = parts
                    .iter()
                    .map(|t| t.f_to_device(anchor.device()))
                    .collect::<Result<_, _>>()?;
                let full = padded_cat(&parts, unit.padded(world), &anchor)?;
                dst.f_copy_(&full.f_narrow(0, i64::from(self.rank) * unit.shard, unit.shard)?)?;
            }
            state.step = step;
        }
        opt.set_steps_taken(read_step(&file, STEPS_KEY)?);
        Ok(())
    }
}

/// The unsharded trainer's restore from a sharded checkpoint (any world size): each weight's
/// master and moments, read one unit at a time, into `opt` (over the whole model).
pub fn load_unsharded(opt: &mut AdamW, saved: &SavedShards) -> Result<(), TrainError> {
    let shapes: Vec<Shape> = opt.params().iter().map(|(n, t)| (n.clone(), t.size())).collect();
    saved.check(&Layout::new(&shapes, 1)?)?;
    let index: BTreeMap<String, usize> =
        shapes.iter().enumerate().map(|(i, (n, _))| (n.clone(), i)).collect();
    let _guard = tch::no_grad_guard();
    for (u, unit) in saved.layout.units.iter().enumerate() {
        for key in shard_files::KEYS {
            let full = saved.range(u, key, 0, unit.numel)?;
            let mut offset = 0;
            for (name, shape) in &unit.params {
                let n: i64 = shape.iter().product();
                let part = full.f_narrow(0, offset, n)?.f_view(shape.as_slice())?;
                offset += n;
                let i = index[name];
                let mut dst = match key {
                    "master" => opt.params()[i].1.shallow_clone(),
                    "exp_avg" => opt.state()[i].exp_avg.shallow_clone(),
                    _ => opt.state()[i].exp_avg_sq.shallow_clone(),
                };
                dst.f_copy_(&part)?;
                opt.state_mut()[i].step = unit.step;
            }
        }
    }
    opt.set_steps_taken(saved.layout.steps_taken);
    Ok(())
}

/// The blocks' weights during one update: gathered from, and reduced into, a [`Sharded`].
pub struct Gathering<'a> {
    /// The state.
    pub shard: &'a mut Sharded,
    /// The masters.
    pub opt: &'a AdamW,
    /// The world's group (`None` only for one rank).
    pub group: Option<&'a mut ProcessGroup>,
}

impl BlockWeights for Gathering<'_> {
    fn gather(&mut self, block: Block, next: Option<Block>) -> Result<(), ModelError> {
        let u = self.shard.layout.index(block);
        let next = next.map(|b| self.shard.layout.index(b));
        self.shard.gather(u, next, self.opt, self.group.as_deref_mut()).map_err(model_err)
    }

    fn release(&mut self, block: Block) -> Result<(), ModelError> {
        let u = self.shard.layout.index(block);
        self.shard.release(u).map_err(model_err)
    }

    fn reduce(&mut self, block: Block) -> Result<(), ModelError> {
        let u = self.shard.layout.index(block);
        self.shard.reduce(u, self.group.as_deref_mut()).map_err(model_err)?;
        self.shard.release(u).map_err(model_err)
    }

    /// The root unit's gradient is reduced after every transition, as a block's is, so
    /// that it accumulates in the f32 slice (a bf16 gather's gradient is bf16).
    fn finish(&mut self) -> Result<(), ModelError> {
        self.shard.reduce(0, self.group.as_deref_mut()).map_err(model_err)
    }

    /// Skipped only when every rank's gradient is zero: the gathers are collectives.
    fn skip_backward(&mut self, local_zero: bool) -> Result<bool, ModelError> {
        match self.group.as_deref_mut().filter(|_| self.shard.layout.world > 1) {
            None => Ok(local_zero),
            Some(g) => {
                let anchor = &self.shard.grads[0];
                let mut busy = anchor.f_new_full(
                    [1],
                    if local_zero { 0.0 } else { 1.0 },
                    (Kind::Float, anchor.device()),
                )?;
                let start = std::time::Instant::now();
                g.all_reduce(&mut busy, ReduceOp::Sum)?;
                self.shard.communication_s += start.elapsed().as_secs_f64();
                Ok(busy.f_double_value(&[0])? == 0.0)
            }
        }
    }
}

fn model_err(e: TrainError) -> ModelError {
    match e {
        TrainError::Dist(d) => ModelError::Dist(d),
        TrainError::Model(m) => m,
        TrainError::Torch(t) => ModelError::Torch(t),
        other => ModelError::Input(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> Vec<(String, Vec<i64>)> {
        [
            ("x_embedder.weight", vec![4, 3]),
            ("transformer_blocks.1.ff.weight", vec![5]),
            ("transformer_blocks.0.b", vec![2, 2]),
            ("transformer_blocks.0.a", vec![3]),
            ("single_transformer_blocks.0.w", vec![7]),
            ("proj_out.bias", vec![2]),
        ]
        .into_iter()
        .map(|(n, s)| (n.to_string(), s))
        .collect()
    }

    #[test]
    fn units_are_the_root_then_each_block_in_order_with_names_sorted_and_padding() {
        let l = Layout::new(&params(), 3).unwrap();
        let names: Vec<&str> = l.units.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(
            names,
            ["root", "transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.0"]
        );
        assert_eq!(l.units[0].params[0].0, "proj_out.bias");
        assert_eq!(l.units[1].params[0].0, "transformer_blocks.0.a");
        let sizes: Vec<(i64, i64)> = l.units.iter().map(|u| (u.numel, u.shard)).collect();
        // 14 → 5 per rank (1 of padding), 7 → 3 (2), 5 → 2 (1), 7 → 3 (2).
        assert_eq!(sizes, [(14, 5), (7, 3), (5, 2), (7, 3)]);
        assert_eq!(l.index(Block::Double(1)), 2);
        assert_eq!(l.index(Block::Single(0)), 3);
        assert_eq!((l.elements(), l.shard_elements(), l.largest_unit()), (33, 13, 15));
        assert_eq!(Layout::new(&params(), 1).unwrap().shard_elements(), 33);
    }

    #[test]
    fn blocks_must_be_numbered_from_zero() {
        let mut p = params();
        p.push(("transformer_blocks.3.x".into(), vec![1]));
        let e = Layout::new(&p, 2).unwrap_err().to_string();
        assert!(
            e.contains("transformer_blocks are not numbered") && e.contains("[0, 1, 3]"),
            "{e}"
        );
        assert!(Layout::new(&params(), 0).is_err());
    }

    fn tensors(world_seed: f64) -> Vec<(String, Tensor)> {
        params()
            .into_iter()
            .map(|(n, s)| {
                let t = Tensor::randn(s.as_slice(), (Kind::Float, tch::Device::Cpu)) * world_seed;
                (n, t.set_requires_grad(true))
            })
            .collect()
    }

    /// On one rank, the cut and a gather after a release give back the same weights.
    #[test]
    fn one_rank_cuts_and_gathers_back_the_same_weights() {
        let w = tensors(1.0);
        let copies: Vec<Tensor> = w.iter().map(|(_, t)| t.detach().copy()).collect();
        let (mut s, masters) = Sharded::cut(&w, 0, 1, Kind::Float).unwrap();
        let opt = AdamW::over(masters, Default::default()).unwrap();
        s.release_blocks().unwrap();
        assert_eq!(w[1].1.numel(), 0, "a block's variable is empty once released");
        s.gather_all(&opt, None).unwrap();
        for ((n, t), c) in w.iter().zip(&copies) {
            assert!(t.detach().equal(c), "{n} came back different");
        }
    }

    /// Rank 1 of 3 owns the middle slice of each padded unit.
    #[test]
    fn a_rank_owns_its_slice_of_each_padded_unit() {
        let w: Vec<(String, Tensor)> = params()
            .into_iter()
            .map(|(n, s)| {
                let k: i64 = s.iter().product();
                (n, Tensor::arange(k, (Kind::Float, tch::Device::Cpu)).view(s.as_slice()) + 1.0)
            })
            .collect();
        let (_, masters) = Sharded::cut(&w, 2, 3, Kind::Float).unwrap();
        // Root = proj_out.bias [1, 2] ++ x_embedder.weight [1..12], padded to 15: rank 2 owns
        // elements 10..15 = [9, 10, 11, 12, 0].
        assert_eq!(masters[0].0, "root");
        assert_eq!(Vec::<f32>::try_from(&masters[0].1).unwrap(), [9., 10., 11., 12., 0.]);
        // single_transformer_blocks.0.w = [1..7] padded to 9: rank 2 owns [7, 0, 0].
        assert_eq!(Vec::<f32>::try_from(&masters[3].1).unwrap(), [7., 0., 0.]);
    }

    /// A state written by one rank (no group needed) comes back exactly, re-cut for rank 2
    /// of 3 too; the export is bf16 when asked; a misshapen slice and a changed model are
    /// refused naming the tensor, the file and both shapes.
    #[test]
    fn a_saved_state_comes_back_on_any_world_size_and_bad_files_are_named() {
        let w = tensors(1.0);
        let (s, masters) = Sharded::cut(&w, 0, 1, Kind::Float).unwrap();
        let mut opt = AdamW::over(masters, Default::default()).unwrap();
        let grads: Vec<Tensor> = opt.params().iter().map(|(_, p)| p.ones_like()).collect();
        opt.step_with(&grads).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir(d.join(OPTIMIZER_DIR)).unwrap();
        let cfg = crate::train::policy::tiny_flux_config();
        s.save(&opt, None, d, &cfg, Kind::BFloat16).unwrap();
        let shard0 = d.join("transformer/diffusion_pytorch_model-00001-of-00004.safetensors");
        let export = crate::flux::weights::SafetensorsFile::open(&shard0).unwrap();
        assert_eq!(export.tensor("proj_out.bias").unwrap().kind(), Kind::BFloat16);
        assert!(d.join("transformer").join(DIFFUSERS_INDEX).is_file());
        assert!(d.join("optimizer/layout.json").is_file());
        let saved = SavedShards::open(d).unwrap();
        assert_eq!((saved.layout.world, saved.layout.steps_taken), (1, 1));
        // Back on one rank, from other weights: the masters, the moments, the steps.
        let (mut s1, m1) = Sharded::cut(&tensors(2.0), 0, 1, Kind::Float).unwrap();
        let mut back = AdamW::over(m1, Default::default()).unwrap();
        s1.load_saved(&mut back, &saved, true).unwrap();
        assert_eq!(back.steps_taken(), 1);
        for (u, (a, b)) in opt.state().iter().zip(back.state()).enumerate() {
            assert!(opt.params()[u].1.equal(&back.params()[u].1), "master {u}");
            assert!(a.exp_avg.equal(&b.exp_avg) && a.exp_avg_sq.equal(&b.exp_avg_sq));
            assert_eq!((a.step, b.step), (1, 1));
        }
        // Rank 2 of 3 gets the slices a cut of the trained weights for it would give.
        let trained: Vec<(String, Tensor)> = {
            let mut s0 = s;
            s0.gather_all(&opt, None).unwrap();
            w.iter().map(|(n, t)| (n.clone(), t.detach().copy())).collect()
        };
        let (_, want) = Sharded::cut(&trained, 2, 3, Kind::Float).unwrap();
        let (mut s3, m3) = Sharded::cut(&tensors(3.0), 2, 3, Kind::Float).unwrap();
        let mut three = AdamW::over(m3, Default::default()).unwrap();
        s3.load_saved(&mut three, &saved, false).unwrap();
        for ((name, a), (_, b)) in want.iter().zip(three.params()) {
            assert!(a.equal(b), "{name}: rank 2 of 3 got another slice");
        }
        // The unsharded trainer's whole weights.
        let plain: Vec<(String, Tensor)> =
            tensors(4.0).into_iter().map(|(n, t)| (n, t.detach().copy())).collect();
        let mut whole = AdamW::over(plain, Default::default()).unwrap();
        load_unsharded(&mut whole, &saved).unwrap();
        for ((name, a), (_, b)) in trained.iter().zip(whole.params()) {
            assert!(a.equal(b), "{name}: the unsharded restore differs");
        }
        // transformer_blocks.0 (7 elements) gets a first moment of 4 in the rank's file.
        let file = d.join("optimizer").join(shard_files::rank_file(0, 1));
        let st = crate::flux::weights::SafetensorsFile::open(&file).unwrap();
        let mut all: Vec<(String, Tensor)> = st.read_all().unwrap().into_iter().collect();
        for (k, t) in &mut all {
            if k == "exp_avg.transformer_blocks.0" {
                *t = Tensor::zeros([4], (Kind::Float, tch::Device::Cpu));
            }
        }
        drop(st);
        write_safetensors(&file, &all).unwrap();
        let e = SavedShards::open(d).unwrap_err().to_string();
        for needle in
            ["exp_avg.transformer_blocks.0", "rank-00000-of-00001.safetensors", "[7]", "[4]"]
        {
            assert!(e.contains(needle), "{needle} missing from: {e}");
        }
        // A model whose weight changed shape since the save.
        let mut p = params();
        p[3].1 = vec![5];
        let e = saved.check(&Layout::new(&p, 2).unwrap()).unwrap_err().to_string();
        for needle in ["transformer_blocks.0.a", "layout.json", "[3]", "[5]"] {
            assert!(e.contains(needle), "{needle} missing from: {e}");
        }
    }
}
