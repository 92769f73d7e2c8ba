"""A short, fixed-seed run of the random-argument fuzzer (bench/fuzz.py): the
server must survive it, every command must get exactly one reply, in order,
and every error must be printable ASCII."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_fuzz_smoke():
    cmd = [sys.executable, os.path.join(ROOT, "bench", "fuzz.py"),
           "--seconds", "20", "--seed", "12345", "--clients", "4"]
    # The fuzzer bounds its own waits; this timeout only guards against a hang.
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, errors="replace", timeout=150)
    assert proc.returncode == 0, (f"fuzz.py exited with {proc.returncode}\n"
                                  f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr[-5000:]}")
