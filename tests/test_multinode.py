"""Cluster-shaped runs: `ray job submit` to a loopback cluster started with `ray start --head`, and a
two-node cluster simulated on one machine (`ray.cluster_utils.Cluster`) with roles on different nodes.

Both run in their own Ray instances (subprocesses), apart from the test session's local Ray."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from actors.sotopia import SotopiaDataset
from actors.states import make_state, write_states
from testing.fault_server import FaultConfig, FaultServer
from prompts import DEFAULT_PROMPTS

SYSTEM_PROMPT = DEFAULT_PROMPTS.system.render()

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def states_file(tmp_path_factory):
    dataset = SotopiaDataset.load()
    path = tmp_path_factory.mktemp("states") / "train_rl.parquet"
    return write_states([make_state(dataset, i, [], (5.0, 5.0)) for i in range(8)], path, SYSTEM_PROMPT)


@pytest.fixture(scope="module")
def judge():
    with FaultServer(FaultConfig(fault_rate=0.0)) as server:
        yield server


def overrides(tiny_model_dir, states_file, judge, run_dir):
    return [
        f"rollout.model={tiny_model_dir}",
        f"data.train_states={states_file}",
        f"reward.judge.base_url={judge.base_url}",
        "reward.judge.model=fault-judge",  # the name the test server lists (the preflight checks it)
        f"eval.judge.base_url={judge.base_url}",
        "eval.judge.model=fault-judge",
        "eval.max_episodes=1",
        f"cluster.run_dir={run_dir}",
        "algorithm.total_steps=2",
        "learner.resume=never",
    ]


def test_ray_job_submit_on_a_loopback_cluster(tiny_model_dir, states_file, judge, tmp_path):
    gcs_port, dashboard_port = free_port(), free_port()
    # Ray 2.60 enables token authentication: the head writes ~/.ray/auth_token and the job client must be
    # told to send it.
    # The job's `python` must be this environment's, as on a cluster where every node runs the same image.
    env = {
        **os.environ,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_AUTH_MODE": "token",
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
    }
    head = subprocess.Popen(
        [
            str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
            "--num-cpus=6", "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
            # Other Ray instances may run on this machine (the test session's own): no fixed default ports.
            f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
            f"--ray-client-server-port={free_port()}",
            f"--temp-dir={tempfile.mkdtemp(prefix='ray-', dir='/tmp')}",  # short: Ray's unix sockets live here
        ],
        env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        address = f"http://127.0.0.1:{dashboard_port}"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            probe = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], env=env, capture_output=True)
            if probe.returncode == 0:
                break
            time.sleep(2)
        else:
            pytest.fail(f"the loopback Ray head did not come up: {probe.stderr.decode()[-2000:]}")
        run_dir = tmp_path / "run"
        command = [
            str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT),
            "--runtime-env", str(ROOT / "configs" / "runtime_env.yaml"), "--",
            "python", "-m", "cluster.cli", "train", "--config", "configs/tiny.yaml", "cluster.address=auto",
            *overrides(tiny_model_dir, states_file, judge, run_dir),
        ]
        for _ in range(10):  # the head's job agent comes up a little after its HTTP server
            job = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
            if "No available agent to submit job" not in job.stderr + job.stdout:
                break
            time.sleep(3)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "succeeded" in (job.stdout + job.stderr).lower()
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["steps"] == 2 and summary["policy_version"] == 2
        evaluations = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if "eval/episodes" in l]
        assert [e["step"] for e in evaluations] == [0, 2]  # before and after training
    finally:
        stop_process_group(head)


def stop_process_group(process: subprocess.Popen) -> None:
    """Stop `ray start --block` and every Ray process it started (they share its session), without
    touching other Ray instances on the machine the way `ray stop` would."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    time.sleep(2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


TWO_NODE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors
    from actors.states import read_states
    from cluster.config import load_config
    from cluster.driver import TrainingDriver

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "resources": {"rollout_node": 1}})
    cluster.add_node(num_cpus=3, resources={"learner_node": 1})
    ray.init(address=cluster.address)
    config = load_config("configs/tiny.yaml", sys.argv[1:] + [
        "cluster.address=auto", 'cluster.rollout_resources={"rollout_node": 1}', 'cluster.learner_resources={"learner_node": 1}',
    ])
    driver = TrainingDriver(config, read_states(config.data.train_states), config.rollout.model,
                            judge_url=config.reward.judge.base_url, judge_model="judge")
    summary = driver.run()
    placements = {}
    for actor in list_actors(limit=1000):
        placements.setdefault(actor.class_name, set()).add(actor.node_id)
    print("RESULT" + json.dumps({"summary": summary, "nodes": {k: sorted(v) for k, v in placements.items()}}))
    ray.shutdown()
    cluster.shutdown()
    """
)


def test_two_node_cluster_places_roles_on_different_nodes(tiny_model_dir, states_file, judge, tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", TWO_NODE_SCRIPT, *overrides(tiny_model_dir, states_file, judge, tmp_path / "run")],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"},
    )
    lines = [l for l in result.stdout.splitlines() if l.startswith("RESULT")]
    assert lines, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads(lines[-1][len("RESULT"):])
    assert data["summary"]["steps"] == 2
    rollout_nodes, learner_nodes = set(data["nodes"]["RolloutActor"]), set(data["nodes"]["LearnerWorker"])
    assert rollout_nodes and learner_nodes and not rollout_nodes & learner_nodes


PLACEMENT_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.placement_group import placement_group_table
    from ray.util.state import list_actors
    from cluster.cli import main
    from cluster.config import load_config
    from cluster.ray_cluster import place_role, role_bundles

    nodes, paper_overrides, engine_overrides = (json.loads(arg) for arg in sys.argv[1:4])
    # The head runs the entrypoint, as under `ray job submit`: no GPUs. Then one node per `ray start` line.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    node_of = {}
    for node in nodes:
        handle = cluster.add_node(num_cpus=4, num_gpus=node["num_gpus"], resources=node["resources"])
        node_of[next(iter(node["resources"]))] = handle.node_id
    ray.init(address=cluster.address)
    config = load_config("configs/llama3.1-8b.yaml", paper_overrides)
    placed = {}
    for role in ("rollout", "learner"):
        placement = place_role(role, role_bundles(config)[role], timeout_s=60)
        placed[role] = sorted(set(placement_group_table(placement.group)["bundles_to_node_id"].values()))
        placement.remove()
    codes = {command: main([command, "--config", "configs/tiny.yaml", *engine_overrides, *extra])
             for command, extra in (("build-states", ["--max-episodes", "1"]), ("eval", ["--max-episodes", "1"]))}
    engines = [actor.node_id for actor in list_actors(filters=[("class_name", "=", "RolloutActor")], limit=100)]
    print("RESULT" + json.dumps({"nodes": node_of, "placed": placed, "codes": codes, "engines": engines}))
    ray.shutdown()
    cluster.shutdown()
    """
)


def docs_node_pinning_example() -> tuple[list[dict], list[str]]:
    """The `ray start` lines and the overrides of the node-pinning example in docs/gpu.md, as a user copies them."""
    import re

    text = (ROOT / "docs" / "gpu.md").read_text()
    nodes = [
        {"num_gpus": int(gpus), "resources": json.loads(resources)}
        for gpus, resources in re.findall(r"ray start --address \S+ --num-gpus (\d+) --resources '(\{[^']*\})'", text)
    ]
    overrides = re.findall(r"'(cluster\.(?:rollout|learner)_resources=\{[^']*\})'", text)
    return nodes, overrides


def test_node_pinning_example_places_and_commands_put_engines_on_gpu_nodes(tiny_model_dir, judge, tmp_path):
    """The docs' two-node example reserves both roles of the paper config on the intended nodes; `build-states`
    and `eval` on a cluster run their engines as Ray actors on the rollout node, not in the entrypoint's process."""
    nodes, pins = docs_node_pinning_example()
    assert len(nodes) == 2 and len(pins) == 2, (nodes, pins)
    paper = [*pins, f"data.scenarios={ROOT / 'actors' / 'scenarios'}"]
    engine = [
        "cluster.address=auto", 'cluster.rollout_resources={"rollout_node": 1}', f"rollout.model={tiny_model_dir}",
        f"reward.judge.base_url={judge.base_url}", "reward.judge.model=fault-judge",
        f"eval.judge.base_url={judge.base_url}", "eval.judge.model=fault-judge", f"cluster.run_dir={tmp_path / 'run'}",
    ]
    result = subprocess.run(
        [sys.executable, "-c", PLACEMENT_SCRIPT, json.dumps(nodes), json.dumps(paper), json.dumps(engine)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"},
    )
    lines = [l for l in result.stdout.splitlines() if l.startswith("RESULT")]
    assert lines, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads(lines[-1][len("RESULT"):])
    assert data["placed"] == {"rollout": [data["nodes"]["rollout_node"]], "learner": [data["nodes"]["learner_node"]]}
    assert data["codes"] == {"build-states": 0, "eval": 0}
    assert data["engines"] == [data["nodes"]["rollout_node"]] * 2  # one engine per command, on the rollout node
    assert (tmp_path / "run" / "train_rl.parquet").is_file()
