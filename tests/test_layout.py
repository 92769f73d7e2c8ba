"""The architecture holds: each top-level part of src/ uses only the parts
below it, so there is no import cycle (issue 8 B)."""
import os
import re

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
# Lowest first. stats and config are leaves any layer may read; config
# itself needs only model and the adapter's owned string.
ALLOWED = {
    "model": set(),
    "stats": set(),
    "redis": {"model", "stats"},
    "config": {"model", "redis"},
    "limits": {"model", "stats", "config"},
    "fill": {"model", "stats", "config", "redis", "limits"},
    "commands": {"model", "stats", "config", "redis", "limits", "fill"},
}


def part_of(path):
    rel = os.path.relpath(path, SRC)
    head = rel.split(os.sep)[0]
    return head[:-3] if head.endswith(".rs") else head


def test_each_part_uses_only_the_parts_below_it():
    bad = []
    for root, _, files in os.walk(SRC):
        for name in files:
            if not name.endswith(".rs") or name == "lib.rs":
                continue
            path = os.path.join(root, name)
            part = part_of(path)
            assert part in ALLOWED, f"{path}: unknown top-level part {part}"
            with open(path) as fh:
                used = set(re.findall(r"crate::([a-z_]+)", fh.read()))
            for u in used - {part} - ALLOWED[part]:
                bad.append(f"{os.path.relpath(path, SRC)} uses crate::{u}")
    assert not bad, bad


def test_unsafe_lives_only_in_the_redis_adapter():
    offenders = []
    for root, _, files in os.walk(SRC):
        for name in files:
            path = os.path.join(root, name)
            if name.endswith(".rs") and part_of(path) != "redis":
                with open(path) as fh:
                    if re.search(r"\bunsafe\b", fh.read()):
                        offenders.append(os.path.relpath(path, SRC))
    assert not offenders, offenders


def test_no_source_file_is_a_grab_bag():
    long = []
    for root, _, files in os.walk(SRC):
        for name in files:
            path = os.path.join(root, name)
            with open(path) as fh:
                n = sum(1 for _ in fh)
            if name.endswith(".rs") and n > 600:
                long.append((os.path.relpath(path, SRC), n))
    assert not long, long
