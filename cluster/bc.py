"""The behaviour-cloning stage (`ampo bc`): check the demonstrations, then clone them with the BC learner."""

from __future__ import annotations

from pathlib import Path

from cluster.config import Config
from cluster.stages import bc_model_path, demos_path, existing
from learner.bc import load_bc_records


def run_bc_command(
    config: Config,
    *,
    data: str | Path | None = None,
    model_path: str | Path | None = None,
    out_dir: str | Path | None = None,
) -> Path:
    """Behaviour-clone the configured rollout model (or `model_path`) on `data` (default `data.bc_data`) with the
    `bc` and `learner` settings and write the HF folder to `out_dir` (default `bc.output`, else
    `<run_dir>/bc_model`). Records are checked first (file, row, field); Ray is started or joined as
    `cluster.address` says and shut down again when this call started it."""
    import ray

    from cluster.sources import resolve_data, resolve_model
    from cluster.ray_cluster import MACHINE_CORES, bc_rank_options, connect, learner_core_sets, shutdown_local
    from learner.bc import run_bc

    source = data if data is not None else existing(demos_path(config), "demonstrations", "make-demos", "data.bc_data")
    records = [record.model_dump() for record in load_bc_records(resolve_data(source), check_format=True)]
    model = resolve_model(model_path if model_path is not None else config.rollout.model)
    out = Path(out_dir) if out_dir is not None else bc_model_path(config)
    started_ray = not ray.is_initialized()
    connect(config)
    try:
        # BC runs alone: with learner pinning on, its ranks get every core back (this process was pinned off some).
        cores = None if learner_core_sets(config) is None else [MACHINE_CORES] * config.learner.num_ranks
        return run_bc(
            config.bc, records, model, out, learner=config.learner, seed=config.cluster.seed,
            ray_options=bc_rank_options(config), cpu_cores=cores,
        )
    finally:
        if started_ray:
            shutdown_local()
