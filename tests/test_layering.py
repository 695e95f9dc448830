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
