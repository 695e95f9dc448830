"""Ray metric classes whose every series carries the `run` tag, and counters that start at 0.

Every role creates its Prometheus series with these drop-in replacements for `ray.util.metrics.Counter`, `Gauge`
and `Histogram`. Each adds the tag key `run` and sets it by default, so call sites pass only their own tags, and
two runs sharing one Ray cluster export separate series.

The driver names its run once (`publish_run`: `logging.run_name`, or the name of `cluster.run_dir`). The name is
kept for the driver's own process and stored in Ray's internal key-value store under the driver's job id; every
actor of the run belongs to that job and reads it there when it creates its metrics. Runs started one after the
other from one process (experiments) publish again before creating their actors. Outside a run (a bench that
creates an actor by itself, a unit test) the tag reads `unnamed`.

`Counter.zero(tag=values, ...)` records 0 for every combination of the given tag values, so a failure counter
exists from start-up and its panel reads 0 rather than "No data" (Ray's `Counter.inc` refuses 0).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable

from ray.util import metrics as _ray

log = logging.getLogger(__name__)

RUN_TAG = "run"
"""The tag key every series carries."""
UNNAMED = "unnamed"
"""The `run` tag of series created outside a run (no name published for the job)."""
_KV_NAMESPACE = "ampo"
_process_run: str | None = None


def _job_key() -> bytes | None:
    import ray

    if not ray.is_initialized():
        return None
    try:
        return f"run_name/{ray.get_runtime_context().get_job_id()}".encode()
    except Exception:  # noqa: BLE001 - no job context: no key
        return None


def publish_run(name: str) -> None:
    """Name the run of this process and (when Ray is up) of every actor the process's job creates from now on."""
    global _process_run
    _process_run = name
    key = _job_key()
    if key is None:
        return
    try:
        from ray.experimental import internal_kv

        internal_kv._internal_kv_put(key, name.encode(), overwrite=True, namespace=_KV_NAMESPACE)
    except Exception as exc:  # noqa: BLE001 - metrics must never stop a run
        log.warning("could not publish the run name %r in Ray's key-value store (actors tag %r): %r", name, UNNAMED, exc)


def current_run() -> str:
    """The run name published in this process, else the one published for this job, else `unnamed`."""
    if _process_run is not None:
        return _process_run
    key = _job_key()
    if key is not None:
        try:
            from ray.experimental import internal_kv

            value = internal_kv._internal_kv_get(key, namespace=_KV_NAMESPACE)
        except Exception:  # noqa: BLE001
            value = None
        if value:
            return value.decode()
    return UNNAMED


def _with_run(tag_keys: Iterable[str] | None) -> tuple[str, ...]:
    keys = tuple(tag_keys or ())
    return keys if RUN_TAG in keys else (*keys, RUN_TAG)


class Counter(_ray.Counter):
    """`ray.util.metrics.Counter` with the `run` tag (default: `current_run()`)."""

    def __init__(
        self, name: str, description: str = "", tag_keys: tuple[str, ...] | None = None, run: str | None = None
    ) -> None:
        self._own_tag_keys = tuple(tag_keys or ())
        super().__init__(name, description, _with_run(tag_keys))
        self.set_default_tags({RUN_TAG: run or current_run()})

    def zero(self, **values: Iterable[str]) -> None:
        """Record 0 for every combination of the tag values given per tag key (all of the counter's own keys)."""
        missing = set(self._own_tag_keys) - set(values)
        if missing:
            raise ValueError(f"{self._name}: zero() needs values for the tag key(s) {sorted(missing)}")
        if self._metric is None:  # a discarded metric (invalid name) records nothing
            return
        keys = list(values)
        for combination in itertools.product(*(list(values[k]) for k in keys)):
            tags = self._get_final_tags(dict(zip(keys, combination, strict=True)))
            self._validate_tags(tags)
            self._metric.record(0.0, tags=tags)

    def __reduce__(self):  # noqa: ANN204
        return Counter, (self._name, self._description, self._own_tag_keys, self._default_tags[RUN_TAG])


class Gauge(_ray.Gauge):
    """`ray.util.metrics.Gauge` with the `run` tag (default: `current_run()`)."""

    def __init__(
        self, name: str, description: str = "", tag_keys: tuple[str, ...] | None = None, run: str | None = None
    ) -> None:
        self._own_tag_keys = tuple(tag_keys or ())
        super().__init__(name, description, _with_run(tag_keys))
        self.set_default_tags({RUN_TAG: run or current_run()})

    def __reduce__(self):  # noqa: ANN204
        return Gauge, (self._name, self._description, self._own_tag_keys, self._default_tags[RUN_TAG])


class Histogram(_ray.Histogram):
    """`ray.util.metrics.Histogram` with the `run` tag (default: `current_run()`)."""

    def __init__(
        self,
        name: str,
        description: str = "",
        boundaries: list[float] | None = None,
        tag_keys: tuple[str, ...] | None = None,
        run: str | None = None,
    ) -> None:
        self._own_tag_keys = tuple(tag_keys or ())
        super().__init__(name, description, boundaries, _with_run(tag_keys))
        self.set_default_tags({RUN_TAG: run or current_run()})

    def __reduce__(self):  # noqa: ANN204
        run = self._default_tags[RUN_TAG]
        return Histogram, (self._name, self._description, self.boundaries, self._own_tag_keys, run)


__all__ = ["RUN_TAG", "UNNAMED", "Counter", "Gauge", "Histogram", "current_run", "publish_run"]
