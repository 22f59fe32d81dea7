//! A worker's side of the world's lifecycle, as a state machine: which process group it is
//! forming or training in. Pure: [`Phase::on`] takes an event and says what to start; the
//! driver loop in `lib.rs` owns the futures and the exits (the job's end, a fatal error).
//!
//! ```text
//!            Assigned(g)            Joined               Paused
//!   Idle ────────────────> Joining ────────> Training ──────────> Paused
//!    ^  (g not yet tried)     │                 ^  │                │
//!    │   Abandoned | Failed   │                 │  │  Assigned(h)   │ RetryDue
//!    └────────────────────────┘                 │  └──> Joining(h)  │
//!                                               └───────────────────┘
//! ```
//!
//! A newer assignment while joining is not handled here: the rendezvous in progress watches
//! the assigned generations itself and is abandoned at once, which brings the phase back to
//! `Idle`, where the newer assignment starts the next join.

use dancegrpo_proto::RankAssignment;
use tokio::time::Instant;

/// Where a worker is in the world's lifecycle.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum Phase {
    /// No world assigned yet.
    #[default]
    Idle,
    /// This generation could not form, or was abandoned for a newer one; waiting for an
    /// assignment of another.
    Tried(u64),
    /// Forming the process group of this assignment.
    Joining(RankAssignment),
    /// Training in the formed group of this assignment.
    Training(RankAssignment),
    /// The group is formed but training stopped (a transient error, a caught panic): it is
    /// tried again at `until`, unless a newer world is assigned first.
    Paused {
        /// The formed group's assignment.
        assignment: RankAssignment,
        /// When to try again.
        until: Instant,
    },
}

/// What happens to a worker's world.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// The coordinator's newest assignment (seen again on every turn of the loop).
    Assigned(RankAssignment),
    /// The process group formed.
    Joined,
    /// The rendezvous was called off: a newer generation was assigned.
    Abandoned,
    /// The group could not form (a peer slow, gone or not yet back), and why.
    JoinFailed(String),
    /// Training stopped, to be tried again at this time.
    Paused(Instant),
    /// The time to try again has come.
    RetryDue,
}

/// What the loop starts after a transition.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Nothing new.
    None,
    /// Form this assignment's process group; whatever the old world was doing is void.
    Join(RankAssignment),
    /// Train in this assignment's formed group (from the coordinator's step and checkpoint).
    Train(RankAssignment),
    /// Tell the coordinator this generation cannot form, and why, so that it re-forms the
    /// world.
    ReportFailedJoin {
        /// The generation.
        generation: u64,
        /// Why it cannot.
        why: String,
    },
}

impl Phase {
    /// The generation this worker is forming or has formed, or last tried.
    pub fn generation(&self) -> Option<u64> {
        match self {
            Phase::Idle => None,
            Phase::Tried(g) => Some(*g),
            Phase::Joining(a) | Phase::Training(a) | Phase::Paused { assignment: a, .. } => {
                Some(a.generation)
            }
        }
    }

    /// Moves on `event` and says what to start. An event that does not apply to the phase
    /// (a join result while training, say) changes nothing.
    pub fn on(&mut self, event: Event) -> Action {
        let (next, action) = match (std::mem::take(self), event) {
            // A generation not tried yet, with no join in progress: form it, dropping the
            // old world's training.
            (
                p @ (Phase::Idle | Phase::Tried(_) | Phase::Training(_) | Phase::Paused { .. }),
                Event::Assigned(a),
            ) if p.generation() != Some(a.generation) => {
                (Phase::Joining(a.clone()), Action::Join(a))
            }
            (Phase::Joining(a), Event::Joined) => (Phase::Training(a.clone()), Action::Train(a)),
            (Phase::Joining(a), Event::Abandoned) => (Phase::Tried(a.generation), Action::None),
            (Phase::Joining(a), Event::JoinFailed(why)) => (
                Phase::Tried(a.generation),
                Action::ReportFailedJoin { generation: a.generation, why },
            ),
            (Phase::Training(assignment), Event::Paused(until)) => {
                (Phase::Paused { assignment, until }, Action::None)
            }
            (Phase::Paused { assignment, .. }, Event::RetryDue) => {
                (Phase::Training(assignment.clone()), Action::Train(assignment))
            }
            (p, _) => (p, Action::None),
        };
        *self = next;
        action
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use dancegrpo_proto::StoreAddress;

    use super::*;

    fn world(generation: u64) -> RankAssignment {
        RankAssignment {
            rank: 1,
            world_size: 2,
            generation,
            store: StoreAddress { host: "h".into(), port: 1, prefix: format!("g{generation}/") },
        }
    }

    fn phases(until: Instant) -> Vec<Phase> {
        vec![
            Phase::Idle,
            Phase::Tried(1),
            Phase::Joining(world(1)),
            Phase::Training(world(1)),
            Phase::Paused { assignment: world(1), until },
        ]
    }

    /// Every (phase, event) pair: the transitions written out once more by hand, and every
    /// other pair leaves the phase as it was and starts nothing.
    #[test]
    fn each_transition_and_every_pair_that_changes_nothing() {
        let until = Instant::now() + Duration::from_secs(2);
        let events = [
            Event::Assigned(world(1)),
            Event::Assigned(world(2)),
            Event::Joined,
            Event::Abandoned,
            Event::JoinFailed("timeout".into()),
            Event::Paused(until),
            Event::RetryDue,
        ];
        use Action as A;
        use Event as E;
        let paused = Phase::Paused { assignment: world(1), until };
        let moves: Vec<(Phase, Event, Phase, Action)> = vec![
            (Phase::Idle, E::Assigned(world(1)), Phase::Joining(world(1)), A::Join(world(1))),
            (Phase::Idle, E::Assigned(world(2)), Phase::Joining(world(2)), A::Join(world(2))),
            // A generation that failed is not tried again; a newer one is.
            (Phase::Tried(1), E::Assigned(world(2)), Phase::Joining(world(2)), A::Join(world(2))),
            (Phase::Joining(world(1)), E::Joined, Phase::Training(world(1)), A::Train(world(1))),
            (Phase::Joining(world(1)), E::Abandoned, Phase::Tried(1), A::None),
            (
                Phase::Joining(world(1)),
                E::JoinFailed("timeout".into()),
                Phase::Tried(1),
                A::ReportFailedJoin { generation: 1, why: "timeout".into() },
            ),
            // A re-formed world drops the old one's training, paused or not.
            (
                Phase::Training(world(1)),
                E::Assigned(world(2)),
                Phase::Joining(world(2)),
                A::Join(world(2)),
            ),
            (Phase::Training(world(1)), E::Paused(until), paused.clone(), A::None),
            (paused.clone(), E::Assigned(world(2)), Phase::Joining(world(2)), A::Join(world(2))),
            (paused.clone(), E::RetryDue, Phase::Training(world(1)), A::Train(world(1))),
        ];
        for from in phases(until) {
            for event in &events {
                let mut p = from.clone();
                let action = p.on(event.clone());
                let want = moves.iter().find(|(f, e, _, _)| *f == from && e == event);
                match want {
                    Some((_, _, to, act)) => {
                        assert_eq!((&p, &action), (to, act), "{from:?} on {event:?}");
                    }
                    None => {
                        assert_eq!((&p, &action), (&from, &A::None), "{from:?} on {event:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_worker_goes_through_a_failed_world_and_a_pause_to_training() {
        let mut p = Phase::default();
        assert_eq!(p.on(Event::Assigned(world(1))), Action::Join(world(1)));
        // The loop sees the same assignment on every turn: no second join.
        assert_eq!(p.on(Event::Assigned(world(1))), Action::None);
        let failed = Action::ReportFailedJoin { generation: 1, why: "rank 0 gone".into() };
        assert_eq!(p.on(Event::JoinFailed("rank 0 gone".into())), failed);
        assert_eq!(p.on(Event::Assigned(world(1))), Action::None, "not retried");
        assert_eq!(p.on(Event::Assigned(world(2))), Action::Join(world(2)));
        assert_eq!(p.on(Event::Joined), Action::Train(world(2)));
        assert_eq!(p.on(Event::Paused(Instant::now())), Action::None);
        assert_eq!(p.generation(), Some(2));
        assert_eq!(p.on(Event::RetryDue), Action::Train(world(2)));
        assert_eq!(p, Phase::Training(world(2)));
    }
}
