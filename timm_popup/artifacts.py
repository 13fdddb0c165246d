"""Find an artifact (directory, mask file or ``hf-hub:`` repo) and build its verified popup model."""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
from timm.models import get_pretrained_cfg_value, is_model
from torch import nn

from .configjson import check_config
from .convert import frozen_tensors, popup_masks
from .export import dense_state_dict
from .hub import CONFIG_NAME, WEIGHTS_NAME
from .maskfile import META, check_format, read_header, read_mask_file

__all__ = ["Artifact", "ArtifactError", "HUB_PREFIX", "LOCAL_PREFIX", "resolve_artifact", "require_architecture",
           "build_model", "dense_size", "explain_damaged_local_configs"]

HUB_PREFIX = "hf-hub:"
LOCAL_PREFIX = "local-dir:"  # timm's name for an artifact directory: the same as the bare path


class ArtifactError(ValueError):
    """An artifact that cannot be found or read. ``bad_input``: the caller named something wrong (else: a fault
    on the way, e.g. the network)."""

    def __init__(self, message: str, *, bad_input: bool = True) -> None:
        super().__init__(message)
        self.bad_input = bad_input


@dataclass
class Artifact:
    """A resolved artifact: the local mask file and, where there is one, its config.json."""

    source: str
    mask_file: Path
    config: dict[str, Any] | None
    architecture: str | None
    directory: Path | None = None  # holds config.json + model.safetensors: loadable as local-dir:
    hub_id: str | None = None  # org/name[@revision] for hf-hub: artifacts


def _one_line(exc: BaseException | str) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


_BAD_CONFIG = "is not valid JSON, so the model it describes cannot be built: write the artifact again " \
              "(timm_popup.save_pretrained, or download it again) or repair the file"


def _read_config(path: Path, mask_file: Path | None) -> dict[str, Any]:
    """``config.json``, checked (:func:`timm_popup.configjson.check_config`) against the mask file beside it."""
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path} {_BAD_CONFIG} ({_one_line(e)})", bad_input=False) from e
    check_config(config, _header(mask_file), where=str(path))
    if not isinstance(config, dict) or not isinstance(config.get("architecture"), str):
        raise ArtifactError(f"{path} names no architecture: it is not a timm config.json", bad_input=False)
    return config


def _header(mask_file: Path | None) -> dict[str, Any] | None:
    """The tensors of the timm-popup mask file beside a config.json, checked on their own first
    (:func:`timm_popup.maskfile.check_format`: an invalid mask file is reported as such, not as a config.json
    that disagrees with it); None where there is no popup mask to read (a plain timm checkpoint, or a file the
    loader will say is unreadable)."""
    try:
        header = read_header(mask_file) if mask_file is not None and mask_file.is_file() else None
    except Exception:  # safetensors' own error types: a truncated or foreign file
        return None
    if header is None or META + "format_version" not in header:
        return None
    tensors = read_mask_file(mask_file)
    check_format(tensors)
    return tensors


def _download(spec: str) -> Artifact:
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    hub_id = spec[len(HUB_PREFIX):]
    repo_id, _, revision = hub_id.partition("@")
    paths = {}
    # model.safetensors is fetched here, before timm sees the repo: without one, timm's hf-hub loader would
    # fall back to a pickled pytorch_model.bin.
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        try:
            paths[name] = Path(hf_hub_download(repo_id, name, revision=revision or None))
        except HFValidationError as e:
            raise ArtifactError(f"{spec!r} is not a valid Hub id: use hf-hub:org/name[@revision] "
                                f"({_one_line(e)})") from e
        except LocalEntryNotFoundError as e:  # offline or unreachable, and not in the cache
            raise ArtifactError(f"could not download {name} of {repo_id} from {constants.ENDPOINT} and it is not "
                                f"cached: {_one_line(e)}", bad_input=False) from e
        except RepositoryNotFoundError as e:
            raise ArtifactError(f"repository {repo_id} was not found on {constants.ENDPOINT}: check the id (a "
                                "private or gated repo needs a token: HF_TOKEN or `hf auth login`)") from e
        except RevisionNotFoundError as e:
            raise ArtifactError(f"{repo_id} has no revision {revision!r}") from e
        except EntryNotFoundError as e:
            raise ArtifactError(f"{repo_id} has no {name}: it is not a timm-popup artifact (config.json + "
                                "model.safetensors)") from e
        except (HfHubHTTPError, OSError) as e:
            raise ArtifactError(f"could not download {name} of {repo_id}: {_one_line(e)}", bad_input=False) from e
    config = _read_config(paths[CONFIG_NAME], paths[WEIGHTS_NAME])
    return Artifact(spec, paths[WEIGHTS_NAME], config, config["architecture"], hub_id=hub_id)


def resolve_artifact(spec: str, model: str | None = None) -> Artifact:
    """Find the mask file and config of ``spec``: a directory, a mask file or ``hf-hub:org/name[@rev]``.

    ``model`` names the architecture of a mask file that has no config.json beside it.
    """
    if spec.startswith(HUB_PREFIX):
        art = _download(spec)
    else:
        path = Path(spec.removeprefix(LOCAL_PREFIX)).expanduser()
        if not path.exists():
            raise ArtifactError(f"{spec} does not exist: pass an artifact directory (config.json + "
                                "model.safetensors), a model.safetensors file or hf-hub:org/name")
        directory = path if path.is_dir() else None
        if directory is not None and not (directory / WEIGHTS_NAME).is_file():
            raise ArtifactError(f"{directory} holds no {WEIGHTS_NAME}: it is not a timm-popup artifact directory")
        if directory is None and path.name == WEIGHTS_NAME and (path.parent / CONFIG_NAME).is_file():
            directory = path.parent  # the mask file of an artifact directory: use its config too
        mask_file = directory / WEIGHTS_NAME if directory is not None else path
        config = None
        if directory is not None and (directory / CONFIG_NAME).is_file():
            config = _read_config(directory / CONFIG_NAME, mask_file)
        elif directory is not None:
            directory = None  # no config.json: not loadable as local-dir:, needs model=
        art = Artifact(spec, mask_file, config, config["architecture"] if config else None, directory=directory)
    if model is not None:
        if art.architecture is not None and art.architecture != model:
            raise ArtifactError(f"{spec} is a {art.architecture} artifact (config.json) but --model says {model}: "
                                "drop --model")
        art.architecture = model
    return art


def explain_damaged_local_configs() -> None:
    """Make timm's ``local-dir:`` / ``hf-hub:`` config reading check a popup artifact's ``config.json`` first
    (:func:`timm_popup.configjson.check_config`, against the mask file beside it where it is at hand), so an invalid one
    is one line naming the field, not a model built from it; and make a damaged one read through ``local-dir:``
    say which file it is and what to do (timm parses it with a bare ``json.load``, so the error names neither; it
    stays a ``json.JSONDecodeError``, a ``ValueError``). timm's two loaders are wrapped once, when timm_popup is
    imported; a plain timm config is left to timm."""
    import timm.models._factory as factory
    from timm.models._hub import download_from_hf

    original = factory.load_model_config_from_path
    if getattr(original, "_timm_popup_wrapped", False):
        return
    original_hf = factory.load_model_config_from_hf

    def checked(config_path: Path, mask_file: Path | None) -> None:
        try:
            config = json.loads(config_path.read_text())
        except (OSError, ValueError):
            return  # timm reads it next and raises its own error (with the file's name, below)
        check_config(config, _header(mask_file), where=str(config_path))

    @functools.wraps(original)
    def load_model_config_from_path(model_path: str | os.PathLike) -> Any:
        checked(Path(model_path) / CONFIG_NAME, Path(model_path) / WEIGHTS_NAME)
        try:
            return original(model_path)
        except json.JSONDecodeError as e:
            raise json.JSONDecodeError(f"{Path(model_path) / CONFIG_NAME} {_BAD_CONFIG}; {e.msg}", e.doc, e.pos) from e

    @functools.wraps(original_hf)
    def load_model_config_from_hf(model_id: str, *args: Any, **kwargs: Any) -> Any:
        # the mask is fetched later, by timm's loader; the file's own values are compared with the model there
        checked(Path(download_from_hf(model_id, CONFIG_NAME, cache_dir=kwargs.get("cache_dir"))), None)
        return original_hf(model_id, *args, **kwargs)

    load_model_config_from_path._timm_popup_wrapped = True  # type: ignore[attr-defined]
    factory.load_model_config_from_path = load_model_config_from_path
    factory.load_model_config_from_hf = load_model_config_from_hf


def require_architecture(art: Artifact) -> str:
    """The artifact's architecture, known to timm; an error saying what to pass otherwise."""
    if art.architecture is None:
        raise ArtifactError(f"{art.mask_file} has no config.json beside it: pass --model ARCH (e.g. --model "
                            "popup_resnet50) to name the architecture it was saved from")
    if not is_model(art.architecture):
        raise RuntimeError(f"Unknown model ({art.architecture})")
    return art.architecture


def build_model(art: Artifact) -> nn.Module:
    """Build the popup model of ``art`` and load its mask through timm's own loading path, verifying it.

    ``hf-hub:`` / ``local-dir:`` where there is a config.json, else the architecture with
    ``pretrained_cfg_overlay=dict(file=)``; every ``popup_<timm name>`` is registered, so all of them load so.
    """
    architecture = require_architecture(art)
    if art.hub_id is not None:
        return timm.create_model(HUB_PREFIX + art.hub_id, pretrained=True).eval()
    if art.directory is not None:
        return timm.create_model(f"local-dir:{art.directory}", pretrained=True).eval()
    kwargs: dict[str, Any] = dict(pretrained_cfg_overlay=dict(file=str(art.mask_file)))
    classifiers = get_pretrained_cfg_value(architecture, "classifier") or ()
    tensors = read_mask_file(art.mask_file)
    shape_keys = [f"{name}.weight.mask_shape" for name in ((classifiers,) if isinstance(classifiers, str)
                                                           else classifiers)]
    shape_key = next((key for key in shape_keys if key in tensors), None)
    if shape_key is not None:
        # The loader re-initialises a classifier of another shape (another num_classes) instead of failing;
        # here the file is all there is, so build the head it was saved with (every head has one row per class).
        kwargs["num_classes"] = int(tensors[shape_key][0])
    return timm.create_model(architecture, pretrained=True, **kwargs).eval()


def dense_size(model: nn.Module) -> tuple[int, int]:
    """(parameters, bytes) of the fp32 dense checkpoint of the same network.

    Parameters: every tensor the plain network would train (masked weights and the tensors the parameter
    policy froze; scores are not among them). Bytes: all of its tensors, BatchNorm statistics included, as
    save_pretrained counts them for the model card.
    """
    state = dense_state_dict(model)
    params = sum(m.weight.numel() for m in popup_masks(model).values())
    params += sum(t.numel() for _, t in frozen_tensors(model))
    params += sum(p.numel() for n, p in model.named_parameters() if not n.endswith("scores"))
    return params, sum(t.numel() * t.element_size() for t in state.values())
