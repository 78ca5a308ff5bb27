//! Chaos: one run, with workers and the coordinator SIGKILLed at random moments (20 and 3 by
//! default) and restarted in place with the same arguments, as Kubernetes restarts them. The
//! run must end, and its audit must show the whole step contract: every sample exactly once
//! per epoch, full global batches, every step counted, equal parameters on every rank.
//!
//! Bigger by hand: `FERROCLIP_CHAOS_WORKER_KILLS=200 FERROCLIP_CHAOS_COORDINATOR_KILLS=20
//! FERROCLIP_CHAOS_EPOCHS=120 cargo nextest run -p ferroclip --test chaos --no-capture`.

mod run_common;

use std::time::{Duration, Instant};

use run_common::*;

const BATCH: u32 = 24;

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A tiny deterministic generator (the kills' order; their timing is the machine's).
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

#[test]
fn random_sigkills_of_workers_and_the_coordinator_keep_the_step_contract() {
    let worker_kills = env_num("FERROCLIP_CHAOS_WORKER_KILLS", 20);
    let coordinator_kills = env_num("FERROCLIP_CHAOS_COORDINATOR_KILLS", 3);
    let epochs = env_num("FERROCLIP_CHAOS_EPOCHS", 50) as usize;
    let tmp = tempfile::tempdir().expect("tmp");
    let data = synth(tmp.path(), 600, 9);
    let run_dir = tmp.path().join("run").display().to_string();
    let cfg = run_config(
        tmp.path(),
        &run_dir,
        &data,
        BATCH,
        "[checkpoint]\nevery_steps = 10",
    );
    let text = std::fs::read_to_string(&cfg)
        .expect("cfg")
        .replace("epochs = 1", &format!("epochs = {epochs}"))
        .replace("max_workers = 4", "max_workers = 3");
    std::fs::write(&cfg, text).expect("cfg");
    let (grpc, http) = (free_port(), free_port());
    let ids = ["w-a", "w-b", "w-c"];
    let mut coord = coordinator(&cfg, grpc, http);
    let mut workers: Vec<Proc> = ids.iter().map(|id| worker(grpc, id)).collect();
    let t0 = Instant::now();
    let total_kills = worker_kills + coordinator_kills;
    // Spread the coordinator's kills over the sequence.
    let coordinator_turns: Vec<u64> = (1..=coordinator_kills)
        .map(|i| i * total_kills / (coordinator_kills + 1))
        .collect();
    let mut rng = Lcg(0xc4a05);
    let (mut killed_workers, mut killed_coordinator) = (0, 0);
    let mut last_kill_step = 0;
    let mut recovered = Vec::new();
    for turn in 0..total_kills {
        // Let the run go on a few steps between kills (random 1-4).
        let gap = 1 + rng.below(4);
        let s = wait_until(
            http,
            "progress before a kill",
            Duration::from_secs(120),
            // A kill lands on a full world: a restarted worker re-joins only once its old
            // session has lapsed (cluster.heartbeat_timeout_s), and a kill of a worker still
            // waiting outside would end no generation.
            |s| {
                let full = s["state"] == "training"
                    && s["workers"].as_array().map_or(0, Vec::len) == ids.len();
                (step_of(s) >= last_kill_step + gap && full) || s["state"] == "finished"
            },
        );
        if s["state"] == "finished" {
            eprintln!("the run finished before kill {turn}");
            break;
        }
        last_kill_step = step_of(&s);
        let t = Instant::now();
        if coordinator_turns.contains(&turn) {
            coord.0.kill().expect("kill coordinator");
            let _ = coord.0.wait();
            coord = coordinator(&cfg, grpc, http);
            killed_coordinator += 1;
        } else {
            let i = rng.below(ids.len() as u64) as usize;
            workers[i].0.kill().expect("kill worker");
            let _ = workers[i].0.wait();
            std::thread::sleep(Duration::from_millis(200 + 100 * rng.below(8)));
            workers[i] = worker(grpc, ids[i]);
            killed_workers += 1;
        }
        let before = last_kill_step;
        let s = wait_until(
            http,
            "a step after the kill",
            Duration::from_secs(120),
            |s| step_of(s) > before || s["state"] == "finished",
        );
        recovered.push(t.elapsed().as_secs_f64());
        last_kill_step = step_of(&s);
    }
    let s = wait_until(http, "the end", Duration::from_secs(600), |s| {
        s["state"] == "finished"
    });
    for (i, w) in workers.iter_mut().enumerate() {
        let st = exit_within(w, Duration::from_secs(60));
        assert!(st.success(), "{}: {st}", ids[i]);
    }
    let steps =
        assert_epochs_contract(&data, &run_dir, &Default::default(), BATCH as usize, epochs);
    recovered.sort_by(f64::total_cmp);
    let median = recovered.get(recovered.len() / 2).copied().unwrap_or(0.0);
    let max = recovered.last().copied().unwrap_or(0.0);
    eprintln!(
        "chaos: {killed_workers} worker and {killed_coordinator} coordinator SIGKILLs, {} steps, \
         generation {}, samples lost/repeated 0/0, {:.0}s wall; kill → next committed step: \
         median {median:.1}s, max {max:.1}s",
        steps.len(),
        s["generation"],
        t0.elapsed().as_secs_f64()
    );
    assert_eq!(killed_workers, worker_kills, "every worker kill happened");
    assert_eq!(killed_coordinator, coordinator_kills);
}
