"""A short `fastsd-train` on a busy CPU: wall and CPU time with OpenMP's default wait policy (threads
spin, then sleep), with `OMP_WAIT_POLICY=PASSIVE` (what fastsd-train sets on a busy machine) and with
one thread.

    python bench/cpu_load.py                         # steps=3 eval=off, 0 and 6 busy processes beside it
    python bench/cpu_load.py --busy 0 2 6 --steps 5  # more loads
    python bench/cpu_load.py --smoke                 # steps=1, no busy processes (checks the script)

Each busy process is a Python loop that never sleeps (one runnable process, like another job's
thread). Each case runs the trainer in a fresh process (libgomp reads its variables once, when
torch loads); "spin" imports torch before fastsd.cli, so fastsd-train's choice does not apply.
Prints a markdown table (wall s, CPU s of the trainer, wall against the same setting with no busy
process) and writes JSON to --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
SETTINGS = {  # name -> (environment changes, import torch before fastsd.cli)
    "spin": ({}, True),
    "passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, False),
    "one thread": ({"OMP_NUM_THREADS": "1"}, False),
}
TRAIN = "import sys\n{torch}from fastsd.cli import main\nsys.exit(main(sys.argv[1:]))\n"


def run_case(setting: str, busy: int, steps: int, run_dir: str) -> dict:
    extra, torch_first = SETTINGS[setting]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    env.update(extra, PYTHONPATH=os.pathsep.join([ROOT, env.get("PYTHONPATH", "")]))
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
    try:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        code = TRAIN.format(torch="import torch\n" if torch_first else "")
        proc = subprocess.run([sys.executable, "-c", code, f"steps={steps}", "eval=off", f"run_dir={run_dir}"],
                              env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    finally:
        for b in burners:
            b.kill()
            b.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"{setting}, {busy} busy: exit {proc.returncode}\n{proc.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"setting": setting, "busy": busy, "steps": steps, "wall_s": wall, "cpu_s": cpu,
            "minor_faults": after.ru_minflt - before.ru_minflt}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--busy", type=int, nargs="+", default=[0, 6], help="busy processes beside the trainer")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    ap.add_argument("--smoke", action="store_true", help="steps=1, no busy processes")
    ap.add_argument("--out", default=os.path.join("bench", "out", "cpu_load.json"))
    args = ap.parse_args(argv)
    if args.smoke:
        args.busy, args.steps = [0], 1
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
            "cpus": os.cpu_count(), "load_before": os.getloadavg()}
    rows = []
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for busy in args.busy:
            for setting in args.settings:
                row = run_case(setting, busy, args.steps, os.path.join(tmp, f"{setting}-{busy}".replace(" ", "_")))
                rows.append(row)
                print(json.dumps(row), flush=True)
                with open(args.out, "w") as f:
                    json.dump({"meta": meta, "rows": rows}, f, indent=1)
    quiet = {r["setting"]: r["wall_s"] for r in rows if r["busy"] == 0}
    print(f"\n{meta['date']}, {meta['cpus']} CPUs, load before {meta['load_before'][0]:.2f}: "
          f"fastsd-train steps={args.steps} eval=off\n")
    print("| busy processes | setting | wall s | CPU s | wall vs no busy process |\n|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['wall_s'] / quiet[r['setting']]:.1f}x" if r["setting"] in quiet else "-"
        print(f"| {r['busy']} | {r['setting']} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
