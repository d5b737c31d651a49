"""The pages a reader walks through keep three promises: every measured figure they state has one home,
a results page that gives its date, machine and command; every relative link resolves; and every line
range and test they point at still is what they name. `make docs-check` runs this file alone.

A figure is a number beside a unit a measurement has: %, ×/x, $, CPU s, s, min, KiB/MiB/GiB, "hits".
Each line of README.md or docs/*.md that states figures must find them all together in one line or one
paragraph of a results page (examples/RESULTS.md, examples/LAB.md, bench/RESULTS.md, tests/RESULTS.md),
so a figure typed by hand, or copied from one run and another beside it, fails. Code (fenced blocks,
`inline code`) and link targets are not read: they hold commands and prompts, not measurements.
"""
import ast
import glob
import os
import re

import pytest

from conftest import ROOT

RESULTS = ["examples/RESULTS.md", "examples/LAB.md", "bench/RESULTS.md", "tests/RESULTS.md"]
FIGURE = re.compile(r"""
    \$\d[\d,]*(?:\.\d+)?                                        # $819, $2,963
  | (?<![\w.])\d[\d,]*(?:\.\d+)?\s?                              # a number, then its unit:
    (?:%|×(?!\s?\d)|x(?![\w])(?!\s?\d)|CPU[ -]?s(?:econds?)?\b|[KMG]i?B\b|min(?:utes)?\b|s\b|seconds?\b|hits\b)
""", re.X)


def pages() -> list[str]:
    return ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))]


def read(path: str) -> str:
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, text) outside fenced code, with inline code, link targets and HTML comments blanked."""
    out, fenced = [], False
    for n, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            out.append((n, re.sub(r"`[^`]*`|\]\([^)]*\)|<!--.*?-->", " ", line)))
    return out


def figures(text: str) -> set[str]:
    """The figures of a text, written one way: no spaces or bold, × as x, seconds as s, minutes as min."""
    text = text.replace("**", "")
    found = set()
    for m in FIGURE.finditer(text):
        f = re.sub(r"\s", "", m.group(0)).replace("×", "x")
        f = re.sub(r"CPU-?s(econds?)?$", "CPUs", f)
        f = re.sub(r"seconds?$", "s", re.sub(r"minutes$", "min", f))
        found.add(f)
    return found


def homes() -> list[set[str]]:
    """The figures of every line and every paragraph of the results pages (code included: their records)."""
    units = []
    for path in RESULTS:
        text = read(path)
        units += [figures(line) for line in text.splitlines()]
        units += [figures(block) for block in re.split(r"\n\s*\n", text)]
    return [u for u in units if u]


def figures_without_a_home(path: str, text: str, units: list[set[str]]) -> list[str]:
    wrong = []
    for n, line in prose_lines(text):
        found = figures(line)
        if found and not any(found <= unit for unit in units):
            wrong.append(f"{path}:{n}: {sorted(found)} stand together in no line or paragraph of {', '.join(RESULTS)}")
    return wrong


def test_every_figure_of_the_readme_and_docs_has_its_home_in_a_results_page():
    units = homes()
    wrong = [w for path in pages() for w in figures_without_a_home(path, read(path), units)]
    assert not wrong, "\n".join(wrong)


def test_a_figure_edited_by_hand_fails_the_check():
    units = homes()
    readme = read("README.md")
    row = next(line for line in readme.splitlines() if line.startswith("| after training, top-3 average"))
    assert not figures_without_a_home("README.md", row, units)
    edited = re.sub(r"\d+\.\d%", lambda m: f"{float(m.group(0)[:-1]) + 1:.1f}%", row, count=1)
    assert edited != row and figures_without_a_home("README.md", edited, units)


def test_the_results_pages_give_dates_and_commands():
    for path in RESULTS:
        text = read(path)
        assert re.search(r"20\d\d-\d\d-\d\d", text) and ("python" in text or "make" in text), path


# ---------------------------------------------------------------------------- links, line ranges, test names
def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: str) -> set[str]:
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.*)$", read(path), re.M)}


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.parametrize("page", pages() + RESULTS)
def test_every_relative_link_resolves(page):
    wrong = []
    for n, line in enumerate(read(page).splitlines(), 1):
        for target in LINK.findall(line):
            if re.match(r"[a-z]+:", target):
                continue   # http(s), mailto: not this repository's
            file, _, anchor = target.partition("#")
            path = os.path.normpath(os.path.join(os.path.dirname(page), file)) if file else page
            if not os.path.exists(os.path.join(ROOT, path)):
                wrong.append(f"{page}:{n}: {target}: no such file")
            elif anchor and path.endswith(".md") and anchor not in anchors(path):
                wrong.append(f"{page}:{n}: {target}: no such heading in {path}")
    assert not wrong, "\n".join(wrong)


def test_every_test_named_exists():
    wrong = []
    for page in pages():
        for file, name in re.findall(r"(tests/test_\w+\.py)::(test_\w+)", read(page)):
            if not os.path.isfile(os.path.join(ROOT, file)) or f"def {name}(" not in read(file):
                wrong.append(f"{page}: {file}::{name}")
    assert not wrong, "named tests that do not exist:\n" + "\n".join(wrong)


# ---------------------------------------------------------------------------- the README's first reading
FIRST_READS = [("train/loop.py", "training_step"), ("lora/layer.py", "LoRALinear.forward"),
               ("quant/nf4.py", "quantize_nf4")]
RANGE = re.compile(r"\[`([\w/]+\.py):(\d+)-(\d+)`\]\(([\w/]+\.py)#L(\d+)-L(\d+)\) `([\w.]+)`")


def definition_lines(path: str, qualified: str) -> tuple[int, int]:
    """First and last line of a function, a class or a class's method (`Class.method`) in a file."""
    body, node = ast.parse(read(path)).body, None
    for part in qualified.split("."):
        node = next(n for n in body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == part)
        body = node.body
    return min([node.lineno] + [d.lineno for d in node.decorator_list]), node.end_lineno


def test_the_line_ranges_point_at_what_they_name():
    """README's "read these first" (and any page's `path:a-b` link before a name): the definition's lines."""
    found = [(page, m.groups()) for page in pages() for m in RANGE.finditer(read(page))]
    named = {(g[0], g[6]) for page, g in found if page == "README.md"}
    assert set(FIRST_READS) <= named, f"README.md gives no line range for {set(FIRST_READS) - named}"
    for page, (path, a, b, link, la, lb, name) in found:
        start, end = definition_lines(path, name)
        assert (path, int(a), int(b), int(la), int(lb)) == (link, start, end, start, end), \
            f"{page} points {path} {name} at {a}-{b}; it stands at {start}-{end}"
