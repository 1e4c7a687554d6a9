"""What the user gave `Krea2Pipeline.from_pretrained` (a pipeline folder, a hub id, a quantized
folder, a single transformer file, explicit component paths) → one `PipelineSpec`.

Order matters: the transformer the user named is found and checked (headers or manifest) before
any default (the Qwen text encoder, the Qwen-Image VAE) is resolved — and perhaps downloaded —
so a wrong path or format is reported as itself, not as a failed download of something else.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..checks import check_shift, folder_defaults
from ..config import Krea2Config
from ..errors import CheckpointNotFoundError, CorruptCheckpointError
from ..model.text_encoder import DEFAULT_SELECT_LAYERS
from ..quantize.recipe import QuantSpec
from ..sampling import DEFAULT_SHIFT
from ..variants import VARIANTS, VariantDefaults
from ..files.hub_fetch import HubFetcher
from ..files.jsonfile import read_json
from .transformer import describe_transformer

logger = logging.getLogger("krea2_lite")

# Where the released model's other components live when only a transformer file is given.
DEFAULT_TEXT_ENCODER = "Qwen/Qwen3-VL-4B-Instruct"
DEFAULT_VAE = "Qwen/Qwen-Image"


@dataclass(frozen=True)
class PipelineSpec:
    """Everything needed to load a pipeline, resolved to local paths and checked."""

    transformer: Path
    text_encoder: Path
    vae: Path
    config: Krea2Config          # the transformer's shape (from its headers or manifest)
    quant: QuantSpec | None      # what the transformer is, or will be, quantized to
    variant: str                 # "raw" | "turbo"
    shift: dict = field(default_factory=dict)  # scheduler_config.json's resolution shift, if any
    select_layers: tuple[int, ...] = DEFAULT_SELECT_LAYERS
    defaults: VariantDefaults | None = None    # the folder's own steps / guidance / mu
    default_size: tuple[int, int] = (1024, 1024)  # (width, height)
    revision: str | None = None  # the commit hash the model's hub repo was loaded at (None: a local model)


def _json_if_present(path: Path, what: str) -> dict:
    """A JSON object, {} when the file does not exist; a damaged one is a JsonFileError naming it."""
    return read_json(path, what=what, default={})


def _is_model_folder(path: Path) -> bool:
    return path.is_dir() and ((path / "model_index.json").is_file() or (path / "krea2_lite.json").is_file())


def _open_root(path_or_hub_id, hub: HubFetcher, revision: str | None) -> tuple[Path | None, dict, dict]:
    """(root, model_index.json, krea2_lite.json) of what the user named (None: nothing named)."""
    if path_or_hub_id is None:
        return None, {}, {}
    if os.fspath(path_or_hub_id) == "demo" and not _is_model_folder(Path("demo")):
        from ..demo import demo_path  # the trained miniature shipped with the package

        if Path("demo").exists():
            logger.warning("krea2_lite: ./demo is not a model folder; loading the shipped demo model "
                           "(pass ./demo/ to mean the local entry)")
        path_or_hub_id = demo_path()
    root = hub.resolve(path_or_hub_id, revision)  # a hub repo: its small files only, for now
    if not root.is_dir():
        return root, {}, {}
    return (root, _json_if_present(root / "model_index.json", "model_index.json"),
            _json_if_present(root / "krea2_lite.json", "quantized-folder manifest"))


def _components(root: Path | None, index: dict, manifest: dict, transformer, text_encoder, vae):
    """(transformer, text_encoder, vae, pipeline root or None, index) as named or found in the root."""
    if manifest:  # a folder written by `python -m krea2_lite.quantize`
        components = manifest.get("components", {})
        pipeline = components.get("pipeline", {}) if isinstance(components, dict) else None
        if not isinstance(pipeline, dict):
            raise CorruptCheckpointError(f"{root / 'krea2_lite.json'}: 'components' must map names to JSON "
                                         "objects (the manifest was edited or is damaged)")
        index = dict(pipeline)
        if manifest.get("variant") not in (None, "raw", "turbo"):
            raise CorruptCheckpointError(f"{root / 'krea2_lite.json'}: 'variant' must be \"raw\", \"turbo\" or null, "
                                         f"found {manifest.get('variant')!r:.40}")
        if manifest.get("variant"):  # what `quantize --variant` recorded wins over the source's own flag
            turbo = manifest["variant"] == "turbo"
            if isinstance(index.get("is_distilled"), bool) and index["is_distilled"] != turbo:
                index.pop("krea2_lite", None)  # the source's own steps / CFG were for the other variant
            index["is_distilled"] = turbo
        transformer = transformer or root
    if root is not None and not index and not manifest:
        if transformer is not None:
            raise ValueError(f"{root}: not a diffusers pipeline folder (no model_index.json), and "
                             "transformer= was given as well; pass one or the other")
        transformer, root = root, None
    if transformer is None:
        transformer = root / "transformer" if root is not None else None
    if transformer is None:
        raise ValueError("nothing to load: pass a pipeline folder / hub id, or transformer=")
    if root is not None:
        vae = vae or root / "vae"
        if text_encoder is None:
            text_encoder = root / "text_encoder"
            if not text_encoder.exists():
                raise CheckpointNotFoundError(f"{root}: no text_encoder/ folder; pass text_encoder=")
    return transformer, text_encoder, vae, root, index


def _variant(variant: str | None, index: dict, root) -> str:
    if variant is not None:
        return variant
    if "is_distilled" in index:
        if not isinstance(index["is_distilled"], bool):
            raise ValueError(f"{root}: model_index.json 'is_distilled' must be true or false, "
                             f"got {index['is_distilled']!r}")
        return "turbo" if index["is_distilled"] else "raw"
    logger.warning("krea2_lite: the checkpoint does not say whether it is Raw or Turbo; using Raw's "
                   "defaults (52 steps, CFG 3.5). Pass variant='turbo' for Turbo.")
    return "raw"


def _resolve_vae(vae, hub: HubFetcher) -> Path:
    path = hub.resolve(DEFAULT_VAE, small=["vae/*.json"]) / "vae" if vae is None else hub.resolve(vae)
    if hub.where(path) and path.suffix.lower() == ".safetensors":  # one file of a hub repo: it and its config
        hub.need(path)
        path = path.parent
    if not path.exists():
        raise CheckpointNotFoundError(f"{path}: VAE folder not found")
    return path


def resolve_pipeline(path_or_hub_id=None, *, variant: str | None = None, quant=None, transformer=None,
                     text_encoder=None, vae=None, revision: str | None = None, progress: bool = True) -> PipelineSpec:
    """Resolve `from_pretrained`'s arguments into a PipelineSpec (see the module docstring). Hub
    references are fetched by need (`files.hub_fetch`): small files first, then exactly the weights
    this load reads, announced (unless `progress` is False) before the first large file."""
    hub = HubFetcher(progress=progress)
    root, index, manifest = _open_root(path_or_hub_id, hub, revision)
    transformer, text_encoder, vae, root, index = _components(root, index, manifest, transformer, text_encoder, vae)
    transformer = hub.resolve(transformer, revision if path_or_hub_id is None else None)
    described = None if hub.where(transformer) else describe_transformer(transformer, quant)  # named: checked first
    text_encoder, vae = hub.resolve(text_encoder or DEFAULT_TEXT_ENCODER), _resolve_vae(vae, hub)
    for path, part in ((transformer, "transformer"), (text_encoder, "text_encoder"), (vae, "vae")):
        hub.need(path, parts=(part,))
    hub.fetch()
    config, spec = described or describe_transformer(transformer, quant)
    # A folder's own sampling defaults and native size (the demo's), validated (checks.py).
    own = folder_defaults(index.get("krea2_lite") or {}, str(root or transformer))
    defaults = None
    if variant is None and "steps" in own and "guidance" in own:
        defaults = VariantDefaults(steps=int(own["steps"]), guidance=float(own["guidance"]), mu=own.get("mu"))
    shift = {}
    if root is not None:
        scheduler_file = root / "scheduler" / "scheduler_config.json"
        scheduler = _json_if_present(scheduler_file, "scheduler config")
        shift = check_shift({k: scheduler[k] for k in DEFAULT_SHIFT if k in scheduler}, str(scheduler_file))
    model_repo = hub.where(root if root is not None else transformer)
    return PipelineSpec(
        transformer=transformer, text_encoder=text_encoder, vae=vae, config=config, quant=spec,
        variant=_variant(variant, index, root), shift=shift,
        select_layers=tuple(index.get("text_encoder_select_layers") or DEFAULT_SELECT_LAYERS),
        defaults=defaults, default_size=(int(own.get("width", 1024)), int(own.get("height", 1024))),
        revision=model_repo[0].commit if model_repo else None)
