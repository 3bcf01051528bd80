"""A non-editable install is whole: setup.py's package tree (what `pip install .` or a wheel copies) holds
every subpackage, and the front doors run from it (a hand list of packages once left the server out)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_built_package_tree_has_every_subpackage_and_runs(tmp_path):
    build = tmp_path / "lib"
    proc = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(build)], cwd=ROOT,
                          check=True, capture_output=True, text=True, timeout=600)
    # Some setuptools copy a package missing from `packages` anyway, as data, with this warning; others leave it
    # out (the server, before setup.py found its packages). Either way it is a package setup.py does not know.
    assert "is absent from the `packages` configuration" not in proc.stderr, proc.stderr[-3000:]
    # build_py copies the Python files; the extension comes from build_ext (already built by make setup).
    for so in (ROOT / "elastic_decode").glob("_C*.so"):
        shutil.copy(so, build / "elastic_decode" / so.name)
    source = {p.relative_to(ROOT / "elastic_decode").parent for p in (ROOT / "elastic_decode").rglob("__init__.py")}
    built = {p.relative_to(build / "elastic_decode").parent for p in (build / "elastic_decode").rglob("__init__.py")}
    assert source | {Path("kernels"), Path("train")} <= built, sorted(map(str, source - built))
    modules = sorted(".".join(("elastic_decode", *p.relative_to(build / "elastic_decode").with_suffix("").parts))
                     .removesuffix(".__init__").removesuffix(".__main__")
                     for p in (build / "elastic_decode").rglob("*.py"))
    env = {**os.environ, "PYTHONPATH": str(build)}
    code = ("import importlib, elastic_decode, sys\n"
            f"for m in {modules!r}:\n    importlib.import_module(m)\n"
            "assert elastic_decode.__file__.startswith(sys.argv[1]), elastic_decode.__file__\nprint('ok')")
    proc = subprocess.run([sys.executable, "-c", code, str(build)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
    for door in ("serve", "generate", "eval", "train"):
        proc = subprocess.run([sys.executable, "-m", f"elastic_decode.{door}", "--help"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0 and "usage" in proc.stdout, (door, proc.stderr[-2000:])
