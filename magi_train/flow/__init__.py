"""Flow-matching math: noising path, sigma sampling, losses, conditioning (pure functions)."""

from magi_train.flow.matching import (
    Mode,
    add_noise,
    condition_velocities,
    drop_text,
    impose_conditions,
    joint_flow_loss,
    masked_mse,
    noise_clip,
    sample_modes,
    sample_sigma,
    shift_sigma,
    velocity_target,
    x0_from_velocity,
)

__all__ = [
    "Mode",
    "add_noise",
    "condition_velocities",
    "drop_text",
    "impose_conditions",
    "joint_flow_loss",
    "masked_mse",
    "noise_clip",
    "sample_modes",
    "sample_sigma",
    "shift_sigma",
    "velocity_target",
    "x0_from_velocity",
]
