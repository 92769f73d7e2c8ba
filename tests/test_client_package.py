"""clients/python installs as a typed package, offline, with the venv's own
build backend; the installed copy imports and exports the documented names."""
import os
import shutil
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "clients", "python")


def test_the_package_installs_offline_and_is_typed(tmp_path):
    # A copy: setuptools builds in the source tree and would leave build/ there.
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation",
                    "--no-deps", "--no-index", "--target", str(site), str(src)],
                   check=True, timeout=300)
    assert (site / "aicache" / "py.typed").is_file(), "PEP 561 marker missing"
    probe = ("import aicache, aicache.aio, aicache.keys; "
             "print(aicache.__file__); "
             "print(all(hasattr(aicache, n) for n in aicache.__all__)); "
             "print(sorted({'AICache', 'ChatHistory', 'Meta', 'Throttle', 'StreamError', "
             "'stream_chat', 'completion_to_chunks'} - set(aicache.__all__)))")
    out = subprocess.run([sys.executable, "-c", probe], env={**os.environ, "PYTHONPATH": str(site)},
                         cwd=tmp_path, capture_output=True, text=True, check=True, timeout=60)
    where, exported, missing = out.stdout.splitlines()
    assert where.startswith(str(site)) and exported == "True" and missing == "[]"
