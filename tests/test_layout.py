"""The architecture as a contract: the README's Layout section matches the tree, the import
layers in pyproject.toml hold, and no module grows past the size the README allows."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("hyperlaw", "client", "server", "trainer", "fitting", "migrations")
MAX_MODULE_LINES = 450


def _layout_section() -> str:
    readme = (REPO_ROOT / "README.md").read_text()
    match = re.search(r"^## Layout\n(.*?)(?=^## |\Z)", readme, flags=re.S | re.M)
    assert match, "README.md has no '## Layout' section"
    return match.group(1)


def _tree_paths(section: str) -> set[str]:
    """Paths drawn in the section's first code block: one entry per line, indented by
    nesting (``server/`` then ``  worker/`` then ``    loop.py``), text after '#' ignored."""
    block = re.search(r"```text\n(.*?)```", section, flags=re.S)
    assert block, "the Layout section draws the tree in a ```text block"
    paths, stack = set(), []
    for line in block.group(1).splitlines():
        entry = line.split("#", 1)[0].rstrip()
        if not entry.strip():
            continue
        depth = (len(entry) - len(entry.lstrip())) // 2
        name = entry.strip()
        stack[depth:] = [name.rstrip("/")]
        paths.add("/".join(stack) + ("/" if name.endswith("/") else ""))
    return paths


def _packages() -> set[str]:
    found = set()
    for top in PACKAGES:
        for init in (REPO_ROOT / top).rglob("__init__.py"):
            found.add(init.parent.relative_to(REPO_ROOT).as_posix() + "/")
    return found


def test_the_readme_draws_every_package_and_only_what_exists():
    drawn = _tree_paths(_layout_section())
    missing = sorted(_packages() - drawn)
    assert not missing, f"packages not drawn in README's Layout: {missing}"
    absent = sorted(p for p in drawn if not (REPO_ROOT / p).exists())
    assert not absent, f"README's Layout draws paths that do not exist: {absent}"


def test_no_module_is_longer_than_the_readme_allows():
    section = _layout_section()
    too_long = []
    for top in PACKAGES:
        for module in (REPO_ROOT / top).rglob("*.py"):
            lines = len(module.read_text().splitlines())
            path = module.relative_to(REPO_ROOT).as_posix()
            if lines > MAX_MODULE_LINES and f"`{path}`" not in section:
                too_long.append(f"{path} ({lines} lines)")
    assert not too_long, (
        f"modules over {MAX_MODULE_LINES} lines that README's Layout does not explain: {too_long}"
    )


def test_the_import_contracts_hold():
    """import-linter's contracts in pyproject.toml: the layers, the trainer reaching the
    service through the client only, no import circle inside a package."""
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run(
        [str(lint), "--no-cache"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
