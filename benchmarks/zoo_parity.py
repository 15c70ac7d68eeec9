"""Differential parity over the architecture zoo (``pock_tvm.models.zoo``): every case compiled full and
with a sparse scheme, at O0 and O3, batch 1 and 8; forward against ONNX Runtime (ONNX cases) or PyTorch,
one SGD step (loss and each trained tensor's update) against float64 PyTorch autograd.

    python benchmarks/zoo_parity.py --out benchmarks/results            # all cases (resumable)
    python benchmarks/zoo_parity.py --only resnet50,gpt2 --out /tmp/z   # some

Writes ``zoo_parity_host.json`` (one record per run, kept between runs: cases already measured are
skipped unless --fresh) and ``zoo_parity_host.md``. Goal: forward and loss within 1e-5, updates within
1e-4 (``pock_tvm.compiler.parity``); a case that cannot compile is listed with its error.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import sys
import time
import traceback
from pathlib import Path

SETTINGS = [(scheme, opt, batch) for scheme in ("full", "sparse") for opt in ("O0", "O3") for batch in (1, 8)]


def run_case(case, scheme: str, opt: str, batch: int) -> dict:
    from pock_tvm.compiler.parity import check_parity

    args = case.build(batch)
    start = time.perf_counter()
    try:
        result = check_parity(**args, scheme=case.sparse if scheme == "sparse" else "full", options=opt,
                              tuning_database=False)
        record = result.to_dict()
    except Exception as err:  # noqa: BLE001 (a case that fails is a row of the table, not a crash)
        record = {"ok": False, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
        logging.getLogger("zoo").info(traceback.format_exc())
    return {"case": case.name, "family": case.family, "scheme": case.sparse if scheme == "sparse" else "full",
            "options": opt, "batch": batch, "seconds": round(time.perf_counter() - start, 1), **record}


def write(records: list[dict], out: Path) -> None:
    from pock_tvm.targets.toolchain import system_cpu

    out.mkdir(parents=True, exist_ok=True)
    meta = {"date": datetime.date.today().isoformat(), "cpu": system_cpu(), "machine": platform.machine(),
            "command": "python benchmarks/zoo_parity.py --out benchmarks/results"}
    tmp = out / "zoo_parity_host.json.tmp"
    tmp.write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    os.replace(tmp, out / "zoo_parity_host.json")
    cases = list(dict.fromkeys(r["case"] for r in records))
    lines = [f"# Zoo parity ({meta['date']}, {meta['cpu']})", "",
             f"Command: `{meta['command']}`. Each cell: full / sparse scheme, the worst of O0 and O3 at batch 1 "
             "and 8 (forward and loss relative error; update: the largest relative error of a trained tensor).",
             "Goal: forward and loss <= 1e-5, update <= 1e-4.", "",
             "| case | family | sparse scheme | forward | loss | update | runs ok | worst tensor |",
             "|---|---|---|---|---|---|---|---|"]
    for name in cases:
        rows = [r for r in records if r["case"] == name]
        good = [r for r in rows if "error" not in r]
        ok = sum(r["ok"] for r in rows)
        if not good:
            lines.append(f"| {name} | {rows[0]['family']} | {rows[0]['scheme'] if rows[0]['scheme'] != 'full' else ''} "
                         f"| - | - | - | 0/{len(rows)} | {rows[0]['error'][:120]} |")
            continue
        worst = max(good, key=lambda r: r["update"])
        sparse = next((r["scheme"] for r in rows if r["scheme"] != "full"), "")
        errors = [r for r in rows if "error" in r]
        note = worst["worst"] + (f"; {len(errors)} runs failed: {errors[0]['error'][:80]}" if errors else "")
        lines.append(f"| {name} | {rows[0]['family']} | {sparse} | {max(r['forward'] for r in good):.1e} | "
                     f"{max(r['loss'] for r in good):.1e} | {max(r['update'] for r in good):.1e} | "
                     f"{ok}/{len(rows)} | {note} |")
    passed = sum(all(r["ok"] for r in records if r["case"] == n) for n in cases)
    lines += ["", f"{passed} of {len(cases)} cases pass every run."]
    tmp = out / "zoo_parity_host.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, out / "zoo_parity_host.md")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", help="comma-separated case names")
    parser.add_argument("--fresh", action="store_true", help="measure every case again")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from pock_tvm.models.zoo import CASES

    path = args.out / "zoo_parity_host.json"
    records = [] if args.fresh or not path.exists() else json.loads(path.read_text())["records"]
    only = set(args.only.split(",")) if args.only else None
    for case in CASES:
        if only and case.name not in only:
            continue
        for scheme, opt, batch in SETTINGS:
            key = (case.name, case.sparse if scheme == "sparse" else "full", opt, batch)
            if any((r["case"], r["scheme"], r["options"], r["batch"]) == key for r in records):
                continue
            record = run_case(case, scheme, opt, batch)
            records = [r for r in records if (r["case"], r["scheme"], r["options"], r["batch"]) != key] + [record]
            print(json.dumps({k: record[k] for k in record if k != "notes"}), flush=True)
            write(records, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
