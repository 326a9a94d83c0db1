"""Subset lists (`data.train.keep_list`): train on the images a plain-text list names, for folders and LMDBs alike.

The list holds one entry per line: an image's path relative to the data set's root (`images/0001.jpg`, with `/`
separators) or, for an LMDB, its key. Blank lines are skipped; white space around an entry is not part of it. This
is how a published subset is reproduced, e.g. the CFS-filtered 2,508,146 LUPerson images of TransReID-SSL, whose
released list (a pickle) `python -m dino_recog.data.convert_keys --cfs` turns into such a file.

The images keep the data set's order (not the list's), so the sampler sees the same order as without a list. How many
were kept, and how many listed entries name nothing present (with a few named), is logged; a list that keeps nothing
is an error naming the file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np

from .parsers import DatasetLayoutError

__all__ = ["keep_positions", "read_keep_list", "relative_names"]

log = logging.getLogger(__name__)


def read_keep_list(path: str | os.PathLike) -> list[str]:
    """The entries of a keep list, normalised: `\\` read as `/`, a leading `./` dropped.

    Raises:
        DatasetLayoutError: the file is missing, not UTF-8 text, or lists nothing.
    """
    try:
        with open(path, encoding="utf-8") as fh:
            entries = [_normalise(line.strip()) for line in fh if line.strip()]
    except FileNotFoundError:
        raise DatasetLayoutError(f"data.train.keep_list: {path} not found; expected a text file of relative paths "
                                 "or LMDB keys, one per line") from None  # fmt: skip
    except UnicodeDecodeError as e:
        raise DatasetLayoutError(f"data.train.keep_list: {path} is not UTF-8 text ({e.reason} at byte {e.start}); "
                                 "expected relative paths or LMDB keys, one per line (a pickled list: convert it "
                                 "with python -m dino_recog.data.convert_keys --cfs)") from None  # fmt: skip
    if not entries:
        raise DatasetLayoutError(f"data.train.keep_list: {path} is empty; expected relative paths or LMDB keys, one "
                                 "per line")  # fmt: skip
    return entries


def _normalise(entry: str) -> str:
    entry = entry.replace("\\", "/")
    while entry.startswith("./"):
        entry = entry[2:]
    return entry


def relative_names(paths: Sequence[str], root: str | os.PathLike) -> list[str]:
    """Image paths as a keep list names them: relative to `root` ("" is the working directory), `/`-separated."""
    return [os.path.relpath(p, root or ".").replace(os.sep, "/") for p in paths]


def keep_positions(names: Sequence[str], keep_list: str | os.PathLike, where: str) -> np.ndarray:
    """The positions (in order) of the images whose name `keep_list` lists, the count logged.

    Args:
        names: each image's relative path (`relative_names`) or LMDB key.
        keep_list: the list file.
        where: the data set, for messages (its root).

    Raises:
        DatasetLayoutError: the list names none of the images (or cannot be read).
    """
    entries = read_keep_list(keep_list)
    wanted = set(entries)
    kept = np.fromiter((i for i, n in enumerate(names) if n in wanted), dtype=np.int64)
    if not len(kept):
        raise DatasetLayoutError(
            f"data.train.keep_list: {keep_list} names none of the {len(names)} images of {where} (its entries look "
            f"like {', '.join(map(repr, entries[:2]))}; the images are named like "
            f"{', '.join(map(repr, names[:2]))}); expected paths relative to {where} or LMDB keys"
        )
    found = {names[i] for i in kept}
    missing = [e for e in entries if e not in found]
    note = ""
    if missing:
        note = f"; {len(missing)} listed entries are not in it (e.g. {', '.join(map(repr, missing[:3]))})"
    log.info("data.train.keep_list %s: keeping %d of the %d images of %s%s", keep_list, len(kept), len(names), where,
             note)  # fmt: skip
    return kept
