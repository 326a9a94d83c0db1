"""Convert LUPerson-NL's keys.pkl into the plain-text labels.txt, once (it is read safely either way):

    python -m dino_recog.data.convert_keys ROOT/keys.pkl [OUT/labels.txt]   (default: labels.txt beside keys.pkl)

The pickle is read by an unpickler that builds only lists, dicts, strings and numbers: a file that asks for any
other Python object is refused unread, and nothing in it runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..user_errors import user_errors
from .labeled_lmdb import read_keys_pickle, write_labels_txt

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("keys_pkl", help="LUPerson-NL's keys.pkl")
    parser.add_argument("out", nargs="?", help="the labels.txt to write (default: beside keys.pkl)")
    args = parser.parse_args(argv)
    with user_errors():
        keys, pids = read_keys_pickle(args.keys_pkl)
        out = Path(args.out) if args.out else Path(args.keys_pkl).with_name("labels.txt")
        if out.exists():
            raise FileExistsError(f"{out}: already exists; remove it or give another path")
        write_labels_txt(out, keys, pids)
        print(f"{out}: {len(keys)} images of {len(set(pids))} identities")


if __name__ == "__main__":
    main()
