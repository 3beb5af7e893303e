"""Query normalization and fingerprints."""

from __future__ import annotations

import re

import pytest

from pgtrace.fingerprint import fingerprint, normalize


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # numbers: integers, decimals, exponents, hex, negatives
        ("SELECT * FROM t WHERE id = 42", "select * from t where id = ?"),
        ("select 1.5, 3., 2e10, -7, 1.5E-3, 0x1F", "select ?, ?, ?, ?, ?, ?"),
        ("select a-1 from t", "select a-? from t"),
        # digits inside identifiers stay
        ("select col1, t2.c3 from t2", "select col1, t2.c3 from t2"),
        ("select a$1 from t", "select a$1 from t"),
        # string literals, with doubled quotes and prefixes
        ("select 'abc'", "select ?"),
        ("select 'it''s', ''", "select ?, ?"),
        ("select E'x\\'y', 1", "select ?, ?"),
        ("select B'0101', X'1f', U&'d\\0061t'", "select ?, ?, ?"),
        ("select $$a 'b' c$$, 1", "select ?, ?"),
        ("select $fn$ body; $$ $fn$, 2", "select ?, ?"),
        # a prefix cut inside a literal (QUERY_LEN) still normalizes
        ("SELECT 'unterminated", "select ?"),
        # parameters
        ("select * from t where id=$1 and x = $12", "select * from t where id=? and x = ?"),
        # IN lists collapse, whatever their length
        ("select * from t where id in (1, 2, 3)", "select * from t where id in (?)"),
        ("select * from t where id IN ($1,$2)", "select * from t where id in (?)"),
        ("select * from t where id in ( 'a' ,'b' )", "select * from t where id in (?)"),
        ("select * from t where id in (7)", "select * from t where id in (?)"),
        # comments
        ("select 1 -- trailing comment\n", "select ?"),
        ("/* leading */ select /* inner\nline */ 1", "select ?"),
        # comment markers inside literals are not comments
        ("select '--', 1", "select ?, ?"),
        ("select '/*', 1, '*/'", "select ?, ?, ?"),
        ("select 1 /* it's */, 2", "select ? , ?"),
        # quoted identifiers stay (their quotes and markers are not literals)
        ('select "it\'s--", "a""b" from "T1"', 'select "it\'s--", "a""b" from "t1"'),
        # a prefix cut inside a comment
        ("select 1 /* cut", "select ?"),
        # whitespace and case; a trailing semicolon goes
        ("  SELECT\n\t*   FROM  T ;  ", "select * from t"),
        ("Insert Into T Values (1, 'x');", "insert into t values (?)"),
    ],
)
def test_normalize(text: str, expected: str) -> None:
    assert normalize(text) == expected


def test_fingerprint_format() -> None:
    fp = fingerprint("select 1")
    assert re.fullmatch(r"[0-9a-f]{16}", fp)
    assert fingerprint("") == ""


def test_fingerprint_is_stable_across_runs() -> None:
    # a fixed hash (blake2b of the normalized text), not Python's per-process hash()
    import hashlib

    assert fingerprint("SELECT 1") == hashlib.blake2b(b"select ?", digest_size=8).hexdigest()
    assert fingerprint("select abalance from pgbench_accounts where aid = 17") == fingerprint(
        "SELECT abalance FROM pgbench_accounts WHERE aid = $1"
    )


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("select * from t where id = 1", "SELECT *\n  FROM t\n WHERE id = 99999;"),
        ("select * from t where name = 'bob'", "select * from t where name = $1"),
        ("select * from t where id in (1,2,3)", "select * from t where id in ($1, $2)"),
        ("/* app=x */ update t set v = v + 1 where k = 5", "update t set v = v + 2 where k = 6"),
        ("insert into t values (1, 'a')", "-- c\ninsert into t values (2, 'b')"),
    ],
)
def test_same_statement_same_fingerprint(a: str, b: str) -> None:
    assert fingerprint(a) == fingerprint(b)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("select * from t where id = 1", "select * from u where id = 1"),
        ("select a from t", "select b from t"),
        ("update t set v = 1", "delete from t where v = 1"),
        ("select * from t where a = '--' and b = 1", "select * from t where a = 1"),
        ("select 1 from t1", "select 1 from t2"),
    ],
)
def test_different_statements_differ(a: str, b: str) -> None:
    assert fingerprint(a) != fingerprint(b)
