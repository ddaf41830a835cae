"""Where a benchmark record came from: the checkout's git commit (one helper for every script in bench/)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMIT_ENV_VAR = "STDD_GIT_COMMIT"  # the commit of a checkout without .git, given by whoever copied it


STCA_SOURCES = ("stdd_kernels", "bench", "stdd/model", "csrc")  # what the STCA timings depend on


def git_commit(sources: tuple[str, ...] = STCA_SOURCES) -> dict:
    """The checkout's commit from git (``dirty``: uncommitted changes under ``sources``), or from
    ``STDD_GIT_COMMIT`` where there is no git checkout."""

    def git(*args):
        try:
            result = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return result.stdout.strip() if result.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit:
        dirty = git("status", "--porcelain", "--", *sources)
        return {"commit": commit, "dirty": bool(dirty), "source": "git"}
    given = os.environ.get(COMMIT_ENV_VAR) or None
    return {"commit": given, "dirty": None, "source": COMMIT_ENV_VAR if given else None}
