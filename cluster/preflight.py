"""Preflight: before any engine starts, every model endpoint the config names must answer.

A wrong judge address, a key that did not reach the job or a model name the server does not serve would otherwise
show up only as unscored samples after the engines have loaded and the step-0 evaluation has played its episodes.
For each remote endpoint (`reward.judge`, `eval.judge`, `eval.partner`, `eval.policy`; `local` ones are started by the run itself)
the check, made from this process:

1. reads the key as the calls will (`api_key_env`, else `api_key_file`);
2. lists the served models and finds the configured one (servers that cannot list models are let through);
3. sends one tiny chat request and needs an answer.

The run directory is checked first: it must be writable and have room (`check_run_dir`). A failure stops the
command with one line that names the field. `ampo doctor --config F` runs the same checks and prints each result.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import openai

from cluster.config import Config, ConfigError
from reward.config import JudgeConfig
from reward.judge import load_api_key

log = logging.getLogger(__name__)

LOCAL = "local"
TIMEOUT_S = 20.0
MIN_FREE_BYTES = 256 << 20
"""Free space a run directory needs before a command starts (a checkpoint of the tiny test model is a few MiB; a
paper run's are tens of GB, which a full disk reports when it is written, leaving the previous one intact)."""


@dataclass(frozen=True)
class EndpointCheck:
    field: str
    """The config section, e.g. `reward.judge`."""
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{self.field}: {'ok' if self.ok else 'FAILED'}: {self.detail}"


def endpoint_sections(config: Config, *, training: bool = True) -> list[tuple[str, JudgeConfig]]:
    """The endpoints a command calls: the reward judge when it trains, the evaluator, and the partner and the API
    policy if set (the API policy only in `ampo eval`: training always evaluates its own checkpoints)."""
    sections: list[tuple[str, JudgeConfig]] = [("reward.judge", config.reward.judge)] if training else []
    sections.append(("eval.judge", config.eval.judge))
    if config.eval.partner is not None:
        sections.append(("eval.partner", config.eval.partner))
    if config.eval.policy is not None and not training:
        sections.append(("eval.policy", config.eval.policy))
    return sections


def check_endpoint(field: str, section: JudgeConfig, *, timeout_s: float = TIMEOUT_S) -> EndpointCheck:
    """Key, model and one answer of one endpoint (see the module docstring)."""
    if section.base_url == LOCAL:
        return EndpointCheck(field, True, "a local server started by this run")
    try:
        key = load_api_key(section)
    except ValueError as exc:
        return EndpointCheck(field, False, str(exc))
    where = f"{section.base_url} (model {section.model})"
    client = openai.OpenAI(base_url=section.base_url, api_key=key or "unused", timeout=timeout_s, max_retries=0)
    try:
        try:
            served = [m.id for m in client.models.list()]
        except openai.NotFoundError:
            served = []  # some gateways do not list models; the request below still checks the name
        if served and section.model not in served:
            return EndpointCheck(field, False, f"{where} does not serve {section.model!r}; it serves {', '.join(served[:8])}")
        client.chat.completions.create(
            model=section.model, messages=[{"role": "user", "content": "Reply with OK."}], max_tokens=4, temperature=0.0
        )
    except openai.AuthenticationError:
        hint = f"${section.api_key_env} is not set here" if key is None else f"the key from ${section.api_key_env} or the key file was refused"
        return EndpointCheck(field, False, f"{where} refused the request: {hint}")
    except openai.APIConnectionError as exc:
        return EndpointCheck(field, False, f"{where} is not reachable from this machine: {exc.__cause__ or exc}")
    except openai.APIError as exc:
        return EndpointCheck(field, False, f"{where} answered with an error: {exc}")
    finally:
        client.close()
    return EndpointCheck(field, True, f"{where} answered")


def check_endpoints(config: Config, *, training: bool = True) -> list[EndpointCheck]:
    """Every endpoint a command calls, checked (what `ampo doctor` prints)."""
    return [check_endpoint(field, section) for field, section in endpoint_sections(config, training=training)]


def check_run_dir(config: Config, *, min_free_bytes: int = MIN_FREE_BYTES) -> EndpointCheck:
    """`cluster.run_dir` can be created and written (a probe file is written, synced and removed), and its disk
    has at least `min_free_bytes` free: a read-only or full disk is named before any work, not found by a
    checkpoint or a results line that cannot be written."""
    run_dir = Path(config.cluster.run_dir)
    field = "cluster.run_dir"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=run_dir, prefix=".ampo-probe-") as probe:
            probe.write(b"ampo")
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as exc:
        return EndpointCheck(field, False, f"{run_dir} cannot be written: {exc.strerror or exc}")
    free = shutil.disk_usage(run_dir).free
    if free < min_free_bytes:
        return EndpointCheck(field, False, f"{run_dir} has {free / 2**20:.0f} MiB free; a run needs at least "
                                           f"{min_free_bytes / 2**20:.0f} MiB (checkpoints, rollouts, results)")
    return EndpointCheck(field, True, f"{run_dir} writable, {free / 2**30:.1f} GiB free")


def preflight(config: Config, *, training: bool = True) -> list[EndpointCheck]:
    """Check the run directory and every endpoint; raise ConfigError naming the failed fields, else return the
    checks."""
    checks = [check_run_dir(config), *check_endpoints(config, training=training)]
    for check in checks:
        log.info("preflight %s", check.line())
    failed = [c for c in checks if not c.ok]
    if failed:
        raise ConfigError("; ".join(c.line() for c in failed))
    return checks
