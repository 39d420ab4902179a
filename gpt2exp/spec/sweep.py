"""A sweep: settings (e.g. learning rates) tried for every variant, so that each variant is compared at its own
best setting. The first seed selects each variant's setting; the remaining seeds give the verdict at it, so the
selection never sees the seeds the verdict is made on."""

from __future__ import annotations

import itertools
from typing import Annotated, Any, Literal

from pydantic import Field

from gpt2exp.spec.sections import Strict, point_name

Value = str | int | float | bool | None


class SweepSpec(Strict):
    """Settings crossed with the variants; trials run on Ray Tune, each variant's best setting is chosen on seed 1."""

    params: dict[str, Annotated[list[Value], Field(min_length=1)]] = Field(
        min_length=1, description="Dotted path -> values tried for every variant, e.g. {train.lr: [1.0e-3, 2.0e-3, 4.0e-3]}."
    )
    scheduler: Literal["none", "asha"] = Field(
        default="none", description="asha: stop a variant's poor settings early (ASHA on validation loss, within each variant)."
    )
    grace_period: int | None = Field(
        default=None, gt=0, description="ASHA: steps a trial trains before it may be stopped (default: train.eval_interval)."
    )
    reduction_factor: int = Field(default=2, ge=2, description="ASHA: at each rung, the best 1/reduction_factor go on.")

    def settings(self) -> list[tuple[str, dict[str, Any]]]:
        """(name, overrides) of every setting, e.g. ``("lr=0.002", {"train.lr": 0.002})``."""
        keys = list(self.params)
        out = []
        for combo in itertools.product(*(self.params[k] for k in keys)):
            values = dict(zip(keys, combo, strict=True))
            out.append((point_name(values), values))
        return out

    def problems(self, n_seeds: int, num_workers: int, tracking: bool, fixed: dict[str, str]) -> list[str]:
        """What the rest of the spec must give a sweep: seeds after the selection one, one-worker trials, MLflow, and
        swept fields that no variant or grid sets too (``fixed``: path -> where it is set)."""
        out = [
            f"sweep.params.{key}: also set by {where}; a swept field takes its values from the sweep alone"
            for key, where in fixed.items()
            if key in self.params
        ]
        if n_seeds < 2:
            out.append(
                "sweep: needs at least 2 seeds (seed 1 selects each variant's setting, the others give the verdict); "
                "set train.seeds, e.g. [1, 2, 3]"
            )
        if num_workers != 1:
            out.append(
                "sweep: trials run one worker each on Ray Tune; set parallel.num_workers: 1 (multi-worker trials are not supported)"
            )
        if not tracking:
            out.append("sweep: the selection and the verdict are read from MLflow; set tracking.enabled: true")
        return out

    def n_runs(self, n_variants: int, n_seeds: int) -> int:
        """Trials: every variant x setting on the first seed, then every variant on the other seeds."""
        return n_variants * (len(self.settings()) + n_seeds - 1)
