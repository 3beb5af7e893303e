"""The marker policy of tests/conftest.py, run in an inner pytest session under CI=true.

A test skipped because the server under test is not of its ``pg`` version is the version
matrix at work and passes CI; a root/bpf test skipped for any other reason fails it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import conftest as policy

pytest_plugins = ["pytester"]

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def inner(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    monkeypatch.setenv("CI", "true")
    monkeypatch.delenv("PGTRACE_TEST_DSN", raising=False)
    pytester.syspathinsert(str(REPO))
    pytester.makeconftest('pytest_plugins = ["tests.conftest"]\n')
    return pytester


def _run(inner: pytest.Pytester, pytestconfig: pytest.Config) -> pytest.AttachResult:
    pg_bin = pytestconfig.getoption("--pg-bin")
    args = [f"--pg-bin={pg_bin}"] if pg_bin else []  # one token: see scripts/test.sh
    return inner.runpytest_inprocess(*args, "-p", "no:cacheprovider")


def test_version_skips_pass_ci(inner: pytest.Pytester, pytestconfig: pytest.Config,
                               pg_major: int) -> None:
    inner.makepyfile(f'''
import pytest

@pytest.mark.root
@pytest.mark.pg(">= {pg_major + 1}")
def test_newer_only():
    raise AssertionError("must not run")

@pytest.mark.pg("<= {pg_major}")
def test_this_version(pg_major):
    assert pg_major == {pg_major}

@pytest.mark.pg("== {pg_major}, != {pg_major}")
def test_no_version():
    raise AssertionError("must not run")
''')
    res = _run(inner, pytestconfig)
    res.assert_outcomes(passed=1, skipped=2)
    assert res.ret == 0
    res.stdout.fnmatch_lines(["*2 tests not for this version*"])


def test_other_skips_still_fail_ci(inner: pytest.Pytester, pytestconfig: pytest.Config,
                                   monkeypatch: pytest.MonkeyPatch, pg_major: int) -> None:
    # bcc made unimportable for the inner session only (restored after the test)
    monkeypatch.setattr(policy, "_bcc_error", ["bcc cannot be imported: made so by the test"])
    inner.makepyfile(f'''
import pytest

@pytest.mark.bpf
@pytest.mark.pg(">= {pg_major}")
def test_needs_bcc():
    pass
''')
    res = _run(inner, pytestconfig)
    res.assert_outcomes(errors=1)  # the skip happens in setup: an error, not a pass
    res.stdout.fnmatch_lines(["*a bpf test must run, but it was skipped:*bcc cannot be imported*"])
    res.stdout.fnmatch_lines(["*CI=true but none of the 1 BPF tests ran: failing*"])


def test_a_bad_spec_is_an_error(inner: pytest.Pytester, pytestconfig: pytest.Config) -> None:
    inner.makepyfile('''
import pytest

@pytest.mark.pg("=> 17")
def test_typo():
    pass
''')
    res = _run(inner, pytestconfig)
    res.assert_outcomes(errors=1)
    res.stdout.fnmatch_lines(["*bad PostgreSQL version spec*"])
