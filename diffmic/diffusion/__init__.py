"""Pure diffusion maths: the noise schedule, the samplers and MMD. Imports no network and no engine."""

from .mmd import mmd
from .sampler import SAMPLERS, SamplingSettings, sample, sampling_schedule
from .schedule import NoiseSchedule, antithetic_timesteps

__all__ = ["NoiseSchedule", "SAMPLERS", "SamplingSettings", "antithetic_timesteps", "mmd", "sample",
           "sampling_schedule"]
