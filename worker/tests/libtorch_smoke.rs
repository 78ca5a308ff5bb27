//! A real tch forward + backward + optimizer step on CPU.

#[test]
fn loss_decreases_over_real_optimizer_steps() {
    let losses = ferroclip_worker::cmd::smoke::train(30, 0);
    assert_eq!(losses.len(), 30);
    assert!(losses.iter().all(|l| l.is_finite()));
    assert!(
        losses[29] < 0.5 * losses[0],
        "loss did not fall enough: first {} last {}",
        losses[0],
        losses[29]
    );
}

#[test]
fn runs_on_the_pinned_libtorch() {
    let v = ferroclip_worker::libtorch::version();
    assert!(v.starts_with("2.11.0"), "libtorch version {v}");
}
