"""docs/recipes.md is the source of truth of the recipe presets: each preset it names equals its table, key by key.

The tables' format is documented in docs/recipes.md ("Hyper-parameter tables", "Published rows").
"""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import pytest
import yaml

from dino_recog import config as C
from dino_recog import report
from dino_recog.protocol_card import CARD_KEYS, protocol_card

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "docs" / "recipes.md"
PRESETS_LINE = re.compile(r"^Presets: (.+) \(stage ([12])\)$")
PRESET_ITEM = re.compile(r"`([^`]+)`(?: \(without ((?:`[^`]+`(?:, )?)+)\))?")  # a preset and the rows it skips
SOURCE = re.compile(r"^[\w.-]+/[\w.-]+@[0-9a-f]{7,40}:\S+#L\d+(-L\d+)?(, #L\d+)*$")
TABLE_HEADER = ["key", "ours", "theirs", "source"]
PUBLISHED_EXTRA = ["size", "preset", "source"]  # columns of the published table beside the card
PENDING = "pending "


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _table_after(lines: list[str], start: int) -> tuple[list[str], list[list[str]]]:
    """The header and rows of the first markdown table at or after line `start`."""
    i = start
    while i < len(lines) and not lines[i].startswith("|"):
        i += 1
    if i + 1 >= len(lines):
        raise ValueError(f"docs/recipes.md line {start + 1}: expected a table after it")
    header, rows = _cells(lines[i]), []
    for line in lines[i + 2:]:  # past the |---| separator
        if not line.startswith("|"):
            break
        rows.append(_cells(line))
    return header, rows


def recipe_sections(text: str) -> list[tuple[str, int, list[dict]]]:
    """(preset path, stage, rows) for each preset of each `Presets: ... (stage N)` line of docs/recipes.md and the
    table after that line (less the rows of the keys named in the preset's `(without ...)`).

    A row is {"key", "ours", "pending", "theirs", "source"}: `ours` is the YAML value, or the text after `pending`
    (`pending` True) for a key the config does not have yet.
    """
    lines = text.splitlines()
    sections = []
    for n, line in enumerate(lines):
        m = PRESETS_LINE.match(line)
        if not m:
            continue
        header, cells = _table_after(lines, n + 1)
        assert header == TABLE_HEADER, f"docs/recipes.md line {n + 1}: table header {header}, expected {TABLE_HEADER}"
        rows = []
        for c in cells:
            assert len(c) == 4, f"docs/recipes.md: row {c} has {len(c)} cells, expected 4"
            key, ours = c[0].strip("`"), c[1]
            pending = ours.startswith(PENDING)
            value = ours[len(PENDING):].strip("`") if pending else yaml.safe_load(ours.strip("`"))
            rows.append({"key": key, "ours": value, "pending": pending, "theirs": c[2], "source": c[3]})
        for preset, without in PRESET_ITEM.findall(m.group(1)):
            skip = set(re.findall(r"`([^`]+)`", without))
            sections.append((preset, int(m.group(2)), [r for r in rows if r["key"] not in skip]))
    return sections


def published_rows(text: str) -> list[dict]:
    """The published table (its header starts with `| recipe | data |`) as dicts keyed by its header, as written."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if _cells(line)[:2] == ["recipe", "data"])
    header, cells = _table_after(lines, start)
    return [dict(zip(header, c, strict=True)) for c in cells]


_MISSING = object()


def lookup(cfg: object, key: str) -> object:
    """The value of a dotted key (`data.train[0].name`) in a resolved config, or _MISSING when it has no such key."""
    obj = cfg
    for part in key.split("."):
        m = re.fullmatch(r"(\w+)(?:\[(\d+)\])?", part)
        assert m, f"docs/recipes.md: malformed key {key!r}"
        obj = getattr(obj, m.group(1), _MISSING)
        if obj is _MISSING:
            return _MISSING
        if m.group(2) is not None:
            obj = obj[int(m.group(2))]
    return obj


def same(a: object, b: object) -> bool:
    """Equal as config values: numbers to 1e-9 relative, sequences element-wise, booleans never equal to numbers."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def _load(preset: str | Path, stage: int) -> object:
    return C.load(preset, None, C.DinoConfig if stage == 1 else C.RecogConfig)


def check_preset(preset: str | Path, stage: int, rows: list[dict]) -> list[str]:
    """One message per row of the table that the preset does not match, naming the preset, the key and both values."""
    cfg, errors = _load(preset, stage), []
    for row in rows:
        actual = lookup(cfg, row["key"])
        if row["pending"]:
            if actual is not _MISSING:
                errors.append(f"{preset}: {row['key']} now exists in the config: set it in the preset "
                              f"(docs/recipes.md: pending {row['ours']}) and drop 'pending' from its row")
        elif actual is _MISSING:
            errors.append(f"{preset}: the config has no key {row['key']} (docs/recipes.md gives {row['ours']!r})")
        elif not same(actual, row["ours"]):
            errors.append(f"{preset}: {row['key']} is {actual!r} in the preset, {row['ours']!r} in docs/recipes.md")
    return errors


PRESETS = recipe_sections(RECIPES.read_text())


def test_recipe_tables_are_well_formed():
    # The TransReID-SSL stage 1 (folder and LMDB), Market-1501 and MSMT17 presets; each row cites a file and line.
    assert len(PRESETS) >= 4
    for preset, _, rows in PRESETS:
        assert len(rows) >= 20, f"{preset}: expected a table of every hyper-parameter"
        keys = [r["key"] for r in rows]
        assert len(keys) == len(set(keys)), f"{preset}: a key appears twice in its table"
        for row in rows:
            where = f"{preset}: {row['key']}"
            assert SOURCE.match(row["source"]), f"{where}: source {row['source']!r} is not repo@commit:path#Lnn"
            assert row["theirs"], f"{where}: the authors' value is empty"


@pytest.mark.parametrize("preset,stage,rows", PRESETS, ids=[p for p, _, _ in PRESETS])
def test_preset_matches_its_table(preset, stage, rows):
    assert (ROOT / preset).is_file(), f"docs/recipes.md names {preset}, which does not exist"
    assert check_preset(ROOT / preset, stage, rows) == []


def test_changed_preset_value_fails_naming_preset_key_and_values(tmp_path):
    preset, stage, rows = next(s for s in PRESETS if s[0] == "configs/market1501/vit_small_transreid_ssl.yaml")
    copy = tmp_path / "vit_small_transreid_ssl.yaml"
    shutil.copy(ROOT / preset, copy)
    text = copy.read_text()
    assert "label_smoothing: 0.0" in text
    copy.write_text(text.replace("label_smoothing: 0.0", "label_smoothing: 0.1"))
    assert check_preset(copy, stage, rows) == [
        f"{copy}: loss.label_smoothing is 0.1 in the preset, 0.0 in docs/recipes.md"]


def test_pending_key_that_exists_fails():
    # A row marked pending must be converted once its key exists, so the preset cannot silently lack it.
    preset, stage, rows = PRESETS[0]
    rows = [{"key": "train.lr", "ours": "0.0005", "pending": True, "theirs": "", "source": ""}]
    (error,) = check_preset(ROOT / preset, stage, rows)
    assert "train.lr now exists in the config" in error and preset in error


def test_published_rows_read_by_the_report_state_their_presets_conventions():
    published = report.read_published(RECIPES)  # the reader `python -m dino_recog.report --published` uses
    rows = published_rows(RECIPES.read_text())
    assert [p["recipe"] for p in published] == [r["recipe"] for r in rows]
    assert {r["recipe"] for r in rows} >= {"TransReID-SSL ViT-S/16", "PASS ViT-S/16", "SOLIDER Swin-B"}
    # Every stage-2 preset of the tables has its published row, and every row's preset has its table.
    assert {r["preset"] for r in rows} - {"-"} == {p for p, stage, _ in PRESETS if stage == 2}
    for row, pub in zip(rows, published):
        assert set(row) == {"recipe", "mAP", "rank1", *CARD_KEYS, *PUBLISHED_EXTRA}, f"{row['recipe']}: columns"
        assert pub["protocol"] == {k: row[k] for k in CARD_KEYS}, f"{row['recipe']}: the report reads another card"
        assert 0 < pub["mAP"] <= 1 and 0 < pub["rank1"] <= 1
        assert SOURCE.match(row["source"]), f"{row['recipe']}: source {row['source']!r}"
        if row["preset"] == "-":
            continue
        cfg = _load(ROOT / row["preset"], 2)
        spec = {"mean": cfg.aug.mean, "std": cfg.aug.std, "test_feature": cfg.model.test_feature}
        card = protocol_card(cfg, spec)  # what the preset's results.json will state
        for key in CARD_KEYS:
            assert card[key] == row[key], f"{row['preset']}: {key} is {card[key]} in its card, {row[key]} published"
        assert same(cfg.aug.size, yaml.safe_load(row["size"])), f"{row['preset']}: aug.size {cfg.aug.size}"
