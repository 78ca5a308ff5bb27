//! ferroclip's coordinator: owns a run's membership, data plan, step commits and checkpoints.
