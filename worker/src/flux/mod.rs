//! The FLUX.1 transformer (`FluxTransformer2DModel`) in tch: config, model, weight loading in
//! the diffusers and BFL layouts, and activation checkpointing for training.
//!
//! Layout: [`config`] (diffusers `config.json`), [`model`] (the network, diffusers variable
//! names), [`weights`] (streaming safetensors reader), [`load`] (layouts and key mapping),
//! [`checkpoint`] (per-block recomputation), [`error`] (the error type of all model code).

/// Activation checkpointing for the training forward + backward.
pub mod checkpoint;
/// The transformer's hyperparameters.
pub mod config;
/// The error type shared by the model modules.
pub mod error;
/// Checkpoint layouts (diffusers folder, BFL file) and loading.
pub mod load;
/// LoRA adapters with PEFT semantics and keys.
pub mod lora;
/// The network.
pub mod model;
/// Memory-mapped safetensors reading.
pub mod weights;

pub use config::FluxConfig;
pub use error::{ModelError, Result};
pub use load::{Layout, LoadedFlux, WeightPolicy, load_flux};
pub use model::{FluxInputs, FluxTransformer};
