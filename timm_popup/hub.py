"""Artifacts on disk and on the Hugging Face Hub: ``save_pretrained``, ``push_to_hub``, model cards.

An artifact directory is what timm's ``local-dir:`` / ``hf-hub:`` loaders read: ``config.json`` (timm's
format, written by timm's own helper), ``model.safetensors`` (the mask file of :mod:`timm_popup.masks`) and a
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
from importlib.resources import files
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub import constants as hf_constants
from timm.models import is_model
from timm.models._hub import save_config_for_hf
from torch import nn

from ._io import atomic_write
from .export import dense_state_dict
from .init import GENERATOR_VERSION
from .masks import FORMAT_VERSION, MaskError, artifact_info, read_mask_file, save_masks

__all__ = ["save_pretrained", "push_to_hub", "push_artifact", "model_card", "CONFIG_NAME", "WEIGHTS_NAME",
           "CARD_NAME", "ARTIFACT_FILES"]

CONFIG_NAME, WEIGHTS_NAME, CARD_NAME = "config.json", "model.safetensors", "README.md"
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
    ``info`` is :func:`timm_popup.masks.artifact_info` of its mask file. Front matter: library, tags,
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
    return ModelCard.from_template(
        card_data, template_path=str(_template_path()),
        free_density=info.get("density") == "free",
        model_id=model_id, load_name=f"hf-hub:{repo_id}" if repo_id else f"local-dir:{directory_name}",
        architecture=architecture, registered=architecture.startswith("popup_") and is_model(architecture),
        base_architecture=architecture.removeprefix("popup_"), k=info["k"], weight_init=info["weight_init"],
        seed=info["seed"], kept_weights=f"{kept:,}", total_weights=f"{total:,}",
        kept_percent=f"{100 * kept / max(total, 1):.1f}",
        artifact_size=_human_bytes(artifact_bytes) if artifact_bytes else "n/a",
        dense_size=_human_bytes(dense_bytes) if dense_bytes else "n/a",
        size_ratio=f"{dense_bytes / artifact_bytes:.1f}" if dense_bytes and artifact_bytes else "n/a",
        format_version=info["format_version"], generator_version=info["generator_version"],
        dataset=dataset, metrics_rows=[(_METRIC_NAMES.get(n, n), _fmt(v)) for n, v in metrics.items()],
        recipe_rows=[(n, _fmt(v)) for n, v in recipe.items()],
    )


def _render_card(directory: Path, repo_id: str | None) -> ModelCard:
    config = json.loads((directory / CONFIG_NAME).read_text())
    weights = directory / WEIGHTS_NAME
    return model_card(config, artifact_info(read_mask_file(weights)), repo_id=repo_id,
                      artifact_bytes=weights.stat().st_size, directory_name=directory.resolve().name)


def _fmt(value: Any) -> str:
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
    save_masks(model, directory / WEIGHTS_NAME)
    # Everything the card shows travels in config.json (timm ignores extra top-level keys), so the card can be
    # re-rendered from the files alone, e.g. by push_artifact for the repo it lands in.
    # the fp32 checkpoint of the same network: weights are (non-persistent) buffers here, scores are not in it
    dense_bytes = sum(t.numel() * t.element_size() for t in dense_state_dict(model).values())
    popup = dict(format_version=FORMAT_VERSION, generator_version=GENERATOR_VERSION, **_popup_args(model),
                 dense_bytes=dense_bytes, timm_popup_version=_version())
    popup.update(card_fields(metrics=metrics, dataset=dataset, recipe=recipe))
    atomic_write(directory / CONFIG_NAME, lambda tmp: save_config_for_hf(
        model, tmp, model_config={"timm_popup": popup, "pretrained_cfg": {"hf_hub_filename": WEIGHTS_NAME}},
        model_args=_popup_args(model)))
    atomic_write(directory / CARD_NAME, _render_card(directory, repo_id).save)
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

    The mask file is checked (format and checksum) before anything is sent, so a truncated or foreign file
    is never published.
    """
    directory = Path(directory)
    missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if not (directory / name).is_file()]
    if missing:
        raise MaskError(f"{directory} is not a timm-popup artifact (missing {', '.join(missing)}): write one with "
                        "timm_popup.save_pretrained(model, directory) first")
    info = artifact_info(read_mask_file(directory / WEIGHTS_NAME))
    files = {name: directory / name for name in ARTIFACT_FILES if (directory / name).is_file()}
    if "timm_popup" in json.loads((directory / CONFIG_NAME).read_text()):
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
