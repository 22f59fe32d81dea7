//! The one attention call the FLUX transformer, the VAE mid-block and the CLIP towers share:
//! unmasked, non-causal `scaled_dot_product_attention`, which takes the fused kernels on CUDA.

use tch::{TchError, Tensor};

/// `softmax(q·kᵀ/√d)·v` over the last two dimensions, no mask, no dropout.
pub(crate) fn attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor, TchError> {
    Tensor::f_scaled_dot_product_attention(q, k, v, None::<Tensor>, 0.0, false, None, false)
}
