"""The model qnext uses when none is named: the bundled demo model, else a synthetic checkpoint made once.

Until a trained demo model ships in qnext/assets/demo/, the first call writes the `small` preset (random weights,
synthetic tokenizer, ~60 MB) under $QNEXT_CACHE/default-synthetic (default ~/.cache/qnext/default-synthetic). It is
written to a temporary sibling directory and renamed into place, so concurrent first calls never see half a
checkpoint; a marker file records the generator version so an outdated cache is rebuilt.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent / "assets" / "demo"
PRESET = "small"
SEED = 0
VERSION = 1  # bump when the writer's output changes, so stale caches are rebuilt
MARKER = "qnext-synthetic.json"


def cache_root() -> Path:
    return Path(os.environ.get("QNEXT_CACHE") or Path.home() / ".cache" / "qnext")


def _current(path: Path) -> bool:
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return marker == {"preset": PRESET, "seed": SEED, "version": VERSION} and (path / "config.json").is_file()


def default_model_path() -> Path:
    """Directory of the default checkpoint (created on first use; see module doc)."""
    if (DEMO_DIR / "config.json").is_file():
        return DEMO_DIR
    target = cache_root() / "default-synthetic"
    if _current(target):
        return target
    from qnext.weights.checkpoint_writer import write_checkpoint

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".default-synthetic-", dir=target.parent))
    try:
        write_checkpoint(tmp, PRESET, dtype="bfloat16", seed=SEED)
        (tmp / MARKER).write_text(json.dumps({"preset": PRESET, "seed": SEED, "version": VERSION}))
        if target.exists() and not _current(target):  # outdated: move it aside, then replace
            stale = Path(tempfile.mkdtemp(prefix=".stale-", dir=target.parent))
            os.replace(target, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:
            if not _current(target):  # lost a race to a writer whose result is not usable
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
