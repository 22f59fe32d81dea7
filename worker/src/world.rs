//! The compute thread's state: the device, and this rank's place in the world, meaning the c10d
//! store and process group of the current generation. A new generation (a worker was lost and
//! its slot refilled) re-forms the group on a fresh store prefix without restarting this
//! process.

use std::sync::Arc;
use std::time::Duration;

use std::collections::BTreeMap;

use dancegrpo_proto::{JobConfig, RankAssignment, StepMetrics, WorkItem};
use tch::{Kind, Tensor};

use crate::device::Device;
use crate::dist::{Backend, Generations, GroupOptions, ProcessGroup, ReduceOp, Store};
use crate::error::{Error, Result};
use crate::train::trainer::{Place, Scored};
use crate::train::{TrainError, Trainer};

/// Everything the compute thread owns.
#[derive(Debug)]
pub struct World {
    device: Device,
    /// The store and whether this rank hosts it. The host keeps it across generations (its
    /// port stays bound); clients reconnect each generation.
    store: Option<(Arc<Store>, bool)>,
    group: Option<ProcessGroup>,
    /// Built on the first iteration; kept across generations (a re-formed world restores it
    /// from a checkpoint rather than reloading the model).
    trainer: Option<Trainer>,
    /// Intra-op threads to pin (`None`: libtorch's default).
    threads: Option<usize>,
}

impl World {
    /// State for `device`; nothing touches the device until [`World::init_device`].
    pub fn new(device: Device, threads: Option<usize>) -> Self {
        Self { device, store: None, group: None, trainer: None, threads }
    }

    /// Initialises the device on the calling (compute) thread, pins its intra-op thread count,
    /// and describes it.
    pub fn init_device(&mut self) -> Result<String> {
        match self.threads {
            Some(n) => crate::threads::pin(n),
            None => _ = crate::threads::pin_default(),
        }
        self.device.init()?;
        Ok(match self.device {
            Device::Cpu => crate::compute::describe_cpu(),
            other => other.to_string(),
        })
    }

    /// The trainer, built for `cfg` on first use.
    pub fn trainer(&mut self, cfg: &JobConfig) -> Result<&mut Trainer, TrainError> {
        if self.trainer.is_none() {
            tracing::info!(model = %cfg.pretrained_model_name_or_path, "loading the policy");
            let place = self.place();
            self.trainer = Some(Trainer::new(cfg, self.device, place)?);
        }
        Ok(self.trainer.as_mut().expect("built above"))
    }

    /// After a panic: drops the trainer, whose state is unknown (the next [`World::trainer`]
    /// builds it again), and the process group, so that peers waiting in a collective with
    /// this rank fail at once, as if it had died, instead of at the collective timeout.
    pub fn discard_after_panic(&mut self) {
        self.trainer = None;
        self.group = None;
    }

    /// This rank's place in the current world (rank 0 of 1 before any group is joined).
    pub fn place(&self) -> Place {
        place_of(self.group.as_ref())
    }

    /// The step the trainer's weights are at, as GetWork wants it: `None` after an interrupted
    /// update, and when its sharded state is cut for another place than this rank's in the
    /// current world (a re-formed world renumbered it), so that the coordinator restores it.
    pub fn ready_for(&mut self) -> Result<Option<u64>, TrainError> {
        let place = self.place();
        let t = self.loaded_trainer()?;
        Ok(t.ready_for().filter(|_| t.sharded_place().is_none_or(|cut| cut == place)))
    }

    /// Restores the trainer to `step` from `dir`, its state cut for the current world.
    pub fn restore(&mut self, step: u64, dir: Option<&std::path::Path>) -> Result<(), TrainError> {
        let place = self.place();
        self.loaded_trainer()?.restore(step, dir, place)
    }

    /// Writes `checkpoint-<step>` (every rank takes part when the state is sharded).
    pub fn save_checkpoint(
        &mut self,
        step: u64,
        trainer_state_json: &str,
    ) -> Result<Option<std::path::PathBuf>, TrainError> {
        let trainer =
            self.trainer.as_mut().ok_or_else(|| TrainError::Invalid("no trainer loaded".into()))?;
        check_cut(trainer, place_of(self.group.as_ref()))?;
        trainer.save_checkpoint(step, trainer_state_json, self.group.as_mut())
    }

    /// The trainer built by [`World::trainer`].
    pub fn loaded_trainer(&mut self) -> Result<&mut Trainer, TrainError> {
        self.trainer.as_mut().ok_or_else(|| TrainError::Invalid("no trainer loaded".into()))
    }

    /// Rolls out `items` (over the current group when a sharded rollout gathers per forward).
    pub fn rollout(&mut self, items: &[WorkItem]) -> Result<Scored, TrainError> {
        let trainer =
            self.trainer.as_mut().ok_or_else(|| TrainError::Invalid("no trainer loaded".into()))?;
        check_cut(trainer, place_of(self.group.as_ref()))?;
        trainer.rollout(items, self.group.as_mut())
    }

    /// One update on this rank's trajectories, all-reducing over the current group.
    pub fn train(
        &mut self,
        iteration: u64,
        work: &[WorkItem],
        advantages: &BTreeMap<(u64, u32), Vec<f64>>,
    ) -> Result<StepMetrics, TrainError> {
        let trainer =
            self.trainer.as_mut().ok_or_else(|| TrainError::Invalid("no trainer loaded".into()))?;
        // Fault injection for the tests (`FAILPOINTS=train=1*panic(...)`); a no-op otherwise.
        fail::fail_point!("train");
        check_cut(trainer, place_of(self.group.as_ref()))?;
        trainer.train(iteration, work, advantages, self.group.as_mut())
    }

    /// The current group, if this rank has joined one.
    pub fn group(&mut self) -> Option<&mut ProcessGroup> {
        self.group.as_mut()
    }

    /// Joins the world of `a` and proves it works: a barrier, then an all-reduce whose result
    /// every rank can predict. Returns the backend used. Abandoned with
    /// [`DistError::Abandoned`](crate::dist::DistError::Abandoned) as soon as `generations`
    /// holds a newer generation than `a`'s.
    pub fn join(
        &mut self,
        a: &RankAssignment,
        backend_override: &str,
        timeout: Duration,
        generations: &Generations,
    ) -> Result<Backend> {
        let backend = Backend::resolve(self.device, backend_override)?;
        let options = GroupOptions::default()
            .with_timeout(timeout)
            .abandon_when_superseded(generations.clone(), a.generation);
        // The previous generation's group must go before its store can be replaced, and what
        // the trainer holds of it before the group.
        if let Some(t) = &mut self.trainer {
            t.leave_group();
        }
        self.group = None;
        let is_master = a.rank == 0;
        let reuse = match &self.store {
            Some((s, was_master)) => {
                *was_master && is_master && s.port() == a.store.port && a.store.host == s_host(s)
            }
            None => false,
        };
        let store = match (&self.store, reuse) {
            (Some((s, _)), true) => s.clone(),
            _ => {
                self.store = None;
                Store::connect_abandonable(&a.store.host, a.store.port, is_master, &options)?
            }
        };
        self.store = Some((store.clone(), is_master));
        let mut group = ProcessGroup::with_store(
            store,
            &a.store.prefix,
            a.rank,
            a.world_size,
            backend,
            &options,
        )?;
        group.barrier()?;
        let mut probe = self.device.to(&Tensor::from_slice(&[1.0f32]))?;
        group.all_reduce(&mut probe, ReduceOp::Sum)?;
        let got = probe.to_kind(Kind::Double).double_value(&[0]);
        if got != f64::from(a.world_size) {
            return Err(Error::Compute(format!(
                "all-reduce check of generation {} gave {got}, expected {}",
                a.generation, a.world_size
            )));
        }
        self.group = Some(group);
        Ok(backend)
    }
}

/// The place of a rank in `group`'s world (rank 0 of 1 without one).
fn place_of(group: Option<&ProcessGroup>) -> Place {
    group.map_or((0, 1), |g| (g.rank(), g.world_size()))
}

/// A sharded trainer's state must be cut for this rank's place before it takes part in the
/// world's collectives.
fn check_cut(trainer: &Trainer, place: Place) -> Result<(), TrainError> {
    match trainer.sharded_place() {
        Some(cut) if cut != place => Err(TrainError::Invalid(format!(
            "the sharded state is cut for rank {} of {}, but this rank is {} of {}: a new world \
             must restore a checkpoint first",
            cut.0, cut.1, place.0, place.1
        ))),
        _ => Ok(()),
    }
}

fn s_host(s: &Store) -> String {
    s.addr().rsplit_once(':').map(|(h, _)| h.to_string()).unwrap_or_default()
}
