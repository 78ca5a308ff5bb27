//! The run's rules on an explicit clock, no process: workers are simulated by calling the
//! same methods the gRPC service calls.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use ferroclip_proto::config::RunConfig;

use super::{Committed, Placement, Refusal, Run, StepPlan, StepReport};
use crate::membership::WorkerInfo;

pub(super) fn config(epochs: u32, batch: u32, max_workers: u32) -> RunConfig {
    let mut c = RunConfig::default();
    c.run.dir = "s3://b/run".into();
    c.run.epochs = epochs;
    c.optim.global_batch = batch;
    c.data.shuffle_window_blocks = 2;
    c.cluster.min_workers = 1;
    c.cluster.max_workers = max_workers;
    c.cluster.settle_s = 1.0;
    c.cluster.heartbeat_timeout_s = 5.0;
    c.checkpoint.keep = 2;
    c
}

pub(super) fn info(id: &str, applied: u64) -> WorkerInfo {
    WorkerInfo {
        worker_id: id.into(),
        host: "h".into(),
        device: "cpu".into(),
        collective_addr: format!("{id}:1"),
        last_applied: applied,
        state_generation: 0,
    }
}

/// Simulated workers: their placements and what each applied.
pub(super) struct Sim {
    pub(super) run: Run,
    pub(super) now: Instant,
    pub(super) place: HashMap<String, Placement>,
    pub(super) applied: HashMap<String, u64>,
    /// Every committed step's total samples, in order.
    sizes: Vec<u32>,
}

impl Sim {
    pub(super) fn new(cfg: RunConfig, rows: Vec<u32>) -> Self {
        Self {
            run: Run::new(cfg, rows),
            now: Instant::now(),
            place: HashMap::new(),
            applied: HashMap::new(),
            sizes: Vec::new(),
        }
    }

    pub(super) fn later(&mut self, secs: f64) {
        self.now += Duration::from_secs_f64(secs);
    }

    /// `ids` (re-)join; time passes until the generation forms.
    pub(super) fn form(&mut self, ids: &[&str]) {
        for id in ids {
            let applied = self.applied.get(*id).copied().unwrap_or(0);
            let mut me = info(id, applied);
            me.state_generation = self.place.get(*id).map_or(0, |p| p.generation);
            self.run.join(me, self.now);
        }
        for _ in 0..20 {
            if self.run.tick(self.now) {
                break;
            }
            self.later(0.5);
        }
        self.place.clear();
        for id in ids {
            let p = self.run.placement(id).expect("placed");
            self.applied
                .insert(id.to_string(), p.next_step.saturating_sub(1));
            self.place.insert(id.to_string(), p);
        }
    }

    pub(super) fn ids(&self) -> Vec<String> {
        let mut v: Vec<(u32, String)> = self
            .place
            .iter()
            .map(|(id, p)| (p.rank, id.clone()))
            .collect();
        v.sort();
        v.into_iter().map(|(_, id)| id).collect()
    }

    pub(super) fn next(&mut self, id: &str, step: u64) -> StepPlan {
        let g = self.place[id].generation;
        self.run
            .next_step(id, g, step, self.now)
            .expect("next step")
    }

    pub(super) fn commit(&mut self, id: &str, step: u64) -> Committed {
        let g = self.place[id].generation;
        let report = StepReport {
            step,
            samples: 1,
            metrics: vec![],
        };
        let c = self
            .run
            .commit_step(id, g, report, self.now)
            .expect("commit");
        self.applied.insert(id.to_string(), step);
        c
    }

    pub(super) fn checkpoint(&mut self, id: &str, step: u64) {
        let g = self.place[id].generation;
        let url = format!("s3://b/run/checkpoints/step-{step:08}");
        self.run
            .commit_checkpoint(id, g, step, &url)
            .expect("checkpoint");
    }

    /// Every member asks for `step`; Some(size) if it was assigned, None at the end.
    pub(super) fn step_all(&mut self, step: u64) -> Option<u32> {
        let ids = self.ids();
        let mut total = None;
        for id in &ids {
            match self.next(id, step) {
                StepPlan::Samples { shape, .. } => {
                    total = Some(shape.global_batch);
                }
                _ => return None,
            }
        }
        for id in &ids {
            self.commit(id, step);
        }
        self.sizes.push(total.expect("members"));
        total
    }

    /// Runs steps until the end; rank 0 then checkpoints the last one.
    pub(super) fn run_to_the_end(&mut self) {
        let mut step = self.run.ledger.committed_step() + 1;
        while self.step_all(step).is_some() {
            step += 1;
        }
        let rank0 = self.ids()[0].clone();
        self.checkpoint(&rank0, step - 1);
    }
}

#[test]
fn a_run_feeds_full_batches_and_finishes_only_with_its_final_checkpoint() {
    // 3 workers, 1 epoch of 13 × 17 = 221 samples, batch 20: 11 full steps and one of 1.
    let mut sim = Sim::new(config(1, 20, 3), vec![17; 13]);
    sim.form(&["a", "b", "c"]);
    assert_eq!(sim.run.total_steps(), 12);
    let mut step = 1;
    while sim.step_all(step).is_some() {
        step += 1;
    }
    assert_eq!(sim.sizes.len(), 12);
    assert!(sim.sizes[..11].iter().all(|&n| n == 20), "{:?}", sim.sizes);
    assert_eq!(sim.sizes[11], 1);
    assert_eq!(sim.run.phase_name(), "finishing");
    assert!(!sim.run.finished(), "not before the final checkpoint");
    // Heartbeats keep the finishing generation alive and say nothing of stopping yet.
    let g = sim.place["b"].generation;
    assert!(!sim.run.heartbeat("b", g, 0.0, sim.now).expect("beat"));
    sim.checkpoint("a", 12);
    assert!(sim.run.finished());
    assert!(
        sim.run.heartbeat("b", g, 0.0, sim.now).expect("beat"),
        "stop"
    );
}

#[test]
fn a_death_in_the_last_steps_regroups_and_the_run_still_finishes() {
    // 48 samples, batch 12: 4 steps.
    let mut sim = Sim::new(config(1, 12, 3), vec![12; 4]);
    sim.form(&["a", "b", "c"]);
    for step in 1..=3 {
        sim.step_all(step).expect("step");
    }
    // Step 4 is assigned; "a" and "b" ask for step 5, which does not exist: finishing.
    for id in ["a", "b", "c"] {
        sim.next(id, 4);
    }
    assert_eq!(sim.next("a", 5), StepPlan::End);
    assert_eq!(sim.run.phase_name(), "finishing");
    sim.commit("a", 4);
    sim.commit("b", 4);
    // "c" dies before committing step 4: only silence tells (it never left).
    for _ in 0..12 {
        sim.later(0.5);
        for id in ["a", "b"] {
            // Once the generation has ended the answer is Stale: join again.
            let g = sim.place[id].generation;
            let _ = sim.run.heartbeat(id, g, 0.0, sim.now);
        }
        sim.run.tick(sim.now);
    }
    assert_eq!(
        sim.run.phase_name(),
        "waiting",
        "the finishing generation ended"
    );
    assert_eq!(sim.run.counters.worker_deaths, 1);
    // The survivors applied step 4: it commits as the new generation forms, and step 5 does
    // not exist, so rank 0 only writes the final checkpoint.
    sim.form(&["a", "b"]);
    assert_eq!(sim.run.ledger.committed_step(), 4);
    assert_eq!(sim.place["a"].next_step, 5);
    assert_eq!(sim.next("a", 5), StepPlan::End);
    sim.checkpoint("a", 4);
    assert!(sim.run.finished());
}

#[test]
fn a_worker_lost_before_applying_the_last_step_gets_it_rerun_full() {
    let mut sim = Sim::new(config(1, 12, 3), vec![12; 5]);
    sim.form(&["a", "b", "c"]);
    for step in 1..=4 {
        sim.step_all(step).expect("step");
    }
    for id in ["a", "b", "c"] {
        sim.next(id, 5);
    }
    // "b" leaves (SIGTERM) before anyone applied step 5: the step is abandoned.
    let g = sim.place["b"].generation;
    sim.run.leave("b", g, "SIGTERM", sim.now).expect("leave");
    sim.form(&["a", "c"]);
    assert_eq!(sim.run.ledger.committed_step(), 4);
    assert_eq!(
        sim.step_all(5),
        Some(12),
        "the last step re-runs with the full batch"
    );
    assert_eq!(sim.next("a", 6), StepPlan::End);
    sim.checkpoint("a", 5);
    assert!(sim.run.finished());
}

#[test]
fn retried_calls_get_the_same_answer() {
    let mut sim = Sim::new(config(1, 8, 2), vec![16; 4]);
    sim.form(&["a", "b"]);
    let first = sim.next("a", 1);
    let again = sim.next("a", 1);
    assert_eq!(first, again, "NextStep is idempotent");
    sim.next("b", 1);
    assert_eq!(sim.commit("a", 1), Committed::Waiting);
    // "a"'s answer was lost and it retries: still waiting, not double counted.
    assert_eq!(sim.commit("a", 1), Committed::Waiting);
    assert_eq!(sim.commit("b", 1), Committed::Step);
    // "b" retries after the commit: the step is committed, no error.
    assert_eq!(sim.commit("b", 1), Committed::Step);
    assert_eq!(sim.run.history.len(), 1);
    // A step far ahead is refused, a committed one too.
    let g = sim.place["a"].generation;
    assert!(sim.run.next_step("a", g, 5, sim.now).is_err());
    assert!(sim.run.next_step("a", g, 1, sim.now).is_err());
}

#[test]
fn checkpoints_are_recorded_once_under_the_run_dir_and_pruned_oldest_first() {
    let mut sim = Sim::new(config(1, 8, 1), vec![8; 8]);
    sim.form(&["a"]);
    let g = sim.place["a"].generation;
    for step in 1..=4 {
        sim.step_all(step).expect("step");
        sim.checkpoint("a", step);
        sim.checkpoint("a", step); // a retry records nothing new
        let _ = sim.run.prune_checkpoints();
    }
    let steps: Vec<u64> = sim.run.checkpoints.iter().map(|c| c.step).collect();
    assert_eq!(steps, vec![3, 4], "keep = 2, newest kept");
    for url in [
        "s3://b/run/checkpoints/step-00000005", // not this step
        "s3://b/elsewhere/step-00000004",
        "s3://b/run/checkpoints/step-4",
        "s3://b/run/checkpoints/../data",
    ] {
        assert!(
            sim.run.commit_checkpoint("a", g, 4, url).is_err(),
            "{url} accepted"
        );
    }
    sim.run.config.checkpoint.keep = 0;
    assert!(
        sim.run.prune_checkpoints().len() <= 1,
        "keep = 0 still keeps the newest"
    );
    assert_eq!(sim.run.checkpoints.last().map(|c| c.step), Some(4));
}

#[test]
fn a_restarted_coordinator_resumes_the_journaled_run() {
    let mut sim = Sim::new(config(1, 10, 2), vec![10; 6]);
    sim.form(&["a", "b"]);
    for step in 1..=3 {
        sim.step_all(step).expect("step");
    }
    sim.checkpoint("a", 3);
    let snap = sim.run.snapshot();
    // A new coordinator process: the same config, the journal's state.
    let mut restarted = Sim::new(config(1, 10, 2), vec![10; 6]);
    restarted.run.restore(snap).expect("restore");
    restarted.applied = sim.applied.clone();
    restarted.form(&["a", "b"]);
    assert_eq!(restarted.place["a"].next_step, 4);
    restarted.run_to_the_end();
    assert!(restarted.run.finished());
    assert_eq!(restarted.run.ledger.committed_step(), 6);
    // Another run's journal does not fit this one.
    let other = Run::new(config(1, 10, 2), vec![10; 7]);
    assert!(other.identity.mismatch(&restarted.run.identity).is_some());
}

#[test]
fn a_step_limited_run_repeats_its_data_and_ends_at_the_limit() {
    let mut cfg = config(1, 16, 2);
    cfg.run.steps = 7;
    let mut sim = Sim::new(cfg, vec![5; 4]); // 20 samples: epochs repeat
    sim.form(&["a", "b"]);
    sim.run_to_the_end();
    assert_eq!(sim.sizes, vec![16; 7]);
    assert!(sim.run.finished());
    assert_eq!(sim.run.total_steps(), 7);
}

#[test]
fn a_joins_first_steps_are_what_next_step_answers_and_none_when_a_regroup_or_stop_waits() {
    let mut sim = Sim::new(config(1, 8, 3), vec![16; 4]);
    sim.form(&["a", "b"]);
    let (g, from) = (sim.place["a"].generation, sim.place["a"].next_step);
    let first = sim.run.first_steps("a", g, from, sim.now);
    let steps: Vec<u64> = first.iter().map(|(s, _)| *s).collect();
    assert_eq!(steps, [from, from + 1]);
    for (step, plan) in &first {
        assert_eq!(plan, &sim.next("a", *step), "step {step}");
    }
    // The other rank's first steps come from the same assignments, its own part of them.
    let theirs = sim.run.first_steps("b", g, from, sim.now);
    for ((_, a), (_, b)) in first.iter().zip(&theirs) {
        let (StepPlan::Samples { samples: a, .. }, StepPlan::Samples { samples: b, .. }) = (a, b)
        else {
            panic!("samples: {a:?} {b:?}");
        };
        assert_eq!((a.len(), b.len()), (4, 4));
        assert!(a.iter().all(|s| !b.contains(s)), "ranks share a sample");
    }
    // A joiner waits for the next step boundary: that answer (regroup) is NextStep's to give.
    sim.run.join(info("c", 0), sim.now);
    assert!(sim.run.first_steps("a", g, from, sim.now).is_empty());
    // The same with a stop: nothing is carried, the run is not ended by a Join.
    let mut sim = Sim::new(config(1, 8, 2), vec![16; 4]);
    sim.form(&["a"]);
    sim.run.request_stop();
    let (g, from) = (sim.place["a"].generation, sim.place["a"].next_step);
    assert!(sim.run.first_steps("a", g, from, sim.now).is_empty());
    assert_eq!(sim.run.phase_name(), "training");
}

#[test]
fn a_retried_join_gets_the_same_place_and_a_rejoin_ends_the_generation() {
    let mut sim = Sim::new(config(1, 8, 2), vec![16; 4]);
    sim.form(&["a", "b"]);
    let g = sim.place["a"].generation;
    // "a"'s Join answer was lost: it asks again with the same details, as of before.
    let again = sim
        .run
        .placed_again(&info("a", 0), g - 1)
        .expect("same place");
    assert_eq!(again, sim.place["a"]);
    // A restarted process with other details, or one that already ran this generation, is no
    // retry.
    let mut other = info("a", 0);
    other.collective_addr = "a:2".into();
    assert!(sim.run.placed_again(&other, g - 1).is_none());
    assert!(sim.run.placed_again(&info("a", 0), g).is_none());
    sim.run.join(info("a", 0), sim.now);
    assert_eq!(
        sim.run.phase_name(),
        "waiting",
        "a real re-join ends the generation"
    );
}

#[test]
fn a_reported_failure_ends_the_generation_and_the_survivors_form_at_once() {
    let mut sim = Sim::new(config(1, 12, 3), vec![12; 4]);
    sim.form(&["a", "b", "c"]);
    sim.step_all(1).expect("step");
    let g = sim.place["a"].generation;
    let c_rank = sim.place["c"].rank;
    // A rank outside the generation, or a caller of an older generation, ends nothing.
    assert!(matches!(
        sim.run.report_failure("a", g, 7, "x", sim.now),
        Err(Refusal::Invalid(_))
    ));
    assert!(matches!(
        sim.run.report_failure("a", g - 1, c_rank, "x", sim.now),
        Err(Refusal::Stale(_))
    ));
    assert_eq!(sim.run.phase_name(), "training");
    sim.run
        .report_failure("a", g, c_rank, "ring timeout", sim.now)
        .expect("report");
    assert_eq!(sim.run.counters.worker_deaths, 1);
    // The suspect is not waited for: the survivors form as soon as both are back.
    let before = sim.now;
    sim.form(&["a", "b"]);
    assert_eq!(sim.now, before, "no wait for the suspect");
    let p = &sim.place["b"];
    assert_eq!((p.generation, p.world_size, p.next_step), (g + 1, 2, 2));
    assert!(!p.needs_state && p.resume_checkpoint.is_none());
    sim.run_to_the_end();
    assert_eq!(sim.sizes, vec![12; 4]);
    assert!(sim.run.finished());
}

#[test]
fn newcomers_without_state_resume_from_the_latest_checkpoint() {
    let mut sim = Sim::new(config(1, 10, 2), vec![10; 6]);
    sim.form(&["a", "b"]);
    for step in 1..=3 {
        sim.step_all(step).expect("step");
        if step == 2 {
            sim.checkpoint("a", 2);
        }
    }
    // Both go silent; two new workers, holding no state, take their places.
    sim.later(6.0);
    sim.run.tick(sim.now);
    assert_eq!(sim.run.phase_name(), "waiting");
    sim.form(&["c", "d"]);
    let p = &sim.place["d"];
    assert_eq!(
        p.resume_checkpoint.as_deref(),
        Some("s3://b/run/checkpoints/step-00000002")
    );
    assert_eq!(
        p.next_step, 3,
        "step 3 was not in the checkpoint: it runs again"
    );
    assert_eq!(sim.run.ledger.committed_step(), 2);
    sim.run_to_the_end();
    assert_eq!(
        sim.sizes,
        vec![10; 7],
        "3 steps, then 3..=6 again from the checkpoint"
    );
    assert_eq!(sim.run.ledger.committed_step(), 6);
    assert!(sim.run.finished());
}

#[test]
fn newcomers_without_state_or_checkpoint_start_over() {
    let mut sim = Sim::new(config(1, 10, 2), vec![10; 3]);
    sim.form(&["a", "b"]);
    sim.step_all(1).expect("step");
    sim.later(6.0);
    sim.run.tick(sim.now);
    sim.form(&["c", "d"]);
    let p = &sim.place["c"];
    assert_eq!((p.next_step, p.resume_checkpoint.clone()), (1, None));
    assert_eq!(sim.run.ledger.committed_step(), 0);
    sim.run_to_the_end();
    assert_eq!(sim.sizes, vec![10; 4]);
    assert!(sim.run.finished());
}

#[test]
fn a_model_from_a_history_a_rollback_abandoned_takes_the_state_and_commits_nothing() {
    let mut sim = Sim::new(config(1, 10, 3), vec![10; 8]);
    sim.form(&["a", "b"]);
    for step in 1..=5 {
        sim.step_all(step).expect("step");
        if step == 2 {
            sim.checkpoint("a", 2);
        }
    }
    // "a" and "b" go silent; two new processes roll the run back to step 2's checkpoint and
    // run steps 3 and 4 again (other ranks, other sums: another model than "b"'s).
    sim.later(6.0);
    sim.run.tick(sim.now);
    sim.form(&["c", "d"]);
    assert!(sim.place["c"].resume_checkpoint.is_some());
    sim.step_all(3).expect("step 3");
    sim.step_all(4).expect("step 4");
    sim.next("c", 5);
    // "b" was alive after all: it comes back with step 4 applied, the run's step number, and
    // then with 5, a step the run assigned but nobody of its history applied.
    for (b_applied, committed) in [(4, 4), (5, 4)] {
        sim.applied.insert("b".into(), b_applied);
        sim.form(&["c", "d", "b"]);
        assert_eq!(
            sim.run.ledger.committed_step(),
            committed,
            "b at {b_applied}: its steps are not the run's"
        );
        let b = &sim.place["b"];
        assert!(b.needs_state, "b at {b_applied} must take the state");
        assert_ne!(b.state_source_rank, b.rank, "nor give it");
        assert_eq!(b.next_step, committed + 1);
        // It leaves again before applying anything of this generation.
        let g = b.generation;
        sim.run.leave("b", g, "test", sim.now).expect("leave");
        sim.place.remove("b");
    }
    // A restarted coordinator keeps the rollback: the same decision after a replay.
    let snap = sim.run.snapshot();
    let mut again = Run::new(config(1, 10, 3), vec![10; 8]);
    again.restore(snap).expect("restore");
    let mut b = info("b", 4);
    b.state_generation = 1;
    assert!(!again.on_lineage(&b));
    b.last_applied = 2;
    assert!(
        again.on_lineage(&b),
        "steps up to the checkpoint are shared"
    );
    b.state_generation = 1_000;
    assert!(!again.on_lineage(&b), "a generation the run never had");
}

#[test]
fn a_joiner_behind_the_survivors_gets_the_state_from_one_of_them() {
    let mut sim = Sim::new(config(1, 12, 3), vec![12; 5]);
    sim.form(&["a", "b", "c"]);
    for step in 1..=2 {
        sim.step_all(step).expect("step");
    }
    for id in ["a", "b", "c"] {
        sim.next(id, 3);
    }
    // "a" and "b" applied step 3; "c" leaves before it did.
    sim.commit("a", 3);
    sim.commit("b", 3);
    let g = sim.place["c"].generation;
    sim.run.leave("c", g, "SIGTERM", sim.now).expect("leave");
    sim.form(&["a", "b", "d"]);
    assert_eq!(
        sim.run.ledger.committed_step(),
        3,
        "what the survivors applied commits"
    );
    let d = &sim.place["d"];
    assert!(d.needs_state);
    assert_eq!(d.state_source_rank, sim.place["a"].rank);
    assert_eq!(
        (d.next_step, d.rank),
        (4, 2),
        "joiners follow the survivors"
    );
    sim.run_to_the_end();
    assert_eq!(
        sim.sizes,
        vec![12; 4],
        "steps 1, 2, 4, 5 committed by all; 3 by regroup"
    );
    assert!(sim.run.finished());
}

#[test]
fn a_join_abandoned_while_forming_is_forgotten() {
    let mut cfg = config(1, 8, 3);
    cfg.cluster.min_workers = 2;
    let mut sim = Sim::new(cfg, vec![8; 4]);
    sim.run.join(info("a", 0), sim.now);
    sim.run.abandon_join("a", sim.now);
    sim.run.join(info("b", 0), sim.now);
    sim.later(2.0);
    assert!(!sim.run.tick(sim.now), "one worker waits: min_workers = 2");
    sim.form(&["b", "c"]);
    assert!(sim.run.placement("a").is_none());
    assert_eq!(sim.place["b"].world_size, 2);
}

fn mixed_config(sources: &[(&str, f64)]) -> RunConfig {
    let mut cfg = config(1, 10, 2);
    cfg.data.sources = sources
        .iter()
        .map(|(root, weight)| ferroclip_proto::config::DataSource {
            root: root.to_string(),
            weight: *weight,
        })
        .collect();
    cfg
}

fn mixed_sources(rows: &[(u32, usize, f64)]) -> Vec<ferroclip_plan::Source> {
    rows.iter()
        .map(|&(r, n, weight)| ferroclip_plan::Source {
            block_rows: vec![r; n],
            weight,
        })
        .collect()
}

#[test]
fn a_mixed_run_counts_each_source_and_its_journal_names_the_sources() {
    let cfg = mixed_config(&[("s3://b/big", 3.0), ("s3://b/small", 1.0)]);
    let sources = mixed_sources(&[(10, 30, 3.0), (10, 10, 1.0)]);
    let mut sim = Sim {
        run: Run::mixed(cfg.clone(), sources.clone()),
        now: Instant::now(),
        place: HashMap::new(),
        applied: HashMap::new(),
        sizes: Vec::new(),
    };
    sim.form(&["a", "b"]);
    sim.run_to_the_end();
    assert!(sim.run.finished());
    assert_eq!(
        sim.run.source_samples(),
        [("s3://b/big", 300), ("s3://b/small", 100)]
    );
    // A restart resumes the counts from the journal's snapshot.
    let mut restarted = Run::mixed(cfg.clone(), sources.clone());
    restarted.restore(sim.run.snapshot()).expect("restore");
    assert_eq!(restarted.source_samples(), sim.run.source_samples());
    // Other weights, another source or another order is another run.
    for other in [
        mixed_config(&[("s3://b/big", 2.0), ("s3://b/small", 1.0)]),
        mixed_config(&[("s3://b/small", 1.0), ("s3://b/big", 3.0)]),
        mixed_config(&[("s3://b/big", 3.0), ("s3://b/other", 1.0)]),
    ] {
        let run = Run::mixed(other, sources.clone());
        let why = run.identity.mismatch(&sim.run.identity).expect("refused");
        assert!(why.contains("s3://b/small (weight 1)"), "{why}");
    }
    // A single root keeps the identity it had before mixing existed.
    let mut single = config(1, 10, 2);
    single.data.root = Some("s3://b/big".into());
    let run = Run::new(single, vec![10; 30]);
    assert_eq!(run.identity.data_root, "s3://b/big");
    assert_eq!(run.source_samples(), [("s3://b/big", 0)]);
}

#[test]
fn step_calls_stand_in_for_heartbeats_and_clear_a_store_wait() {
    let mut sim = Sim::new(config(1, 4, 2), vec![8; 4]);
    sim.form(&["a", "b"]);
    let g = sim.place["a"].generation;
    let waited = |sim: &Sim, id: &str| {
        let s = sim.run.status();
        let w = s
            .workers
            .iter()
            .find(|w| w.worker_id == id)
            .expect("member");
        w.store_wait_s
    };
    sim.run.heartbeat("a", g, 30.0, sim.now).expect("beat");
    assert_eq!(waited(&sim, "a"), 30.0);
    // Only step calls, 4 s apart, for longer than the heartbeat timeout (10 s): nobody is
    // declared dead.
    for step in 1..=4 {
        sim.later(4.0);
        sim.step_all(step).expect("a step");
        sim.run.tick(sim.now);
        assert_eq!(
            sim.run.counters.worker_deaths, 0,
            "a member counted as silent at step {step}"
        );
    }
    assert_eq!(
        waited(&sim, "a"),
        0.0,
        "a rank that commits steps is not waiting on its store"
    );
    // Silence is still noticed.
    sim.later(11.0);
    sim.run.tick(sim.now);
    assert_eq!(sim.run.counters.worker_deaths, 1);
}
