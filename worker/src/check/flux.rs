//! `check flux-forward | vae-decode | sde-step`: run one model component on tensors from a safetensors file and
//! write the results to another, so parity can be checked from outside (e.g. against a Python
//! reference) with any weights. Every subcommand's `--help` lists the tensor names.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand, ValueEnum};
use tch::{Device, Kind, Tensor};

use crate::flux::error::{ModelError, Result};
use crate::flux::weights::SafetensorsFile;
use crate::flux::{FluxInputs, WeightPolicy, load_flux};
use crate::sampler::{Next, Schedule, sde_step};
use crate::vae::{load_vae, to_uint8};

/// The model-check subcommands.
#[derive(Subcommand, Debug)]
pub enum FluxCheck {
    /// FLUX transformer forward pass.
    ///
    /// --model-dir: a diffusers `transformer/` folder (index + shards, or one file, with
    /// config.json), a pipeline root holding `transformer/`, a BFL single file, or a folder
    /// holding one BFL file (plus config.json unless it is a FLUX-sized model).
    ///
    /// Input tensors: hidden_states [B,N,in_channels], encoder_hidden_states [B,T,joint_dim],
    /// pooled_projections [B,pooled_dim], timestep [B] (σ in [0,1]), guidance [B] (models with
    /// guidance_embeds), img_ids [N,3], txt_ids [T,3].
    /// Output tensors: output [B,N,out_channels] (f32).
    #[command(verbatim_doc_comment)]
    FluxForward(FluxForwardArgs),
    /// FLUX VAE decode and uint8 post-processing.
    ///
    /// --model-dir: a diffusers `vae/` folder (config.json + diffusion_pytorch_model.safetensors)
    /// or a pipeline root holding `vae/`.
    ///
    /// Input tensors, one of: latents [B,16,h,w] (VAE space: already latents/scaling+shift), or
    /// packed_latents [B,N,64] with --height/--width (unpacked, then /scaling_factor +
    /// shift_factor, as the FLUX pipeline does).
    /// Output tensors: image [B,3,H,W] (f32, about [-1,1]), image_u8 [B,H,W,3] (uint8 RGB).
    #[command(verbatim_doc_comment)]
    VaeDecode(VaeDecodeArgs),
    /// One DanceGRPO SDE step (formula only, no model).
    ///
    /// Input tensors: v [B,...] (velocity), x [B,...] (current latent), sigmas [S+1] (f32 σ
    /// schedule), and one of noise [B,...] (standard normal: samples next = μ + s·noise) or
    /// next [B,...] (a stored next latent, whose log-prob is computed).
    /// Output tensors: mean (μ), next, log_prob [B], x0; all f32.
    #[command(verbatim_doc_comment)]
    SdeStep(SdeStepArgs),
}

/// Arithmetic of the model checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CheckDtype {
    /// f32 weights and activations.
    F32,
    /// bf16 weights and activations.
    Bf16,
}

impl CheckDtype {
    fn kind(self) -> Kind {
        match self {
            CheckDtype::F32 => Kind::Float,
            CheckDtype::Bf16 => Kind::BFloat16,
        }
    }
}

/// Options shared by the model checks.
#[derive(Args, Debug)]
pub struct Common {
    /// The model directory (see the subcommand's description).
    #[arg(long)]
    pub model_dir: PathBuf,
    /// The input safetensors file.
    #[arg(long)]
    pub inputs: PathBuf,
    /// Where to write the output safetensors file.
    #[arg(long)]
    pub out: PathBuf,
    /// Weight and activation dtype.
    #[arg(long, value_enum, default_value_t = CheckDtype::F32)]
    pub dtype: CheckDtype,
    /// Device: `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// `check flux-forward`.
#[derive(Args, Debug)]
pub struct FluxForwardArgs {
    /// Model, files, dtype and device.
    #[command(flatten)]
    pub common: Common,
}

/// `check vae-decode`.
#[derive(Args, Debug)]
pub struct VaeDecodeArgs {
    /// Model, files, dtype and device.
    #[command(flatten)]
    pub common: Common,
    /// Image height in pixels (with packed_latents).
    #[arg(long)]
    pub height: Option<i64>,
    /// Image width in pixels (with packed_latents).
    #[arg(long)]
    pub width: Option<i64>,
}

/// `check sde-step`.
#[derive(Args, Debug)]
pub struct SdeStepArgs {
    /// The input safetensors file.
    #[arg(long)]
    pub inputs: PathBuf,
    /// Where to write the output safetensors file.
    #[arg(long)]
    pub out: PathBuf,
    /// Step index i (σ_i → σ_{i+1}).
    #[arg(long)]
    pub step: usize,
    /// SDE noise level η.
    #[arg(long, default_value_t = 0.3)]
    pub eta: f64,
}

/// Runs one check command.
pub fn run(cmd: FluxCheck) -> anyhow::Result<()> {
    match cmd {
        FluxCheck::FluxForward(a) => Ok(flux_forward(&a.common)?),
        FluxCheck::VaeDecode(a) => Ok(vae_decode(&a)?),
        FluxCheck::SdeStep(a) => sde(&a),
    }
}

fn parse_device(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::Cuda(0)),
        _ => {
            s.strip_prefix("cuda:").and_then(|n| n.parse().ok()).map(Device::Cuda).ok_or_else(
                || ModelError::Input(format!("unknown device {s:?} (cpu, cuda, cuda:N)")),
            )
        }
    }
}

struct Inputs {
    path: PathBuf,
    tensors: BTreeMap<String, Tensor>,
}

impl Inputs {
    fn read(path: &Path, device: Device) -> Result<Self> {
        let tensors = SafetensorsFile::open(path)?
            .read_all()?
            .into_iter()
            .map(|(k, t)| t.f_to_device(device).map(|t| (k, t)))
            .collect::<std::result::Result<_, _>>()?;
        Ok(Self { path: path.to_path_buf(), tensors })
    }

    fn get(&self, name: &str) -> Result<&Tensor> {
        self.tensors.get(name).ok_or_else(|| {
            ModelError::Input(format!(
                "{} has no tensor {name:?} (it has: {})",
                self.path.display(),
                self.tensors.keys().cloned().collect::<Vec<_>>().join(", ")
            ))
        })
    }
}

fn write(path: &Path, tensors: &[(&str, Tensor)]) -> Result<()> {
    let t = tensors
        .iter()
        .map(|(k, t)| Ok((k.to_string(), t.f_to_device(Device::Cpu)?.f_contiguous()?)))
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::write_safetensors(&t, path)?)
}

fn flux_forward(c: &Common) -> Result<()> {
    let device = parse_device(&c.device)?;
    let policy = match c.dtype {
        CheckDtype::F32 => WeightPolicy::Frozen(Kind::Float),
        CheckDtype::Bf16 => WeightPolicy::FrozenBf16,
    };
    let m = load_flux(&c.model_dir, device, policy)?;
    let i = Inputs::read(&c.inputs, device)?;
    let guidance = if m.model.config().guidance_embeds { Some(i.get("guidance")?) } else { None };
    let inputs = FluxInputs {
        hidden_states: i.get("hidden_states")?,
        encoder_hidden_states: i.get("encoder_hidden_states")?,
        pooled_projections: i.get("pooled_projections")?,
        timestep: i.get("timestep")?,
        guidance,
        img_ids: i.get("img_ids")?,
        txt_ids: i.get("txt_ids")?,
    };
    let out = tch::no_grad(|| m.model.forward(&inputs))?;
    write(&c.out, &[("output", out.f_to_kind(Kind::Float)?)])
}

fn vae_decode(a: &VaeDecodeArgs) -> Result<()> {
    let c = &a.common;
    let device = parse_device(&c.device)?;
    let vae = load_vae(&c.model_dir, device, c.dtype.kind())?;
    let i = Inputs::read(&c.inputs, device)?;
    let image = tch::no_grad(|| -> Result<Tensor> {
        if let Ok(z) = i.get("latents") {
            return vae.decoder.decode(z);
        }
        let packed = i.get("packed_latents").map_err(|_| {
            ModelError::Input(format!("{} needs `latents` or `packed_latents`", i.path.display()))
        })?;
        let (Some(h), Some(w)) = (a.height, a.width) else {
            return Err(ModelError::Input("packed_latents need --height and --width".into()));
        };
        vae.decoder.decode_packed(packed, h, w)
    })?;
    write(&c.out, &[("image", image.f_to_kind(Kind::Float)?), ("image_u8", to_uint8(&image)?)])
}

fn sde(a: &SdeStepArgs) -> anyhow::Result<()> {
    let i = Inputs::read(&a.inputs, Device::Cpu)?;
    let sigmas = Vec::<f32>::try_from(&i.get("sigmas")?.f_to_kind(Kind::Float)?.f_flatten(0, -1)?)?;
    let sched = Schedule::from_sigmas(sigmas)?;
    let next = match (i.get("noise"), i.get("next")) {
        (Ok(n), _) => Next::Noise(n),
        (_, Ok(z)) => Next::Given(z),
        _ => {
            return Err(
                ModelError::Input(format!("{} needs `noise` or `next`", i.path.display())).into()
            );
        }
    };
    let out = sde_step(i.get("v")?, i.get("x")?, &sched, a.step, a.eta, next)?;
    Ok(write(
        &a.out,
        &[("mean", out.mean), ("next", out.next), ("log_prob", out.log_prob), ("x0", out.x0)],
    )?)
}
