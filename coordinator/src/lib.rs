//! The dancegrpo coordinator: admits the workers of a job, hands out ranks and the c10d
//! rendezvous, watches heartbeats, and serves the job status. It never links libtorch.
//!
//! Layout: [`config`] loads what to run, [`state`] is the job's live state over the embedded
//! [`db`], [`service`] is the gRPC edge, [`server`] assembles it, and [`cli`] is the client side
//! of the status API.

/// Status, watch and list commands: the client side of the job API.
pub mod cli;
/// Job config loading (file, environment, flags) and process settings.
pub mod config;
/// The embedded SQLite database.
pub mod db;
/// The error type and its mapping to gRPC status codes.
pub mod error;
/// One iteration's bookkeeping: work, rewards, advantages, refills, metrics.
pub mod iteration;
/// The job's and the workers' lifecycles as state machines.
pub mod lifecycle;
/// Prometheus `/metrics`.
pub mod metrics;
/// Reward log, metrics log, reward curve, trainer state, prompt count.
pub mod outputs;
/// Reward-curve PNG.
pub mod plot;
/// The checks of the job's files before anything starts.
pub mod preflight;
/// The reward log (one float per line, as the reference writes it).
pub mod reward_log;
/// Prompt shuffle and per-worker work items of an iteration.
pub mod schedule;
/// Server assembly: services, health, reflection, loss detection.
pub mod server;
/// gRPC service implementations.
pub mod service;
/// The job's live state.
pub mod state;
/// TensorBoard event files: scalars and sample grids.
pub mod tensorboard;
/// Shared builders of the unit tests.
#[cfg(test)]
mod testing;

pub use error::{Error, Result};
