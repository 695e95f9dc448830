"""Subcommands of the data and evaluation pipeline (`ampo data check`, `build-states`, `make-demos`, `bc`,
`eval`, `report`). Each registers a parser whose `handler(args) -> int` runs it."""

from __future__ import annotations

import argparse


def register_pipeline_commands(sub: argparse._SubParsersAction) -> None:
    """Add the pipeline subcommands to the `ampo` parser."""
