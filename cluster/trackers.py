"""Optional copies of the run's metrics in TensorBoard event files and Weights & Biases (offline mode).

The driver hands every record it appends to `<run_dir>/metrics.jsonl` (one per learner step, one per evaluation)
to `Trackers.log(step, record)`; each enabled tracker gets the record's numeric values as scalars at that step,
under the same keys (`reward_mean`, `mode_fraction/1`, `eval/goal_actor`, ...). Keys that are not metrics
(`step`, `time`) and null values (a mode absent from a step) are left out.

* `logging.tensorboard: true`: event files in `<run_dir>/tensorboard/` (`tensorboard --logdir <run_dir>/tensorboard`),
  written with `torch.utils.tensorboard.SummaryWriter` when the tensorboard package is installed, else with
  tensorboardX's writer of the same format (Ray Tune's dependency).
* `logging.wandb: true`: a W&B run in offline mode (`WANDB_MODE=offline`, files in `<run_dir>/wandb/`), project and
  run named after the run (`logging.run_name`, else the name of `cluster.run_dir`), the resolved config as the W&B
  config; `wandb sync <run_dir>/wandb/offline-run-*` uploads it later.

A missing package is reported when the driver is created, before any role starts, naming the field and the
package to install (`pip install -e '.[tracking]'` installs both). Writers open on the first record.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from cluster.config import Config, LoggingConfig

log = logging.getLogger(__name__)

NOT_METRICS = frozenset({"step", "time"})
"""Record keys that are not logged as scalars: the step is the x axis, `time` a wall-clock timestamp."""


class TrackerError(RuntimeError):
    """An enabled tracker cannot run (its package is missing); the message names the field and the package."""


class Tracker(Protocol):
    def log(self, step: int, scalars: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


def scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The record's numeric values by key, without `step`, `time`, nulls and non-numbers."""
    return {
        key: float(value)
        for key, value in record.items()
        if key not in NOT_METRICS and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def summary_writer_class() -> Callable[..., Any]:
    """`torch.utils.tensorboard.SummaryWriter` (needs tensorboard), else tensorboardX's; TrackerError without both."""
    try:
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter
    except ImportError:
        pass
    try:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    except ImportError:
        raise TrackerError(
            "logging.tensorboard=true needs the tensorboard package: pip install tensorboard "
            "(or pip install -e '.[tracking]'), or set logging.tensorboard=false"
        ) from None


def wandb_module() -> Any:
    try:
        import wandb
    except ImportError:
        raise TrackerError(
            "logging.wandb=true needs the wandb package: pip install wandb (or pip install -e '.[tracking]'), "
            "or set logging.wandb=false"
        ) from None
    return wandb


class TensorBoardTracker:
    """Scalars in TensorBoard event files under `log_dir`, flushed after every record."""

    def __init__(self, log_dir: Path, writer_class: Callable[..., Any] | None = None) -> None:
        self.log_dir = Path(log_dir)
        self._writer_class = writer_class or summary_writer_class()
        self._writer: Any = None

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        if self._writer is None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._writer = self._writer_class(str(self.log_dir))
        for key, value in scalars.items():
            self._writer.add_scalar(key, value, step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class WandbTracker:
    """An offline W&B run (`WANDB_MODE=offline`) in `<directory>/wandb/`, project and name `run`."""

    def __init__(self, directory: Path, run: str, config: Mapping[str, Any] | None = None, module: Any = None) -> None:
        self.directory = Path(directory)
        self.run = run
        self.config = dict(config or {})
        self._wandb = module or wandb_module()
        self._run: Any = None

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        if self._run is None:
            os.environ["WANDB_MODE"] = "offline"
            self.directory.mkdir(parents=True, exist_ok=True)
            self._run = self._wandb.init(
                project=self.run, name=self.run, dir=str(self.directory), mode="offline", config=self.config
            )
        # A finite-only copy: W&B charts drop NaN anyway, and an evaluation without hard episodes reports NaN.
        self._run.log({k: v for k, v in scalars.items() if math.isfinite(v)}, step=step)

    def close(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None


class Trackers:
    """The trackers `logging` enables; `log` and `close` go to each. None enabled: both do nothing."""

    def __init__(self, trackers: list[Tracker] | None = None) -> None:
        self.trackers: list[Tracker] = list(trackers or [])

    @classmethod
    def for_run(cls, config: Config) -> Trackers:
        """The trackers of `config.logging`, writing under `cluster.run_dir`; raises TrackerError for a missing package."""
        from cluster.metrics import run_label

        section: LoggingConfig = config.logging
        run_dir = Path(config.cluster.run_dir)
        trackers: list[Tracker] = []
        if section.tensorboard:
            trackers.append(TensorBoardTracker(run_dir / "tensorboard"))
        if section.wandb:
            trackers.append(WandbTracker(run_dir, run_label(config), config.model_dump(mode="json")))
        return cls(trackers)

    def log(self, step: int, record: Mapping[str, Any]) -> None:
        values = scalars(record)
        for tracker in self.trackers:
            try:
                tracker.log(step, values)
            except Exception as exc:  # noqa: BLE001 - a tracker failing must not stop training; metrics.jsonl has it all
                log.warning("%s could not log step %d: %r", type(tracker).__name__, step, exc)

    def close(self) -> None:
        for tracker in self.trackers:
            try:
                tracker.close()
            except Exception as exc:  # noqa: BLE001
                log.warning("closing %s failed: %r", type(tracker).__name__, exc)
