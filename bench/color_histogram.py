"""Colour-histogram baseline on a Market-1501-layout set: how far colour alone gets.

    python bench/color_histogram.py --root data/demo          # the demo set (generated if missing)
    python bench/color_histogram.py --market /data/Market-1501-v15.09.15

Each image becomes a joint RGB histogram (8 bins per channel) of its top, middle and bottom thirds, L1-normalised;
query and gallery are compared with the chi-squared distance under the standard protocol (rank-1/5/10, mAP, mINP).
The demo set is built so that this baseline stays well below trained models: identities share colours.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dino_recog.data.datasets import load_market1501, read_image  # noqa: E402
from dino_recog.data.demo import ensure_demo  # noqa: E402
from dino_recog.evaluation import evaluate_rank  # noqa: E402

BINS = 8


def histogram(path: str) -> np.ndarray:
    img = np.asarray(read_image(path).resize((64, 128)), dtype=np.int64) * BINS // 256  # (128, 64, 3) bin indices
    codes = (img[..., 0] * BINS + img[..., 1]) * BINS + img[..., 2]
    parts = [np.bincount(codes[r].ravel(), minlength=BINS**3) for r in (slice(0, 43), slice(43, 86), slice(86, 128))]
    h = np.concatenate(parts).astype(np.float64)
    return h / h.sum()


def chi2(q: np.ndarray, g: np.ndarray, chunk: int = 64) -> np.ndarray:
    out = np.empty((len(q), len(g)), dtype=np.float32)
    for i in range(0, len(q), chunk):
        a = q[i : i + chunk, None, :]
        out[i : i + chunk] = 0.5 * ((a - g[None]) ** 2 / (a + g[None] + 1e-10)).sum(-1)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--root", default="data/demo", help="demo data directory (generated if missing)")
    src.add_argument("--market", help="a Market-1501-layout folder instead of the demo set")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    root = Path(args.market) if args.market else ensure_demo(args.root) / "market"
    data = load_market1501(root)
    t0 = time.perf_counter()
    qf = np.stack([histogram(r.path) for r in data.query])
    gf = np.stack([histogram(r.path) for r in data.gallery])
    r = evaluate_rank(
        chi2(qf, gf),
        *(np.array([x.pid for x in s]) for s in (data.query, data.gallery)),
        *(np.array([x.camid for x in s]) for s in (data.query, data.gallery)),
    )
    result = {
        "method": "colour histogram (RGB 8^3 x 3 stripes, chi2)",
        "data": str(root),
        "rank1": float(r["cmc"][0]),
        "rank5": float(r["cmc"][4]),
        "rank10": float(r["cmc"][9]),
        "mAP": r["mAP"],
        "mINP": r["mINP"],
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(
        f"colour-histogram baseline on {root}: rank-1 {100 * result['rank1']:.1f}  rank-5 "
        f"{100 * result['rank5']:.1f}  mAP {100 * result['mAP']:.1f}  mINP {100 * result['mINP']:.1f}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
