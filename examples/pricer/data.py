"""Where the pricer's items come from (pricer/split.py splits them).

Three sources, one result (`Loaded`: items plus a count of the rows skipped and why):

- `load_diamonds()`: the 53,940 real diamonds that ship inside the `plotnine` wheel, each row
  turned into a short description and its price (the embedded default: no download).
- `load_amazon_meta(path, tokenizer)`: Amazon Reviews 2023 item metadata (`meta_<Category>.jsonl`,
  optionally gzipped), prepared as the course prepares it (`Item` and `ItemLoader` in its code).
- `load_text_price(path)`: a `.jsonl` or `.csv` with `text` and `price` columns, such as the
  course's prepared pricer data (where `text` already holds the prompt and the answer).

A bad row (missing, non-numeric or out-of-range price, empty text, unreadable line) is skipped and
counted, never a crash.
"""
from __future__ import annotations

import csv
import gzip
import importlib.util
import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator

from .prompt import description_of, make_answer, make_prompt


@dataclass(frozen=True)
class Item:
    """One product: its prompt (ending in `Price is $`) and its true price in dollars."""

    prompt: str
    price: float

    @property
    def answer(self) -> str:
        return make_answer(self.price)


@dataclass
class Loaded:
    """The items read from one source, and the rows skipped, counted by reason."""

    source: str
    items: list[Item] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        """One line, e.g. `diamonds.csv: 53,940 items, 2 skipped (non-numeric price 1, empty text 1)`."""
        n = sum(self.skipped.values())
        why = ", ".join(f"{reason} {count:,}" for reason, count in self.skipped.most_common())
        return f"{os.path.basename(self.source)}: {len(self.items):,} items, {n:,} skipped" + (f" ({why})" if n else "")


def parse_price_field(value: Any, low: float = 0.0, high: float = math.inf) -> tuple[float | None, str | None]:
    """(price, None) for a usable price, else (None, reason): missing, non-numeric or out of range.

    `low` is exclusive when it is 0 (a price must be positive) and inclusive otherwise, as the
    course's `MIN_PRICE <= price <= MAX_PRICE`.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return None, "missing price"
    try:
        price = float(value)
    except (TypeError, ValueError):
        return None, "non-numeric price"
    if not math.isfinite(price):
        return None, "non-numeric price"
    if price <= 0 or price < low or price > high:
        return None, "price out of range"
    return price, None


# ----------------------------------------------------------------------------- diamonds
DIAMOND_FIELDS = ("carat", "cut", "color", "clarity", "depth", "table", "x", "y", "z")


def diamonds_csv() -> str:
    """Path of `plotnine/data/diamonds.csv`, found without importing plotnine (installed --no-deps)."""
    spec = importlib.util.find_spec("plotnine")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the diamonds data ships in the plotnine wheel: pip install --no-deps plotnine==0.15.9")
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, "data", "diamonds.csv")
        if os.path.isfile(path):
            return path
    raise FileNotFoundError("plotnine is installed but holds no data/diamonds.csv; reinstall it with "
                            "pip install --no-deps --force-reinstall plotnine==0.15.9")


def describe_diamond(row: dict[str, str]) -> str:
    """Every measured attribute of a diamond in one line: the four Cs, then depth, table and size.

    {'carat': '0.23', 'cut': 'Ideal', 'color': 'E', 'clarity': 'SI2', 'depth': '61.5', 'table': '55',
    'x': '3.95', 'y': '3.98', 'z': '2.43'} -> 'Diamond: 0.23 carat, Ideal cut, color E, clarity SI2,
    depth 61.5%, table 55%, 3.95 x 3.98 x 2.43 mm'. Depth and table are percentages of the width;
    x, y and z are length, width and depth in millimetres.
    """
    return (f"Diamond: {row['carat']} carat, {row['cut']} cut, color {row['color']}, clarity {row['clarity']}, "
            f"depth {row['depth']}%, table {row['table']}%, {row['x']} x {row['y']} x {row['z']} mm")


def describe_four_cs(row: dict[str, str]) -> str:
    """The four Cs alone (carat, cut, colour, clarity): a prompt about 20 tokens shorter.

    {'carat': '0.23', 'cut': 'Ideal', 'color': 'E', 'clarity': 'SI2', ...} ->
    'Diamond: 0.23 carat, Ideal cut, color E, clarity SI2'. Carat carries most of the price.
    """
    return f"Diamond: {row['carat']} carat, {row['cut']} cut, color {row['color']}, clarity {row['clarity']}"


DESCRIPTIONS = {"full": describe_diamond, "four-cs": describe_four_cs}


def load_diamonds(path: str | None = None, description: str = "full") -> Loaded:
    """Every row of the diamonds CSV as an Item; rows with a bad price or a blank field are skipped.

    description: 'full' (every attribute, `describe_diamond`) or 'four-cs' (`describe_four_cs`).
    """
    if description not in DESCRIPTIONS:
        raise ValueError(f"description {description!r}: expected one of {sorted(DESCRIPTIONS)}")
    describe = DESCRIPTIONS[description]
    loaded = Loaded(path or diamonds_csv())
    loaded.items = [Item(make_prompt(describe(row)), price) for row, price in diamond_rows(loaded.source, loaded.skipped)]
    return loaded


def diamond_rows(path: str | None = None, skipped: Counter | None = None) -> Iterator[tuple[dict[str, str], float]]:
    """(row, price) for each usable row of the diamonds CSV, in file order; the rows with a bad price
    or a blank field are counted in `skipped` by reason. Every reader of the diamonds starts here."""
    path = path or diamonds_csv()
    skipped = skipped if skipped is not None else Counter()
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [k for k in (*DIAMOND_FIELDS, "price") if k not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing columns {missing}; expected {[*DIAMOND_FIELDS, 'price']}")
        for row in reader:
            price, reason = parse_price_field(row["price"])
            if reason is None and any(not (row[k] or "").strip() for k in DIAMOND_FIELDS):
                reason = "empty text"
            if reason:
                skipped[reason] += 1
                continue
            yield row, price


# ----------------------------------------------------------------------------- Amazon metadata
MIN_PRICE, MAX_PRICE = 0.5, 999.49
MIN_CHARS = 300                  # contents of 300 characters or fewer: too little to price
MIN_TOKENS, MAX_TOKENS = 150, 160
CEILING_CHARS = MAX_TOKENS * 7   # cut contents to 1,120 characters before tokenizing
REMOVALS = ('"Batteries Included?": "No"', '"Batteries Included?": "Yes"', '"Batteries Required?": "No"',
            '"Batteries Required?": "Yes"', "By Manufacturer", "Item", "Date First", "Package", ":",
            "Number of", "Best Sellers", "Number", "Product ")
_NOISE = re.compile(r'[:\[\]"{}【】\s]+')


def scrub(text: str) -> str:
    """Punctuation and whitespace runs to one space; words of 7+ characters with a digit (part numbers) dropped."""
    text = _NOISE.sub(" ", text).strip()
    text = text.replace(" ,", ",").replace(",,,", ",").replace(",,", ",")
    return " ".join(w for w in text.split(" ") if len(w) < 7 or not any(c.isdigit() for c in w))


def scrub_details(details: str) -> str:
    for noise in REMOVALS:
        details = details.replace(noise, "")
    return details


def amazon_text(record: dict[str, Any], tokenizer) -> tuple[str | None, str | None]:
    """(text, None) for a usable record, else (None, reason): the course's `Item.parse`.

    contents = description lines, feature lines, scrubbed details, each part ending in a newline;
    more than 300 characters, cut to 1,120; text = scrub(title) + newline + scrub(contents); more
    than 150 tokens, cut to 160 (as the course: an item of exactly 150 tokens is dropped).
    """
    title = record.get("title")
    if not isinstance(title, str) or not title.strip():
        return None, "empty text"
    contents = "\n".join(_strings(record.get("description")))
    if contents:
        contents += "\n"
    features = "\n".join(_strings(record.get("features")))
    if features:
        contents += features + "\n"
    details = record.get("details")
    if isinstance(details, dict):  # the raw .jsonl files hold a dict; the HF dataset a JSON string
        details = json.dumps(details, ensure_ascii=False) if details else ""
    if details:
        contents += scrub_details(str(details)) + "\n"
    if len(contents) <= MIN_CHARS:
        return None, "contents of 300 characters or fewer"
    contents = contents[:CEILING_CHARS]
    text = f"{scrub(title)}\n{scrub(contents)}"
    tokens = tokenizer.encode(text, bos=False)
    if len(tokens) <= MIN_TOKENS:
        return None, "150 tokens or fewer"
    return tokenizer.decode(tokens[:MAX_TOKENS]), None


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value] if value else []
    return [str(v) for v in value or [] if v]


def load_amazon_meta(path: str, tokenizer) -> Loaded:
    """`meta_<Category>.jsonl[.gz]`: items priced 0.50 to 999.49 whose text the tokenizer cuts to 160 tokens."""
    loaded = Loaded(path)
    for record, reason in _jsonl_records(path):
        if reason is None:
            price, reason = parse_price_field(record.get("price"), MIN_PRICE, MAX_PRICE)
        if reason is None:
            text, reason = amazon_text(record, tokenizer)
        if reason:
            loaded.skipped[reason] += 1
            continue
        loaded.items.append(Item(make_prompt(text), price))
    return loaded


def _jsonl_records(path: str) -> Iterator[tuple[dict[str, Any] | None, str | None]]:
    """(record, None) per line, or (None, 'unreadable line') where a line is not a JSON object."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                yield None, "unreadable line"
                continue
            yield (record, None) if isinstance(record, dict) else (None, "unreadable line")


# ----------------------------------------------------------------------------- text + price files
def load_text_price(path: str) -> Loaded:
    """A `.jsonl[.gz]` or `.csv` with `text` and `price`; `text` may hold the whole prompt and answer."""
    loaded = Loaded(path)
    if path.endswith(".csv"):
        f = open(path, newline="", encoding="utf-8")
        reader = csv.DictReader(f)
        missing = [k for k in ("text", "price") if k not in (reader.fieldnames or [])]
        if missing:
            f.close()
            raise ValueError(f"{path}: missing columns {missing}; expected a header with 'text' and 'price'")
        rows: Iterator = ((row, None) for row in reader)
    else:
        f = None
        rows = _jsonl_records(path)
    try:
        for row, reason in rows:
            if reason is None:
                price, reason = parse_price_field(row.get("price"))
            if reason is None:
                text = row.get("text")
                description = description_of(text) if isinstance(text, str) else ""
                if not description:
                    reason = "empty text"
            if reason:
                loaded.skipped[reason] += 1
                continue
            loaded.items.append(Item(make_prompt(description), price))
    finally:
        if f is not None:
            f.close()
    return loaded


# ----------------------------------------------------------------------------- dispatch and split
def is_amazon_meta(path: str) -> bool:
    return re.fullmatch(r"meta_.+\.jsonl(\.gz)?", os.path.basename(path)) is not None


def load_source(data: str | None, tokenizer=None, description: str = "full") -> Loaded:
    """`None` or 'diamonds': the embedded diamonds (described in full or by the four Cs, see
    `load_diamonds`); `meta_<Category>.jsonl[.gz]`: Amazon metadata (needs the tokenizer); any other
    `.jsonl[.gz]` or `.csv`: a text + price file."""
    if data in (None, "diamonds"):
        return load_diamonds(description=description)
    if not os.path.isfile(data):
        raise FileNotFoundError(f"{data}: no such data file (expected meta_<Category>.jsonl[.gz], "
                                f"a .jsonl or .csv with text and price, or 'diamonds')")
    if is_amazon_meta(data):
        if tokenizer is None:
            raise ValueError(f"{data}: Amazon metadata is cut by tokens, so loading it needs the model's tokenizer")
        return load_amazon_meta(data, tokenizer)
    if data.endswith((".jsonl", ".jsonl.gz", ".csv")):
        return load_text_price(data)
    raise ValueError(f"{data}: unknown data format; expected meta_<Category>.jsonl[.gz], a .jsonl or a .csv")
