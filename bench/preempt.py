"""A real run killed at random points, resumed each time, against the same run uninterrupted; and what recovery
checkpoints cost.

    python bench/preempt.py                  # popup_conv2 on 12,800 Fashion-MNIST images, 2 epochs, 6 kills
    python bench/preempt.py --cost           # training time without recovery checkpoints, and with one every N
    python bench/preempt.py --kills 10 --checkpointing-steps 20 --seed 1

Kills: the uninterrupted run is timed first (its process start, its seconds per optimizer update). Then the same
run is started with ``--resume latest`` again and again, each time signalled (SIGTERM or SIGKILL, alternating, to
its whole process tree as a scheduler does) at a random moment of its training, until it finishes. Printed per kill:
the signal, the checkpoint it resumed from and the one it left (in optimizer updates), the attempt's wall time and
the time lost (wall time minus the progress it kept, at the uninterrupted run's seconds per update). SIGTERM should
lose about the process start and a step; SIGKILL at most the start and ``--checkpointing-steps`` updates. At the end:
the final mask file's sha256 against the uninterrupted run's.

Cost (``--cost``): the same run with no recovery checkpoint inside an epoch, and with one after every update
(``--cost-every``; so many saves that their cost stands far above the noise), rounds interleaved; printed: the
training time of each (the epochs' own time, which includes the saves), the cost of one save, what one every
``--checkpointing-steps`` updates costs, and what the default (one save per 10 minutes of training) costs: one save's
time over 600 s.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from machine import check_idle

ROOT = Path(__file__).resolve().parents[1]
RUN = ["--model", "popup_conv2", "--dataset", "fashion-mnist", "--val-samples", "2000", "--epochs", "2",
       "--batch-size", "128", "--log-every", "1000"]
EPOCHS = 2
TRAINING_STARTS = "augmentation: "  # the last line the script prints before its first step


def launch(args: list[str], out: Path, *, kill_after: float | None = None, sig: signal.Signals = signal.SIGTERM
           ) -> dict:
    """One attempt: `accelerate launch` the run (``--resume latest``); with ``kill_after``, signal its process tree
    that many seconds after its training started. Returns its timings and the checkpoints before and after."""
    before = newest_updates(out)
    cmd = ["accelerate", "launch", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", str(ROOT / "train_accelerate.py"), *RUN, *args, "--output-dir", str(out),
           "--resume", "latest"]
    env = dict(os.environ, TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: list[str] = []
    training = threading.Event()
    marks: dict[str, float] = {}

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(TRAINING_STARTS) and not training.is_set():
                marks["training"] = time.perf_counter()
                training.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    killed = None
    if kill_after is not None:
        while not training.wait(0.05) and proc.poll() is None:
            pass
        if proc.poll() is None:
            time.sleep(max(0.0, kill_after - (time.perf_counter() - marks["training"])))
            if proc.poll() is None:
                killed = time.perf_counter() - started
                os.killpg(proc.pid, sig)
    proc.wait()
    reader.join()
    wall = time.perf_counter() - started
    if killed is None and proc.returncode != 0:
        sys.exit(f"the run failed (exit {proc.returncode}):\n{''.join(lines[-40:])}")
    return dict(wall=wall, start=marks.get("training", started + wall) - started, killed=killed,
                before=before, after=newest_updates(out), log="".join(lines), done=(out / "model.safetensors").exists())


def newest_updates(out: Path) -> int:
    """Optimizer updates covered by the newest complete checkpoint (0: none)."""
    from timm_popup.runstate import list_checkpoints, read_trainer_state

    found = list_checkpoints(out)
    return read_trainer_state(found[-1])["num_updates"] if found else 0


def training_time(out: Path) -> float:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return sum(row["epoch_time_s"] for row in rows)


def digest(out: Path) -> str:
    return hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()


def kills(args: argparse.Namespace, work: Path) -> None:
    every = ["--checkpointing-steps", str(args.checkpointing_steps), "--train-samples", str(args.train_samples)]
    reference = launch(every, work / "reference")
    updates = newest_updates(work / "reference")
    train_wall = reference["wall"] - reference["start"]
    # the epochs' own time: the wall time after training starts also holds the evaluation and the artifact's write,
    # and kill times drawn over it land after the last update too
    per_update = training_time(work / "reference") / updates
    print(f"uninterrupted: {reference['wall']:.1f} s wall ({reference['start']:.1f} s process start, "
          f"{train_wall:.1f} s training and evaluation, {updates} updates: {per_update * 1000:.0f} ms each); "
          f"--checkpointing-steps {args.checkpointing_steps}", flush=True)
    rng = random.Random(args.seed)
    out, total, n = work / "interrupted", 0.0, 0
    print("kill  signal   at (s)  resumed from  left at  ~redone  wall (s)  lost (s)  start (s)")
    while True:
        left = updates - newest_updates(out)
        sig = (signal.SIGTERM, signal.SIGKILL)[n % 2] if n < args.kills and left > 0 else None
        remaining = left * per_update  # kill somewhere in what is left to train
        attempt = launch(every, out, kill_after=rng.uniform(0.05, 0.95) * remaining if sig else None,
                         sig=sig or signal.SIGTERM)
        total += attempt["wall"]
        if attempt["done"]:
            break
        n += 1
        kept = attempt["after"] - attempt["before"]
        lost = attempt["wall"] - kept * per_update
        # SIGTERM: none (its checkpoint is written after the step it stopped at); SIGKILL: the updates it had made
        # beyond the checkpoint it left, estimated at the uninterrupted pace
        reached = attempt["before"] + max(0.0, (attempt["killed"] - attempt["start"]) / per_update)
        redone = 0 if sig == signal.SIGTERM else max(0, round(reached) - attempt["after"])
        print(f"{n:>4}  {signal.Signals(sig).name:<7} {attempt['killed']:>7.1f}  {attempt['before']:>12}  "
              f"{attempt['after']:>7}  {redone:>7}  {attempt['wall']:>8.1f}  {lost:>8.1f}  {attempt['start']:>9.1f}",
              flush=True)
    same = digest(out) == digest(work / "reference")
    print(f"final mask: {digest(out)[:16]} interrupted {n} times, {digest(work / 'reference')[:16]} uninterrupted: "
          f"{'identical' if same else 'DIFFERENT'}; wall {total:.1f} s against {reference['wall']:.1f} s "
          f"({total - reference['wall']:.1f} s lost in all)")
    if not same:
        raise SystemExit(1)


def cost(args: argparse.Namespace, work: Path) -> None:
    # one save per update magnifies the saves' cost far above the run-to-run noise of the training time
    samples = ["--train-samples", str(args.train_samples)]
    settings = {"none": ["--checkpointing-steps", str(10**9), *samples],
                f"every {args.cost_every}": ["--checkpointing-steps", str(args.cost_every), *samples]}
    times: dict[str, list[float]] = {name: [] for name in settings}
    saves = 0
    for _ in range(args.rounds):
        for name, extra in settings.items():
            out = work / name.replace(" ", "-")
            shutil.rmtree(out, ignore_errors=True)
            launch(extra, out)
            times[name].append(training_time(out))
            updates, every = newest_updates(out), args.cost_every
            per_epoch = updates // EPOCHS
            # a recovery save follows every N-th update, except an epoch's last (its epoch checkpoint follows)
            saves = sum(1 for u in range(1, updates + 1) if u % every == 0 and u % per_epoch != 0)
    without, with_ = statistics.median(times["none"]), statistics.median(times[f"every {args.cost_every}"])
    per_save = (with_ - without) / saves if saves else float("nan")
    per_update = without / updates
    print(f"training time (median of {args.rounds}): {without:.2f} s without recovery checkpoints, {with_:.2f} s with "
          f"one every {args.cost_every} update(s) ({saves} saves, {100 * (with_ / without - 1):+.1f}%): "
          f"{per_save * 1000:.0f} ms per save, {per_update * 1000:.0f} ms per update")
    share = per_save / (args.checkpointing_steps * per_update)
    print(f"--checkpointing-steps {args.checkpointing_steps}: {100 * share:.2f}% of training time")
    print(f"default (a save after every 10 minutes of training): {100 * per_save / 600:.3f}% of training time "
          f"for this model; a save of S seconds costs S/6 % (under 2% while a save takes under 12 s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=6, help="interruptions, SIGTERM and SIGKILL alternating")
    parser.add_argument("--checkpointing-steps", type=int, default=20, help="recovery checkpoint interval (updates)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    parser.add_argument("--cost", action="store_true", help="measure what recovery checkpoints cost instead")
    parser.add_argument("--rounds", type=int, default=3, help="--cost: rounds of each setting")
    parser.add_argument("--cost-every", type=int, default=1, help="--cost: the recovery interval timed (updates)")
    parser.add_argument("--keep", default=None, metavar="DIR", help="work in DIR and keep it (default: a temp dir)")
    parser.add_argument("--allow-busy", action="store_true", help="run on a busy machine (figures not to be quoted)")
    parser.add_argument("--train-samples", type=int, default=12800, help="Fashion-MNIST training images")
    args = parser.parse_args()
    check_idle(args.allow_busy)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="preempt-"))
    try:
        (cost if args.cost else kills)(args, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
