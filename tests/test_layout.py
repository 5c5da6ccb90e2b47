"""The tree's shape: no import cycles, the shared-memory layout a leaf, plugin authors served from one module."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import llm_worker.plugin

ROOT = Path(__file__).resolve().parent.parent


def test_the_import_graph_has_no_cycles() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "import_cycles.py")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout
    assert done.stdout.rstrip().endswith(", 0 cycles")


def test_the_shared_memory_layout_depends_on_nothing_of_llm_worker() -> None:
    tree = ast.parse((ROOT / "llm_worker" / "host" / "layout.py").read_text())
    imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [name for name in imported if name.startswith("llm_worker")]


def test_the_plugin_surface_exports_what_it_lists() -> None:
    for name in llm_worker.plugin.__all__:
        assert getattr(llm_worker.plugin, name) is not None, name


def test_examples_and_the_plugin_guide_import_only_from_the_plugin_surface() -> None:
    # The simulator (llm_worker.devtools) is the one other import: the stand-in server a provider's tests need.
    texts = [p.read_text() for p in (ROOT / "examples").rglob("*.py")] + [(ROOT / "docs" / "plugins.md").read_text()]
    for text in texts:
        for line in text.splitlines():
            stripped = line.strip()
            if stripped.startswith("from llm_worker") and " import " in stripped and ".devtools" not in stripped:
                assert stripped.startswith(("from llm_worker.plugin import", "from llm_worker import hookimpl")), line


def test_the_anthropic_and_openrouter_providers_import_only_the_plugin_surface() -> None:
    # Written as a third party would write them: llm_worker.plugin, and the plugin's own sibling module.
    own = {"anthropic.py": "llm_worker.plugins.anthropic_shapes", "anthropic_shapes.py": "", "openrouter.py": ""}
    for name, sibling in own.items():
        tree = ast.parse((ROOT / "llm_worker" / "plugins" / name).read_text())
        imported: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module == "llm_worker.plugins":
                imported |= {f"llm_worker.plugins.{alias.name}" for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                imported.add(node.module or "")
        ours = {module for module in imported if module.startswith("llm_worker")}
        assert ours <= {"llm_worker.plugin", sibling}, (name, ours)
