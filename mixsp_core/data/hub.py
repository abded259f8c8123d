"""Pairs from Hugging Face datasets: ``hf:ID`` (the Hub, via ``datasets.load_dataset``) and
``hf-disk:DIR`` (a dataset saved with ``save_to_disk``).

Datasets need columns ``sentence1``, ``sentence2``, ``score`` (0-5, as in the ``mteb/*-sts``
sets); optional ``task``/``subset``/``split`` columns override the defaults. ``datasets`` is
imported lazily: it costs ~1.5 s and most runs read local files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from mixsp_core.data.table import concat_pairs, normalize_split, pairs_from_frame
from mixsp_core.errors import DataError

# Hub ids whose pairs are the standard benchmarks, mapped to the contract's task names.
HUB_TASKS: dict[str, str] = {
    "mteb/sts12-sts": "STS12",
    "mteb/sts13-sts": "STS13",
    "mteb/sts14-sts": "STS14",
    "mteb/sts15-sts": "STS15",
    "mteb/sts16-sts": "STS16",
    "mteb/stsbenchmark-sts": "STSBenchmark",
    "mteb/sickr-sts": "SICKRelatedness",
}
_OFFLINE_HINT = (
    "the Hugging Face Hub is unreachable or the dataset is not cached; point at local data instead: "
    "senteval:DIR (a SentEval directory), file:PATH (csv/tsv/jsonl/parquet) or hf-disk:DIR (save_to_disk output)"
)


def load_hub(dataset_id: str) -> pd.DataFrame:
    """All splits of Hub dataset ``dataset_id`` as a pairs frame (``source`` = ``hf:ID/split``, ``line`` = row).

    Known ``mteb/*-sts`` ids get their task names; any other id is its own task name.
    Network or cache failures raise ``DataError`` saying how to point at local data.
    """
    import datasets

    label = f"hf:{dataset_id}"
    try:
        loaded = datasets.load_dataset(dataset_id)
    except (OSError, ValueError) as error:  # ConnectionError and DatasetNotFoundError are OSErrors
        raise DataError(label, f"{_OFFLINE_HINT} ({type(error).__name__}: {error})") from error
    return _dataset_pairs(loaded, label, HUB_TASKS.get(dataset_id, dataset_id))


def load_hub_disk(directory: str | Path) -> pd.DataFrame:
    """A ``DatasetDict`` (every split) or a single ``Dataset`` saved with ``save_to_disk``.

    The task defaults to the directory's name; a lone ``Dataset`` is taken as its recorded split,
    else ``test``.
    """
    import datasets

    path = Path(directory)
    label = f"hf-disk:{path}"
    if not path.is_dir():
        raise DataError(label, "directory not found")
    try:
        loaded = datasets.load_from_disk(str(path))
    except (OSError, ValueError) as error:
        raise DataError(label, f"not a dataset saved with save_to_disk ({type(error).__name__}: {error})") from error
    return _dataset_pairs(loaded, label, path.name)


def _dataset_pairs(loaded: Any, label: str, task: str) -> pd.DataFrame:
    """Pairs from a ``DatasetDict`` (one frame per split) or a ``Dataset``."""
    import datasets

    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded.items())
    elif isinstance(loaded, datasets.Dataset):
        splits = [(str(loaded.split) if loaded.split is not None else "test", loaded)]
    else:
        raise DataError(label, f"expected a Dataset or DatasetDict, got {type(loaded).__name__}")
    frames = []
    for split_name, dataset in splits:
        split = normalize_split(split_name)
        if split is None:
            raise DataError(label, f"split {split_name!r} is not train, validation/dev or test")
        source = f"{label}/{split_name}"
        raw = dataset.to_pandas()
        if len(raw) == 0:
            continue  # an empty split holds no pairs; a dataset with no rows at all is refused below
        frames.append(
            pairs_from_frame(
                raw,
                source=source,
                lines=range(1, len(raw) + 1),
                default_task=task,
                default_split=split,
                numeric_scores=True,
            )
        )
    if not frames:
        raise DataError(label, "no data rows in any split; expected at least one pair")
    return concat_pairs(frames)
