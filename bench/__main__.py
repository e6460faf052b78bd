"""Run every component benchmark and print one table: ours vs the reference library, same weights and
inputs, measured in the same process with warm-up and repeats.

    python -m bench [--quick] [--json PATH] [--only NAME[,NAME...]] [--compile]

time_ratio = ours_s / ref_s and mem_ratio = ours_mem_mb / ref_mem_mb (peak resident memory added by one call);
below 1.0 means we are faster / leaner. `--quick` uses CI-size inputs; the full suite uses SD v1.5 sizes.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
import traceback

from bench.common import print_table

BENCHES = ("vae", "unet", "vit", "eval", "sample", "train", "diffseg")
COMPILABLE = ("unet",)  # benchmarks with a --compile row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CI-size inputs (whole suite in a few minutes)")
    p.add_argument("--json", default=None, help="write the rows as a JSON list to this path")
    p.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(BENCHES)}")
    p.add_argument("--compile", action="store_true",
                   help="also time our UNet under torch.compile (inductor; output checked against eager first; "
                        "compiling takes minutes on CPU)")
    args = p.parse_args(argv)
    names = args.only.split(",") if args.only else list(BENCHES)
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        p.error(f"unknown benchmark(s) {unknown}; choose from {list(BENCHES)}")
    rows, failed = [], []
    for name in names:
        print(f"== {name}", file=sys.stderr, flush=True)
        try:
            module = importlib.import_module(f"bench.bench_{name}")
            extra = {"compile": True} if args.compile and name in COMPILABLE else {}
            rows += [dict(row, bench=name) for row in module.run(args.quick, **extra)]
        except Exception:  # noqa: BLE001 - one failing benchmark must not hide the others
            traceback.print_exc()
            failed.append(name)
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
                       for r in rows], f, indent=2)
    if failed:
        raise SystemExit(f"benchmarks failed: {failed}")


if __name__ == "__main__":
    main()
