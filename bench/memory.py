"""Peak training memory of popup models versus the same dense timm model, above the import baseline.

    python bench/memory.py [--steps 5]

Each variant trains ``--steps`` SGD steps (momentum, weight decay: the recipe's optimizer state) in a fresh
process; the figure is the peak resident set size during training minus the RSS after imports and the batch
were created (``resource.getrusage``'s ``ru_maxrss`` would include the import peak, so the child samples its RSS
from /proc in a thread). Printed side by side with the ratio.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from machine import load_line

_CHILD = r"""
import json, sys, threading, time
import timm, torch, torch.nn.functional as F
import timm_popup
spec = json.loads(sys.argv[1])
torch.set_num_threads(spec["threads"])

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

x = torch.randn(spec["batch"], 3, spec["size"], spec["size"])
y = torch.randint(0, 10, (spec["batch"],))
base = rss()
peak = [base]
stop = threading.Event()

def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], rss())
        time.sleep(0.002)

threading.Thread(target=sample, daemon=True).start()
model = timm.create_model(spec["name"], num_classes=10).train()
opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9, weight_decay=1e-4)
for _ in range(spec["steps"]):
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()
stop.set()
peak[0] = max(peak[0], rss())
print(json.dumps({"peak_above_baseline": peak[0] - base}))
"""


def measure(name: str, batch: int, size: int, steps: int, threads: int) -> int:
    spec = json.dumps(dict(name=name, batch=batch, size=size, steps=steps, threads=threads))
    out = subprocess.run([sys.executable, "-c", _CHILD, spec], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_above_baseline"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    print(f"machine: {load_line()} (memory does not depend on load)")
    print("| model | batch @ px | dense peak (MB) | popup peak (MB) | popup / dense |\n|---|---|---|---|---|")
    for dense, batch, size in (("resnet18", 64, 32), ("resnet50", 32, 64)):
        d = measure(dense, batch, size, args.steps, args.threads)
        p = measure(f"popup_{dense}", batch, size, args.steps, args.threads)
        print(f"| {dense} | {batch} @ {size} | {d / 1e6:.0f} | {p / 1e6:.0f} | {p / d:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
