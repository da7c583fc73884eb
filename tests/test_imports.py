"""One import direction between tlcm.models and the toy world (issue 14, item 5).

``tlcm.models`` resolves the name ``"toy"`` by importing ``tlcm.toy`` inside a function; the toy world takes the
Stable Diffusion scheduler config from ``tlcm.sd_config`` and never imports ``tlcm.models``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "tlcm"


def _imports(path: Path, module_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_toy_world_never_imports_models():
    for path in sorted((SRC / "toy").glob("*.py")):
        bad = {n for n in _imports(path, module_level_only=False) if n == "tlcm.models" or n.startswith("tlcm.models.")}
        assert not bad, f"{path.name} imports {bad}: take SD constants from tlcm.sd_config"


def test_models_imports_toy_only_lazily_and_sd_config_is_a_leaf():
    assert not {n for n in _imports(SRC / "models.py", True) if n.startswith("tlcm.toy")}
    assert not {n for n in _imports(SRC / "sd_config.py", False) if n.startswith("tlcm")}


def test_importing_either_side_does_not_load_the_other():
    code = "import sys, tlcm.toy.common, tlcm.toy.teacher; assert 'tlcm.models' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    code = "import sys, tlcm.models; assert 'tlcm.toy' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_one_scheduler_config_everywhere():
    from tlcm import models, sd_config, testing
    from tlcm.toy import common

    assert models.STABLE_DIFFUSION_SCHEDULER_CONFIG is sd_config.STABLE_DIFFUSION_SCHEDULER_CONFIG
    assert testing.SD_SCHEDULER_CONFIG is sd_config.STABLE_DIFFUSION_SCHEDULER_CONFIG
    assert {k: common.SD_SCHEDULER_CONFIG[k] for k in sd_config.STABLE_DIFFUSION_SCHEDULER_CONFIG} == \
        sd_config.STABLE_DIFFUSION_SCHEDULER_CONFIG
