"""The fuzz targets under pytest: the corpus always, atheris when installed.

Replaying `corpus/<target>/` through each one-input function is fast and needs
no atheris, so every run keeps what fuzzing once found fixed. With atheris
importable, each target also fuzzes for FUZZ_SECONDS (default 10) in a
subprocess, starting from a copy of its corpus, and must exit 0: no finding.
"""

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
TARGETS = ["frames", "control", "clienthello"]
FUZZ_SECONDS = int(os.environ.get("FUZZ_SECONDS", "10"))

try:
    import atheris  # noqa: F401

    HAVE_ATHERIS = True
except ImportError:
    HAVE_ATHERIS = False


def _corpus(target: str) -> list[Path]:
    return sorted((HERE / "corpus" / target).iterdir())


@pytest.mark.parametrize("target", TARGETS)
def test_corpus_replays_clean(target):
    """Every corpus file passes its target's one-input function without a finding."""
    one_input = importlib.import_module(f"tests.fuzz.fuzz_{target}").one_input
    files = _corpus(target)
    assert files, f"corpus/{target} is empty"
    for path in files:
        try:
            one_input(path.read_bytes())
        except Exception as e:
            raise AssertionError(f"corpus/{target}/{path.name}: {type(e).__name__}: {e}") from e


@pytest.mark.parametrize("target", TARGETS)
def test_corpus_stays_small(target):
    """Each corpus stays under ~70 files and 350 KB, so the repo stays small and the replay fast."""
    files = _corpus(target)
    assert len(files) <= 70
    assert sum(p.stat().st_size for p in files) <= 350_000


@pytest.mark.fuzz
@pytest.mark.skipif(not HAVE_ATHERIS, reason="atheris is not installed (no wheel for this platform)")
@pytest.mark.parametrize("target", TARGETS)
def test_fuzz_finds_nothing(target, tmp_path):
    """A bounded coverage-guided run of the target ends without a crash (exit 0)."""
    corpus = tmp_path / "corpus"
    shutil.copytree(HERE / "corpus" / target, corpus)  # the run adds files: not into the repo
    command = [
        sys.executable,
        str(HERE / f"fuzz_{target}.py"),
        f"-max_total_time={FUZZ_SECONDS}",
        "-timeout=10",  # one input taking 10 s is a finding too (slow-input DoS)
        "-rss_limit_mb=1024",
        f"-artifact_prefix={tmp_path}/",
        str(corpus),
    ]
    result = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=FUZZ_SECONDS + 60
    )
    crashes = sorted(p.name for p in tmp_path.iterdir() if p.name != "corpus")
    assert result.returncode == 0, (
        f"fuzz_{target} found {crashes} (exit {result.returncode}):\n{result.stderr[-4000:]}"
    )
