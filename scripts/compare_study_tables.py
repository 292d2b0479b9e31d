"""Compare the study tables of two working directories (e.g. a study run before and after a refactor).

    python scripts/compare_study_tables.py BEFORE_WD AFTER_WD [--study micro] [--decimals 4] [--added COLUMN ...]

Columns that differ run to run (wall times, throughput, peak memory: tests/test_kill_resume.py's VOLATILE) are
left out; every other column must be equal, exactly or to --decimals. ``--added`` names columns the AFTER tables may
have in addition (a new column, e.g. ``space``); they are reported with their values and left out of the comparison.
Exit status 1 when any table differs.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import pandas as pd

VOLATILE = re.compile(r"(_s$|per_s|memory)")  # as tests/test_kill_resume.py


def tables(wd: Path, study: str) -> dict[str, pd.DataFrame]:
    out = {}
    for path in sorted((wd / "results/studies" / study).glob("*.parquet")):
        df = pd.read_parquet(path)
        out[path.name] = df[[c for c in df.columns if not VOLATILE.search(c)]]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("before", type=Path)
    p.add_argument("after", type=Path)
    p.add_argument("--study", default="micro")
    p.add_argument("--decimals", type=int, default=4)
    p.add_argument("--added", action="append", default=[], help="a column only the AFTER tables have")
    args = p.parse_args(argv)
    a, b = tables(args.before, args.study), tables(args.after, args.study)
    for name, df in b.items():
        new = [c for c in args.added if c in df and (name not in a or c not in a[name])]
        if new:
            print(f"{name}: added {', '.join(f'{c} = {sorted(map(str, df[c].unique()))}' for c in new)}")
            b[name] = df.drop(columns=new)
    ok = set(a) == set(b)
    if not ok:
        print(f"different tables: only before {sorted(set(a) - set(b))}, only after {sorted(set(b) - set(a))}")
    for name in sorted(set(a) & set(b)):
        try:
            pd.testing.assert_frame_equal(a[name], b[name], check_exact=True, obj=name)
            print(f"{name}: identical {a[name].shape}")
        except AssertionError:
            try:
                pd.testing.assert_frame_equal(a[name], b[name], check_exact=False, rtol=0,
                                              atol=0.5 * 10 ** -args.decimals, obj=name)
                print(f"{name}: equal to {args.decimals} decimals {a[name].shape}")
            except AssertionError as exc:
                ok = False
                print(f"{name}: DIFFERS\n{exc}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
