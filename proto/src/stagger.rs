//! When a rank sends its report of a step (CommitStep). Thousands of ranks finish a step in the
//! same instant, right after the all-reduce; sent at once, their reports queue on the
//! coordinator's core for its whole per-world cost (~0.3 s at 4,096 ranks), and heartbeats
//! queue behind them. Each rank waits a delay that grows with its rank instead, so the reports
//! arrive spread over part of the next step (bench/README-coordinator.md). Workers send the
//! report off their step loop, so the delay costs training nothing.

use std::time::Duration;

/// The coordinator time to plan per report: it spends ~72 µs of its core on one at 4,096
/// ranks; twice that keeps it under half its core while a world's reports arrive.
pub const PER_RANK: Duration = Duration::from_micros(150);

/// How long rank `rank` of `world` waits after a step of `step_time` before reporting it: the
/// world's reports spread over `world` × 150 µs (0.6 ms at 4 ranks, 0.6 s at 4,096), at most
/// half a step, so every answer is back well before the next step needs it.
pub fn report_delay(rank: u32, world: u32, step_time: Duration) -> Duration {
    let world = world.max(1);
    let spread = (PER_RANK * world).min(step_time / 2);
    spread.mul_f64(f64::from(rank.min(world - 1)) / f64::from(world))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_spread_with_the_world_and_stay_inside_half_a_step() {
        let step = Duration::from_secs(1);
        assert_eq!(report_delay(0, 4096, step), Duration::ZERO);
        // 4,096 ranks: 0.61 s of spread wanted, half the 1 s step allowed.
        let last = report_delay(4095, 4096, step);
        assert!(last < Duration::from_millis(500) && last > Duration::from_millis(499));
        assert_eq!(report_delay(2048, 4096, step), Duration::from_millis(250));
        // 4 ranks: at most 0.6 ms, whatever the step time.
        assert!(report_delay(3, 4, step) <= Duration::from_micros(450));
        // A fast step bounds the spread; a rank beyond the world is the last rank.
        let fast = Duration::from_millis(10);
        assert!(report_delay(4095, 4096, fast) < Duration::from_millis(5));
        assert_eq!(report_delay(9999, 4, step), report_delay(3, 4, step));
        assert_eq!(report_delay(0, 0, step), Duration::ZERO);
    }
}
