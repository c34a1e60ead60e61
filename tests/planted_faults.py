"""Planted faults for tests of the non-finite policy (``facescale.train.hooks.WorkerHooks``; test-only: no config
key or CLI flag reaches them).

In-process or through Ray: ``run_training(cfg, hooks=PlantedFaults(...).hooks())`` (Ray pickles the hooks to its
workers; :func:`ship_to_ray_workers` lets them unpickle this module without it being on their path).
Under torchrun: ``torchrun ... -m planted_faults --nonfinite-loss-steps 3 -- train --config F ...`` runs the real
``facescale`` CLI with the faults (``tests/`` on ``PYTHONPATH``).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch

from facescale.train.hooks import WorkerHooks


@dataclass(frozen=True)
class PlantedFaults:
    """A NaN loss at the given optimizer steps, and/or a NaN backbone weight after one step, on rank ``rank``."""

    nonfinite_loss_steps: tuple[int, ...] = ()
    nonfinite_weights_step: int | None = None
    rank: int = 0

    def poison_loss(self, step: int, rank: int) -> bool:
        return rank == self.rank and step in self.nonfinite_loss_steps

    def after_step(self, step: int, rank: int, backbone: torch.nn.Module) -> None:
        if step == self.nonfinite_weights_step and rank == self.rank:
            with torch.no_grad():
                next(backbone.parameters()).fill_(float("nan"))

    def hooks(self) -> WorkerHooks:
        return WorkerHooks(poison_loss=self.poison_loss, after_step=self.after_step)


def ship_to_ray_workers() -> None:
    """Pickles this module by value into Ray tasks, so workers need not import it from ``tests/``."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def main(argv: list[str]) -> int:
    from facescale.cli import main as facescale_main

    parser = argparse.ArgumentParser(description="facescale with planted faults (tests only)")
    parser.add_argument("--nonfinite-loss-steps", type=int, nargs="*", default=[])
    parser.add_argument("--nonfinite-weights-step", type=int)
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("facescale_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    rest = args.facescale_args[1:] if args.facescale_args[:1] == ["--"] else args.facescale_args
    faults = PlantedFaults(tuple(args.nonfinite_loss_steps), args.nonfinite_weights_step, args.rank)
    return facescale_main(rest, hooks=faults.hooks())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
