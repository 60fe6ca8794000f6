"""Simulated infants with known ground truth, and renderings of them.

A SIMULATION, NOT PHYSIOLOGY: see ``mam.synth.motion``. ``write_dataset`` writes the training
layout of ``mam.training.dataset``; ``mam.synth.render`` turns poses into a video that
BlazePose tracks.
"""

from mam.synth.dataset import write_dataset
from mam.synth.motion import CATEGORIES, SimParams, SimulatedInfant, simulate_infant

__all__ = ["CATEGORIES", "SimParams", "SimulatedInfant", "simulate_infant", "write_dataset"]
