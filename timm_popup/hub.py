"""Artifacts on disk and on the Hugging Face Hub: ``save_pretrained``, ``push_to_hub``, model cards.

An artifact directory is what timm's ``local-dir:`` / ``hf-hub:`` loaders read: ``config.json`` (timm's
format, written by timm's own helper), ``model.safetensors`` (the mask file of :mod:`timm_popup.maskfile`) and a
``README.md`` model card rendered from ``hub_cards/popup_model_card.md``. timm's ``push_to_hf_hub`` would
upload the full state dict, so publishing writes these compact files and uploads them with
one ``HfApi.create_commit`` (what ``upload_folder`` does, with the card rendered for the target repo).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, metadata
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import CommitOperationAdd, EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub import constants as hf_constants
from timm.models import is_model
from timm.models._hub import save_config_for_hf
from timm.models._input import get_model_input_config
from torch import nn

from ._io import atomic_write
from .configjson import check_config
from .export import CONFIG_NAME, WEIGHTS_NAME, dense_state_dict
from .maskfile import (
    MaskError,
    artifact_info,
    read_mask_file,
    write_mask_file,
)
from .masks import mask_state_dict, model_header
from .reference import GENERATOR_VERSION

__all__ = ["save_pretrained", "push_to_hub", "push_artifact", "model_card", "model_stats", "check_push_access",
           "PushError", "format_value", "card_fields", "source_url", "CONFIG_NAME", "WEIGHTS_NAME", "CARD_NAME",
           "ARTIFACT_FILES"]

CARD_NAME = "README.md"
ARTIFACT_FILES = (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME)
CARD_TEMPLATE = "popup_model_card.md"
TAGS = ["image-classification", "timm", "edge-popup", "supermask"]
_METRIC_NAMES = {"top1": "Top-1 accuracy", "top5": "Top-5 accuracy"}


def _template_path() -> Path:
    # A source checkout (and an editable install) reads hub_cards/ in place; a wheel ships it as
    # timm_popup.hub_cards (pyproject's package-dir mapping).
    local = Path(__file__).resolve().parents[1] / "hub_cards" / CARD_TEMPLATE
    return local if local.is_file() else Path(str(files("timm_popup.hub_cards").joinpath(CARD_TEMPLATE)))


def _version() -> str:
    from . import __version__  # the package imports this module: read the version lazily

    return __version__


def source_url() -> str | None:
    """The project's source address as its package metadata declares it (``[project.urls]`` in pyproject.toml:
    ``Source``, ``Repository`` or ``Homepage``), else ``None``: a card names no address the package does not
    declare, and then tells its reader to install from a copy of the source."""
    try:
        meta = metadata("timm-popup")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return None
    urls = {label.strip().lower(): url.strip() for label, _, url in
            (entry.partition(",") for entry in meta.get_all("Project-URL") or [])}
    return next((urls[label] for label in ("source", "repository", "homepage") if urls.get(label)), None)


def _popup_args(model: nn.Module) -> dict[str, Any]:
    args = model.popup_config.popup_args()
    if not args["dense"]:
        del args["dense"]
    return args


def _human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    raise AssertionError("unreachable")


def model_card(config: Mapping[str, Any], info: Mapping[str, Any], *, repo_id: str | None = None,
               artifact_bytes: int | None = None, directory_name: str = "model") -> ModelCard:
    """The model card of an artifact, a pure function of its files (so a push can re-render it for its repo).

    ``config`` is the artifact's ``config.json`` (its ``timm_popup`` entry holds metrics, dataset, recipe);
    ``info`` is :func:`timm_popup.maskfile.artifact_info` of its mask file. Front matter: library, tags,
    license, datasets and a model-index with top-1/top-5 (``EvalResult``) when they were measured.
    """
    popup = config.get("timm_popup", {})
    architecture = config["architecture"]
    metrics, dataset, recipe = dict(popup.get("metrics") or {}), popup.get("dataset"), popup.get("recipe") or {}
    model_id = repo_id or directory_name
    eval_results = [
        EvalResult(task_type="image-classification", dataset_type=dataset, dataset_name=dataset,
                   metric_type="accuracy", metric_name=_METRIC_NAMES[name], metric_value=float(metrics[name]))
        for name in ("top1", "top5") if dataset and name in metrics
    ]
    card_data = ModelCardData(
        library_name="timm", license=config.get("pretrained_cfg", {}).get("license") or "apache-2.0",
        tags=list(TAGS), datasets=[dataset] if dataset else None, pipeline_tag="image-classification",
        model_name=model_id if eval_results else None, eval_results=eval_results or None,
    )
    total, kept, dense_bytes = info["total_weights"], info["kept_weights"], popup.get("dense_bytes")
    pretrained_cfg = config.get("pretrained_cfg", {})
    label_names = list(config.get("label_names") or pretrained_cfg.get("label_names") or [])
    num_classes = int(config.get("num_classes") or pretrained_cfg.get("num_classes") or len(label_names))
    input_size = pretrained_cfg.get("input_size") or [3, 224, 224]
    stats = popup.get("stats") or {}
    return ModelCard.from_template(
        card_data, template_path=str(_template_path()),
        free_density=info.get("density") == "free", method_name=info.get("method", "edge-popup"),
        method_text=_METHOD_TEXT.get(info.get("method"), "").format(k=100 * float(info["k"]), slots=info.get("slots")),
        method_paper=_METHOD_PAPER.get(info.get("method")), bits_per_weight=info.get("bits_per_weight"),
        structure=info.get("structure"),
        model_id=model_id, load_name=f"hf-hub:{repo_id}" if repo_id else f"local-dir:{directory_name}",
        eval_name=f"hf-hub:{repo_id}" if repo_id else directory_name, k_percent=f"{100 * float(info['k']):g}",
        architecture=architecture, registered=architecture.startswith("popup_") and is_model(architecture),
        base_architecture=architecture.removeprefix("popup_"), k=info["k"], weight_init=info["weight_init"],
        seed=info["seed"], kept_weights=f"{kept:,}", total_weights=f"{total:,}",
        kept_percent=f"{100 * kept / max(total, 1):.1f}",
        artifact_size=_human_bytes(artifact_bytes) if artifact_bytes else "n/a",
        dense_size=_human_bytes(dense_bytes) if dense_bytes else "n/a",
        size_ratio=f"{dense_bytes / artifact_bytes:.1f}" if dense_bytes and artifact_bytes else "n/a",
        format_version=info["format_version"], generator_version=info["generator_version"],
        dataset=dataset, metrics_rows=[(_METRIC_NAMES.get(n, n), _cell(format_value(v))) for n, v in metrics.items()],
        recipe_rows=[(n, _cell(format_value(v))) for n, v in recipe.items()],
        label_names=label_names, num_classes=num_classes, top_k=min(5, num_classes) if num_classes else 5,
        image_size=f"{input_size[-2]} x {input_size[-1]}" + (", grayscale" if input_size[0] == 1 else ""),
        image_mode="L" if input_size[0] == 1 else "RGB",
        params_m=_stat(stats.get("params"), 1e6), gmacs=_stat(stats.get("macs"), 1e9),
        activations_m=_stat(stats.get("activations"), 1e6), source_url=source_url(), version=_version(),
        learned=" and ".join(text for key, text in _LEARNED_TEXT.items() if info.get(key)),
        learn_args="".join(f", {key}=True" for key in _LEARNED_TEXT if info.get(key)),
        score_init=(config.get("model_args") or {}).get("score_init"),
    )


# What a card says an artifact learned besides its mask (timm_popup.convert's learn_norm / learn_bias)
_LEARNED_TEXT = {"learn_norm": "the norm layers' scale and shift (from 1 and 0)",
                 "learn_bias": "the biases (from 0)"}


# How a card describes the artifact of each method that followed the paper (timm_popup.methods); edge-popup and
# supermask cards keep their own wording.
_METHOD_TEXT = {
    "global-topk": "global top-k: the {k:g}% of all the network's random weights with the largest learned scores, "
                   "one threshold across layers",
    "biprop": "biprop, MPT-1/32: in each layer the {k:g}% of the random weights with the largest learned scores, "
              "binarised to +-alpha per layer",
    "iterand": "IteRand: in each layer the {k:g}% of the weights with the largest learned scores, pruned weights "
               "having been re-drawn from seeded streams during the search",
    "signed-supermask": "signed supermask: in each layer the {k:g}% of the weights with the largest |score|, each "
                        "kept with its sign or flipped",
    "slot-machine": "slot machine: every weight is one of {slots} seeded random values, chosen by learned scores; "
                    "nothing is pruned",
    "gem-miner": "Gem-Miner: the random weights whose learned scores in [0, 1] round to 1 after iterative freezing "
                 "to at most {k:g}% of the network; the density of each layer is learned",
}
_METHOD_PAPER = {
    "biprop": "Multi-Prize Lottery Ticket Hypothesis (Diffenderfer & Kailkhura, ICLR 2021): "
              "https://arxiv.org/abs/2103.09377",
    "iterand": "Pruning Randomly Initialized Neural Networks with Iterative Randomization (Chijiwa et al., NeurIPS "
               "2021): https://arxiv.org/abs/2106.09269",
    "signed-supermask": "Signing the Supermask: Keep, Hide, Invert (Koster et al., ICLR 2022): "
                        "https://arxiv.org/abs/2201.13361",
    "slot-machine": "Slot Machines: Discovering Winning Combinations of Random Weights in Neural Networks (Aladago "
                    "& Torresani, ICML 2021): https://arxiv.org/abs/2101.06475",
    "gem-miner": "Rare Gems: Finding Lottery Tickets at Initialization (Sreenivasan et al., NeurIPS 2022): "
                 "https://arxiv.org/abs/2202.12002",
}


def _stat(value: float | None, unit: float) -> str:
    if value is None:
        return "n/a"
    scaled = value / unit
    return f"{scaled:.2f}" if scaled >= 0.1 else f"{scaled:.3g}"


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell (a ``|`` would end the cell, a newline the row)."""
    return " ".join(text.split()).replace("|", "\\|")


def model_stats(model: nn.Module) -> dict[str, int]:
    """timm's model stats for the card: parameters of the dense network (masked weights counted whole, scores
    not), multiply-accumulates and activations (elements output by convolutions and linear layers, as timm's
    tables count them) of one image at the model's input size."""
    from torch.utils.flop_counter import FlopCounterMode

    params = sum(t.numel() for name, t in model.named_parameters() if _is_param(name, True))
    params += sum(t.numel() for name, t in model.named_buffers() if _is_param(name, False))
    activations = 0

    def count(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        nonlocal activations
        activations += output.numel()

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    reference = next(iter(model.parameters()), None)
    device = reference.device if reference is not None else torch.device("cpu")
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, *get_model_input_config(model)["input_size"], device=device))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return dict(params=params, macs=counter.get_total_flops() // 2, activations=activations)


def _is_param(name: str, is_parameter: bool) -> bool:
    """A weight or bias of the dense network: a parameter other than scores, or a frozen popup weight/bias (kept
    as buffers); not masks or normalisation statistics."""
    leaf = name.rsplit(".", 1)[-1]
    return leaf in ("weight", "bias") or (is_parameter and leaf != "scores")


def _render_card(directory: Path, repo_id: str | None) -> ModelCard:
    config = json.loads((directory / CONFIG_NAME).read_text())
    weights = directory / WEIGHTS_NAME
    return model_card(config, artifact_info(read_mask_file(weights)), repo_id=repo_id,
                      artifact_bytes=weights.stat().st_size, directory_name=directory.resolve().name)


def format_value(value: Any) -> str:
    """A metric or recipe value as a card shows it (4 significant digits for floats, JSON for containers)."""
    if isinstance(value, float):
        return f"{value:.4g}" if not math.isnan(value) else "nan"
    return json.dumps(value) if isinstance(value, (list, dict, tuple)) else str(value)


def card_fields(*, metrics: Mapping[str, float] | None, dataset: str | None,
                recipe: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``timm_popup`` entries of config.json that a card shows: only those given, metrics as floats."""
    fields: dict[str, Any] = {}
    if metrics:
        fields["metrics"] = {n: float(v) for n, v in metrics.items()}
    if dataset:
        fields["dataset"] = dataset
    if recipe:
        fields["recipe"] = dict(recipe)
    return fields


def _write_config(model: nn.Module, directory: Path, fields: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``config.json`` (timm's own helper; the ``timm_popup`` entry carries everything the card shows, so a
    card can be re-rendered from the files alone, e.g. for the repo a push lands in) and return what it holds."""
    args, stats, cfg = _popup_args(model), model_stats(model), model.popup_config
    # the fp32 checkpoint of the same network: weights are (non-persistent) buffers here, scores are not in it
    dense_bytes = sum(t.numel() * t.element_size() for t in dense_state_dict(model).values())
    popup = dict(format_version=model_header(model).format, generator_version=GENERATOR_VERSION,
                 **({"method": cfg.method} if cfg.method != "edge-popup" else {}), **args,
                 dense_bytes=dense_bytes, stats=stats, timm_popup_version=_version(), **fields)
    path = atomic_write(directory / CONFIG_NAME, lambda tmp: save_config_for_hf(
        model, tmp, model_config={"timm_popup": popup, "pretrained_cfg": {"hf_hub_filename": WEIGHTS_NAME}},
        model_args=args))
    return json.loads(path.read_text())


def save_pretrained(
    model: nn.Module,
    save_directory: str | os.PathLike,
    *,
    metrics: Mapping[str, float] | None = None,
    dataset: str | None = None,
    recipe: Mapping[str, Any] | None = None,
    repo_id: str | None = None,
) -> Path:
    """Write ``model``'s artifact (``config.json``, ``model.safetensors``, ``README.md``) to ``save_directory``.

    ``config.json`` records k, weight_init and seed as model arguments, so ``hf-hub:`` / ``local-dir:`` build
    the right network before the mask is checked; the mask file carries them too, because registry
    ``pretrained=True`` never reads ``config.json``. Each file is written atomically.
    """
    if getattr(model, "popup_config", None) is None:
        raise MaskError("this model has no popup layers: build it with timm.create_model('popup_...') or "
                        "timm_popup.convert(model) before saving it")
    directory = Path(save_directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot create the output directory {directory} ({e.strerror}): choose a writable path") from e
    tensors = mask_state_dict(model)
    weights = write_mask_file(tensors, directory / WEIGHTS_NAME)
    config = _write_config(model, directory, card_fields(metrics=metrics, dataset=dataset, recipe=recipe))
    card = model_card(config, artifact_info(tensors), repo_id=repo_id, artifact_bytes=weights.stat().st_size,
                      directory_name=directory.resolve().name)
    atomic_write(directory / CARD_NAME, card.save)
    return directory


def push_artifact(
    directory: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Upload an artifact directory to ``repo_id`` in one commit (creating the repo if needed); the commit URL.

    The mask file and config.json are checked (format, checksum, every field) before anything is sent, so a
    truncated, foreign or invalid artifact is never published.
    """
    directory = Path(directory)
    missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if not (directory / name).is_file()]
    if missing:
        raise MaskError(f"{directory} is not a timm-popup artifact (missing {', '.join(missing)}): write one with "
                        "timm_popup.save_pretrained(model, directory) first")
    tensors = read_mask_file(directory / WEIGHTS_NAME)
    info = artifact_info(tensors)
    try:
        config = json.loads((directory / CONFIG_NAME).read_text())
    except ValueError as e:
        raise MaskError(f"{directory / CONFIG_NAME} is not valid JSON ({e}): write the artifact again") from e
    check_config(config, tensors, where=str(directory / CONFIG_NAME))  # nothing invalid is published
    files = {name: directory / name for name in ARTIFACT_FILES if (directory / name).is_file()}
    if "timm_popup" in config:
        # the uploaded card's loading code names the repo it lands in; the local folder is left as it is
        files[CARD_NAME] = str(_render_card(directory, repo_id)).encode()
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.create_commit(
            repo_id=repo_id, revision=revision,
            operations=[CommitOperationAdd(path_in_repo=name, path_or_fileobj=src) for name, src in files.items()],
            commit_message=commit_message or f"Upload edge-popup mask (k={info['k']}, seed={info['seed']})",
        )
    except Exception as e:  # HTTP errors, and the transport's own (huggingface_hub's HTTP backend is not public API)
        reason = (str(e).splitlines() or [""])[0]
        raise RuntimeError(
            f"could not push to {repo_id} on {hf_constants.ENDPOINT}: {type(e).__name__}: {reason}. Check the "
            "network (and HF_ENDPOINT), and that your token (HF_TOKEN or `hf auth login`) may write there") from e
    return commit.commit_url


def push_to_hub(
    model: nn.Module,
    repo_id: str,
    *,
    metrics: Mapping[str, float] | None = None,
    dataset: str | None = None,
    recipe: Mapping[str, Any] | None = None,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Save ``model``'s compact artifact and upload it to the Hub in one commit; returns the commit URL."""
    with tempfile.TemporaryDirectory(prefix="timm-popup-") as tmp:
        save_pretrained(model, tmp, metrics=metrics, dataset=dataset, recipe=recipe, repo_id=repo_id)
        return push_artifact(tmp, repo_id, token=token, private=private, revision=revision,
                             commit_message=commit_message)


class PushError(ValueError):
    """The Hub cannot take the artifact (unreachable, no token, no write access); the message is one line."""


def check_push_access(repo_id: str, *, token: str | None = None, private: bool | None = None) -> str:
    """Prove, before any expensive work, that an artifact can be pushed to ``repo_id``: the endpoint answers, the
    token is valid and not read-only, and the repo exists (created with ``exist_ok``, as the push would).

    Returns the repo's URL; raises :class:`PushError` with a one-line message (never the token) otherwise.
    """
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    where = hf_constants.ENDPOINT
    api = HfApi(token=token)
    try:
        who = api.whoami()
    except LocalTokenNotFoundError as e:
        raise PushError(f"--push-to-hub {repo_id}: no Hub token; set HF_TOKEN or run `hf auth login` with a token "
                        "that may write") from e
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status == 401:
            raise PushError(f"--push-to-hub {repo_id}: the Hub at {where} refused the token (401: invalid or "
                            "expired); set HF_TOKEN or run `hf auth login` again") from e
        raise PushError(f"--push-to-hub {repo_id}: the Hub at {where} answered {status}: {_first_line(e)}") from e
    except Exception as e:  # the transport's own errors (huggingface_hub's HTTP backend is not public API)
        raise PushError(f"--push-to-hub {repo_id}: cannot reach the Hub at {where} ({type(e).__name__}: "
                        f"{_first_line(e)}); check the network and HF_ENDPOINT") from e
    role = ((who.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise PushError(f"--push-to-hub {repo_id}: the token is read-only; use a token with write access")
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    except Exception as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        reason = "no write access" if status in (401, 403) else f"{type(e).__name__}: {_first_line(e)}"
        raise PushError(f"--push-to-hub {repo_id}: cannot create or use the repo on {where} ({reason}); check the "
                        "name and that your token may write there") from e
    return str(url)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
