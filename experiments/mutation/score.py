"""Mutation score per module from the results of `mutmut run` (run from the repository root).

    python experiments/mutation/score.py [--survivors] [--min 90]

Reads mutmut's per-file results (mutants/<module>.meta) for every module that
[tool.mutmut].only_mutate names in pyproject.toml, leaves out the equivalent mutants listed in
experiments/mutation/equivalent.toml (each checked against the mutant's diff, so that a stale
entry is an error rather than a silent exclusion), and prints per module:
total, excluded, killed (a test failed, or the mutant hung and was stopped), survived, not
reached (no test in the selection runs the function), and the score = killed / (total - excluded).
With --survivors, the diff of every survivor follows. With --min, exits 1 if a module scores below it.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EQUIVALENT = Path(__file__).with_name("equivalent.toml")
KILLED = {"killed", "timeout", "segfault", "caught by type check"}


def modules() -> list[str]:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"]
    found = []
    for src in cfg["source_paths"]:
        for path in sorted((ROOT / src).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if any(fnmatch.fnmatch(rel, p) for p in cfg["only_mutate"]) and path.stat().st_size:
                found.append(rel)
    return found


def diff(name: str) -> str:
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    return get_diff_for_mutant(name)


def added_lines(text: str) -> str:
    return "\n".join(line[1:].strip() for line in text.splitlines() if line.startswith("+") and not line.startswith("+++"))


def assertion_message_only(name: str) -> bool:
    """Whether the mutant changes nothing but the message of an ``assert`` (a check that only tests call)."""
    import ast

    lines = diff(name).splitlines()
    old = [l[1:] for l in lines if l.startswith("-") and not l.startswith("---")]
    new = [l[1:] for l in lines if l.startswith("+") and not l.startswith("+++")]
    if len(old) != 1 or len(new) != 1:
        return False
    try:
        a, b = (ast.parse(x.strip()).body[0] for x in (old[0], new[0]))
    except SyntaxError:
        return False
    return (isinstance(a, ast.Assert) and isinstance(b, ast.Assert) and ast.dump(a.test) == ast.dump(b.test)
            and ast.dump(a.msg) != ast.dump(b.msg))


def load_equivalent(known: set[str]) -> tuple[dict[str, str], list[str]]:
    """name -> reason, and the errors (an entry whose mutant is gone or whose diff no longer matches)."""
    if not EQUIVALENT.exists():
        return {}, []
    entries = tomllib.loads(EQUIVALENT.read_text()).get("mutant", [])
    out, errors = {}, []
    for e in entries:
        name = e["name"]
        if name not in known:
            errors.append(f"{name}: listed as equivalent but mutmut has no such mutant (code changed?)")
            continue
        if e["mutated"].strip() not in added_lines(diff(name)):
            errors.append(f"{name}: its diff no longer shows {e['mutated']!r} (code changed?)")
            continue
        out[name] = e["reason"]
    return out, errors


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--survivors", action="store_true", help="print each survivor's diff")
    parser.add_argument("--equivalent", action="store_true", help="list the equivalent mutants left out")
    parser.add_argument("--min", type=float, default=None, help="exit 1 if a module scores below this percentage")
    args = parser.parse_args()

    import os

    os.chdir(ROOT)
    from mutmut.stats import status_by_exit_code

    results: dict[str, dict[str, str]] = {}
    for module in modules():
        meta = ROOT / "mutants" / f"{module}.meta"
        if not meta.exists():
            print(f"no results for {module}: run `make mutation` first", file=sys.stderr)
            return 2
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        results[module] = {name: status_by_exit_code[code] for name, code in codes.items()}

    equivalent, errors = load_equivalent({n for r in results.values() for n in r})
    # the messages of internal assertions: a mutant that only rewrites one changes no behaviour
    for statuses in results.values():
        for name, status in statuses.items():
            if status != "killed" and name not in equivalent and assertion_message_only(name):
                equivalent[name] = "the message of an assert only"
    for error in errors:
        print("equivalent.toml:", error, file=sys.stderr)

    header = f"{'module':34} {'total':>6} {'equiv':>6} {'killed':>7} {'surv':>5} {'unreached':>9} {'unchecked':>9} {'score':>7}"
    print(header)
    print("-" * len(header))
    low, survivors = [], []
    sums = [0] * 6
    for module, statuses in results.items():
        counted = {n: s for n, s in statuses.items() if n not in equivalent}
        killed = sum(s in KILLED for s in counted.values())
        survived = [n for n, s in counted.items() if s == "survived" or s == "suspicious"]
        unreached = [n for n, s in counted.items() if s == "no tests"]
        unchecked = sum(s == "not checked" for s in counted.values())
        survivors += survived + unreached
        row = [len(statuses), len(statuses) - len(counted), killed, len(survived), len(unreached), unchecked]
        sums = [a + b for a, b in zip(sums, row)]
        score = 100.0 * killed / len(counted) if counted else 100.0
        if args.min is not None and score < args.min:
            low.append(module)
        print(f"{module:34} {row[0]:6} {row[1]:6} {row[2]:7} {row[3]:5} {row[4]:9} {row[5]:9} {score:6.1f}%")
    print("-" * len(header))
    total_counted = sums[0] - sums[1]
    print(f"{'all':34} {sums[0]:6} {sums[1]:6} {sums[2]:7} {sums[3]:5} {sums[4]:9} {sums[5]:9} "
          f"{100.0 * sums[2] / max(total_counted, 1):6.1f}%")
    if args.survivors:
        for name in survivors:
            print(f"\n## {name}\n{diff(name)}")
    if args.equivalent:
        print("\nequivalent mutants left out:")
        for name, reason in sorted(equivalent.items()):
            print(f"  {name}: {reason}")
    if low:
        print(f"below {args.min}%: {', '.join(low)}", file=sys.stderr)
    return 1 if low or errors else 0


if __name__ == "__main__":
    sys.exit(main())
