//! Activation checkpointing for the training forward + backward of one transition.
//!
//! PyTorch's `torch.utils.checkpoint` re-runs each block in backward from a saved input. tch
//! has neither that nor a custom autograd Function, so the same schedule is driven by hand,
//! block by block, with ordinary `backward()` calls:
//!
//! 1. The stem (embeddings, conditioning vector `temb`) runs **with** grad; its outputs are then
//!    cut from the graph. `temb` becomes one leaf shared by every block and the head, so its
//!    gradient accumulates across all of them.
//! 2. All blocks run under `no_grad`. Only each block's input is kept (two `[B, L, d]` tensors
//!    per double block, one per single block) – no activations.
//! 3. The head runs with grad on a leaf copy of the last block's output, the caller's loss is
//!    built on the velocity, and `loss.backward()` fills the head's weight gradients, the `temb`
//!    leaf's gradient and the gradient `g` w.r.t. the last block's output.
//! 4. In reverse order, each block is recomputed with grad from its saved input (made a leaf)
//!    and `Σ(out ⊙ g)` is back-propagated: its gradient w.r.t. `out` is exactly `g`, so this
//!    accumulates the block's true weight gradients and yields the gradient w.r.t. its input,
//!    the `g` of the block before. For double blocks the sum runs over both streams.
//! 5. Finally `Σ(x ⊙ gx) + Σ(c ⊙ gc) + Σ(temb ⊙ g_temb)` is back-propagated through the stem.
//!
//! When the gradient reaching the last block's output and `temb` is exactly zero (the loss is
//! flat in the velocity, as for a clipped PPO ratio), steps 4 and 5 are skipped: they would
//! only add zeros.
//!
//! Under sharding (FSDP's FULL_SHARD, `crate::train::shard`) a block's weights exist only
//! while it runs: the driver asks a [`BlockWeights`] to gather them before each block's
//! forward and recomputation, to free them after the forward, and to reduce-scatter the
//! block's gradient and free the weights after its backward. Whether to skip steps 4 and 5 is
//! then decided by all ranks together, since the gathers are collectives every rank joins.
//!
//! Peak memory is therefore the saved block inputs plus one block's autograd graph, instead of
//! every block's graph (MODELS.md §5). Cost: one extra forward of the blocks. The weight
//! gradients equal the plain backward's up to the summation order of `temb`'s gradient
//! (`tests/flux_checkpoint.rs` proves it on a tiny config).

use tch::Tensor;

use super::error::{ModelError, Result};
use super::model::{FluxInputs, FluxTransformer, Stem};

/// A block of the transformer, as the sharded weights name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Block {
    /// `transformer_blocks.{i}`.
    Double(usize),
    /// `single_transformer_blocks.{i}`.
    Single(usize),
}

/// Where the blocks' weights live while the checkpointed backward runs.
pub trait BlockWeights {
    /// Makes `block`'s weights present before it runs; `next` is the block the driver will
    /// gather after it, whose weights may start coming now (a prefetch).
    fn gather(&mut self, block: Block, next: Option<Block>) -> Result<()>;
    /// `block` ran without a graph: its weights may go.
    fn release(&mut self, block: Block) -> Result<()>;
    /// `block`'s backward is done: its weight gradients may be reduced, and its weights go.
    fn reduce(&mut self, block: Block) -> Result<()>;
    /// Whether the blocks' backward is skipped, given whether this rank's gradient into them
    /// is zero.
    fn skip_backward(&mut self, local_zero: bool) -> Result<bool>;
    /// The whole backward is done (or skipped): the stem's and the head's weight gradients
    /// may be reduced. Their weights stay.
    fn finish(&mut self) -> Result<()>;
}

/// Every weight is always present (no sharding): nothing to gather or reduce.
#[derive(Debug, Default)]
pub struct Resident;

impl BlockWeights for Resident {
    fn gather(&mut self, _: Block, _: Option<Block>) -> Result<()> {
        Ok(())
    }
    fn release(&mut self, _: Block) -> Result<()> {
        Ok(())
    }
    fn reduce(&mut self, _: Block) -> Result<()> {
        Ok(())
    }
    fn skip_backward(&mut self, local_zero: bool) -> Result<bool> {
        Ok(local_zero)
    }
    fn finish(&mut self) -> Result<()> {
        Ok(())
    }
}

/// The first single block, if there is one.
pub(crate) fn first_single(count: usize) -> Option<Block> {
    (count > 0).then_some(Block::Single(0))
}

fn leaf(t: &Tensor) -> Result<Tensor> {
    Ok(t.f_detach()?.f_set_requires_grad(true)?)
}

/// Whether every element of `t` is zero (a gradient that would only add zeros further back).
pub(crate) fn is_zero(t: &Tensor) -> Result<bool> {
    Ok(t.f_count_nonzero(None)?.f_int64_value(&[])? == 0)
}

fn grad_of(t: &Tensor) -> Result<Tensor> {
    let g = t.grad();
    if g.defined() { Ok(g) } else { Ok(t.f_zeros_like()?) }
}

/// Forward + backward of `loss_fn(velocity)` with per-block recomputation. Gradients are
/// accumulated into the model's trainable variables exactly as `loss.backward()` would after a
/// plain [`FluxTransformer::forward`]. Returns the (detached) loss.
/// `loss_fn`'s error comes back as it is, so the caller's own error type passes through.
pub fn forward_backward_checkpointed<E, F>(
    model: &FluxTransformer,
    inputs: &FluxInputs<'_>,
    loss_fn: F,
) -> std::result::Result<Tensor, E>
where
    E: From<ModelError>,
    F: FnOnce(&Tensor) -> std::result::Result<Tensor, E>,
{
    forward_backward_with(model, inputs, &mut Resident, loss_fn)
}

/// [`forward_backward_checkpointed`] with the blocks' weights from `weights` (sharded
/// training). The stem's and the head's weights must be present throughout.
pub fn forward_backward_with<E, F>(
    model: &FluxTransformer,
    inputs: &FluxInputs<'_>,
    weights: &mut dyn BlockWeights,
    loss_fn: F,
) -> std::result::Result<Tensor, E>
where
    E: From<ModelError>,
    F: FnOnce(&Tensor) -> std::result::Result<Tensor, E>,
{
    let recorded = Recorded::forward(model, inputs, weights)?;
    let loss = loss_fn(&recorded.velocity)?;
    Ok(recorded.backward(model, loss, weights)?)
}

/// Steps 1 to 3 up to the loss: the velocity, and what the backward needs.
struct Recorded {
    stem: Stem,
    temb_leaf: Tensor,
    /// Text tokens.
    t: i64,
    double_inputs: Vec<(Tensor, Tensor)>,
    single_inputs: Vec<Tensor>,
    h_leaf: Tensor,
    velocity: Tensor,
}

impl Recorded {
    fn forward(
        model: &FluxTransformer,
        inputs: &FluxInputs<'_>,
        weights: &mut dyn BlockWeights,
    ) -> Result<Self> {
        let stem = model.stem(inputs)?;
        let Stem { x, c, temb, rope } = &stem;
        let temb_leaf = leaf(temb)?;
        let t = c.size()[1];

        // 2. Forward without a graph, keeping block inputs only.
        let (double_inputs, single_inputs, h_out) = tch::no_grad(|| -> Result<_> {
            let (mut xi, mut ci) = (x.f_detach()?, c.f_detach()?);
            let mut double_inputs = Vec::with_capacity(model.double_blocks.len());
            let (nd, ns) = (model.double_blocks.len(), model.single_blocks.len());
            for (i, blk) in model.double_blocks.iter().enumerate() {
                let next = if i + 1 < nd { Some(Block::Double(i + 1)) } else { first_single(ns) };
                weights.gather(Block::Double(i), next)?;
                let (xo, co) = blk.forward(&xi, &ci, &temb_leaf, rope)?;
                weights.release(Block::Double(i))?;
                double_inputs.push((xi, ci));
                (xi, ci) = (xo, co);
            }
            let mut h = Tensor::f_cat(&[ci, xi], 1)?;
            let mut single_inputs = Vec::with_capacity(model.single_blocks.len());
            for (i, blk) in model.single_blocks.iter().enumerate() {
                weights.gather(Block::Single(i), (i + 1 < ns).then_some(Block::Single(i + 1)))?;
                let ho = blk.forward(&h, &temb_leaf, rope)?;
                weights.release(Block::Single(i))?;
                single_inputs.push(h);
                h = ho;
            }
            Ok((double_inputs, single_inputs, h))
        })?;

        // 3. Head and loss.
        let h_leaf = leaf(&h_out)?;
        drop(h_out);
        let velocity = model.head(&h_leaf.f_narrow(1, t, h_leaf.size()[1] - t)?, &temb_leaf)?;
        Ok(Self { stem, temb_leaf, t, double_inputs, single_inputs, h_leaf, velocity })
    }

    /// Steps 3 (the backward of `loss`) to 5. Returns the detached loss.
    fn backward(
        self,
        model: &FluxTransformer,
        loss: Tensor,
        weights: &mut dyn BlockWeights,
    ) -> Result<Tensor> {
        let Self { stem, temb_leaf, t, double_inputs, single_inputs, h_leaf, velocity } = self;
        let Stem { x, c, temb, rope } = stem;
        drop(velocity);
        loss.f_backward()?;
        let mut g = grad_of(&h_leaf)?;
        drop(h_leaf);
        // A loss that does not depend on the velocity here (a PPO ratio clipped on the side the
        // advantage favours) sends zeros into the blocks: their recomputation and backward would
        // only add zeros, so they are skipped.
        let local_zero = is_zero(&g)? && is_zero(&grad_of(&temb_leaf)?)?;
        if weights.skip_backward(local_zero)? {
            weights.finish()?;
            return Ok(loss.f_detach()?);
        }

        // 4. Recompute each block with grad, newest first.
        for (i, (blk, h_in)) in model.single_blocks.iter().zip(single_inputs).enumerate().rev() {
            let h_in = leaf(&h_in)?;
            let next = match i {
                0 => model.double_blocks.len().checked_sub(1).map(Block::Double),
                i => Some(Block::Single(i - 1)),
            };
            weights.gather(Block::Single(i), next)?;
            let out = blk.forward(&h_in, &temb_leaf, &rope)?;
            out.f_mul(&g)?.f_sum(out.kind())?.f_backward()?;
            drop(out);
            weights.reduce(Block::Single(i))?;
            g = grad_of(&h_in)?;
        }
        let n = g.size()[1] - t;
        let mut gc = g.f_narrow(1, 0, t)?;
        let mut gx = g.f_narrow(1, t, n)?;
        drop(g);
        for (i, (blk, (x_in, c_in))) in
            model.double_blocks.iter().zip(double_inputs).enumerate().rev()
        {
            let (x_in, c_in) = (leaf(&x_in)?, leaf(&c_in)?);
            weights.gather(Block::Double(i), i.checked_sub(1).map(Block::Double))?;
            let (xo, co) = blk.forward(&x_in, &c_in, &temb_leaf, &rope)?;
            let s = xo.f_mul(&gx)?.f_sum(xo.kind())? + co.f_mul(&gc)?.f_sum(co.kind())?;
            s.f_backward()?;
            drop((s, xo, co));
            weights.reduce(Block::Double(i))?;
            gx = grad_of(&x_in)?;
            gc = grad_of(&c_in)?;
        }

        // 5. Through the stem.
        let g_temb = grad_of(&temb_leaf)?;
        let s = x.f_mul(&gx)?.f_sum(x.kind())?
            + c.f_mul(&gc)?.f_sum(c.kind())?
            + temb.f_mul(&g_temb)?.f_sum(temb.kind())?;
        if s.requires_grad() {
            s.f_backward()?;
        }
        weights.finish()?;
        Ok(loss.f_detach()?)
    }
}
