"""Size on disk of a SparseDelta for SmolLM2-135M at several densities, against the full checkpoint.

For each dtype (fp32 as cached, and bf16) and density, a random subnetwork's entries are given new values (a stand-in
for training: the folder size does not depend on the values), the delta is saved with ``save_pretrained``, merged
into a freshly loaded base, and the merged weights are checked bit-exactly against the "trained" model. The full
model's size is that of a ``save_pretrained`` folder of the same model in the same dtype.

    python benchmarks/bench_delta_size.py          # writes benchmarks/results/delta_size.md
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch
from _common import RESULTS_DIR, perturb_selected, write_result

from sparse_rl import SparseDelta
from sparse_rl.delta import DELTA_WEIGHTS_NAME, base_checksum
from sparse_rl.discovery import random_mask
from sparse_rl.models import load_smollm2

RESULTS = RESULTS_DIR / "delta_size.md"


def folder_bytes(folder: Path, pattern: str = "*") -> int:
    return sum(f.stat().st_size for f in folder.glob(pattern) if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--densities", type=float, nargs="+", default=[0.05, 0.10, 0.30])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)

    rows, checksum_seconds = [], {}
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        base, _ = load_smollm2(dtype=dtype)
        num_parameters = sum(p.numel() for p in base.parameters())
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            base.save_pretrained(tmp / "full")
            full = folder_bytes(tmp / "full")
            for density in args.densities:
                mask = random_mask(base, density, seed=0)
                trained = copy.deepcopy(base)
                perturb_selected(trained, mask, scale=1e-3)

                delta = SparseDelta.from_trained(trained, mask)
                delta.save_pretrained(tmp / f"delta-{density}")
                size = folder_bytes(tmp / f"delta-{density}")
                weights = (tmp / f"delta-{density}" / DELTA_WEIGHTS_NAME).stat().st_size

                target = copy.deepcopy(base)
                SparseDelta.from_pretrained(target, tmp / f"delta-{density}")
                exact = all(torch.equal(p, q) for p, q in zip(target.parameters(), trained.parameters()))
                if not exact:
                    raise AssertionError(f"merged model differs from the trained one at density {density}")

                value_bytes = mask.num_selected * base.dtype.itemsize
                mask_bytes = sum((s.numel() + 7) // 8 for s in mask.selections.values())
                rows.append(dict(dtype=dtype_name, density=density, selected=mask.num_selected,
                                 num_parameters=num_parameters, full=full, size=size, weights=weights,
                                 expected=value_bytes + mask_bytes))
                print(rows[-1], flush=True)
                del trained, target, delta
            timings = []
            for _ in range(3):
                start = time.perf_counter()
                base_checksum(base, mask)
                timings.append(time.perf_counter() - start)
            checksum_seconds[dtype_name] = min(timings)
        del base

    mib = 2**20
    lines = [
        "# Sparse delta checkpoints of SmolLM2-135M-Instruct",
        "",
        "Folder written by `SparseDelta.save_pretrained` (values in the model's dtype + mask as packed bits, or int32 "
        "indices where smaller, + `delta_config.json`) against a `save_pretrained` folder of the full model in the "
        "same dtype. Random per-tensor subnetwork over all parameters (embeddings included; lm_head is tied). Every "
        "delta was merged into a freshly loaded base and checked bit-exact against the trained model.",
        "",
        "| dtype | density | selected entries | delta folder MiB | full folder MiB | delta / full "
        "| values + bits MiB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dtype']} | {r['density']:.2f} | {r['selected']:,} | {r['size'] / mib:.1f} | {r['full'] / mib:.1f} "
            f"| {r['size'] / r['full']:.3f} | {r['expected'] / mib:.1f} |"
        )
    lines += [
        "",
        "Expected ratio: d x (value bytes) + 1/8 byte of mask per parameter, over (value bytes) per parameter.",
        f"Base checksum (SHA-256 over the unselected entries, computed at save and at load; mask at density "
        f"{args.densities[-1]}), best of 3: "
        + ", ".join(f"{k} {v:.2f} s" for k, v in checksum_seconds.items())
        + " (2-core machine shared with other jobs; indicative only).",
        "",
        "Reproduce: `python benchmarks/bench_delta_size.py`",
        "",
    ]
    write_result("\n".join(lines), RESULTS, write=not args.no_write)


if __name__ == "__main__":
    main()
