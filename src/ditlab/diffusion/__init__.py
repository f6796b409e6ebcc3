"""The Gaussian diffusion of DiT (ADM / Improved DDPM): schedules and respacing, the process
and its training losses, and the samplers; flow matching (SiT) beside it."""

from ditlab.diffusion.flow_matching import FlowMatching
from ditlab.diffusion.process import Diffusion
from ditlab.diffusion.samplers import SAMPLERS
from ditlab.diffusion.schedule import BETA_SCHEDULES

__all__ = ["BETA_SCHEDULES", "Diffusion", "FlowMatching", "SAMPLERS"]
