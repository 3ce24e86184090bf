"""The test tiers (tests/conftest.py): a ``data`` test skips without the data, fails where CI requires
it, and a test that uses the data without the marker fails."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

from conftest import REPO

DATA_TEST = "tests/test_layouts_episodes.py::test_shared_defects_catalog"


def _pytest(args: list[str], cwd, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("CI", "FDSEG_REQUIRE_DATA", "FDSEG_DATA")}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *args],
                          cwd=cwd, env={**base, **env}, capture_output=True, text=True, timeout=300)


def test_missing_data_skips_unless_required(tmp_path):
    missing = str(tmp_path / "nowhere")
    r = _pytest([DATA_TEST], REPO, FDSEG_DATA=missing)
    assert r.returncode == 0 and "1 skipped" in r.stdout, r.stdout
    assert f"real test data not found at {missing}/defects" in r.stdout
    for env in ({"CI": "true"}, {"FDSEG_REQUIRE_DATA": "1"}):
        r = _pytest([DATA_TEST], REPO, FDSEG_DATA=missing, **env)
        assert r.returncode == 1 and "1 error" in r.stdout and "require it" in r.stdout, (env, r.stdout)
    r = _pytest([DATA_TEST, "-m", "not data"], REPO, FDSEG_DATA=missing, CI="true")
    assert r.returncode == 5 and "1 deselected" in r.stdout, r.stdout          # the tier leaves it out


def test_unmarked_use_of_the_data_fails(tmp_path):
    shutil.copy(REPO / "tests" / "conftest.py", tmp_path / "conftest.py")
    markers = "\n".join(f"    {m}: x" for m in ("data", "slow", "browser", "sam"))
    (tmp_path / "pytest.ini").write_text(f"[pytest]\naddopts = --strict-markers\nmarkers =\n{markers}\n")
    (tmp_path / "test_x.py").write_text(
        "import pytest\n\n"
        "def test_forgot_the_marker(defects_root):\n    pass\n\n"
        "@pytest.mark.data\ndef test_marked(defects_root):\n    assert defects_root.is_dir()\n\n"
        "def test_synthetic():\n    pass\n")
    r = _pytest(["test_x.py"], tmp_path, FDSEG_DATA=str(tmp_path / "nowhere"))
    assert r.returncode == 1, r.stdout
    assert "test_forgot_the_marker uses defects_root but is not marked @pytest.mark.data" in r.stdout
    assert "1 passed, 1 skipped, 1 error" in r.stdout, r.stdout                 # the error is a failure
