"""The roles never import the test doubles: `testing/` serves tests, benches and experiments only."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROLES = ("actors", "reward", "learner", "cluster")


def imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_no_role_imports_the_testing_package():
    offenders = [
        f"{path.relative_to(ROOT)} imports {module}"
        for role in ROLES
        for path in (ROOT / role).rglob("*.py")
        for module in imported_modules(path)
        if module == "testing" or module.startswith("testing.")
    ]
    assert offenders == []


def test_the_doubles_live_outside_the_roles():
    assert (ROOT / "testing" / "fault_server.py").is_file() and (ROOT / "testing" / "tiny_model.py").is_file()
    for role in ROLES:
        for path in (ROOT / role).rglob("*.py"):
            assert "class FaultServer" not in path.read_text() and "def build_tiny_model" not in path.read_text(), path


def test_the_repository_stands_alone():
    """No file points at documents users do not have (the team's private spec, design notes or shared folder)."""
    import subprocess

    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    private = ("spec §", "ampo_spec", "../shared", "ARCHITECTURE.md", "anchors.md")
    offenders = [
        f"{name}: {marker}"
        for name in files
        if name.endswith((".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".sh", ".json")) and (ROOT / name).is_file()
        for marker in private
        if marker in (ROOT / name).read_text(errors="ignore") and name != "tests/test_layering.py"
    ]
    assert offenders == []
