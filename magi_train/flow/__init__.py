"""Flow-matching math: noising path, sigma sampling, losses, conditioning (pure functions)."""

from magi_train.flow.matching import (
    AUDIO_SIGMA,
    Mode,
    add_noise,
    check_audio_sigma,
    condition_velocities,
    drop_text,
    impose_conditions,
    joint_flow_loss,
    masked_mse,
    noise_clip,
    sample_modes,
    sample_sigma,
    sample_sigma_pair,
    shift_sigma,
    velocity_target,
    x0_from_velocity,
)

__all__ = [
    "AUDIO_SIGMA",
    "Mode",
    "add_noise",
    "check_audio_sigma",
    "condition_velocities",
    "drop_text",
    "impose_conditions",
    "joint_flow_loss",
    "masked_mse",
    "noise_clip",
    "sample_modes",
    "sample_sigma",
    "sample_sigma_pair",
    "shift_sigma",
    "velocity_target",
    "x0_from_velocity",
]
