"""Teacher embeddings of the pipeline corpus as .npy files that travel to another machine (`train_sweep.py
--teacher-npy`), made through the product's teacher cache.

    python scripts/teacher_targets.py --teacher data/models/teacher-ft/teacher \
        --raw data/models/teacher-ft/corpus_768.npy --pca 128 --pca-out .device/teacher_ft_pca128.npy --float16

Rows are aligned with ``data/corpus/corpus.txt``. ``--raw`` keeps the teacher's full width (float32).
``--pca K`` projects with the same uncentred PCA_K (``fit_pca_projection``, seed ``--seed``) that training
fits itself when handed wider rows, so a K-wide file gives the run the targets it would have computed (and
is small enough to copy); ``--float16`` halves it again (the loader converts to float32).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mixsp_core.losses import fit_pca_projection  # noqa: E402
from mixsp_core.paths import PipelinePaths  # noqa: E402
from mixsp_core.stages.prepare import read_corpus_file  # noqa: E402
from mixsp_core.stages.teacher import encode_with_teacher  # noqa: E402
from mixsp_core.teacher.cache import teacher_identity  # noqa: E402


def save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, array)
    print(f"{path}: {array.shape[0]} x {array.shape[1]} {array.dtype} ({path.stat().st_size / 2**20:.1f} MiB)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True, help="Hub id or model folder (e.g. a fine-tuned teacher)")
    parser.add_argument("--data-root", type=Path, default=ROOT / "data")
    parser.add_argument("--raw", type=Path, default=None, help="write the full-width rows here (float32)")
    parser.add_argument("--pca", type=int, default=0, help="K > 0: also write PCA_K-projected rows")
    parser.add_argument("--pca-out", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=42, help="PCA seed (training uses the config's seed)")
    parser.add_argument("--float16", action="store_true", help="store the PCA rows as float16")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    if args.pca and args.pca_out is None:
        parser.error("--pca needs --pca-out")

    paths = PipelinePaths(args.data_root)
    corpus = read_corpus_file(paths)
    identity = teacher_identity(args.teacher)
    embeddings, stats = encode_with_teacher(corpus, paths, args.teacher, batch_size=args.batch_size)
    print(f"teacher {identity}: cache {paths.teacher_cache(identity)}, {stats.encoded} encoded, "
          f"{stats.reused} reused")
    if args.raw is not None:
        save(args.raw, embeddings)
    if args.pca:
        targets, _ = fit_pca_projection(embeddings, args.pca, seed=args.seed)
        save(args.pca_out, targets.astype(np.float16 if args.float16 else np.float32))
    return 0


if __name__ == "__main__":
    sys.exit(main())
