//! What the simulated workers share in place of a collective: the step barrier an all-reduce
//! would be (a dead rank makes it fail for everyone, as a closed ring socket does), and what
//! the benchmark learns from the coordinator's answers (generations formed, commits, and with
//! `--verify` every sample fed, to check exactly-once and full batches).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::time::Instant;

use ferroclip_proto::v1::SampleRef;
use tokio::sync::Notify;

/// Per committed step: (generation, world, per rank the samples fed).
type Fed = BTreeMap<u64, (u64, u32, BTreeMap<u32, Vec<SampleRef>>)>;

#[derive(Default)]
struct State {
    /// (generation, step) → ranks that reached the barrier.
    arrived: HashMap<(u64, u64), u32>,
    /// generation → newest step whose barrier opened.
    released: HashMap<u64, u64>,
    /// generation → when its first barrier opened: the world's common clock.
    opened: HashMap<u64, tokio::time::Instant>,
    /// generation → the rank that died in it, and whether its failure was reported.
    dead: HashMap<u64, (u32, bool)>,
    /// Generations a rank left to join again (its ring is broken for the others).
    broken: HashSet<u64>,
    killed_at: Option<Instant>,
    recovery_s: Option<f64>,
    /// generation → (first Join sent, last Join answered).
    formed: BTreeMap<u64, (Instant, Instant)>,
    committed: u64,
    first_commit: Option<Instant>,
    last_commit: Option<Instant>,
    /// step → (generation, world, per rank the samples fed) (`--verify` only).
    fed: Fed,
}

pub struct Gate {
    state: Mutex<State>,
    notify: Notify,
    kill_at: Option<u64>,
}

/// How a barrier ended.
pub enum Barrier {
    Passed,
    /// Rank `dead` died in the generation.
    Failed {
        dead: u32,
    },
    /// A rank left the generation to join again (the coordinator ended it).
    Broken,
}

impl Gate {
    pub fn new(kill_at: Option<u64>) -> Self {
        Self {
            state: Mutex::new(State::default()),
            notify: Notify::new(),
            kill_at,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn joined(&self, generation: u64, sent: Instant, answered: Instant) {
        let mut s = self.lock();
        let e = s.formed.entry(generation).or_insert((sent, answered));
        e.0 = e.0.min(sent);
        e.1 = e.1.max(answered);
    }

    /// Seconds from the first Join to the last answer of generation `g`.
    pub fn form_s(&self, generation: u64) -> Option<f64> {
        let s = self.lock();
        s.formed
            .get(&generation)
            .map(|(a, b)| b.duration_since(*a).as_secs_f64())
    }

    /// Whether the rank at `step` of `generation` is the one that dies (once per benchmark).
    pub fn dies(&self, generation: u64, rank: u32, world: u32, step: u64) -> bool {
        if self.kill_at != Some(step) || rank + 1 != world || world < 2 {
            return false;
        }
        let mut s = self.lock();
        if s.killed_at.is_some() {
            return false;
        }
        s.killed_at = Some(Instant::now());
        s.dead.insert(generation, (rank, false));
        drop(s);
        self.notify.notify_waiters();
        true
    }

    /// The all-reduce of `step`: waits until all `world` ranks reached it, or one died.
    pub async fn barrier(&self, generation: u64, step: u64, world: u32) -> Barrier {
        {
            let mut s = self.lock();
            let n = s.arrived.entry((generation, step)).or_insert(0);
            *n += 1;
            if *n >= world {
                s.arrived.remove(&(generation, step));
                s.released.insert(generation, step);
                s.opened
                    .entry(generation)
                    .or_insert_with(tokio::time::Instant::now);
                drop(s);
                self.notify.notify_waiters();
                return Barrier::Passed;
            }
        }
        loop {
            let woken = self.notify.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            {
                let s = self.lock();
                if let Some((dead, _)) = s.dead.get(&generation) {
                    return Barrier::Failed { dead: *dead };
                }
                if s.broken.contains(&generation) {
                    return Barrier::Broken;
                }
                if s.released.get(&generation).is_some_and(|r| *r >= step) {
                    return Barrier::Passed;
                }
            }
            woken.await;
        }
    }

    /// When `generation`'s first barrier opened (every rank left it then, as all leave an
    /// all-reduce at once).
    pub fn opened(&self, generation: u64) -> Option<tokio::time::Instant> {
        self.lock().opened.get(&generation).copied()
    }

    /// A rank leaves `generation` to join again: the others' collectives fail, as a ring
    /// with a peer gone does.
    pub fn broken(&self, generation: u64) {
        self.lock().broken.insert(generation);
        self.notify.notify_waiters();
    }

    /// A neighbour of the dead rank has reported it (the others rejoin after that, as the
    /// failure spreads around a real ring).
    pub fn reported(&self, generation: u64) {
        if let Some(d) = self.lock().dead.get_mut(&generation) {
            d.1 = true;
        }
        self.notify.notify_waiters();
    }

    /// Waits (at most `limit`) until the death in `generation` is reported.
    pub async fn wait_reported(&self, generation: u64, limit: std::time::Duration) {
        let wait = async {
            loop {
                let woken = self.notify.notified();
                tokio::pin!(woken);
                woken.as_mut().enable();
                if self.lock().dead.get(&generation).is_none_or(|d| d.1) {
                    return;
                }
                woken.await;
            }
        };
        let _ = tokio::time::timeout(limit, wait).await;
    }

    pub fn fed(&self, generation: u64, world: u32, step: u64, rank: u32, samples: Vec<SampleRef>) {
        let mut s = self.lock();
        let e = s
            .fed
            .entry(step)
            .or_insert((generation, world, BTreeMap::new()));
        if generation > e.0 {
            *e = (generation, world, BTreeMap::new());
        }
        if generation == e.0 {
            e.2.insert(rank, samples);
        }
    }

    /// The coordinator answered that `step` committed.
    pub fn committed_step(&self, step: u64) {
        let now = Instant::now();
        let mut s = self.lock();
        s.committed = s.committed.max(step);
        s.first_commit.get_or_insert(now);
        s.last_commit = Some(now);
        if let (Some(k), None, Some(kill)) = (self.kill_at, s.recovery_s, s.killed_at) {
            if step >= k {
                s.recovery_s = Some(now.duration_since(kill).as_secs_f64());
            }
        }
    }

    pub fn committed(&self) -> u64 {
        self.lock().committed
    }

    /// Steps per second between the first and the last commit.
    pub fn steps_per_s(&self) -> f64 {
        let s = self.lock();
        match (s.first_commit, s.last_commit) {
            (Some(a), Some(b)) if s.committed > 1 && b > a => {
                (s.committed - 1) as f64 / b.duration_since(a).as_secs_f64()
            }
            _ => 0.0,
        }
    }

    pub fn recovery_s(&self) -> Option<f64> {
        self.lock().recovery_s
    }

    /// Every committed step fed `global` samples from every rank of its generation, and no
    /// sample was fed twice.
    pub fn verify(&self, global: u32) -> Result<(), String> {
        let s = self.lock();
        let mut seen = HashSet::new();
        for step in 1..=s.committed {
            let Some((generation, world, ranks)) = s.fed.get(&step) else {
                return Err(format!("no samples recorded for committed step {step}"));
            };
            if ranks.len() as u32 != *world {
                return Err(format!(
                    "step {step} (generation {generation}): {} of {world} ranks were fed",
                    ranks.len()
                ));
            }
            let total: usize = ranks.values().map(|v| v.len()).sum();
            if total != global as usize {
                return Err(format!("step {step} fed {total} samples, not {global}"));
            }
            for r in ranks.values().flatten() {
                if !seen.insert((r.epoch, r.block, r.row)) {
                    return Err(format!("step {step} fed {r:?} a second time"));
                }
            }
        }
        Ok(())
    }
}
