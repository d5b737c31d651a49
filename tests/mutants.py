"""Does the suite see every feature? Switch each off, one at a time, and check some test fails.

    python tests/mutants.py              # every mutant (make mutants); about 20 minutes on 2 busy cores
    python tests/mutants.py --list       # their names
    python tests/mutants.py warmup dropout   # only these

Each mutant is one `Mutant(name, file, old, new, tests)` record of `tests/mutant_list.py`: in a
scratch copy of the repository, `old` (a snippet of source that must occur exactly once in `file`)
is replaced by `new`, and `pytest -x -q <tests>` runs there. A failing test kills the mutant; a mutant whose tests all
pass survived: the feature can vanish without the suite noticing. A snippet not found (the code
was refactored) is an error, never a silent pass: mend the record. Not part of `make test`.

To add one: a record naming the behaviour the README claims, the smallest edit that switches it
off, and the test files (with -k) that should notice.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

from mutant_list import MUTANTS, Mutant

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def scratch_copy() -> str:
    """The tracked and untracked (not ignored) files of the repository, copied to a temporary folder,
    and a link to its `.venv` (the references the tests read, such as llama.cpp's models/ folder)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split("\0")
    dest = tempfile.mkdtemp(prefix="mutants-")
    for f in filter(None, files):
        src = os.path.join(ROOT, f)
        if os.path.isfile(src):
            os.makedirs(os.path.dirname(os.path.join(dest, f)), exist_ok=True)
            shutil.copy2(src, os.path.join(dest, f))
    if os.path.isdir(os.path.join(ROOT, ".venv")):
        os.symlink(os.path.realpath(os.path.join(ROOT, ".venv")), os.path.join(dest, ".venv"))
    return dest


def run_mutant(m: Mutant, root: str) -> tuple[str, float]:
    """'killed', 'survived' or 'error: ...', and the seconds the tests took."""
    path = os.path.join(root, m.file)
    if not os.path.isfile(path):
        return f"error: {m.file} does not exist", 0.0
    original = open(path, encoding="utf-8").read()
    count = original.count(m.old)
    if count != 1:
        return f"error: the snippet occurs {count} times in {m.file} (expected once): {m.old!r}", 0.0
    with open(path, "w", encoding="utf-8") as f:
        f.write(original.replace(m.old, m.new))
    try:
        t0 = time.perf_counter()
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
        done = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *m.tests],
                              cwd=root, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
    finally:
        with open(path, "w", encoding="utf-8") as f:
            f.write(original)
    if done.returncode == 5:  # pytest: no test collected
        return f"error: no test selected by {' '.join(m.tests)}", seconds
    return ("killed" if done.returncode != 0 else "survived"), seconds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help="run only mutants whose name contains one of these words")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.names or any(n.lower() in m.name.lower() for n in args.names)]
    if args.list:
        for m in chosen:
            print(f"{m.name:50s} {m.file:22s} {' '.join(m.tests)}")
        return 0
    if not chosen:
        print(f"no mutant matches {args.names}", file=sys.stderr)
        return 2
    root = scratch_copy()
    results = []
    try:
        for i, m in enumerate(chosen, 1):
            outcome, seconds = run_mutant(m, root)
            results.append((m, outcome))
            print(f"[{i:2d}/{len(chosen)}] {outcome.split(':')[0]:8s} {m.name}  ({seconds:.0f} s)"
                  + (f"\n        {outcome}" if outcome.startswith("error") else ""), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    killed = sum(o == "killed" for _, o in results)
    survived = [m.name for m, o in results if o == "survived"]
    errors = [m.name for m, o in results if o.startswith("error")]
    print(f"\nmutants killed: {killed}/{len(results)}")
    if survived:
        print("survived (a feature the suite does not see):\n  " + "\n  ".join(survived))
    if errors:
        print("errors (mend the record):\n  " + "\n  ".join(errors))
    return 0 if killed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
