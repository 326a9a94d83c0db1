"""Convert a pickled key file into plain text, once (it is read safely either way):

    python -m dino_recog.data.convert_keys ROOT/keys.pkl [OUT/labels.txt]   (default: labels.txt beside keys.pkl)
    python -m dino_recog.data.convert_keys --cfs cfs_list.pkl --keep 2508146 --prefix images/ keep.txt

The first form turns LUPerson-NL's keys.pkl into labels.txt. The second turns a released subset list, a pickled list
of image names such as TransReID-SSL's CFS list of LUPerson (ranked: its first 2,508,146 names are the 60% subset of
the published model, its first 2,090,122 the 50% one), into the keep list of `data.train.keep_list`: the first
`--keep` names, each prefixed with `--prefix` (TransReID-SSL reads them under `<data_path>/images/`: with
`data.train.root` the folder above images/, the prefix is `images/`).

Either pickle is read by an unpickler that builds only lists, dicts, strings and numbers: a file that asks for any
other Python object is refused unread, and nothing in it runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..atomic import atomic_write
from ..user_errors import user_errors
from .labeled_lmdb import read_keys_pickle, read_string_list_pickle, write_labels_txt

__all__ = ["main"]


def _refuse_existing(out: Path) -> None:
    if out.exists():
        raise FileExistsError(f"{out}: already exists; remove it or give another path")


def _convert_cfs(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if not args.out:
        parser.error("--cfs needs the keep list to write (OUT)")
    out = Path(args.out)
    _refuse_existing(out)
    names = read_string_list_pickle(args.cfs)
    if args.keep > len(names):
        raise ValueError(f"--keep {args.keep}: {args.cfs} lists only {len(names)} names")
    kept = names[: args.keep or len(names)]
    bad = next((n for n in kept if not n.strip() or "\n" in n or "\r" in n), None)
    if bad is not None:
        raise ValueError(f"{args.cfs}: name {bad!r} is empty or spans lines; expected one image name per entry")
    text = "".join(args.prefix + n.strip() + "\n" for n in kept).encode("utf-8")
    atomic_write(out, lambda fh: fh.write(text), "keep list")
    print(f"{out}: {len(kept)} of the {len(names)} names of {args.cfs}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("keys_pkl", nargs="?", help="LUPerson-NL's keys.pkl")
    parser.add_argument("out", nargs="?", help="the labels.txt (default: beside keys.pkl) or, with --cfs, keep list")
    parser.add_argument("--cfs", metavar="LIST_PKL", help="a pickled list of image names (TransReID-SSL's CFS list)")
    parser.add_argument("--keep", type=int, default=0, help="--cfs: keep its first N names (default: all)")
    parser.add_argument("--prefix", default="", help="--cfs: put this before each name (e.g. images/)")
    args = parser.parse_args(argv)
    if args.cfs:  # the positional slot that names keys.pkl then names the output
        if args.keys_pkl and args.out:
            parser.error("--cfs takes one path besides the list: the keep list to write")
        args.out = args.keys_pkl
    elif not args.keys_pkl:
        parser.error("give keys.pkl, or --cfs LIST_PKL")
    elif args.keep or args.prefix:
        parser.error("--keep and --prefix apply to --cfs")
    if args.keep < 0:
        parser.error(f"--keep {args.keep}: expected a count >= 0 (0: all)")
    with user_errors():
        if args.cfs:
            _convert_cfs(args, parser)
            return
        keys, pids = read_keys_pickle(args.keys_pkl)
        out = Path(args.out) if args.out else Path(args.keys_pkl).with_name("labels.txt")
        _refuse_existing(out)
        write_labels_txt(out, keys, pids)
        print(f"{out}: {len(keys)} images of {len(set(pids))} identities")


if __name__ == "__main__":
    main()
