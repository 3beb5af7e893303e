"""vagrant/Vagrantfile passes `vagrant validate` (Debian's vagrant; no provider needed)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

VAGRANT_DIR = Path(__file__).resolve().parents[2] / "vagrant"


def validate(folder: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    if shutil.which("vagrant") is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("vagrant is not installed (scripts/setup.sh installs it)")
        pytest.skip("vagrant is not installed (run: sudo bash scripts/setup.sh)")
    env = dict(os.environ, VAGRANT_DOTFILE_PATH=str(tmp_path / ".vagrant"),
               VAGRANT_CHECKPOINT_DISABLE="1")
    return subprocess.run(["vagrant", "validate", "--ignore-provider"], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=120, check=False)


def test_vagrantfile_validates(tmp_path: Path) -> None:
    res = validate(VAGRANT_DIR, tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "validated successfully" in res.stdout


def test_a_broken_vagrantfile_does_not(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    text = (VAGRANT_DIR / "Vagrantfile").read_text()
    (broken / "Vagrantfile").write_text(text.replace(
        'config.vm.hostname = "pgtrace-lab"',
        'config.vm.hostname = "pgtrace-lab"\n  config.vm.no_such_option = 1'))
    res = validate(broken, tmp_path)
    assert res.returncode != 0
    assert "no_such_option" in res.stdout + res.stderr
