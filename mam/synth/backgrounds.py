"""Real infant motion as the movement background of simulated recordings.

The simulator (``mam.synth.motion``) perturbs every bone's direction around a rest pose; with a
real background the rest pose is replaced, frame by frame, by the bone directions of real infant
motion (the demo tensors of the MAM reference implementation, ``../shared/data``; see
``mam.synth.real_motion`` for their provenance). The simulated components (general movements,
kicks, and FMs inside the simulated FMs intervals) are added on top, so the FMs truth is the
simulator's and never the real data's, whose labels carry no information.

Pools. The published clips overlap by 180 frames within a bag and reappear in several bags. They
are grouped into disjoint chains of really overlapping clips (74 chains, 28.7 min), and chains are
joined into infants wherever a published infant folder holds clips of both. The ``external`` pool
is four whole infants (``EXTERNAL_INFANTS``, 7.5 min, the demo recording's among them) that share
no clip with the ``train`` pool (the rest, 21 min): an external set built on it moves in ways the
training set never showed.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np

from mam.skeleton import LEFT_RIGHT_PAIRS, NUM_JOINTS, PARENTS
from mam.synth.real_motion import (
    OVERLAP,
    continuous_runs,
    default_data_path,
    load_clips,
    retarget,
    to_camera_frame,
)

Pool = Literal["train", "external"]

EXTERNAL_INFANTS = (
    "prepared_data/Data_derivation/FM-/0004",
    "prepared_data/Data_derivation/FM-/0005",  # the demo recording's motion
    "prepared_data/Data_derivation/FM-/0006",
    "prepared_data/Data_validation/FM-/0004",
)


def clip_chains(clips: np.ndarray, groups: dict[str, np.ndarray]) -> list[list[int]]:
    """Disjoint chains of clip ids, each clip followed by the one it overlaps by 180 frames."""
    succ: dict[int, int] = {}
    pred: dict[int, int] = {}
    for ids in groups.values():
        for run in continuous_runs(clips, ids):
            for a, b in zip(run, run[1:]):
                succ[a], pred[b] = b, a
    chains = []
    for start in (c for c in range(len(clips)) if c not in pred):
        chain = [start]
        while chain[-1] in succ:
            chain.append(succ[chain[-1]])
        chains.append(chain)
    return chains


def pool_chains(clips: np.ndarray, groups: dict[str, np.ndarray], pool: Pool) -> list[list[int]]:
    """The chains of one pool; a chain sharing an infant folder with an external infant goes
    to the external pool with it, so no infant's motion is split across pools."""
    chains = clip_chains(clips, groups)
    chain_of = {c: i for i, ch in enumerate(chains) for c in ch}
    external: set[int] = set()
    frontier = {chain_of[int(c)] for g in EXTERNAL_INFANTS for c in groups["group:" + g]}
    infants = [
        {chain_of[int(c)] for c in ids} for g, ids in groups.items() if "labeled_FM_clips" not in g
    ]
    while frontier:  # close over infants that share a chain
        external |= frontier
        frontier = set().union(*(s for s in infants if s & external)) - external
    keep = [i for i in range(len(chains)) if (i in external) == (pool == "external")]
    return [chains[i] for i in keep]


def stitch_chain(clips: np.ndarray, chain: list[int]) -> np.ndarray:
    parts = [clips[chain[0]]] + [clips[i][OVERLAP:] for i in chain[1:]]
    return np.concatenate(parts, axis=0)


def bone_directions(joints: np.ndarray) -> np.ndarray:
    """Unit direction of each bone ``[T, 17, 3]`` (index = child joint; row 0 unused)."""
    j = np.asarray(joints, np.float64)
    d = np.zeros_like(j)
    for child, parent in enumerate(PARENTS):
        if parent >= 0:
            d[:, child] = j[:, child] - j[:, parent]
    n = np.linalg.norm(d, axis=-1, keepdims=True)
    return np.where(n > 1e-9, d / np.maximum(n, 1e-9), 0.0)


def mirror(directions: np.ndarray) -> np.ndarray:
    """The same movement by the other body side: swap left and right joints, flip image x."""
    d = np.array(directions, copy=True)
    for left, right in LEFT_RIGHT_PAIRS:
        d[:, [left, right]] = d[:, [right, left]]
    d[..., 0] *= -1
    return d


@dataclass(frozen=True)
class BackgroundLibrary:
    """Camera-frame bone directions of every chain of one pool, ready to sample."""

    stretches: tuple[np.ndarray, ...]  # each [T_k, 17, 3] unit bone directions
    pool: str

    @property
    def seconds(self) -> float:
        return sum(len(s) for s in self.stretches) / 25.0

    def sample(self, rng: np.random.Generator, num_frames: int) -> np.ndarray:
        """``[num_frames, 17, 3]`` bone directions of one infant's stretch (drawn in proportion
        to its length), from a random frame, mirrored or not, played back and forth (a
        reversal keeps positions continuous) until ``num_frames`` are filled. One stretch per
        recording, as one infant's posture and style; joining stretches would add posture
        shifts no single recording has."""
        lengths = np.array([len(s) for s in self.stretches], np.float64)
        s = self.stretches[int(rng.choice(len(lengths), p=lengths / lengths.sum()))]
        if rng.random() < 0.5:
            s = mirror(s)
        cycle = np.concatenate([s, s[-2:0:-1]]) if len(s) > 2 else s  # forward, then back
        start = int(rng.integers(len(cycle)))
        idx = (start + np.arange(num_frames)) % len(cycle)
        return np.ascontiguousarray(cycle[idx], dtype=np.float32)


@lru_cache(maxsize=4)
def load_library(pool: Pool = "train", path: str | None = None) -> BackgroundLibrary:
    """The chains of ``pool`` from the shared real motion, in the camera-aligned frame."""
    clips, groups = load_clips(path or default_data_path())
    stretches = tuple(
        bone_directions(retarget(to_camera_frame(stitch_chain(clips, ch)))).astype(np.float32)
        for ch in pool_chains(clips, groups, pool)
    )
    if not stretches:
        raise ValueError(f"no real motion in pool {pool!r}")
    assert all(s.shape[1:] == (NUM_JOINTS, 3) for s in stretches)
    return BackgroundLibrary(stretches, pool)


__all__ = [
    "EXTERNAL_INFANTS",
    "BackgroundLibrary",
    "bone_directions",
    "clip_chains",
    "load_library",
    "mirror",
    "pool_chains",
]
