"""Preflight: `ampo train` / `eval` / `doctor` check every remote endpoint before any engine starts (unreachable,
key missing or refused, model not served) and stop with one line naming the field."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from cluster import cli
from cluster.config import load_config
from cluster.preflight import check_endpoint, endpoint_sections
from testing.fault_server import FaultConfig, FaultServer

TINY = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"
KEY_ENV = "AMPO_TEST_PREFLIGHT_KEY"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def no_engines(monkeypatch: pytest.MonkeyPatch) -> None:
    """Anything that would start Ray, an engine or a judge server fails the test."""
    import cluster.endpoints
    import cluster.ray_cluster

    def started(*args, **kwargs):
        raise AssertionError("an engine or Ray was started before the preflight stopped the command")

    monkeypatch.setattr(cluster.ray_cluster, "connect", started)
    monkeypatch.setattr(cluster.endpoints, "open_endpoint", started)


@pytest.fixture
def keyed_server():
    with FaultServer(FaultConfig(api_key="s3cret")) as server:
        yield server


def judge_args(url: str) -> list[str]:
    return [f"reward.judge.base_url={url}", "reward.judge.model=fault-judge", f"reward.judge.api_key_env={KEY_ENV}"]


def train(tmp_path: Path, *overrides: str) -> list[str]:
    states = tmp_path / "states.parquet"
    states.touch()  # present (it is read after the preflight)
    return ["train", "--config", str(TINY), f"data.train_states={states}", f"cluster.run_dir={tmp_path / 'run'}", *overrides]


def test_train_stops_before_any_engine_on_an_unreachable_judge(tmp_path, capsys, no_engines) -> None:
    assert cli.main(train(tmp_path, *judge_args(f"http://127.0.0.1:{closed_port()}/v1"))) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "reward.judge: FAILED" in err and "not reachable" in err


@pytest.mark.integration
def test_train_stops_on_a_missing_key_and_doctor_says_the_same(tmp_path, capsys, no_engines, keyed_server, monkeypatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    assert cli.main(train(tmp_path, *judge_args(keyed_server.base_url))) == 2
    err = capsys.readouterr().err
    assert "reward.judge: FAILED" in err and f"${KEY_ENV} is not set here" in err
    assert cli.main(["doctor", "--config", str(TINY), f"cluster.run_dir={tmp_path / 'run'}", *judge_args(keyed_server.base_url)]) == 2
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"cluster.run_dir: ok: {tmp_path / 'run'} writable")
    assert out[1].startswith("reward.judge: FAILED") and f"${KEY_ENV} is not set here" in out[1]
    assert out[2] == "eval.judge: ok: a local server started by this run"


@pytest.mark.integration
def test_a_refused_key_an_unserved_model_and_a_good_endpoint(keyed_server, monkeypatch) -> None:
    section = load_config(TINY, judge_args(keyed_server.base_url)).reward.judge
    monkeypatch.setenv(KEY_ENV, "wrong")
    assert "was refused" in check_endpoint("reward.judge", section).detail
    monkeypatch.setenv(KEY_ENV, "s3cret")
    good = check_endpoint("reward.judge", section)
    assert good.ok and good.detail.endswith("answered")
    other = check_endpoint("reward.judge", section.model_copy(update={"model": "qwen2.5-72b-instruct"}))
    assert not other.ok and "does not serve 'qwen2.5-72b-instruct'; it serves fault-judge" in other.detail


def test_every_endpoint_a_command_calls_is_checked() -> None:
    config = load_config(TINY, ["eval.partner.base_url=http://x/v1", "eval.partner.model=m"])
    assert [f for f, _ in endpoint_sections(config)] == ["reward.judge", "eval.judge", "eval.partner"]
    assert [f for f, _ in endpoint_sections(config, training=False)] == ["eval.judge", "eval.partner"]


@pytest.mark.integration
def test_a_key_file_on_shared_storage_reaches_every_caller(keyed_server, tmp_path, monkeypatch) -> None:
    # The documented route for a cluster job: the key in a file every node reads, named by api_key_file; the
    # variable is not set in the job (the shell that ran `ray job submit` does not pass its environment on).
    monkeypatch.delenv(KEY_ENV, raising=False)
    key_file = tmp_path / "judge.key"
    key_file.write_text("s3cret\n")
    section = load_config(TINY, [*judge_args(keyed_server.base_url), f"reward.judge.api_key_file={key_file}"]).reward.judge
    assert check_endpoint("reward.judge", section).ok
    key_file.write_text("")
    assert "is empty" in check_endpoint("reward.judge", section).detail


def test_a_read_only_or_full_run_directory_stops_the_command_naming_it(tmp_path, capsys, no_engines, monkeypatch) -> None:
    import errno
    import shutil
    import tempfile
    from collections import namedtuple

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')  # an earlier run's results stay as they are

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    with monkeypatch.context() as patch:
        patch.setattr(tempfile, "NamedTemporaryFile", read_only)
        assert cli.main(train(tmp_path)) == 2
    err = capsys.readouterr().err
    assert f"cluster.run_dir: FAILED: {run_dir} cannot be written: Read-only file system" in err
    usage = namedtuple("usage", "total used free")
    with monkeypatch.context() as patch:
        patch.setattr(shutil, "disk_usage", lambda path: usage(10 << 30, (10 << 30) - (5 << 20), 5 << 20))
        assert cli.main(train(tmp_path)) == 2
    assert f"cluster.run_dir: FAILED: {run_dir} has 5 MiB free; a run needs at least 256 MiB" in capsys.readouterr().err
    assert sorted(p.name for p in run_dir.iterdir()) == ["metrics.jsonl"]
    assert (run_dir / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_a_disk_that_fills_during_a_command_gives_one_line_not_a_traceback(tmp_path, capsys, monkeypatch) -> None:
    """Past the preflight, a full disk (a checkpoint, a results file) ends the command with the error's own words,
    which name the path; other OS errors keep their traceback."""
    import errno

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "metrics.jsonl"))

    monkeypatch.setattr(cli, "_doctor", full)
    assert cli.main(["doctor", "--config", str(TINY)]) == 1
    assert capsys.readouterr().err.strip() == f"ampo: [Errno 28] No space left on device: '{tmp_path / 'run' / 'metrics.jsonl'}'"

    def other(args):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(cli, "_doctor", other)
    with pytest.raises(OSError):
        cli.main(["doctor", "--config", str(TINY)])
