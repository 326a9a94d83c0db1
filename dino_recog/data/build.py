"""From the data set entries of a config (`DatasetSpec`) to records: the one place that maps names to parsers."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from .. import distributed as dist
from ..config import DatasetSpec
from . import datasets as ds
from .demo import ensure_demo
from .keep_list import keep_positions, relative_names
from .labeled_lmdb import LabeledLMDB, keep_identities
from .parsers import _relabel as relabel
from .transforms import reid_test_transform

__all__ = ["labeled_data", "query_gallery", "train_records", "unlabeled_items"]

log = logging.getLogger(__name__)


def labeled_data(spec: DatasetSpec) -> ds.ReIDData:
    """A data set with query / gallery splits (and train where it has one): Market-1501, MSMT17, a labeled folder in
    its evaluation form, or the demo set generated on first use)."""
    if spec.name == "demo":
        data = ds.load_market1501(ensure_demo(spec.root) / "market")
        data.name = "demo"
    elif spec.name == "market1501":
        data = ds.load_market1501(spec.root)
    elif spec.name in ("dukemtmcreid", "dukemtmc"):  # torchreid's and fast-reid's names
        data = ds.load_dukemtmc(spec.root)
    elif spec.name in ("msmt17", "msmt17_v1", "msmt17_v2"):
        version = {"msmt17_v1": "V1", "msmt17_v2": "V2"}.get(spec.name, spec.version)
        if spec.name != "msmt17" and spec.version not in ("auto", version):
            raise ValueError(f"data set {spec.name} with version {spec.version}; {spec.name} is version {version}")
        data = ds.load_msmt17(spec.root, version=version, use_val=spec.use_val)
    elif spec.name == "labeled_folder":
        data = ds.load_labeled_folder_splits(spec.root)
    else:
        raise ValueError(f"data set {spec.name!r} has no query/gallery split; expected market1501, msmt17, "
                         "labeled_folder or demo")  # fmt: skip
    log.info("%s (%s)\n%s", spec.name, spec.root, ds.format_table(data))
    return data


def query_gallery(
    spec: DatasetSpec, size: Sequence[int], mean: Sequence[float], std: Sequence[float]
) -> tuple[ds.ReIDData, ds.ImageDataset, ds.ImageDataset]:
    """The query and gallery of a labeled set as evaluation data sets (resize + normalise; corrupt images raise)."""
    data = labeled_data(spec)
    tf = reid_test_transform(size, mean, std)
    return data, ds.ImageDataset(data.query, tf, train=False), ds.ImageDataset(data.gallery, tf, train=False)


def train_records(specs: list[DatasetSpec], min_images_per_id: int = 0) -> list[ds.Record] | LabeledLMDB:
    """The labeled training images of one or several data sets, identities and cameras offset per set, without the
    identities that have fewer than `min_images_per_id` images (pids then relabelled 0..N-1, in order).

    A labeled LMDB (luperson_nl, labeled_lmdb; alone, the config makes sure) comes as a `LabeledLMDB`. A set's
    `keep_list` keeps only the images it names (before identities are counted and relabelled)."""
    if specs[0].name in ("luperson_nl", "labeled_lmdb"):
        # Rank 0 reads the label file and writes the shared cache; the other ranks then map it.
        spec = specs[0]
        data = dist.run_on_main(lambda: LabeledLMDB(spec.root, min_images_per_id, spec.keep_list))
        dist.barrier()
        data = data or LabeledLMDB(spec.root, min_images_per_id, spec.keep_list)
        log.info("%s %s: %d identities, %d images%s", specs[0].name, specs[0].root, data.num_identities, len(data),
                 _dropped(data.dropped, min_images_per_id))  # fmt: skip
        return data
    sets = []
    for spec in specs:
        if spec.name == "labeled_folder":
            root = Path(spec.root)  # the evaluation form trains on ROOT/train
            split = (root / "train").is_dir() and any((root / d).is_dir() for d in ("query", "gallery", "val"))
            records = ds.load_labeled_folder(root / "train" if split else root, name=spec.root)
            log.info("labeled folder %s: %d identities, %d images", spec.root, len({r.pid for r in records}),
                     len(records))  # fmt: skip
        else:
            records = labeled_data(spec).train
        sets.append(kept_records(records, spec))
    combined = ds.combine_train_sets(sets)
    if len(specs) > 1:
        log.info("combined %d train sets: %d identities, %d images", len(specs), len({r.pid for r in combined}),
                 len(combined))  # fmt: skip
    if min_images_per_id > 1:
        kept, labels, dropped = keep_identities([r.pid for r in combined], min_images_per_id)
        combined = [ds.Record(combined[i].path, int(pid), combined[i].camid) for i, pid in zip(kept, labels)]
        log.info("training on %d identities, %d images%s", len(set(labels.tolist())), len(combined),
                 _dropped(dropped, min_images_per_id))  # fmt: skip
        if not combined:
            raise ds.DatasetLayoutError(f"no training identity has {min_images_per_id} images or more "
                                        "(data.min_images_per_id); nothing to train on")  # fmt: skip
    return combined


def kept_records(records: list[ds.Record], spec: DatasetSpec) -> list[ds.Record]:
    """The records `spec.keep_list` names (all without one), identities relabelled 0..N-1 in order."""
    if not spec.keep_list:
        return records
    kept = keep_positions(relative_names([r.path for r in records], spec.root), spec.keep_list, spec.root)
    return relabel([records[i] for i in kept])


def _dropped(dropped: dict[str, int], minimum: int) -> str:
    if not dropped["identities"]:
        return ""
    return (f" ({dropped['identities']} identities with fewer than {minimum} images dropped, {dropped['images']} "
            "images; data.min_images_per_id)")  # fmt: skip


def unlabeled_items(spec: DatasetSpec, keys_file: str = "") -> list[str] | list[ds.Record] | ds.LMDBImages:
    """The training images of a stage-1 data set; labels, where a set has them, are not used."""
    if spec.name in ("demo", "luperson", "image_folder"):
        folder = ensure_demo(spec.root) / "lup" / "images" if spec.name == "demo" else spec.root
        paths = ds.list_image_folder(folder)
        if spec.keep_list:  # paths relative to `root`, as for every set
            paths = [paths[i] for i in keep_positions(relative_names(paths, spec.root), spec.keep_list, spec.root)]
        return paths
    if spec.name == "luperson_lmdb":
        images = ds.LMDBImages(spec.root, keys_file or None)
        if spec.keep_list:
            images.keys = [images.keys[i] for i in keep_positions(images.keys, spec.keep_list, spec.root)]
        return images
    return train_records([spec])
