from pathlib import Path

import pytest
import yaml

from cluster.cli import main
from cluster.config import Config, ConfigError, config_template, dump_config, load_config

CONFIGS = sorted(p for p in (Path(__file__).resolve().parent.parent / "configs").glob("*.yaml") if p.name != "runtime_env.yaml")
PAPER_CONFIGS = [p for p in CONFIGS if p.name in ("llama3.1-8b.yaml", "qwen2.5-7b.yaml")]
# A folder in the Sotopia layout: the bundled set (the paper configs need one named).
SOTOPIA_LAYOUT = Path(__file__).resolve().parent.parent / "actors" / "scenarios"


def _leaf_paths(model, prefix=()):
    for name, value in model:
        if hasattr(value, "model_fields"):
            yield from _leaf_paths(value, prefix + (name,))
        else:
            yield prefix + (name,)


def test_defaults_are_the_paper_values():
    config = Config()
    assert config.rollout.n == 16
    assert config.algorithm.groups_per_step == 16
    assert config.algorithm.clip_ratio == 0.2
    assert config.algorithm.kl_coef == 0.001
    assert config.algorithm.entropy_coef == 0.001
    assert config.learner.grad_clip == 1.0
    assert config.learner.weight_decay == 0.01
    assert config.reward.length_target == 250 and config.reward.length_scale == 75
    assert config.reward.judge.parse_rounds == 5 and config.reward.judge.greedy_rounds == 2
    assert config.bc.lr == 2e-6 and config.bc.warmup_ratio == 0.1 and config.bc.epochs == 3
    assert config.eval.max_turns == 20 and config.rollout.eval_temperature == 0.7


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_file_loads_and_shows_every_field(path):
    config = load_config(path, [f"data.scenarios={SOTOPIA_LAYOUT}"] if path in PAPER_CONFIGS else [])
    raw = yaml.safe_load(path.read_text())
    for leaf in _leaf_paths(config):
        node = raw
        for part in leaf:
            assert isinstance(node, dict) and part in node, f"{path.name} does not show {'.'.join(leaf)}"
            node = node[part]


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=lambda p: p.name)
def test_paper_configs_stop_without_the_benchmark_folder(path, capsys):
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message and "data.scenarios: " in message and "sotopia_hard.json" in message
    assert load_config(path, [f"data.scenarios={SOTOPIA_LAYOUT}"]).data.benchmark == "sotopia"
    # The command line says the same in one line, before anything starts.
    assert main(["config", "show", "--config", str(path)]) == 2
    assert "data.scenarios: this config evaluates on the Sotopia benchmark" in capsys.readouterr().err
    # Only the paper configs ask for it.
    assert all(load_config(p).data.benchmark == "bundled" for p in CONFIGS if p not in PAPER_CONFIGS)


def test_every_field_has_a_docstring():
    template = config_template()
    for line_no, line in enumerate(template.splitlines()):
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            previous = template.splitlines()[line_no - 1].strip()
            assert previous.startswith("#"), f"field without a docstring: {stripped}"


def test_dotted_overrides_apply_with_types():
    config = load_config(None, ["learner.lr=3e-7", "rollout.n=8", "reward.judge.model=qwen", "data.scenarios=null"])
    assert config.learner.lr == pytest.approx(3e-7)
    assert config.rollout.n == 8
    assert config.reward.judge.model == "qwen"
    assert config.data.scenarios is None


def test_unknown_key_names_the_closest_valid_one():
    with pytest.raises(ConfigError, match=r"unknown key 'learner\.lrr'; did you mean 'learner\.lr'"):
        load_config(None, ["learner.lrr=1e-6"])
    with pytest.raises(ConfigError, match=r"unknown key 'rolout'; did you mean 'rollout'"):
        load_config(None, ["rolout.n=2"])
    with pytest.raises(ConfigError, match=r"did you mean 'reward\.judge\.max_concurrency'"):
        load_config(None, ["reward.judge.max_concurency=3"])


def test_wrong_type_names_field_and_expected_type():
    with pytest.raises(ConfigError, match=r"field 'rollout\.n' expects int, got 'many'"):
        load_config(None, ["rollout.n=many"])
    with pytest.raises(ConfigError, match=r"field 'algorithm\.estimator' expects .*'ampo'.*'grpo'"):
        load_config(None, ["algorithm.estimator=ppo"])


def test_out_of_range_value_is_rejected():
    with pytest.raises(ConfigError, match=r"rollout\.n"):
        load_config(None, ["rollout.n=0"])


def test_file_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("learner: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("learner:\n  gradclip: 2.0\n")
    with pytest.raises(ConfigError, match=r"typo\.yaml: unknown key 'learner\.gradclip'; did you mean 'learner\.grad_clip'"):
        load_config(typo)


def test_malformed_override():
    with pytest.raises(ConfigError, match="section.field=value"):
        load_config(None, ["learner.lr"])


def test_dump_round_trips_and_holds_no_secret(monkeypatch):
    monkeypatch.setenv("AMPO_JUDGE_API_KEY", "sk-very-secret")
    config = load_config(None, ["reward.judge.base_url=http://127.0.0.1:9/v1"])
    text = dump_config(config)
    assert "sk-very-secret" not in text
    assert Config.model_validate(yaml.safe_load(text)) == config


def test_cli_config_show_and_typo(capsys, tiny_config_path):
    assert main(["config", "show", "--config", str(tiny_config_path), "rollout.n=3"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["rollout"]["n"] == 3
    assert main(["config", "show", "--config", str(tiny_config_path), "learner.lrr=3"]) == 2
    assert "did you mean 'learner.lr'" in capsys.readouterr().err


@pytest.mark.integration
def test_taken_metrics_port_is_reported_before_ray_starts():
    import socket

    from cluster.ray_cluster import _check_port_free

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(RuntimeError, match=f"metrics port {port} on 127.0.0.1 is taken.*ray stop"):
            _check_port_free(port)
    _check_port_free(0)  # 0: Ray picks a free port, nothing to check


def test_role_bundles_reserve_the_learner_cpus():
    from cluster.ray_cluster import role_bundles

    config = load_config(CONFIGS[0].parent / "local.yaml", ["learner.num_ranks=2", "cluster.learner_cpus_per_rank=3"])
    bundles = role_bundles(config)
    assert bundles["learner"] == [{"CPU": 3}, {"CPU": 3}]
    assert bundles["rollout"] == [{"CPU": 1}]


def test_learner_core_sets_reserve_the_last_cores_or_nothing(monkeypatch):
    import cluster.ray_cluster as ray_cluster

    monkeypatch.setattr(ray_cluster, "MACHINE_CORES", [0, 1, 2, 3, 4, 5])
    local = CONFIGS[0].parent / "local.yaml"
    pinned = ["cluster.pin_learner_cpus=true", "cluster.learner_cpus_per_rank=2", "learner.num_ranks=2"]
    assert ray_cluster.learner_core_sets(load_config(local, pinned)) == [[2, 3], [4, 5]]
    assert ray_cluster.learner_core_sets(load_config(local, pinned[1:])) is None  # pinning is off by default
    assert ray_cluster.learner_core_sets(load_config(local, [*pinned, "cluster.learner_cpus_per_rank=3"])) is None
    assert ray_cluster.learner_core_sets(load_config(local, [*pinned, "cluster.address=auto"])) is None


def test_pinning_reaches_every_thread_of_the_process():
    import os
    import threading

    from learner.worker import pin_process_to_cores

    original = os.sched_getaffinity(0)
    started, release = threading.Event(), threading.Event()
    native: list[int] = []

    def idle():
        native.append(threading.get_native_id())
        started.set()
        release.wait(10)

    thread = threading.Thread(target=idle)
    thread.start()
    started.wait(10)
    try:
        pin_process_to_cores([min(original)])
        assert os.sched_getaffinity(native[0]) == {min(original)}  # a thread that already existed
        assert os.sched_getaffinity(0) == {min(original)}
    finally:
        pin_process_to_cores(original)
        release.set()
        thread.join()
    assert os.sched_getaffinity(0) == original


def _sections(model, prefix=()):
    """Every section (nested model) path with the first of its plain fields."""
    leaves = [name for name, value in model if not hasattr(value, "model_fields")]
    if prefix and leaves:
        yield prefix, leaves[0]
    for name, value in model:
        if hasattr(value, "model_fields"):
            yield from _sections(value, prefix + (name,))


@pytest.mark.parametrize("path", [None, *CONFIGS], ids=lambda p: p.name if p else "defaults")
def test_overriding_one_field_never_changes_another(path):
    extra = [f"data.scenarios={SOTOPIA_LAYOUT}"] if path in PAPER_CONFIGS else []
    base = load_config(path, extra)
    sections = list(_sections(base))
    assert ("eval", "judge") in [s for s, _ in sections] and len(sections) >= 10
    for section, leaf in sections:
        node = base
        for part in section:
            node = getattr(node, part)
        value = yaml.safe_dump(node.model_dump(mode="json")[leaf], default_flow_style=True).strip().removesuffix("...").strip()
        key = ".".join((*section, leaf))
        again = load_config(path, [*extra, f"{key}={value}"])
        # Setting a field to the value it already has must leave every field, nested defaults included, as it was.
        assert again.model_dump() == base.model_dump(), key


def test_an_evaluator_override_keeps_the_evaluators_own_defaults():
    assert load_config(None, ["eval.judge.model=foo"]).eval.judge.max_tokens == 4096
    assert load_config(None, ["reward.judge.model=foo"]).reward.judge.max_tokens == 1024
