//! Membership: who is in the current generation, who waits to join, and when a new generation
//! forms. Pure bookkeeping over an explicit clock so it is easy to test.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

/// What a worker says about itself when it joins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerInfo {
    pub worker_id: String,
    pub host: String,
    pub device: String,
    pub collective_addr: String,
    /// Newest step whose optimizer update this worker applied (0 = none).
    pub last_applied: u64,
    /// The generation its model is of (`JoinRequest.state_generation`; 0: a new process):
    /// says which history its `last_applied` belongs to when a rollback re-ran steps since.
    pub state_generation: u64,
}

#[derive(Debug, Clone)]
pub struct Member {
    pub info: WorkerInfo,
    pub rank: u32,
    pub last_seen: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Collecting joins for the next generation.
    Forming,
    Training,
    /// No step is left to assign: the last steps commit, rank 0 writes the final checkpoint.
    /// Deaths and leaves still end the generation (the remaining steps run in a new one).
    Finishing,
    /// The final checkpoint is recorded: workers are told to leave.
    Finished,
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub min_workers: u32,
    pub max_workers: u32,
    /// Quiet time after the last join before a generation forms below max_workers.
    pub settle: Duration,
    /// How long to wait for a previous member to come back before forming without it.
    pub rejoin_timeout: Duration,
}

#[derive(Debug)]
pub struct Membership {
    limits: Limits,
    generation: u64,
    phase: Phase,
    members: Vec<Member>,
    /// worker_id → index in `members`: every RPC looks its caller up (O(1), not a scan of
    /// thousands of members).
    index: HashMap<String, usize>,
    waiting: Vec<WorkerInfo>,
    /// Previous members we still wait for, with a deadline.
    expected: BTreeMap<String, Instant>,
    last_arrival: Option<Instant>,
    /// A joiner waits: end the generation at the next step boundary.
    pub regroup_requested: bool,
}

impl Membership {
    pub fn new(limits: Limits, generation: u64) -> Self {
        Self {
            limits,
            generation,
            phase: Phase::Forming,
            members: Vec::new(),
            index: HashMap::new(),
            waiting: Vec::new(),
            expected: BTreeMap::new(),
            last_arrival: None,
            regroup_requested: false,
        }
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    pub fn set_phase(&mut self, phase: Phase) {
        self.phase = phase;
    }

    pub fn members(&self) -> &[Member] {
        &self.members
    }

    pub fn waiting(&self) -> &[WorkerInfo] {
        &self.waiting
    }

    pub fn world_size(&self) -> u32 {
        self.members.len() as u32
    }

    /// The member `worker_id` of generation `generation`, if that pair is current.
    pub fn current(&self, worker_id: &str, generation: u64) -> Option<&Member> {
        if generation != self.generation
            || !matches!(self.phase, Phase::Training | Phase::Finishing)
        {
            return None;
        }
        self.member(worker_id)
    }

    fn member(&self, worker_id: &str) -> Option<&Member> {
        self.index.get(worker_id).map(|&i| &self.members[i])
    }

    fn set_members(&mut self, members: Vec<Member>) {
        self.index = members
            .iter()
            .enumerate()
            .map(|(i, m)| (m.info.worker_id.clone(), i))
            .collect();
        self.members = members;
    }

    /// A sign of life at `now`. Keeps the newest: a beat deferred past the run lock is applied
    /// with its arrival time, which may be older than a step call answered since.
    pub fn touch(&mut self, worker_id: &str, now: Instant) {
        if let Some(&i) = self.index.get(worker_id) {
            let m = &mut self.members[i];
            m.last_seen = m.last_seen.max(now);
        }
    }

    /// A worker asks to join. Returns true if this ended the current generation. A worker
    /// already waiting with the same details (its Join call was retried) changes nothing.
    pub fn join(&mut self, info: WorkerInfo, now: Instant) -> bool {
        if self.phase == Phase::Forming && self.waiting.contains(&info) {
            return false;
        }
        let was_member = self.index.contains_key(&info.worker_id);
        self.waiting.retain(|w| w.worker_id != info.worker_id);
        self.expected.remove(&info.worker_id);
        self.waiting.push(info.clone());
        self.last_arrival = Some(now);
        match self.phase {
            Phase::Training | Phase::Finishing if was_member => {
                // A member re-joining has left its generation (its collective failed).
                self.end_generation(None, now);
                true
            }
            Phase::Training | Phase::Finishing => {
                self.regroup_requested = self.members.len() < self.limits.max_workers as usize;
                false
            }
            _ => false,
        }
    }

    /// Ends the generation (training or finishing: a death in the run's last steps, or while
    /// the final checkpoint is written, re-forms too): every member except `dead` is expected
    /// back.
    pub fn end_generation(&mut self, dead: Option<&str>, now: Instant) {
        if !matches!(self.phase, Phase::Training | Phase::Finishing) {
            if let Some(d) = dead {
                self.expected.remove(d);
                self.waiting.retain(|w| w.worker_id != d);
            }
            return;
        }
        let deadline = now + self.limits.rejoin_timeout;
        for m in &self.members {
            let id = &m.info.worker_id;
            if Some(id.as_str()) != dead && !self.waiting.iter().any(|w| &w.worker_id == id) {
                self.expected.insert(id.clone(), deadline);
            }
        }
        if let Some(d) = dead {
            self.waiting.retain(|w| w.worker_id != d);
        }
        self.phase = Phase::Forming;
        self.regroup_requested = false;
    }

    /// A worker leaves for good. Until the run is finished its generation ends (the others
    /// regroup and take over its share); afterwards it is simply gone.
    pub fn leave(&mut self, worker_id: &str, now: Instant) {
        match self.phase {
            Phase::Training | Phase::Finishing => self.end_generation(Some(worker_id), now),
            Phase::Finished => {
                let mut members = std::mem::take(&mut self.members);
                members.retain(|m| m.info.worker_id != worker_id);
                self.set_members(members);
            }
            Phase::Forming => {
                self.waiting.retain(|w| w.worker_id != worker_id);
                self.expected.remove(worker_id);
            }
        }
    }

    /// Members silent for longer than `timeout`.
    pub fn silent(&self, timeout: Duration, now: Instant) -> Vec<String> {
        self.members
            .iter()
            .filter(|m| now.duration_since(m.last_seen) > timeout)
            .map(|m| m.info.worker_id.clone())
            .collect()
    }

    /// Forms the next generation if its conditions hold. Returns the new members.
    pub fn try_form(&mut self, now: Instant) -> Option<&[Member]> {
        if self.phase != Phase::Forming {
            return None;
        }
        self.expected.retain(|_, deadline| *deadline > now);
        let n = self.waiting.len() as u32;
        if n < self.limits.min_workers || !self.expected.is_empty() {
            return None;
        }
        let settled = self
            .last_arrival
            .is_none_or(|t| now.duration_since(t) >= self.limits.settle);
        let survivors_back = self
            .waiting
            .iter()
            .any(|w| self.index.contains_key(&w.worker_id));
        if n < self.limits.max_workers && !settled && !survivors_back {
            return None;
        }
        // Survivors keep their relative order; joiners follow in arrival order.
        let old_rank = |id: &str| self.member(id).map(|m| m.rank).unwrap_or(u32::MAX);
        let mut next: Vec<(u32, usize, WorkerInfo)> = self
            .waiting
            .iter()
            .enumerate()
            .map(|(i, w)| (old_rank(&w.worker_id), i, w.clone()))
            .collect();
        next.sort_by_key(|(r, i, _)| (*r, *i));
        let take = next.len().min(self.limits.max_workers as usize);
        let admitted: Vec<WorkerInfo> = next.drain(..take).map(|(_, _, w)| w).collect();
        self.waiting = next.into_iter().map(|(_, _, w)| w).collect();
        let members = admitted
            .into_iter()
            .enumerate()
            .map(|(rank, info)| Member {
                info,
                rank: rank as u32,
                last_seen: now,
            })
            .collect();
        self.set_members(members);
        self.generation += 1;
        self.phase = Phase::Training;
        self.regroup_requested =
            !self.waiting.is_empty() && self.members.len() < self.limits.max_workers as usize;
        Some(&self.members)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: &str, applied: u64) -> WorkerInfo {
        WorkerInfo {
            worker_id: id.into(),
            host: "h".into(),
            device: "cpu".into(),
            collective_addr: format!("{id}:1"),
            last_applied: applied,
            state_generation: 0,
        }
    }

    fn limits(min: u32, max: u32) -> Limits {
        Limits {
            min_workers: min,
            max_workers: max,
            settle: Duration::from_secs(2),
            rejoin_timeout: Duration::from_secs(5),
        }
    }

    #[test]
    fn forms_at_max_at_once_and_below_max_after_settling() {
        let t0 = Instant::now();
        let mut m = Membership::new(limits(1, 2), 0);
        m.join(info("a", 0), t0);
        assert!(m.try_form(t0).is_none(), "must settle first");
        assert!(m.try_form(t0 + Duration::from_secs(3)).is_some());
        assert_eq!(m.generation(), 1);

        let mut m = Membership::new(limits(1, 2), 0);
        m.join(info("a", 0), t0);
        m.join(info("b", 0), t0);
        let members = m.try_form(t0).expect("full");
        assert_eq!(members.len(), 2);
        assert_eq!(members[1].info.worker_id, "b");
    }

    /// A deferred beat applied after a newer sign of life does not make the member look
    /// silent for longer than it was.
    #[test]
    fn an_older_sign_of_life_does_not_set_last_seen_back() {
        let t0 = Instant::now();
        let mut m = Membership::new(limits(1, 1), 0);
        m.join(info("a", 0), t0);
        m.try_form(t0).expect("formed");
        let (beat, step_call) = (t0 + Duration::from_secs(4), t0 + Duration::from_secs(5));
        m.touch("a", step_call);
        m.touch("a", beat);
        let timeout = Duration::from_secs(3);
        assert!(m
            .silent(timeout, t0 + Duration::from_millis(7_500))
            .is_empty());
        assert_eq!(m.silent(timeout, t0 + Duration::from_secs(9)), ["a"]);
    }

    #[test]
    fn waits_for_min_workers() {
        let t0 = Instant::now();
        let mut m = Membership::new(limits(2, 4), 0);
        m.join(info("a", 0), t0);
        assert!(m.try_form(t0 + Duration::from_secs(60)).is_none());
        m.join(info("b", 0), t0 + Duration::from_secs(61));
        assert!(m.try_form(t0 + Duration::from_secs(64)).is_some());
    }

    #[test]
    fn a_death_regroups_survivors_in_their_old_order() {
        let t0 = Instant::now();
        let mut m = Membership::new(limits(1, 3), 0);
        for id in ["a", "b", "c"] {
            m.join(info(id, 0), t0);
        }
        m.try_form(t0).expect("formed");
        m.end_generation(Some("b"), t0);
        assert_eq!(m.phase(), Phase::Forming);
        m.join(info("c", 7), t0);
        assert!(m.try_form(t0).is_none(), "a is still expected");
        m.join(info("a", 7), t0);
        let members = m.try_form(t0).expect("formed");
        let ids: Vec<_> = members.iter().map(|m| m.info.worker_id.as_str()).collect();
        assert_eq!(ids, ["a", "c"]);
        assert_eq!(m.generation(), 2);
    }

    #[test]
    fn an_expected_member_that_never_returns_is_dropped_after_the_timeout() {
        let t0 = Instant::now();
        let mut m = Membership::new(limits(1, 3), 0);
        m.join(info("a", 0), t0);
        m.join(info("b", 0), t0);
        m.try_form(t0 + Duration::from_secs(3)).expect("formed");
        m.end_generation(None, t0 + Duration::from_secs(4));
        m.join(info("a", 1), t0 + Duration::from_secs(4));
        assert!(m.try_form(t0 + Duration::from_secs(5)).is_none());
        let members = m.try_form(t0 + Duration::from_secs(10)).expect("b dropped");
        assert_eq!(members.len(), 1);
    }

    #[test]
    fn a_joiner_during_training_requests_a_regroup_and_is_admitted() {
        let t0 = Instant::now();
        let mut m = Membership::new(limits(1, 3), 0);
        m.join(info("a", 0), t0);
        m.join(info("b", 0), t0);
        m.try_form(t0 + Duration::from_secs(3)).expect("formed");
        assert!(!m.join(info("c", 0), t0 + Duration::from_secs(4)));
        assert!(m.regroup_requested);
        assert_eq!(m.phase(), Phase::Training);
        m.end_generation(None, t0 + Duration::from_secs(4));
        m.join(info("a", 5), t0 + Duration::from_secs(4));
        m.join(info("b", 5), t0 + Duration::from_secs(4));
        let ids: Vec<_> = m
            .try_form(t0 + Duration::from_secs(4))
            .expect("formed")
            .iter()
            .map(|m| m.info.worker_id.clone())
            .collect();
        assert_eq!(ids, ["a", "b", "c"]);
    }

    #[test]
    fn stale_generation_is_not_current() {
        let t0 = Instant::now();
        let mut m = Membership::new(limits(1, 1), 0);
        m.join(info("a", 0), t0);
        m.try_form(t0).expect("formed");
        assert!(m.current("a", 1).is_some());
        assert!(m.current("a", 0).is_none());
        assert!(m.current("zz", 1).is_none());
    }
}
