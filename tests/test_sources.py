"""Models and data from the Hugging Face Hub, wherever a path is accepted (`cluster/sources.py`).

There is no Hub to reach from the test machines, so each test lays out a Hugging Face cache by hand (the layout
`huggingface_hub` writes: `<kind>--<owner>--<name>/refs/main` and `snapshots/<commit>/...`) and runs offline; the
resolution code is the same that downloads on a connected machine."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from actors.sotopia import BUNDLED_SCENARIOS, SotopiaDataset
from cluster import sources, stages
from cluster.cli import main as ampo
from cluster.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent
TINY_CONFIG = ROOT / "configs" / "tiny.yaml"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _snapshot(cache: Path, kind: str, repo: str) -> Path:
    base = cache / f"{kind}--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(COMMIT)
    folder = base / "snapshots" / COMMIT
    folder.mkdir(parents=True)
    return folder


@pytest.fixture
def hub(tmp_path, monkeypatch, tiny_model_dir):
    """An offline Hub cache holding the tiny model as `acme/tiny-chat` and a dataset `acme/social` with the bundled
    scenarios under `scenarios/` and a states file."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    shutil.copytree(tiny_model_dir, _snapshot(cache, "models", "acme/tiny-chat"), dirs_exist_ok=True)
    data = _snapshot(cache, "datasets", "acme/social")
    shutil.copytree(BUNDLED_SCENARIOS, data / "scenarios", ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    (data / "data").mkdir()
    (data / "data" / "notes.json").write_text("[]")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    sources._hub_model.cache_clear()
    sources._hub_data.cache_clear()
    yield cache
    sources._hub_model.cache_clear()
    sources._hub_data.cache_clear()


def test_models_resolve_from_local_folders_and_hub_ids(hub, tiny_model_dir, tmp_path):
    folder = sources.resolve_model("acme/tiny-chat")
    assert folder.is_relative_to(hub) and (folder / "config.json").is_file()
    assert sources.resolve_model(f"acme/tiny-chat@{COMMIT}") == folder  # pinned to a revision
    assert sources.resolve_model(str(tiny_model_dir)) == tiny_model_dir  # a local folder is used as it is
    with pytest.raises(FileNotFoundError, match=r"model 'acme/absent': no local folder of that name, and the Hugging Face Hub did not give it"):
        sources.resolve_model("acme/absent")
    with pytest.raises(FileNotFoundError, match=r"no such local folder, and not a Hub model id"):
        sources.resolve_model(str(tmp_path / "nowhere" / "model"))
    with pytest.raises(FileNotFoundError, match=r"not a Hugging Face model folder \(no config.json\)"):
        sources.resolve_model(str(tmp_path))


def test_data_resolves_hub_files_and_folders(hub, tmp_path):
    scenarios = sources.resolve_data("hf://acme/social/scenarios")
    assert scenarios.is_dir() and len(SotopiaDataset.load(scenarios)) == len(SotopiaDataset.load())
    assert sources.resolve_data("hf://acme/social/data/notes.json").read_text() == "[]"
    assert sources.resolve_data(f"hf://acme/social@{COMMIT}/data/notes.json").read_text() == "[]"
    assert sources.resolve_data(tmp_path / "x.json") == tmp_path / "x.json"  # paths stay paths, existing or not
    with pytest.raises(FileNotFoundError, match=r"expected hf://<owner>/<dataset>\[@revision\]/<path in the dataset>"):
        sources.resolve_data("hf://acme/social")
    with pytest.raises(FileNotFoundError, match=r"hf://acme/social/data/absent.json: the Hugging Face Hub did not give it"):
        sources.resolve_data("hf://acme/social/data/absent.json")


def test_config_data_fields_take_hub_sources_and_stages_never_write_into_them(hub, tmp_path):
    config = load_config(TINY_CONFIG, [
        "data.benchmark=sotopia", "data.scenarios=hf://acme/social/scenarios", "data.bc_data=hf://acme/social/data/notes.json",
        "data.train_states=hf://acme/social/data/notes.json", f"cluster.run_dir={tmp_path}",
    ])
    assert config.data.scenarios == "hf://acme/social/scenarios"  # kept as written (the config shows it so)
    assert stages.scenarios_path(config) == sources.resolve_data("hf://acme/social/scenarios")
    assert stages.demos_path(config).read_text() == "[]" and stages.states_path(config).read_text() == "[]"
    with pytest.raises(ConfigError, match=r"data.train_states names a Hugging Face dataset file .* which a stage cannot write"):
        stages.states_path(config, writing=True)
    with pytest.raises(ConfigError, match=r"data.bc_data names a Hugging Face dataset file"):
        stages.demos_path(config, writing=True)
    unset = load_config(TINY_CONFIG, [f"cluster.run_dir={tmp_path}"])
    assert stages.scenarios_path(unset) is None and stages.states_path(unset, writing=True) == tmp_path / "train_rl.parquet"


def test_commands_read_hub_data_and_refuse_to_write_into_it(hub, capsys):
    assert ampo(["data", "check", "hf://acme/social/scenarios"]) == 0
    assert "checked 1: 1 OK" in capsys.readouterr().out
    assert ampo(["data", "check", "--config", str(TINY_CONFIG), "data.scenarios=hf://acme/social/scenarios"]) == 0
    assert ampo(["build-states", "--config", str(TINY_CONFIG), "data.train_states=hf://acme/social/data/notes.json"]) == 2
    assert "which a stage cannot write" in capsys.readouterr().err
    assert ampo(["data", "check", "hf://acme/social/data/absent.json"]) == 1
    assert "ampo data: error: hf://acme/social/data/absent.json: the Hugging Face Hub did not give it" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_eval_plays_a_hub_model_on_hub_scenarios(hub, tmp_path, capsys):
    from testing.fault_server import FaultConfig, FaultServer

    run_dir = tmp_path / "run"
    with FaultServer(FaultConfig()) as judge:
        assert ampo([
            "eval", "--config", str(TINY_CONFIG), "rollout.model=acme/tiny-chat", "data.scenarios=hf://acme/social/scenarios",
            f"cluster.run_dir={run_dir}", f"eval.judge.base_url={judge.base_url}", "eval.judge.model=fault-judge",
            f"reward.judge.base_url={judge.base_url}", "reward.judge.model=fault-judge", "eval.max_turns=2",
            "rollout.max_response_tokens=16", "--max-episodes", "1",
        ]) == 0
    assert "all (1 episodes)" in capsys.readouterr().out
    assert (run_dir / "eval" / "tiny-chat-self_play-all.jsonl").is_file()
