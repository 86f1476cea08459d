"""The release a stranger installs: sdist and wheel build, pass `twine check`, and the wheel alone runs the demo.

The wheel goes into a fresh virtual environment (no pip, no editable install, no checkout on the path). Its
dependencies are the locked environment's packages, reached by a path entry added after the venv's own
site-packages (a plain path: the editable install's .pth file there is not processed), so no download is needed.
"""

from __future__ import annotations

import os
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pandas as pd
import pytest

import narrowgate

# A build and a demo run (about a minute); the build writes into the checkout (build/, the egg-info), so the
# session builds once (`built_once`) whichever test processes the tests land on.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd, **kw):
    done = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert done.returncode == 0, f"{cmd}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def dist(built_once) -> Path:
    # --no-isolation: the build backend (setuptools) comes from the lock instead of a download.
    return built_once(
        "dist", lambda out: _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)])
    )


def test_sdist_and_wheel_pass_twine_check_and_ship_everything(dist):
    wheel = next(dist.glob("narrowgate-*.whl"))
    sdist = next(dist.glob("narrowgate-*.tar.gz"))
    assert wheel.name == f"narrowgate-{narrowgate.__version__}-py3-none-any.whl"
    assert sdist.name == f"narrowgate-{narrowgate.__version__}.tar.gz"
    _run([sys.executable, "-m", "twine", "check", "--strict", str(wheel), str(sdist)])
    names = set(zipfile.ZipFile(wheel).namelist())
    for kind in ("native", "non-native", "gated"):
        for f in ("config.json", "model.safetensors", "CARD.md", "card.json", "tokenizer.json"):
            assert f"narrowgate/organisms/checkpoints/{kind}/{f}" in names, (kind, f)
    assert "narrowgate/resources/imagenet_animals.json" in names
    assert f"narrowgate-{narrowgate.__version__}.dist-info/licenses/LICENSE" in names
    # A fresh install finds the experiments and families by the wheel's entry points: the ones declared here.
    from configparser import ConfigParser

    from narrowgate import catalog

    points = ConfigParser(delimiters=("=",))
    points.read_string(
        zipfile.ZipFile(wheel).read(f"narrowgate-{narrowgate.__version__}.dist-info/entry_points.txt").decode()
    )
    for group in (catalog.EXPERIMENTS_GROUP, catalog.FAMILIES_GROUP):
        assert dict(points[group]) == {name: ep.value for name, ep in catalog.points(group).items()}, group
    assert not any(n.startswith(("tests/", "docs/", "benchmarks/")) for n in names)


def test_the_wheel_alone_runs_the_demo(dist, tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    own = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    (Path(own) / "locked_dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    wheel = next(dist.glob("narrowgate-*.whl"))
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)])

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    where = _run([str(python), "-c", "import narrowgate; print(narrowgate.__file__, narrowgate.__version__)"], env=env)
    file, version = where.stdout.split()
    assert Path(file).is_relative_to(venv) and version == narrowgate.__version__  # the wheel's copy, not src/

    out = tmp_path / "demo"
    demo = _run([str(venv / "bin" / "narrowgate"), "demo", "--scale", "0.2", "--out", str(out)], env=env, cwd=tmp_path)
    assert (out / "report.html").is_file(), demo.stdout[-2000:]
    summary = pd.read_csv(out / "summary.csv")
    assert set(summary["model"]) == {"native", "non-native", "gated", "gated, gate removed"}
    manifest = (out / "gated" / "ablation-vqa" / "manifest.json").read_text()
    assert f'"narrowgate": "{narrowgate.__version__}"' in manifest
