"""A run's state on disk and in time: its output directory (one run at a time), its checkpoints (every epoch and,
between epochs, recovery checkpoints), where it is inside an epoch, and the signals that stop it.

A checkpoint is ``accelerator.save_state`` (model without its DDP prefix, optimizer, grad scaler, every process's
torch / CUDA / numpy / Python generator states, the samplers) written to a temp directory that gets
``trainer_state.json`` last and is then renamed, so a run killed at any moment leaves the previous checkpoint or the
new one complete, and ``--resume latest`` never picks a partial one. ``epoch_NNNN`` follows epoch N;
``step_NNNNNNNN`` (a recovery checkpoint) follows optimizer update N inside an epoch and also holds where each process
was: batches read, the epoch's metric sums and its model buffers (BatchNorm statistics differ between processes
until the epoch ends). The loaders need no state of their own: the order of an epoch is Accelerate's seedable
sampler's (a function of seed and epoch; ``skip_first_batches`` continues it), and each example's augmentation is
seeded by its own place (``timm_popup.data``), not by what a loader worker drew before.

SIGTERM, SIGUSR1 (SLURM's ``--signal``) and SIGINT let the step in progress finish; then every process writes its
part of a recovery checkpoint, the main one prints one line naming it and the command that resumes it, and the run
exits with :data:`EXIT_PREEMPTED`. A second signal while that checkpoint is written changes nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import fcntl
import json
import os
import pickle
import re
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from accelerate import Accelerator
from torch import nn

__all__ = [
    "TrainError", "WriteError", "write_error_cause", "TRAINER_STATE", "CHECKPOINTS_DIR", "LOCK_FILE",
    "EXIT_PREEMPTED", "DEFAULT_CHECKPOINT_MINUTES", "prepare_output_dir", "hold_output_dir", "list_checkpoints",
    "find_checkpoint", "check_fresh_output_dir", "read_trainer_state", "check_resume_compatible", "check_checkpoint",
    "use_portable_checkpoints", "save_checkpoint", "load_checkpoint", "EpochProgress", "resume_progress",
    "position_loader", "Preemption", "Preempted", "Recovery", "resume_command", "DEFAULT_DIST_TIMEOUT_S",
    "PATIENT_TIMEOUT_S", "STATUS_FILE", "EXIT_LOST_PEER", "dist_timeout_kwargs", "Launch", "Cluster", "write_status",
    "read_status", "epoch_order", "rest_of_epoch",
]

TRAINER_STATE = "trainer_state.json"  # written last into a checkpoint: its presence marks a complete one
CHECKPOINTS_DIR = "checkpoints"
LOCK_FILE = "run.lock"
#: The exit status of a run stopped by a signal after saving its recovery checkpoint (sysexits' EX_TEMPFAIL: try
#: again later); a launcher or scheduler that restarts failed jobs resumes it with ``--resume latest``.
EXIT_PREEMPTED = 75
#: Without ``--checkpointing-steps``, a recovery checkpoint follows the first update after this many minutes of
#: training since the last checkpoint: a save of a few seconds costs well under 2% of that.
DEFAULT_CHECKPOINT_MINUTES = 10.0
_EPOCH_PREFIX, _STEP_PREFIX, _TMP_PREFIX = "epoch_", "step_", ".tmp-"
_STATE_VERSION = 1
# Settings a checkpoint cannot be resumed under another value of (the state would not fit, or mean nothing).
_STRUCTURAL = ("model", "method", "k", "weight_init", "seed", "num_classes", "input_size", "model_kwargs")
_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")
# Tests pause a checkpoint write here ("NAME=MARKER": after the checkpoint NAME's tensors are written, before it is
# complete, create MARKER and wait until it is removed), so that a signal lands at a known point: inside the write.
_PAUSE_ENV = "TIMM_POPUP_PAUSE_IN_CHECKPOINT"


class TrainError(ValueError):
    """A problem with the run's settings that the user can fix; the message is one line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class WriteError(OSError):
    """A file the run must write could not be written (full disk, read-only file system); one line."""


def write_error_cause(e: BaseException) -> str:
    """The cause of a failed write in a few words: the OS's reason (``No space left on device``) where known."""
    while e is not None:
        if isinstance(e, OSError) and e.strerror:
            return e.strerror + (f" ({e.filename})" if e.filename else "")
        e = e.__cause__ or e.__context__
    return "the write failed"


# --------------------------------------------------------------------------------------------- the output directory


def prepare_output_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` if needed and prove it writable (so a run never trains for hours and then fails to save)."""
    directory = Path(path).expanduser()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-"):
            pass
    except OSError as e:
        raise TrainError(f"cannot write to output directory {directory}: {e.strerror or e}; "
                         "choose a writable --output-dir") from e
    return directory


@contextlib.contextmanager
def hold_output_dir(output_dir: Path, notify: Callable[[str], None] = print) -> Iterator[Path]:
    """Hold ``output_dir/run.lock`` while the run lives: a second run on the directory is a :class:`TrainError`
    naming the live one (host, pid, since when). The lock is the kernel's (``flock``), so it dies with its process;
    the file of a run that died is taken over, and ``notify`` says so."""
    path = output_dir / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_lock(fd)
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise TrainError(f"another run is using {output_dir}: {holder} ({path}); wait for it to end or choose "
                             "another --output-dir") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:  # its holder ended and removed it between our open and our lock
            same = False
        if same:
            break
        os.close(fd)
    previous = _read_lock(fd)
    if previous:
        notify(f"note: took over {path} from {previous}, which is no longer running")
    record = dict(host=socket.gethostname(), pid=os.getpid(),
                  since=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # before unlocking: a waiting run then finds another file and locks that one
        os.close(fd)


def _read_lock(fd: int) -> str:
    try:
        record = json.loads(os.pread(fd, 4096, 0).decode() or "null")
        return f"the run of pid {record['pid']} on {record['host']} since {record['since']}"
    except (ValueError, TypeError, KeyError, OSError):
        return ""


# ------------------------------------------------------------------------------------------------------ checkpoints


def _position(checkpoint: Path) -> tuple[int, int]:
    """Where a complete checkpoint is in the run: (optimizer updates, 1 for an epoch's end, which follows a recovery
    checkpoint of the same update count)."""
    state = json.loads((checkpoint / TRAINER_STATE).read_text() or "{}")
    return int(state.get("num_updates", 0)), int(checkpoint.name.startswith(_EPOCH_PREFIX))


def _number(name: str) -> int | None:
    for prefix in (_EPOCH_PREFIX, _STEP_PREFIX):
        if name.startswith(prefix) and name[len(prefix):].isdigit():
            return int(name[len(prefix):])
    return None


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (``epoch_NNNN`` / ``step_NNNNNNNN`` holding ``trainer_state.json``) under
    ``output_dir``, oldest first."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _number(p.name) is not None and (p / TRAINER_STATE).is_file()]
    return sorted(found, key=lambda p: (*_position(p), _number(p.name)))


def find_checkpoint(resume: str | None, output_dir: Path) -> Path | None:
    """The checkpoint ``--resume`` names: ``None`` (fresh run), ``latest`` (the newest in ``output_dir``, or a
    fresh run when there is none yet, so a preemptible job can always pass it), a checkpoint directory, or a
    run's output directory (its newest checkpoint)."""
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume).expanduser()
    if (path / TRAINER_STATE).is_file():
        return path
    found = list_checkpoints(path)
    if found:
        return found[-1]
    what = "does not exist" if not path.exists() else "holds no checkpoint"
    raise TrainError(f"--resume {resume}: {what} (no {TRAINER_STATE}, no {CHECKPOINTS_DIR}/{_EPOCH_PREFIX}*); pass "
                     "a checkpoint directory, a run's --output-dir, or 'latest'")


def check_fresh_output_dir(output_dir: Path, *, overwrite: bool) -> None:
    """A fresh run must not mix with another run's checkpoints and log in ``output_dir``."""
    old = list_checkpoints(output_dir)
    if not old:
        return
    if not overwrite:
        raise TrainError(f"{output_dir} already holds checkpoints of a run (newest: {old[-1].name}); pass "
                         "--resume latest to continue it, --overwrite to start over, or another --output-dir")
    shutil.rmtree(output_dir / CHECKPOINTS_DIR)


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    """The JSON state of a checkpoint (epoch, update count, run settings, last metrics; position in the epoch)."""
    try:
        state = json.loads((checkpoint / TRAINER_STATE).read_text())
    except (OSError, ValueError) as e:
        raise TrainError(f"cannot read {checkpoint / TRAINER_STATE}: {e}") from e
    if state.get("version", 0) > _STATE_VERSION:
        raise TrainError(f"{checkpoint} was written by a newer timm-popup (state version {state['version']})")
    return state


def check_resume_compatible(state: Mapping[str, Any], run: Mapping[str, Any]) -> list[str]:
    """Raise if the checkpoint's run differs from this one in a setting its state depends on; return notes on
    other differences (e.g. another --epochs changes the schedule from that point on)."""
    saved = state.get("run", {})
    for key in _STRUCTURAL:
        if key in saved and _jsonable(saved[key]) != _jsonable(run.get(key)):
            raise TrainError(f"the checkpoint was made with {key}={saved[key]!r} but this run has "
                             f"{key}={run.get(key)!r}; resume with the same setting or start a new --output-dir")
    return [f"{key}: checkpoint {saved[key]!r} -> now {run.get(key)!r}" for key in sorted(saved)
            if key not in _STRUCTURAL and _jsonable(saved[key]) != _jsonable(run.get(key))]


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))


def use_portable_checkpoints(accelerator: Accelerator) -> None:
    """Save and load the model's state without DDP's ``module.`` prefix, so a checkpoint resumes under any
    number of processes. Loading goes through safetensors (no pickle)."""

    def save_hook(models: list[nn.Module], weights: list[dict], output_dir: str) -> None:
        for i, model in enumerate(models):
            weights[i] = _bare(accelerator, model).state_dict()

    def load_hook(models: list[nn.Module], input_dir: str) -> None:
        for i, model in enumerate(models):
            path = Path(input_dir) / ("model.safetensors" if i == 0 else f"model_{i}.safetensors")
            _load_model_state(_bare(accelerator, model), safetensors.torch.load_file(str(path)))
        models.clear()  # loaded: Accelerate skips them

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def _bare(accelerator: Accelerator, model: nn.Module) -> nn.Module:
    """The model without its DDP and torch.compile wrappers (whose state dict keys carry ``_orig_mod.``)."""
    return accelerator.unwrap_model(model, keep_torch_compile=False)


def _load_model_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """``model.load_state_dict(state)``, strict but for the names Accelerate's safetensors save leaves out: of a
    tensor reachable under several names (a module shared by several blocks, as in CoaT) it writes one
    (``clean_state_dict_for_safetensors``), and loading that one fills the tensor under all its names."""
    current = model.state_dict()
    loaded = {current[name].untyped_storage().data_ptr() for name in state if name in current}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [name for name in missing if not (current[name].numel() and
                                                current[name].untyped_storage().data_ptr() in loaded)]
    if missing or unexpected:
        raise RuntimeError(f"the checkpoint does not fit the model: missing {missing[:3]}, unexpected "
                           f"{unexpected[:3]}")


def save_checkpoint(accelerator: Accelerator, output_dir: Path, *, epoch: int, state: Mapping[str, Any],
                    keep_last: int) -> Path:
    """``accelerator.save_state`` into ``checkpoints/epoch_NNNN`` atomically (see the module's docstring); older
    epoch checkpoints beyond ``keep_last``, and every recovery checkpoint before it, are deleted."""
    return _write_checkpoint(accelerator, output_dir, f"{_EPOCH_PREFIX}{epoch:04d}",
                             dict(state, epoch=epoch), keep_last=keep_last)


def _write_checkpoint(accelerator: Accelerator, output_dir: Path, name: str, state: Mapping[str, Any], *,
                      keep_last: int, each_process: Callable[[Path], None] | None = None) -> Path:
    """Write checkpoint ``name``: every process its part (``each_process`` adds its own files), then the main one
    the trainer state, then the rename that makes it complete."""
    root = output_dir / CHECKPOINTS_DIR
    final, tmp = root / name, root / f"{_TMP_PREFIX}{name}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f"{_TMP_PREFIX}*"):  # left by a killed run
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    error: BaseException | None = None
    try:
        accelerator.save_state(str(tmp))  # each process writes its own part (the main one: model and optimizer)
        if each_process is not None:
            each_process(tmp)
    except (OSError, RuntimeError) as e:  # safetensors reports a full disk as a RuntimeError
        error = e
    if _all_processes_ok(accelerator, error) and accelerator.is_main_process:
        try:
            _pause_for_tests(name)
            with open(tmp / TRAINER_STATE, "w") as f:
                json.dump(dict(state, version=_STATE_VERSION), f, indent=2)
                f.flush()
                os.fsync(f.fileno())
            if final.exists():  # this position was reached again after a crash: the new state replaces it
                shutil.rmtree(final)
            os.rename(tmp, final)
        except OSError as e:
            error = e
    if not _all_processes_ok(accelerator, error):  # every process stops, none waits for the others forever
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = list_checkpoints(output_dir)
        kept = f"; the previous checkpoint {previous[-1]} is intact" if previous else ""
        cause = write_error_cause(error) if error is not None else "another process could not write its part"
        raise WriteError(f"cannot write the checkpoint {final}: {cause}{kept}") from error
    if accelerator.is_main_process:
        _rotate(output_dir, keep_last)
    accelerator.wait_for_everyone()
    return final


def _rotate(output_dir: Path, keep_last: int) -> None:
    """Keep the last ``keep_last`` epoch checkpoints and the last ``keep_last`` recovery checkpoints after them (one
    before the newest epoch checkpoint is behind it: nothing resumes from there)."""
    found = list_checkpoints(output_dir)
    epochs = [c for c in found if c.name.startswith(_EPOCH_PREFIX)]
    after = found[found.index(epochs[-1]) + 1:] if epochs else found
    keep = set(epochs[-keep_last:]) | set(after[-keep_last:])
    for old in found:
        if old not in keep:
            shutil.rmtree(old, ignore_errors=True)


def _pause_for_tests(name: str) -> None:
    wanted, _, marker = os.environ.get(_PAUSE_ENV, "").partition("=")
    if wanted == name and marker:
        Path(marker).touch()
        deadline = time.monotonic() + 600
        while Path(marker).exists() and time.monotonic() < deadline:
            time.sleep(0.01)


def _all_processes_ok(accelerator: Accelerator, error: BaseException | None) -> bool:
    """Whether no process failed (a collective: every process must call it, in the same order)."""
    if accelerator.num_processes == 1:
        return error is None
    from accelerate.utils import gather_object

    return all(gather_object([error is None]))


def _damaged(checkpoint: Path, what: str, e: BaseException) -> TrainError:
    run_dir = checkpoint.parent.parent if checkpoint.parent.name == CHECKPOINTS_DIR else checkpoint.parent
    found = list_checkpoints(run_dir)
    older = found[:found.index(checkpoint)] if checkpoint in found else []
    then = (f"delete it (rm -r {checkpoint}) to resume from the one before, {older[-1].name}, or pass --overwrite "
            "to start over" if older else "delete it and start over with --overwrite")
    return TrainError(f"the checkpoint {checkpoint} {what} ({' '.join(str(e).split())[:500]}), e.g. cut short by a "
                      f"full disk or an interrupted copy: {then}")


def check_checkpoint(checkpoint: Path) -> None:
    """A :class:`TrainError` when a tensor file of ``checkpoint`` is truncated or corrupt: its header is read
    (``safetensors.safe_open`` checks that the file covers every tensor it declares), before any data is loaded."""
    for file in sorted(checkpoint.glob("*.safetensors")):
        try:
            with safetensors.safe_open(str(file), framework="pt"):
                pass
        except (OSError, safetensors.SafetensorError) as e:
            raise _damaged(checkpoint, f"is damaged: {file.name} cannot be read", e) from e


def load_checkpoint(accelerator: Accelerator, checkpoint: Path) -> dict[str, Any]:
    """Restore model, optimizer and RNG states from ``checkpoint`` (pickle-free for the model; the optimizer and
    RNG files load with ``weights_only=True``); returns its trainer state. A file that cannot be read is a
    :class:`TrainError` that names it and what to do."""
    state = read_trainer_state(checkpoint)
    try:
        accelerator.load_state(str(checkpoint), load_kwargs={"weights_only": True})
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError, safetensors.SafetensorError) as e:
        raise _damaged(checkpoint, "cannot be loaded", e) from e
    return state


# -------------------------------------------------------------------------------------------- inside an epoch


@dataclasses.dataclass
class EpochProgress:
    """Where one process is inside epoch ``epoch`` (0-based): ``step`` batches read, the sums its epoch metrics
    are made of (float32 values, kept exactly), the epoch's training time so far and the lr it started with."""

    epoch: int
    step: int
    num_updates: int
    loss_sum: float
    top1_sum: float
    count: int
    time_s: float
    lr: float = 0.0
    #: Examples of the epoch's order trained before this loader started (> 0: the epoch goes on as "the rest of the
    #: epoch", :func:`rest_of_epoch`, after a resume under another process count)
    offset: int = 0


def _progress_file(index: int) -> str:
    return f"progress_{index}.json"


def _buffers_file(index: int) -> str:
    return f"buffers_{index}.safetensors"


def resume_progress(accelerator: Accelerator, checkpoint: Path, state: Mapping[str, Any],
                    model: nn.Module) -> EpochProgress | None:
    """The place inside its epoch a recovery checkpoint was written at (``None`` for an epoch checkpoint), after
    giving ``model`` (unwrapped) this process's own buffers back (BatchNorm statistics are per process until the
    epoch ends).

    Under another process count than the one that wrote it (or after such a resume), the epoch goes on as its rest:
    :attr:`EpochProgress.offset` examples of the epoch's order are done, the metric sums of all the processes that
    wrote the checkpoint go to process 0, and every process takes the mean of their buffers."""
    if "step" not in state:
        return None
    saved = int(state.get("run", {}).get("num_processes", accelerator.num_processes))
    if saved == accelerator.num_processes and not state.get("offset"):
        sums, buffers = _read_part(checkpoint, accelerator.process_index)
        offset, step = 0, state["step"]
    else:
        parts = [_read_part(checkpoint, index) for index in range(saved)]
        sums = {key: sum(part[0][key] for part in parts) if accelerator.is_main_process else 0
                for key in ("loss_sum", "top1_sum", "count")}
        buffers = {name: _mean([part[1][name] for part in parts]) for name in parts[0][1]}
        offset = state.get("offset", 0) + state["step"] * saved * int(state["run"]["batch_size"])
        step = 0
    named = dict(model.named_buffers())
    with torch.no_grad():
        for name, value in buffers.items():
            named[name].copy_(value)
    return EpochProgress(epoch=state["epoch"], step=step, num_updates=state["num_updates"],
                         loss_sum=sums["loss_sum"], top1_sum=sums["top1_sum"], count=sums["count"],
                         time_s=state["epoch_time_s"], lr=state["lr"], offset=offset)


def _read_part(checkpoint: Path, index: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    try:
        sums = json.loads((checkpoint / _progress_file(index)).read_text())
        buffers = safetensors.torch.load_file(str(checkpoint / _buffers_file(index)))
    except (OSError, ValueError, safetensors.SafetensorError) as e:
        raise _damaged(checkpoint, f"cannot be loaded (process {index}'s part)", e) from e
    return sums, buffers


def _mean(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The processes' mean of a buffer (BatchNorm's running statistics); counters are equal on all: the first."""
    if not tensors[0].is_floating_point():
        return tensors[0]
    return (torch.stack([t.double() for t in tensors]).mean(0)).to(tensors[0].dtype)


def position_loader(accelerator: Accelerator, loader: Any, resume: EpochProgress | None, batch_size: int) -> Any:
    """``loader`` (its epoch set) continued where ``resume`` left the epoch: after its first ``resume.step`` batches
    (Accelerate's ``skip_first_batches`` for a map-style split: the sampler skips them, nothing is read; the stream's
    own re-read for ``--streaming``), or, with an :attr:`EpochProgress.offset`, a loader of this process's batches of
    the epoch's rest (:func:`rest_of_epoch`)."""
    if resume is None or (resume.step == 0 and not resume.offset):
        return loader
    if resume.offset:
        batches = rest_of_epoch(epoch_order(loader), resume.offset, batch_size=batch_size,
                                num_processes=accelerator.num_processes, process_index=accelerator.process_index)
        rest = torch.utils.data.DataLoader(
            loader.dataset, batch_sampler=batches, num_workers=loader.num_workers, collate_fn=loader.collate_fn,
            pin_memory=loader.pin_memory, worker_init_fn=loader.worker_init_fn, generator=loader.generator)
        from accelerate.data_loader import prepare_data_loader

        # unsharded (its batches are this process's already), and marking its end for gradient accumulation
        return prepare_data_loader(rest, num_processes=1, process_index=0, put_on_device=False)
    if hasattr(loader.dataset, "resume_at"):
        loader.dataset.resume_at(resume.step, batch_size)
        return loader
    return accelerator.skip_first_batches(loader, resume.step)


def epoch_order(loader: Any) -> list[int]:
    """The order of the whole split in the loader's current epoch (every process's examples: Accelerate's seedable
    sampler is a function of seed and epoch alone; each process reads every N-th batch of it)."""
    sampler = loader.get_sampler()
    epoch = sampler.epoch
    order = [int(i) for i in sampler]
    sampler.set_epoch(epoch)  # iterating it moved it on to the next epoch
    return order


def rest_of_epoch(order: Sequence[int], done: int, *, batch_size: int, num_processes: int,
                  process_index: int) -> list[list[int]]:
    """This process's batches of ``order[done:]``, the examples an epoch has not trained yet: steps of
    ``num_processes`` x ``batch_size`` examples in order, each split into equal contiguous shares (the last step's
    smaller; one too small to give every process an example joins the step before), so every process takes the
    same number of steps and every example is trained exactly once."""
    rest = list(order[done:])
    size = batch_size * num_processes
    steps = [rest[i:i + size] for i in range(0, len(rest), size)]
    if len(steps) > 1 and len(steps[-1]) < num_processes:
        steps[-2:] = [steps[-2] + steps[-1]]
    if steps and len(steps[-1]) < num_processes:  # fewer examples left than processes: nothing to split
        steps.pop()
    batches = []
    for chunk in steps:
        share, extra = divmod(len(chunk), num_processes)
        start = process_index * share + min(process_index, extra)
        batches.append(chunk[start:start + share + (process_index < extra)])
    return batches


# ---------------------------------------------------------------------------------------------- signals, recovery


class Preempted(Exception):
    """The run stopped on a signal after writing ``checkpoint``; ``line`` says so and how to resume."""

    def __init__(self, line: str, checkpoint: Path) -> None:
        super().__init__(line)
        self.line, self.checkpoint = line, checkpoint


class Preemption:
    """While entered: SIGTERM, SIGUSR1 and SIGINT set :attr:`signal` instead of ending the process (the loop
    stops at the next step boundary); a second one only says that the checkpoint is being written."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Preemption:
        for name in _SIGNALS:
            number = getattr(signal, name)
            self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        """The signals act as before again (after training: the artifact's write and push stay interruptible)."""
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _handle(self, number: int, frame: Any) -> None:
        if self.signal is None:
            self.signal = signal.Signals(number).name
        else:
            print(f"{signal.Signals(number).name}: already stopping after this step's recovery checkpoint (SIGKILL "
                  "ends the run at once; the previous checkpoint stays usable)", file=sys.stderr, flush=True)


class Recovery:
    """Recovery checkpoints and stopping on a signal, decided at optimizer-update boundaries by all processes
    together.

    ``every`` updates (``--checkpointing-steps``), or with ``None`` after :data:`DEFAULT_CHECKPOINT_MINUTES` of
    training since the last checkpoint (the main process's clock decides). A signal reaches the processes at
    slightly different moments, so each one's flag is combined with the others' (one all-reduce per update,
    overlapped with the next step: all stop after the same update, one update after the first saw it).
    """

    def __init__(self, accelerator: Accelerator, output_dir: Path, *, model: nn.Module, every: int | None,
                 keep_last: int, preemption: Preemption, command: str) -> None:
        self.accelerator, self.output_dir, self.model, self.every = accelerator, output_dir, model, every
        self.keep_last, self.preemption, self.command = keep_last, preemption, command
        self.minutes = DEFAULT_CHECKPOINT_MINUTES
        self.last_save = time.monotonic()
        self.stop_agreed = False
        self._pending: tuple[Any, torch.Tensor] | None = None
        self._epoch, self._lr, self._state, self._offset = 0, 0.0, {}, 0

    def epoch_started(self, epoch: int, lr: float, state: Mapping[str, Any], offset: int = 0) -> None:
        """The epoch now trained, the lr it started with, what its checkpoints record besides (run, metrics) and
        the examples of its order done before its loader started (:attr:`EpochProgress.offset`)."""
        self._epoch, self._lr, self._state, self._offset = epoch, lr, dict(state), offset

    def after_update(self, step: int, num_updates: int, total_steps: int | None,
                     progress: Callable[[], EpochProgress]) -> None:
        """Called by every process after each optimizer update: ``step`` batches of the epoch read, ``progress``
        makes this process's record (read only when one is written). Writes a recovery checkpoint when one is due;
        raises :class:`Preempted` after writing it when a signal came."""
        wanted = 2 if self.preemption.signal else int(
            self.every is None and self.accelerator.is_main_process
            and time.monotonic() - self.last_save >= self.minutes * 60)
        agreed = self._vote(wanted)
        last = total_steps is not None and step >= total_steps  # the epoch checkpoint follows at once
        if agreed == 2:
            self.stop_agreed = True
        if last or not (agreed or (self.every is not None and num_updates % self.every == 0)):
            return
        self._drain()  # the vote just sent: its result (a stop, too) is wanted before this process exits
        checkpoint = self._write(dataclasses.replace(progress(), lr=self._lr), step)
        if self.stop_agreed:
            raise self._preempted(checkpoint, f"after step {step} of epoch {self._epoch + 1}")

    def epoch_ended(self, checkpoint: Path) -> None:
        """After the epoch checkpoint: raises :class:`Preempted` (naming it) if a signal came since the last
        update; every process agrees (a blocking all-reduce, once per epoch)."""
        self._drain()
        self.last_save = time.monotonic()
        stop = self.stop_agreed or bool(self.preemption.signal)
        if self.accelerator.num_processes > 1:
            flag = torch.tensor([int(stop)], device=self.accelerator.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            stop = bool(flag.item())
        if stop:
            raise self._preempted(checkpoint, f"at the end of epoch {self._epoch + 1}")

    def _vote(self, wanted: int) -> int:
        if self.accelerator.num_processes == 1:
            return wanted
        agreed = self._drain()
        flag = torch.tensor([wanted], device=self.accelerator.device)
        work = torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, async_op=True)
        self._pending = (work, flag)
        return agreed

    def _drain(self) -> int:
        if self._pending is None:
            return 0
        work, flag = self._pending
        self._pending = None
        work.wait()
        agreed = int(flag.item())
        self.stop_agreed = self.stop_agreed or agreed == 2
        return agreed

    def _write(self, progress: EpochProgress, step: int) -> Path:
        index = self.accelerator.process_index

        def own_part(directory: Path) -> None:
            sums = dict(loss_sum=progress.loss_sum, top1_sum=progress.top1_sum, count=progress.count)
            (directory / _progress_file(index)).write_text(json.dumps(sums))
            names = {name for name, _ in self.model.named_buffers()}
            buffers = {name: t.detach().cpu().clone() for name, t in self.model.state_dict().items() if name in names}
            safetensors.torch.save_file(buffers, str(directory / _buffers_file(index)))

        state = dict(self._state, epoch=self._epoch, step=step, num_updates=progress.num_updates, lr=progress.lr,
                     epoch_time_s=progress.time_s, name=f"{_STEP_PREFIX}{progress.num_updates:08d}")
        if self._offset:
            state["offset"] = self._offset
        checkpoint = _write_checkpoint(self.accelerator, self.output_dir, state["name"], state,
                                       keep_last=self.keep_last, each_process=own_part)
        self.last_save = time.monotonic()
        return checkpoint

    def _preempted(self, checkpoint: Path, when: str) -> Preempted:
        self.accelerator.end_training()  # the trackers' files are complete, too
        what = self.preemption.signal or "a signal on another process"
        line = (f"stopped by {what} {when}; saved {checkpoint}; resume with: {self.command} (exit status "
                f"{EXIT_PREEMPTED})")
        return Preempted(line, checkpoint)


def resume_command(argv: Sequence[str], *, num_processes: int, launched: bool,
                   launch: Launch | None = None) -> str:
    """The command that resumes this run: the same arguments with ``--resume latest`` (no ``--overwrite``), under
    ``accelerate launch`` (with its process count, and on several machines this machine's ``--num_machines``,
    ``--machine_rank`` and rendezvous address) when it was launched so."""
    args, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--resume":
            skip = True
            continue
        if arg.startswith("--resume=") or arg == "--overwrite":
            continue
        args.append(arg)
    if launched:
        flags = ["--multi_gpu", "--num_processes", str(num_processes)] if num_processes > 1 else []
        if launch is not None and launch.num_machines > 1:
            flags += ["--num_machines", str(launch.num_machines), "--machine_rank", str(launch.machine_rank),
                      "--main_process_ip", launch.main_address, "--main_process_port", launch.main_port]
        prefix = ["accelerate", "launch", *flags]
    else:
        prefix = ["python"]
    return shlex.join([*prefix, *args, "--resume", "latest"])


# ------------------------------------------------------------------------------------ several processes and machines


#: How long a process waits inside a collective (all-reduce, barrier, gather) for the others before it gives them up
#: as lost (``--dist-timeout``). It must cover the longest wait a healthy run has there: the others wait for the main
#: process's checkpoint write (scores, optimizer state and trainer state: ~0.55 GB for WRN-50-2, 5 minutes is 2 MB/s
#: on a slow shared disk) and for the slowest process's share of an evaluation or BatchNorm re-estimation (equal
#: shares: seconds apart). PyTorch's own defaults (30 minutes for gloo, 10 for NCCL) leave the other nodes idle that
#: long after one is lost. The one-sided waits without a bound (the first download or conversion of a dataset, the
#: push to the Hub at the end) are given :data:`PATIENT_TIMEOUT_S` instead (:meth:`Cluster.patient`).
DEFAULT_DIST_TIMEOUT_S = 300.0
PATIENT_TIMEOUT_S = 24 * 3600.0
#: What a run records beside its checkpoints about how it ended (``running`` while it runs), for a scheduler whose
#: launcher reports every ending alike (torchrun exits with 1 for a preemption as for a crash).
STATUS_FILE = "run_status.json"
#: The exit status of a run that lost another process (a node lost or frozen): like a preemption, try again.
EXIT_LOST_PEER = EXIT_PREEMPTED
# Words that mark an error raised by a collective whose peer is gone (gloo's and NCCL's messages; torch's DistError).
_PEER_ERRORS = ("gloo", "nccl", "connection closed", "connection reset", "timed out", "broken pipe")


def dist_timeout_kwargs(seconds: float):
    """Accelerate's handler that sets the process group's timeout (``InitProcessGroupKwargs``)."""
    from accelerate.utils import InitProcessGroupKwargs

    return InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=seconds))


@dataclasses.dataclass(frozen=True)
class Launch:
    """How this process was started, from the environment its launcher gave it (torchrun's variables, which
    ``accelerate launch --multi_gpu`` sets too): the launcher, this machine's rank among ``num_machines`` and the
    rendezvous address the machines meet at."""

    launcher: str  # "accelerate" (accelerate launch), "torchrun" (another torch.distributed launcher) or "python"
    num_machines: int = 1
    machine_rank: int = 0
    main_address: str = ""
    main_port: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Launch:
        env = os.environ if env is None else env
        world, local = int(env.get("WORLD_SIZE", "1")), int(env.get("LOCAL_WORLD_SIZE", env.get("WORLD_SIZE", "1")))
        launcher = ("accelerate" if "ACCELERATE_MIXED_PRECISION" in env else
                    "torchrun" if "TORCHELASTIC_RUN_ID" in env or world > 1 else "python")
        return cls(launcher, num_machines=max(1, world // max(1, local)), machine_rank=int(env.get("GROUP_RANK", "0")),
                   main_address=env.get("MASTER_ADDR", ""), main_port=env.get("MASTER_PORT", ""))


class Cluster:
    """The run's processes as a whole: who they are (rank -> host, gathered once at the start), how they were
    launched (:class:`Launch`), the command that resumes the run, and what a process says and records when another
    one is lost: a collective gives up after ``--dist-timeout`` (a frozen or powered-off node sends nothing) or at
    once (a connection reset), and the survivor prints one line naming the lost process and exits with
    :data:`EXIT_LOST_PEER`."""

    def __init__(self, accelerator: Accelerator, argv: Sequence[str], *, timeout_s: float,
                 launch: Launch | None = None) -> None:
        self.accelerator, self.timeout_s = accelerator, timeout_s
        self.launch = Launch.from_env() if launch is None else launch
        self.rank = accelerator.process_index
        self.hosts = [socket.gethostname()]
        if accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            self.hosts = list(gather_object([socket.gethostname()]))
        self.command = resume_command(argv, num_processes=accelerator.num_processes,
                                      launched=self.launch.launcher == "accelerate", launch=self.launch)
        if self.launch.launcher == "torchrun":
            self.command = ("relaunch this job's own launcher command (on every machine) with the same arguments and "
                            "--resume latest")

    @property
    def speaks(self) -> bool:
        """Whether this process prints for its machine (local rank 0: one line per surviving machine)."""
        return self.accelerator.local_process_index == 0

    @contextlib.contextmanager
    def patient(self) -> Iterator[None]:
        """Collectives inside wait up to :data:`PATIENT_TIMEOUT_S`: for a wait on one process's unbounded work (a
        first download or conversion of the dataset, the push to the Hub)."""
        group = _default_group(self.accelerator)
        if group is None:
            yield
            return
        _set_group_timeout(group, PATIENT_TIMEOUT_S)
        try:
            yield
        finally:
            if torch.distributed.is_initialized():  # not yet ended with the run
                _set_group_timeout(group, self.timeout_s)

    def lost_peer(self, error: BaseException) -> str | None:
        """The one line for ``error`` if it is a collective that lost another process (``None`` otherwise): which
        process (rank and host where the error or the process count tells), and how to resume."""
        if self.accelerator.num_processes == 1 or not _is_peer_error(error):
            return None
        message = " ".join(str(error).split())
        others = [r for r in range(self.accelerator.num_processes) if r != self.rank]
        address = re.search(r"\[([0-9a-fA-F.:]+)\]:\d+", message)
        if len(others) == 1:
            who = f"rank {others[0]} on {self.hosts[others[0]]}"
        else:  # gloo and NCCL name at most the address of the connection that broke, not the rank
            where = f"the process at {address[1]}" if address else "another process"
            hosts = ", ".join(sorted({self.hosts[r] for r in others}))
            who = f"{where} (one of ranks {others[0]}-{others[-1]} on {hosts})"
        how = (f"no answer within --dist-timeout {self.timeout_s:g}s" if "timed out" in message.lower() else
               "its connection closed")
        return (f"lost {who}: {how} (rank {self.rank} on {self.hosts[self.rank]} gave up waiting); resume with: "
                f"{self.command} (exit status {EXIT_LOST_PEER})")


def _is_peer_error(error: BaseException) -> bool:
    while error is not None:
        if isinstance(error, torch.distributed.DistError) or (
                isinstance(error, RuntimeError) and any(w in str(error).lower() for w in _PEER_ERRORS)):
            return True
        error = error.__cause__ or error.__context__
    return False


def _default_group(accelerator: Accelerator) -> Any:
    if accelerator.num_processes == 1 or not torch.distributed.is_initialized():
        return None
    return torch.distributed.group.WORLD


def _set_group_timeout(group: Any, seconds: float) -> None:
    setter = getattr(torch.distributed, "set_timeout", None)  # torch >= 2.8; before it the group keeps its own
    if setter is not None:
        setter(datetime.timedelta(seconds=seconds), group)


def write_status(output_dir: Path, status: str, *, exit_status: int, line: str = "", **extra: Any) -> None:
    """Record how the run ended in ``output_dir/run_status.json`` (atomically): ``running``, ``done``, ``retry``
    (preempted, or a peer lost: resume with ``--resume latest``) or ``failed`` (do not retry as it is)."""
    record = dict(status=status, exit_status=exit_status, line=line, host=socket.gethostname(), pid=os.getpid(),
                  time=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **extra)
    tmp = output_dir / f".{STATUS_FILE}.{socket.gethostname()}.{os.getpid()}"
    try:
        tmp.write_text(json.dumps(record) + "\n")
        os.replace(tmp, output_dir / STATUS_FILE)
    except OSError:  # the status is a convenience: never the reason a run fails (nor a temp file left behind)
        with contextlib.suppress(OSError):
            tmp.unlink()


def read_status(output_dir: str | os.PathLike) -> dict[str, Any]:
    """``run_status.json`` of a run (``{}`` where none was written)."""
    try:
        return json.loads((Path(output_dir) / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return {}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m timm_popup.runstate OUTPUT_DIR``: say how the run in OUTPUT_DIR ended and exit with its status, for a
    scheduler's restart rule: 0 done, 75 retry (resume with ``--resume latest``), else failed or no ending recorded."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python -m timm_popup.runstate OUTPUT_DIR (exit status 0 done, 75 retry, 1 failed)",
              file=sys.stderr)
        return 2
    record = read_status(argv[0])
    if record.get("status") in (None, "running"):
        what = f"no {STATUS_FILE}" if not record else f"no ending recorded since {record.get('time')}"
        print(f"{argv[0]}: {what}: the run was killed or crashed before it could say (or still runs); see its log",
              file=sys.stderr)
        return 1
    print(f"{record['status']}: {record.get('line') or 'exit status ' + str(record.get('exit_status'))}")
    return int(record.get("exit_status", 1))


if __name__ == "__main__":
    raise SystemExit(main())
