#!/usr/bin/env python
"""Find a subnetwork of a randomly weighted timm model with edge-popup (or train the dense baseline).

    accelerate launch train_accelerate.py --model popup_conv4 --dataset fashion-mnist --epochs 2 ...
    accelerate launch --multi_gpu --num_processes 8 --mixed_precision bf16 train_accelerate.py \\
        --model popup_wide_resnet50_2 --dataset ILSVRC/imagenet-1k --workers 12

The recipe: parse and check everything, load the data, build the model, optimizer and schedule, train and
evaluate every epoch (checkpointing atomically), then write the artifact (config.json, model.safetensors,
README.md card) to --output-dir and optionally push it to the Hub. The logic lives in ``timm_popup.train``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import sys
import time
from collections.abc import Sequence

from timm.utils import ParseKwargs

from timm_popup.init import FAN_MODES, NONLINEARITIES
from timm_popup.methods import METHODS, Schedule

_EPILOG = ("Recipe values (epochs, batch size, lr, ...) default to --recipe and may each be overridden.\n"
           "k is always the fraction of weights KEPT.")


def _methods_help() -> str:
    """One line per training method, from the methods table itself (timm_popup.methods.METHODS)."""
    width = max(map(len, METHODS))
    return "methods (--method NAME):\n" + "\n".join(
        f"  {name:<{width}}  {method.summary}{' (default)' if name == 'edge-popup' else ''}"
        for name, method in METHODS.items())


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    # raw epilog: the method list keeps one line per method
    p = _Parser(prog="train_accelerate.py", description=__doc__.splitlines()[0],
                epilog=f"{_methods_help()}\n\n{_EPILOG}", formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to train")
    g.add_argument("--model", required=True, help="a registered popup_* model, e.g. popup_conv4, popup_resnet50")
    g.add_argument("--dataset", required=True,
                   help="Hub id (uoft-cs/cifar10, ILSVRC/imagenet-1k), save_to_disk dir, image folder, or "
                        "'fashion-mnist' (Debian's dataset-fashion-mnist, converted on first use)")
    g.add_argument("--method", default="edge-popup",
                   help=f"what the run learns: one of the {len(METHODS)} methods listed at the end (default "
                        "edge-popup)")
    g.add_argument("--init-artifact", default=None, metavar="PATH",
                   help="finetune, random-subnet: an edge-popup run's output dir (or its model.safetensors); the same "
                        "--model, --model-kwargs and --seed as that run")
    g.add_argument("--slots", type=int, default=None, help="slot-machine: candidate values per weight (default 8)")
    g.add_argument("--redraw-every", type=int, default=None,
                   help="iterand: optimizer updates between re-draws of pruned weights (default 300)")
    g.add_argument("--redraw-rate", type=float, default=None,
                   help="iterand: probability that a pruned weight is re-drawn (default 0.1)")
    g.add_argument("--structure", default=None, metavar="N:M",
                   help="N:M structured masks, e.g. 2:4 (N of every M consecutive input weights; k = N/M): "
                        "edge-popup, biprop, signed-supermask, iterand")
    g.add_argument("--freeze-every", type=int, default=None,
                   help="gem-miner: epochs between freezing out the lowest-scored weights (its iter_period; default 5)")
    g.add_argument("--score-l2", type=float, default=None,
                   help="gem-miner: weight of its regulariser score_l2 * ||scores||^2 (its lmbda; default 1e-4)")
    g.add_argument("--density-epochs", type=int, default=None,
                   help="global-topk: reach k over this many epochs, from 0.5, as biprop's --prune_rate_epoch "
                        "(default 0: k from the start)")
    g.add_argument("--recipe", default="auto", help="auto (cifar for 32x32 models, else imagenet), cifar, imagenet")
    g.add_argument("--k", type=float, default=None, help="fraction of weights KEPT per layer (model default)")
    g.add_argument("--weight-init", default=None, help="weight distribution (default: signed_constant; dense: "
                                                       "kaiming_normal)")
    g.add_argument("--init-mode", default=None, choices=FAN_MODES,
                   help="the fan that sets the Kaiming std (the paper code's --mode; default fan_in)")
    g.add_argument("--nonlinearity", default=None, choices=NONLINEARITIES,
                   help="whose gain (torch.nn.init.calculate_gain) scales the Kaiming std (default relu)")
    g.add_argument("--scale-fan", action="store_true", help="std * sqrt(1/k): the paper's scaled distributions")
    g.add_argument("--learn-norm", action="store_true",
                   help="train the norm layers' scale and shift with the scores (the paper code's --bn-type "
                        "LearnedBatchNorm; default: frozen, non-affine)")
    g.add_argument("--learn-bias", action="store_true", help="train the biases with the scores (default: frozen 0)")
    g.add_argument("--score-init", default=None,
                   help="how scores start: kaiming_uniform (default), uniform (U(0, 1), Gem-Miner's) or constant=C")
    g.add_argument("--score-init-constant", type=float, default=None, metavar="C",
                   help="scores start at C (the paper code's flag, for the sampled supermask)")
    g.add_argument("--seed", type=int, default=0, help="seed of the weights, the scores and the data order")
    g.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs, metavar="KEY=VALUE",
                   help="more model arguments, e.g. width=0.5")
    g.add_argument("--in-chans", type=int, default=None, help="input channels (default: from the data for small "
                                                              "models, else the model's)")
    g.add_argument("--img-size", type=int, default=None, help="input size (default: from the data for small models)")
    g.add_argument("--mean", type=float, nargs="+", default=None, help="input normalisation per channel (default: "
                                                                     "the data's for small models, else the model's)")
    g.add_argument("--std", type=float, nargs="+", default=None)

    g = p.add_argument_group("recipe overrides")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int, help="per process")
    g.add_argument("--opt", help="sgd (momentum; see --nesterov) or a timm optimizer name")
    g.add_argument("--lr", type=float, help="learning rate, used as given (no batch-size scaling)")
    g.add_argument("--lr-base-size", type=int, help="global batch the recipe's lr is for (scaled linearly)")
    g.add_argument("--momentum", type=float)
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--sched", help="cosine, tanh, step, multistep, poly or none (timm schedulers)")
    g.add_argument("--warmup-epochs", type=float)
    g.add_argument("--warmup-lr", type=float)
    g.add_argument("--min-lr", type=float)
    g.add_argument("--label-smoothing", type=float)
    g.add_argument("--clip-grad", type=float, help="clip the gradient norm to this value")
    g.add_argument("--grad-accum", type=int, help="gradient accumulation steps")

    g = p.add_argument_group("augmentation (timm train.py's flags; default: by data and budget, printed at start)")
    g.add_argument("--no-aug", action="store_true", help="no training augmentation at all (and no mixup)")
    g.add_argument("--pad-crop", type=int, default=None, metavar="PIXELS",
                   help="the paper's CIFAR crop: pad by PIXELS and crop back (images <= 32 px); 0 turns it off")
    g.add_argument("--scale", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="random resized crop scale range")
    g.add_argument("--ratio", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="random resized crop aspect ratio range")
    g.add_argument("--hflip", type=float, default=None, help="horizontal flip probability")
    g.add_argument("--vflip", type=float, default=None, help="vertical flip probability")
    g.add_argument("--aa", default=None, help="timm auto-augment policy, e.g. rand-m9-mstd0.5-inc1, augmix-m5, v0")
    g.add_argument("--color-jitter", type=float, default=None, help="colour jitter factor (0: off)")
    g.add_argument("--reprob", type=float, default=None, help="random erasing probability")
    g.add_argument("--remode", default=None, help="random erasing mode: pixel, rand or const")
    g.add_argument("--recount", type=int, default=None, help="random erasing count")
    g.add_argument("--mixup", type=float, default=None, help="mixup alpha (0: off)")
    g.add_argument("--cutmix", type=float, default=None, help="cutmix alpha (0: off)")
    g.add_argument("--mixup-prob", type=float, default=None, help="probability of mixing a batch")
    g.add_argument("--mixup-switch-prob", type=float, default=None, help="probability of cutmix when both are on")
    g.add_argument("--mixup-mode", default=None, help="batch, pair or elem")

    g = p.add_argument_group("data")
    g.add_argument("--train-split", default=None)
    g.add_argument("--val-split", default=None)
    g.add_argument("--image-column", default=None)
    g.add_argument("--label-column", default=None)
    g.add_argument("--streaming", action="store_true", help="stream the dataset instead of downloading it")
    g.add_argument("--workers", type=int, default=None, help="DataLoader workers per process (default: from the CPUs)")
    g.add_argument("--decode", default="auto", choices=("auto", "cpu", "gpu"),
                   help="where training images are decoded and transformed: gpu (the workers read bytes, nvJPEG and "
                        "the transforms run on the training GPU), cpu (the workers decode; jitter and normalisation on "
                        "the device), auto (the GPU when training on one); small images, auto-augment and random "
                        "erasing run Pillow's reference transforms (default auto)")
    g.add_argument("--train-samples", type=int, default=None, help="train on a seeded random subset of this size")
    g.add_argument("--val-samples", type=int, default=None, help="validate on the first N images")
    g.add_argument("--data-cache", default=None, help="cache for downloads and conversions (default: datasets' "
                                                      "cache; built-ins in $TIMM_POPUP_CACHE or ~/.cache/timm-popup)")

    g = p.add_argument_group("run")
    g.add_argument("--output-dir", default=None, help="artifact, log and checkpoints (default output/MODEL-METHOD)")
    g.add_argument("--resume", default=None, metavar="PATH|latest",
                   help="continue from a checkpoint dir, a run's output dir, or the latest one in --output-dir")
    g.add_argument("--overwrite", action="store_true", help="start over in an --output-dir that holds checkpoints")
    g.add_argument("--keep-checkpoints", type=int, default=2, help="keep the last N epoch checkpoints (and the last "
                                                                   "N recovery checkpoints after them)")
    g.add_argument("--checkpointing-steps", type=int, default=None, metavar="N",
                   help="a recovery checkpoint every N optimizer updates inside an epoch (default: after every 10 "
                        "minutes of training); SIGTERM, SIGUSR1 and SIGINT write one and exit with status 75")
    g.add_argument("--dist-timeout", type=float, default=None, metavar="SECONDS",
                   help="how long a process waits for the others in a collective before it gives a lost (or frozen) "
                        "node up, prints one line and exits with status 75 (default 300)")
    g.add_argument("--push-to-hub", default=None, metavar="ORG/NAME", help="upload the artifact to this Hub repo")
    g.add_argument("--hub-private", action="store_true", help="create the Hub repo private")
    g.add_argument("--cpu", action="store_true", help="run on CPU even if an accelerator is present")
    g.add_argument("--threads", type=int, default=None,
                   help="compute threads per process (default: OMP_NUM_THREADS if set other than a launcher's "
                        "default 1, else the process's share of the CPUs it may use); results repeat exactly only "
                        "with the same count")
    g.add_argument("--mixed-precision", default=None, choices=["no", "fp16", "bf16"],
                   help="default: accelerate's config / launch flag")
    g.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile the model (timm's --torchcompile; backend default inductor): the mask path "
                        "compiles into the graph with no break")
    g.add_argument("--compile-mode", default=None, metavar="MODE",
                   help="with --compile: torch.compile's mode, e.g. reduce-overhead (CUDA graphs) or max-autotune")
    g.add_argument("--log-with", default="auto", help="trackers besides the CSV/JSON log: auto (tensorboard if "
                                                      "installed), none, or e.g. tensorboard,wandb")
    g.add_argument("--log-every", type=int, default=10, help="progress bar refresh, in steps")
    return p.parse_args(argv)


def _fail(message: object, status: int = 2) -> int:
    """One line on stderr; exit status 2 for bad input, 1 for a failure."""
    if os.environ.get("RANK", "0") == "0":  # every process hits the same error; say it once
        print(f"train_accelerate.py: error: {message}", file=sys.stderr, flush=True)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from timm_popup import runstate

    # what _main learns as it goes (the output directory, the processes), for the ending recorded beside the
    # checkpoints (runstate.STATUS_FILE): a scheduler reads there whether to requeue the run
    run = argparse.Namespace(output_dir=None, cluster=None)
    main_process = os.environ.get("RANK", "0") == "0"
    # the output directory's lock and the signal handlers live as long as the run (timm_popup.runstate)
    with contextlib.ExitStack() as run_scope:
        try:
            status = _main(args, sys.argv if argv is None else ["train_accelerate.py", *argv], run_scope, run)
        except runstate.Preempted as stop:
            if main_process:
                print(stop.line, flush=True)
                _record(run, "retry", runstate.EXIT_PREEMPTED, stop.line, reason="preempted")
            return runstate.EXIT_PREEMPTED
        except Exception as e:
            line = run.cluster.lost_peer(e) if run.cluster is not None else None
            if line is None:
                if main_process:
                    _record(run, "failed", 1, f"{type(e).__name__}: {' '.join(str(e).split())[:500]}")
                raise
            if run.cluster.speaks:  # one line per surviving machine
                print(line, flush=True)
                _record(run, "retry", runstate.EXIT_LOST_PEER, line, reason="lost-peer")
            return runstate.EXIT_LOST_PEER
        if main_process:
            _record(run, "done" if status == 0 else "failed", status)
        return status


def _record(run: argparse.Namespace, status: str, exit_status: int, line: str = "", **extra: str) -> None:
    from timm_popup import runstate

    if run.output_dir is not None:
        runstate.write_status(run.output_dir, status, exit_status=exit_status, line=line, **extra)


def _main(args: argparse.Namespace, argv: Sequence[str], run_scope: contextlib.ExitStack,
          run_record: argparse.Namespace) -> int:
    started = time.perf_counter()

    import timm.data
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, gather_object, set_seed
    from timm.loss import SoftTargetCrossEntropy
    from torch import nn

    from timm_popup import runstate, train
    from timm_popup.data import DataError
    from timm_popup.methods import get_method

    # 1. Check every setting before touching data or devices.
    recipe_flags = ("epochs", "batch_size", "opt", "lr", "lr_base_size", "momentum", "nesterov", "weight_decay",
                    "sched", "warmup_epochs", "warmup_lr", "min_lr", "label_smoothing", "clip_grad", "grad_accum")
    try:
        threads, threads_why = train.choose_threads(args.threads)
        torch.set_num_threads(threads)  # before any tensor work; the C kernels read the same count
        train.check_seed(args.seed)
        method = get_method(args.method)
        model_name = train.check_model_name(args.model)
        recipe = train.resolve_recipe(args.recipe, model_name=model_name, method=method,
                                      overrides={name: getattr(args, name) for name in recipe_flags})
        k = train.check_k(args.k, method)
        weight_init = train.check_weight_init(args.weight_init, method)
        init_artifact = train.check_init_artifact(args.init_artifact, method)
        popup_options = train.check_popup_options(
            learn_norm=args.learn_norm, learn_bias=args.learn_bias, score_init=args.score_init,
            score_init_constant=args.score_init_constant, init_mode=args.init_mode, nonlinearity=args.nonlinearity,
            scale_fan=args.scale_fan)
        options = train.check_method_options(method, slots=args.slots, redraw_every=args.redraw_every,
                                             redraw_rate=args.redraw_rate, freeze_every=args.freeze_every,
                                             score_l2=args.score_l2, density_epochs=args.density_epochs,
                                             epochs=recipe.epochs)
        if args.structure is not None:
            args.model_kwargs = {**args.model_kwargs, "structure": train.check_structure(args.structure, method)}
        for flag, least in (("workers", 0), ("train_samples", 1), ("val_samples", 1), ("keep_checkpoints", 1),
                            ("log_every", 1), ("checkpointing_steps", 1)):
            if getattr(args, flag) is not None and getattr(args, flag) < least:
                raise train.TrainError(f"--{flag.replace('_', '-')} must be at least {least}")
        if args.dist_timeout is None:
            args.dist_timeout = runstate.DEFAULT_DIST_TIMEOUT_S
        if not args.dist_timeout > 0:
            raise train.TrainError(f"--dist-timeout must be a positive number of seconds, not {args.dist_timeout}")
        output_dir = train.prepare_output_dir(args.output_dir or f"output/{model_name}-{method.name}")
        if os.environ.get("RANK", "0") == "0":  # one run per directory: its main process holds the lock
            run_scope.enter_context(runstate.hold_output_dir(output_dir))
        preemption = run_scope.enter_context(runstate.Preemption())
        resume_from = train.find_checkpoint(args.resume, output_dir)
        if resume_from is not None:
            train.check_checkpoint(resume_from)
        resumed = train.read_trainer_state(resume_from) if resume_from else None
        if resumed is None:
            train.check_fresh_output_dir(output_dir, overwrite=args.overwrite)
        trackers = _trackers(args.log_with, train.TrainError)
        dynamo = train.compile_plugin(args.compile, args.compile_mode)
        if args.push_to_hub:  # last: the endpoint, the token and write access, before any training
            from huggingface_hub.utils import HFValidationError, validate_repo_id

            from timm_popup.hub import check_push_access
            try:
                validate_repo_id(args.push_to_hub)
            except HFValidationError as e:
                raise train.TrainError(f"--push-to-hub {args.push_to_hub!r} is not a valid repo id: {e}") from e
            check_push_access(args.push_to_hub, private=args.hub_private or None)
    except ValueError as e:  # TrainError and the library's other one-line ValueErrors
        return _fail(e)
    # checked: from here on the run records how it ends beside its checkpoints (a refused one leaves nothing)
    if os.environ.get("RANK", "0") == "0":
        runstate.write_status(output_dir, "running", exit_status=1)
    run_record.output_dir = output_dir

    # 2. Accelerate: processes, device, mixed precision, DDP without the frozen weights, torch.compile.
    accelerator = Accelerator(
        cpu=args.cpu, mixed_precision=args.mixed_precision, gradient_accumulation_steps=recipe.grad_accum,
        log_with=trackers, project_dir=str(output_dir), dynamo_plugin=dynamo,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        # Frozen weights are buffers, identical on every process by construction: never broadcast them. A process
        # waits --dist-timeout at most in a collective for the others (a lost node is found in bounded time).
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False),
                         runstate.dist_timeout_kwargs(args.dist_timeout)])
    say = accelerator.print
    cluster = run_record.cluster = runstate.Cluster(accelerator, argv, timeout_s=args.dist_timeout)
    set_seed(args.seed)

    # 3. Data and model (still before any training: a bad dataset, split or column fails here).
    try:
        # Hub downloads and the Fashion-MNIST conversion happen once, the others waiting as long as they take
        with cluster.patient(), accelerator.main_process_first():
            ds = train.load_data(args.dataset, train_split=args.train_split, val_split=args.val_split,
                                 image_column=args.image_column, label_column=args.label_column,
                                 streaming=args.streaming, cache_dir=args.data_cache, train_samples=args.train_samples,
                                 val_samples=args.val_samples, seed=args.seed, notify=say)
        input_size = train.resolve_input_size(model_name, ds, in_chans=args.in_chans, img_size=args.img_size)
        mean, std = train.input_stats(model_name, ds, input_size, mean=args.mean, std=args.std, seed=args.seed)
        model = train.create_model(model_name, method=method, num_classes=ds.num_classes, input_size=input_size,
                                   k=k, weight_init=weight_init, seed=args.seed, model_kwargs=args.model_kwargs,
                                   mean=mean, std=std, init_artifact=init_artifact, label_names=ds.class_names,
                                   options=options, popup_options=popup_options)
        data_config = timm.data.resolve_data_config({}, model=model)
        augmentation = train.resolve_augmentation(data_config, epochs=recipe.epochs, no_aug=args.no_aug,
                                                  overrides={name: getattr(args, name) for name in _AUG_FLAGS})
        mixup_fn = train.build_mixup(augmentation, num_classes=ds.num_classes,
                                     label_smoothing=recipe.label_smoothing, batch_size=recipe.batch_size)
        run = dict(model=model_name, method=method.name, k=model.popup_config.k,
                   weight_init=model.popup_config.weight_init,
                   **{**popup_options, "score_init": model.popup_config.score_init}, seed=args.seed,
                   num_classes=ds.num_classes,
                   input_size=list(input_size), mean=list(mean), std=list(std), model_kwargs=args.model_kwargs,
                   dataset=args.dataset, **dataclasses.asdict(recipe), augmentation=augmentation.describe(),
                   num_processes=accelerator.num_processes, mixed_precision=accelerator.mixed_precision,
                   threads=threads)
        if init_artifact is not None:
            run["init_artifact"] = str(init_artifact)
        if ds.prepared is not None:  # timm-popup prepare changed the images: the card says how
            run["prepared"] = ds.prepared
        if resumed is not None:
            for note in train.check_resume_compatible(resumed, run):
                say(f"note: resuming with a changed setting ({note})")
        workers = args.workers if args.workers is not None else _default_workers(accelerator.num_processes)
        train_loader, val_loader, decode = train.build_loaders(
            ds, data_config, batch_size=recipe.batch_size, workers=workers, seed=args.seed,
            num_processes=accelerator.num_processes, process_index=accelerator.process_index,
            pin_memory=accelerator.device.type == "cuda", augmentation=augmentation, decode=args.decode,
            device=accelerator.device)
        run["decode"] = decode.split(" ")[0]
        say(f"decode: {decode}")
        # a supermask's BatchNorm statistics are re-estimated under its eval mask before each evaluation
        calibration = (train.build_calibration_loader(ds, data_config, batch_size=recipe.batch_size, workers=workers,
                                                      seed=args.seed, decode=args.decode, device=accelerator.device)
                       if train.needs_norm_calibration(model) else None)
    except ValueError as e:  # TrainError, DataError, MaskError: one-line messages
        return _fail(e)

    # 4. Optimizer (trainable tensors only: scores for edge-popup) and timm's schedule.
    global_batch = recipe.batch_size * accelerator.num_processes * recipe.grad_accum
    lr = train.scaled_lr(recipe, global_batch)
    optimizer = train.build_optimizer(model, recipe, lr=lr)
    if ds.streaming:  # each process already reads its own part of the stream
        model, optimizer = accelerator.prepare(model, optimizer)
        rows = ds.num_rows.get(ds.train_split)
        steps = rows // (recipe.batch_size * accelerator.num_processes) if rows else None
    else:
        model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
        steps = len(train_loader)
    updates_per_epoch = -(-steps // recipe.grad_accum) if steps else None
    scheduler = train.build_scheduler(optimizer.optimizer, recipe, updates_per_epoch=updates_per_epoch)
    # with mixup, timm's Mixup makes soft targets and applies the label smoothing itself
    loss_fn = SoftTargetCrossEntropy() if mixup_fn else nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    train.use_portable_checkpoints(accelerator)
    # the model itself, without its DDP and torch.compile wrappers: what the method's per-update hook (IteRand's
    # re-draws) acts on, what is evaluated (eager: the same masks) and saved
    bare = accelerator.unwrap_model(model, keep_torch_compile=False)
    schedule = Schedule(recipe.epochs, updates_per_epoch)
    after_update = functools.partial(method.after_update, bare, schedule=schedule) if method.after_update else None
    recovery = runstate.Recovery(accelerator, output_dir, model=bare, every=args.checkpointing_steps,
                                 keep_last=args.keep_checkpoints, preemption=preemption, command=cluster.command)

    # 5. Resume: model, optimizer and update count from the checkpoint (a recovery checkpoint also gives the place
    # inside the epoch); data order and augmentation are a function of (seed, epoch, example), so the run continues
    # exactly where the checkpoint left it.
    start_epoch, num_updates, train_time, metrics, progress = 0, 0, 0.0, {}, None
    if resume_from is not None:
        try:
            state = train.load_checkpoint(accelerator, resume_from)
            # a recovery checkpoint: the place inside the epoch, its metric sums, this process's buffers
            progress = runstate.resume_progress(accelerator, resume_from, state, bare)
        except ValueError as e:
            return _fail(e)
        start_epoch, num_updates = state["epoch"], state["num_updates"]
        if method.on_resume is not None:  # e.g. global-topk's scheduled density, at the update count reached
            method.on_resume(bare, num_updates, schedule=schedule)
        train_time, metrics = state.get("train_time_s", 0.0), state.get("metrics", {})
        if scheduler is not None:
            scheduler.step(start_epoch)
            scheduler.step_update(num_updates)
        inside = "" if progress is None else f", then step {progress.step} of epoch {start_epoch + 1}"
        if progress is not None and progress.offset:
            if ds.streaming:
                return _fail(f"the recovery checkpoint {resume_from} was written by {resumed['run']['num_processes']} "
                             f"process(es) and a stream's place does not map onto {accelerator.num_processes}; resume "
                             "it with as many, or delete it to resume from the epoch checkpoint before it")
            inside = (f", then the rest of epoch {start_epoch + 1} after its first {progress.offset} examples, each "
                      f"remaining one once, over {accelerator.num_processes} process(es) where "
                      f"{resumed['run']['num_processes']} wrote it: not the uninterrupted run's bytes, its batches "
                      "differ")
        if progress is not None and ds.streaming:
            inside += (" (the stream is read again up to there, decoding nothing: the only exact way to refill its "
                       "shuffle buffer)")
        say(f"resumed from {resume_from} (epoch {start_epoch} done, {num_updates} updates{inside})")
    log = train.MetricsLog(output_dir, keep_epochs=start_epoch) if accelerator.is_main_process else None
    card_recipe = _card_recipe(run, recipe, lr=lr, global_batch=global_batch, args=args)
    accelerator.init_trackers("tensorboard", config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                     for k, v in card_recipe.items()})

    total, kept, trainable = train.count_weights(bare)
    say(f"{ds.describe()}")
    say(f"{model_name} ({method.name}): input {'x'.join(map(str, input_size))}, {ds.num_classes} classes, "
        f"{kept:,} of {total:,} weights used, {trainable:,} trainable values; k={run['k']}, "
        f"weight_init={run['weight_init']}, seed={args.seed}; input mean {list(mean)} std {list(std)}")
    say(f"recipe {recipe.name}: {recipe.epochs} epochs, global batch {global_batch} ({accelerator.num_processes} "
        f"process(es) x {recipe.batch_size} x {recipe.grad_accum}), {recipe.opt} lr {lr:.4g}, wd "
        f"{recipe.weight_decay}, {recipe.sched} schedule, {_precision(accelerator.mixed_precision)}, "
        f"{accelerator.device}; output {output_dir}")
    say(f"threads: {threads} per process ({threads_why})")
    chosen = args.no_aug or any(getattr(args, name) is not None for name in _AUG_FLAGS)
    say(f"augmentation: {augmentation.describe()}"
        + ("" if chosen else " (the default for this data and budget; --no-aug, --hflip ... change it)"))

    # 6. Train, evaluate, log and checkpoint every epoch.
    for epoch in range(start_epoch, recipe.epochs):
        resuming = progress if progress is not None and progress.epoch == epoch else None
        lr_used = resuming.lr if resuming else optimizer.param_groups[0]["lr"]
        if resuming is None:  # a resumed epoch goes on with the generator states its checkpoint saved
            train.seed_epoch(args.seed, epoch)
        train.set_loader_epoch(train_loader, args.seed, epoch)
        recovery.epoch_started(epoch, lr_used, dict(num_updates=num_updates, run=run, metrics=metrics,
                                                    train_time_s=train_time), offset=resuming.offset if resuming else 0)
        loader = runstate.position_loader(accelerator, train_loader, resuming, recipe.batch_size)
        epoch_steps = len(loader) if resuming and resuming.offset else steps  # the rest of an epoch: its own count
        try:
            train_stats, num_updates = train.train_one_epoch(
                model, loader, optimizer, loss_fn, accelerator, epoch=epoch, num_updates=num_updates,
                scheduler=scheduler, clip_grad=recipe.clip_grad, total_steps=epoch_steps, mixup_fn=mixup_fn,
                lockstep=ds.streaming and accelerator.num_processes > 1, log_every=args.log_every,
                desc=f"epoch {epoch + 1}/{recipe.epochs}", after_update=after_update, resume=resuming,
                at_update=recovery.after_update)
            if calibration is not None:
                train.recalibrate_norms(bare, calibration, device=accelerator.device)
            train.sync_batchnorm_stats(model, accelerator)
            metrics = train.evaluate(bare, val_loader, device=accelerator.device, accelerator=accelerator)
        except (DataError, train.TrainError) as e:  # an unreadable image, a diverged loss: one line, checkpoints kept
            accelerator.end_training()
            kept = train.list_checkpoints(output_dir)
            where = (f"the last checkpoint, {kept[-1]}, is kept: continue from it with --resume latest" if kept
                     else "no epoch had finished, so there is no checkpoint yet")
            return _fail(f"{e}; {where}")
        except train.WriteError as e:  # a recovery checkpoint could not be written
            accelerator.end_training()
            return _fail(e, status=1)
        train_time += train_stats["time_s"]
        row = dict(epoch=epoch + 1, lr=lr_used, train_loss=train_stats["loss"],
                   train_top1=train_stats["top1"], val_loss=metrics["loss"], val_top1=metrics["top1"],
                   val_top5=metrics["top5"], img_per_s=train_stats["img_per_s"], epoch_time_s=train_stats["time_s"],
                   train_time_s=train_time)
        if log is not None:
            log.append(row)
        accelerator.log(row, step=epoch + 1)
        say(f"epoch {epoch + 1}/{recipe.epochs}: train loss {row['train_loss']:.4f} top1 {row['train_top1']:.2f} | "
            f"val loss {row['val_loss']:.4f} top1 {row['val_top1']:.2f} top5 {row['val_top5']:.2f} | "
            f"lr {row['lr']:.4g} | {row['img_per_s']:.0f} img/s | {row['epoch_time_s']:.1f}s")
        try:
            saved = train.save_checkpoint(accelerator, output_dir, epoch=epoch + 1, keep_last=args.keep_checkpoints,
                                          state=dict(num_updates=num_updates, run=run, metrics=metrics,
                                                     train_time_s=train_time))
        except train.WriteError as e:
            accelerator.end_training()
            return _fail(e, status=1)
        recovery.epoch_ended(saved)  # a signal during the epoch's evaluation or checkpoint: stop here

    preemption.release()  # trained: a signal now ends the run as it would any program

    # 7. Every process must hold the same result; then write the artifact (and push it), the others waiting for as
    # long as the main process takes.
    run_scope.enter_context(cluster.patient())
    final = bare
    digest = train.mask_digest(final)
    digests = gather_object([digest])
    if accelerator.num_processes > 1:
        print(f"rank {accelerator.process_index}/{accelerator.num_processes}: result sha256 {digest}", flush=True)
    if len(set(digests)) != 1:
        return _fail(f"the processes ended with different results: {digests}", status=1)
    what = "weights" if method.learns_weights else "mask"
    say(f"all {accelerator.num_processes} process(es) hold the same {what} (sha256 {digest[:16]})")
    if accelerator.is_main_process:
        card_metrics = dict(top1=metrics["top1"], top5=metrics["top5"], loss=metrics["loss"],
                            train_time_s=round(train_time, 1))
        try:
            method.save(final, output_dir, metrics=card_metrics, dataset=train.dataset_id(args.dataset),
                        recipe=card_recipe)
        except (OSError, RuntimeError) as e:  # safetensors reports a full disk as a RuntimeError
            accelerator.end_training()
            return _fail(f"cannot write the artifact to {output_dir}: {train.write_error_cause(e)}; the last "
                         f"checkpoint is in {output_dir / train.CHECKPOINTS_DIR}", status=1)
        say(f"wrote {output_dir}: val top1 {metrics['top1']:.2f}, top5 {metrics['top5']:.2f}; training "
            f"{train_time:.0f}s, wall {time.perf_counter() - started:.0f}s")
        if args.push_to_hub:
            try:
                url = method.push(output_dir, args.push_to_hub, private=args.hub_private or None)
            except Exception as e:  # the artifact is safe on disk: say how to retry
                again = (f"timm-popup push {output_dir} {args.push_to_hub}" if not method.learns_weights else
                         f"python -c \"from timm_popup.methods import push_dense; push_dense('{output_dir}', "
                         f"'{args.push_to_hub}')\"")
                accelerator.end_training()
                return _fail(f"pushing to {args.push_to_hub} failed ({type(e).__name__}: {e}); the artifact is "
                             f"in {output_dir}: push it again with `{again}`", status=1)
            say(f"pushed to {url}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


_AUG_FLAGS = ("pad_crop", "scale", "ratio", "hflip", "vflip", "aa", "color_jitter", "reprob", "remode", "recount",
              "mixup", "cutmix", "mixup_prob", "mixup_switch_prob", "mixup_mode")


def _precision(mixed_precision: str) -> str:
    return "fp32" if mixed_precision == "no" else f"{mixed_precision} mixed precision"


def _trackers(log_with: str, error: type[Exception]) -> list[str] | None:
    """Accelerate trackers for --log-with; the CSV/JSON log is always written."""
    from accelerate.utils import is_tensorboard_available

    if log_with == "auto":
        return ["tensorboard"] if is_tensorboard_available() else None
    if log_with == "none":
        return None
    names = [name.strip() for name in log_with.split(",") if name.strip()]
    if "tensorboard" in names and not is_tensorboard_available():
        raise error("--log-with tensorboard needs the tensorboard package (pip install tensorboard)")
    return names


def _default_workers(num_processes: int) -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cpus // max(1, num_processes) - 1))


def _card_recipe(run: dict, recipe, *, lr: float, global_batch: int, args: argparse.Namespace) -> dict:
    """The flat, JSON-serialisable hyper-parameters shown in the model card."""
    out = dict(method=run["method"], recipe=recipe.name, epochs=recipe.epochs, global_batch=global_batch,
               batch_size=recipe.batch_size, num_processes=run["num_processes"], grad_accum=recipe.grad_accum,
               opt=recipe.opt, lr=lr, momentum=recipe.momentum, nesterov=recipe.nesterov,
               weight_decay=recipe.weight_decay, sched=recipe.sched, warmup_epochs=recipe.warmup_epochs,
               min_lr=recipe.min_lr, label_smoothing=recipe.label_smoothing, clip_grad=recipe.clip_grad,
               k=run["k"], weight_init=run["weight_init"], seed=run["seed"],
               input_size="x".join(map(str, run["input_size"])), mean=run["mean"], std=run["std"],
               augmentation=run["augmentation"], decode=run["decode"], mixed_precision=run["mixed_precision"],
               threads=run["threads"])
    for name in ("init_artifact", "prepared"):
        if name in run:
            out[name] = run[name]
    if run["model_kwargs"]:
        out["model_kwargs"] = json.dumps(run["model_kwargs"], sort_keys=True)
    for name in ("train_samples", "val_samples"):
        if getattr(args, name) is not None:
            out[name] = getattr(args, name)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
