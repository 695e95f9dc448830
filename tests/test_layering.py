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
        if marker.lower() in (ROOT / name).read_text(errors="ignore").lower() and name != "tests/test_layering.py"
    ]
    assert offenders == []


LOCAL_MODULES = {"actors", "learner", "reward", "cluster", "prompts", "testing", "bench", "experiments", "scripts", "tests",
                 "conftest", "judge_fixtures", "learner_fixtures", "rule_rewards"}
USED_WITHOUT_IMPORT = {
    "gguf": "transformers reads the embedded model's GGUF file through it (cluster/models.py)",
    "accelerate": "transformers loads every model through it",
}


def _requirement_name(requirement: str) -> str:
    import re

    return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_every_imported_package_is_declared_and_every_declared_one_is_used():
    """Third-party imports anywhere in the repository come from a declared distribution (a dependency or an
    extra), and each dependency is imported somewhere or named in USED_WITHOUT_IMPORT with the reason."""
    import importlib.metadata
    import sys
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {_requirement_name(r) for r in project["dependencies"]}
    extras = {_requirement_name(r) for reqs in project["optional-dependencies"].values() for r in reqs}
    distributions = importlib.metadata.packages_distributions()
    imported: dict[str, set[str]] = {}
    for folder in sorted(LOCAL_MODULES):
        for path in (ROOT / folder).rglob("*.py") if (ROOT / folder).is_dir() else ():
            for module in imported_modules(path):
                top = module.split(".")[0]
                if top not in sys.stdlib_module_names and top not in LOCAL_MODULES:
                    imported.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    undeclared = {
        module: sorted(files)[0] for module, files in imported.items()
        if not {d.lower().replace("_", "-") for d in distributions.get(module, [module])} & (core | extras)
    }
    assert undeclared == {}, f"imported but not declared in pyproject.toml (module: first file): {undeclared}"
    used = {d.lower().replace("_", "-") for module in imported for d in distributions.get(module, [module])}
    unused = sorted(core - used - set(USED_WITHOUT_IMPORT))
    assert unused == [], f"declared in pyproject.toml but imported nowhere: {unused}"


def test_every_local_import_resolves():
    """Scripts that CI does not run (benches, experiments) still import only modules that exist: a module moved
    (a test double to `testing/`) leaves no bench behind."""
    import importlib.util

    missing = []
    for folder in ("bench", "experiments", "scripts", "actors", "learner", "reward", "cluster", "testing"):
        for path in (ROOT / folder).rglob("*.py"):
            for module in imported_modules(path):
                if module.split(".")[0] in LOCAL_MODULES - {"tests", "conftest"} and importlib.util.find_spec(module) is None:
                    missing.append(f"{path.relative_to(ROOT)}: {module}")
    assert missing == []
