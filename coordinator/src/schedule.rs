//! What each iteration trains on: the seeded prompt shuffle with its resumable cursor, and the
//! split of an iteration's P prompts × G members into equal per-worker work items
//! (DESIGN.md "The step protocol", step 1).

use dancegrpo_proto::WorkItem;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Position in the shuffled prompt stream. Persisted with the job, so a resumed job draws
/// exactly the prompts the uninterrupted one would have.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    /// Completed passes over the dataset.
    pub epoch: u64,
    /// Next position in this epoch's permutation.
    pub offset: u64,
}

/// Seeded epoch-wise shuffle of `0..len`, like a `DistributedSampler(shuffle=True)` whose
/// loader is restarted when it runs out (the reference's behaviour, ALGORITHM.md §6).
#[derive(Clone, Debug)]
pub struct PromptSampler {
    seed: u64,
    len: u64,
    cursor: Cursor,
    perm: Vec<u64>,
}

impl PromptSampler {
    /// A sampler over `len` prompts, positioned at `cursor`.
    pub fn new(seed: u64, len: u64, cursor: Cursor) -> Self {
        assert!(len > 0, "an empty dataset has no prompts to sample");
        let perm = Self::permutation(seed, len, cursor.epoch);
        Self { seed, len, cursor, perm }
    }

    fn permutation(seed: u64, len: u64, epoch: u64) -> Vec<u64> {
        // One independent stream per epoch, so epoch e's order never depends on how many
        // draws earlier epochs made.
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(epoch);
        let mut p: Vec<u64> = (0..len).collect();
        p.shuffle(&mut rng);
        p
    }

    /// The next `n` prompt indices.
    pub fn take(&mut self, n: usize) -> Vec<u64> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            if self.cursor.offset == self.len {
                self.cursor = Cursor { epoch: self.cursor.epoch + 1, offset: 0 };
                self.perm = Self::permutation(self.seed, self.len, self.cursor.epoch);
            }
            out.push(self.perm[self.cursor.offset as usize]);
            self.cursor.offset += 1;
        }
        out
    }

    /// Where the next draw starts.
    pub fn cursor(&self) -> Cursor {
        self.cursor
    }
}

/// Seed of a group's noise: a fixed function of (job seed, iteration, group, attempt), so any
/// trajectory can be replayed on its own. Members share it (the worker keys each member's SDE
/// noise by its index, and `init_same_noise` shares the initial latent within the group).
pub fn trajectory_seed(job_seed: u64, iteration: u64, group: u64, attempt: u32) -> u64 {
    // SplitMix64 finalizer over the packed fields: cheap, stable across releases, and
    // well-mixed enough that neighbouring trajectories get unrelated streams.
    let mut z = job_seed
        ^ iteration.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ group.wrapping_mul(0xC2B2_AE3D_27D4_EB4F)
        ^ u64::from(attempt).wrapping_mul(0x1656_67B1_9E37_79F9);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Splits one iteration into per-rank work lists: groups in order, members contiguous, and
/// every rank the same number of trajectories, so the optimizer steps line up across ranks.
/// A group may span two ranks.
pub fn plan_iteration(
    iteration: u64,
    prompts: &[u64],
    num_generations: u32,
    world_size: u32,
    job_seed: u64,
) -> Result<Vec<Vec<WorkItem>>, String> {
    let total = prompts.len() as u64 * u64::from(num_generations);
    if world_size == 0 || total % u64::from(world_size) != 0 {
        return Err(format!(
            "{} prompts x {num_generations} generations = {total} trajectories do not split \
             evenly over {world_size} workers",
            prompts.len()
        ));
    }
    let per_rank = (total / u64::from(world_size)) as usize;
    let items: Vec<WorkItem> = prompts
        .iter()
        .enumerate()
        .flat_map(|(g, &prompt_index)| {
            (0..num_generations).map(move |m| WorkItem {
                iteration,
                prompt_index,
                group_id: g as u64,
                member_index: m,
                seed: trajectory_seed(job_seed, iteration, g as u64, 0),
            })
        })
        .collect();
    Ok(items.chunks(per_rank).map(<[WorkItem]>::to_vec).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn each_epoch_is_a_permutation_and_epochs_differ() {
        let mut s = PromptSampler::new(7, 10, Cursor::default());
        let e0 = s.take(10);
        let e1 = s.take(10);
        for e in [&e0, &e1] {
            assert_eq!(e.iter().copied().collect::<HashSet<_>>().len(), 10);
        }
        assert_ne!(e0, e1);
        assert_eq!(s.cursor(), Cursor { epoch: 1, offset: 10 });
        assert_ne!(PromptSampler::new(8, 10, Cursor::default()).take(10), e0, "seed matters");
    }

    #[test]
    fn resuming_from_a_cursor_draws_what_the_uninterrupted_run_draws() {
        let mut straight = PromptSampler::new(1223627, 7, Cursor::default());
        let all: Vec<u64> = (0..6).flat_map(|_| straight.take(3)).collect();
        let mut first = PromptSampler::new(1223627, 7, Cursor::default());
        let mut got: Vec<u64> = (0..3).flat_map(|_| first.take(3)).collect();
        let mut resumed = PromptSampler::new(1223627, 7, first.cursor());
        got.extend((0..3).flat_map(|_| resumed.take(3)));
        assert_eq!(got, all);
    }

    #[test]
    fn work_is_split_evenly_and_covers_every_trajectory_once() {
        let plan = plan_iteration(3, &[5, 9, 2], 4, 4, 42).unwrap();
        assert_eq!(plan.len(), 4);
        assert!(plan.iter().all(|r| r.len() == 3));
        let flat: Vec<&WorkItem> = plan.iter().flatten().collect();
        let keys: HashSet<(u64, u32)> = flat.iter().map(|w| (w.group_id, w.member_index)).collect();
        assert_eq!(keys.len(), 12);
        // Group 0 (prompt 5) spans ranks 0 and 1.
        assert_eq!(plan[0].iter().filter(|w| w.prompt_index == 5).count(), 3);
        assert_eq!(plan[1][0].prompt_index, 5);
        let seeds: HashSet<(u64, u64)> = flat.iter().map(|w| (w.group_id, w.seed)).collect();
        assert_eq!(seeds.len(), 3, "one seed per group, distinct between groups");
        assert!(flat.iter().all(|w| w.iteration == 3));
        let e = plan_iteration(0, &[1, 2, 3], 3, 2, 0).unwrap_err();
        assert!(e.contains("do not split evenly over 2 workers"), "{e}");
    }
}
