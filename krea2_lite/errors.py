"""Exception types a user can act on. Each message names the file, key or argument at fault."""

from __future__ import annotations


class Krea2LiteError(Exception):
    """Base class of every error krea2_lite raises on purpose."""


class CheckpointNotFoundError(Krea2LiteError, FileNotFoundError):
    """The path does not exist, or a folder holds no model files."""


class UnsafeCheckpointFormatError(Krea2LiteError, ValueError):
    """A pickle-based file (.ckpt, .pt, .pth, .bin): refused, never unpickled."""


class CorruptCheckpointError(Krea2LiteError, ValueError):
    """A safetensors file that is truncated, empty or has an unreadable header."""


class NotKrea2CheckpointError(Krea2LiteError, ValueError):
    """A readable checkpoint of another model (FLUX, SD, ...)."""


class CheckpointKeysError(Krea2LiteError, KeyError):
    """A Krea 2 checkpoint with missing or unexpected tensors."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class ShapeMismatchError(Krea2LiteError, ValueError):
    """A tensor whose shape disagrees with the config (explicit or inferred)."""


class FormatVersionError(Krea2LiteError, ValueError):
    """A quantized folder written by a newer krea2_lite (or not a krea2_lite folder at all)."""


class DeviceMemoryError(Krea2LiteError, MemoryError):
    """The GPU ran out of memory during generation; the message says where and what to try."""


class MemoryPlanError(Krea2LiteError, MemoryError):
    """No placement of the pipeline fits the device memory budget ("device") or the host RAM ("host")."""

    def __init__(self, message: str, limit: str = "device"):
        super().__init__(message)
        self.limit = limit


class LoraError(Krea2LiteError, ValueError):
    """A LoRA file that does not fit the model (other model, unknown module, rank or shape
    mismatch, unsupported adapter type), or a LoRA name that is not loaded / already loaded."""


class JsonFileError(CorruptCheckpointError):
    """A JSON file we read (model_index.json, config.json, a shard index, a manifest, a tokenizer
    or adapter config) that is unreadable, not JSON, of the wrong JSON type, or missing keys."""


class SafetensorsSetError(CorruptCheckpointError):
    """A set of safetensors files that disagree: one tensor in two files, an index that names a
    tensor its shard lacks, a byte length that does not match shape × dtype, or an integer / bool
    tensor where the model expects floating point."""


class ArgumentError(Krea2LiteError, ValueError):
    """An argument outside its allowed range; the message names it and the range."""


class ArgumentTypeError(ArgumentError, TypeError):
    """An argument of the wrong type (a float seed, a string step count, ...)."""


class UnsafeOutputError(Krea2LiteError, ValueError):
    """An output path that would overwrite or delete the input, a home folder, a filesystem root,
    or a folder krea2_lite did not write."""


class NonFiniteError(Krea2LiteError, FloatingPointError):
    """NaN or inf in a tensor that must be finite; the message names where it came from."""
class MetadataError(Krea2LiteError, ValueError):
    """A PNG without readable krea2_lite metadata (generate --from-png); the message names the file."""


class PromptFileError(Krea2LiteError, ValueError):
    """A prompt file (generate --prompts) that is empty or has a bad line; the message names file and line."""


class HubError(Krea2LiteError):
    """Fetching from the Hugging Face hub failed; the subclass says why, the message what to do."""


class HubAccessError(HubError, PermissionError):
    """A gated or private repo this machine may not read: `reason` is "not-logged-in" (401) or
    "not-approved" (logged in, license not yet accepted / approved: 403)."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


class HubNotFoundError(HubError, CheckpointNotFoundError):
    """No such repo, revision or file on the hub."""


class HubOfflineError(HubError, CheckpointNotFoundError):
    """HF_HUB_OFFLINE=1 and the local cache lacks a file this load reads."""


class HubConnectionError(HubError, ConnectionError):
    """The hub cannot be reached (network down, proxy, server error) and the cache lacks what is needed."""


class DiskSpaceError(HubError, OSError):
    """The files to fetch do not fit the free space of the hub cache's disk (checked before any download)."""


class ImageInputError(ArgumentError):
    """An input image or mask (image=, mask_image=, outpaint=; --image, --mask) that cannot be read or
    does not fit the call (aspect ratio, all-black mask, size); the message names the file or argument."""


class GGUFFileError(CorruptCheckpointError):
    """A GGUF file that cannot be read as stored: truncated, duplicate tensor names, a tensor whose
    bytes do not fit its type and shape. Names the file and the tensor."""


class UnsupportedFormatError(Krea2LiteError, ValueError):
    """A quantized format krea2_lite does not run (an unknown GGUF tensor type, a ComfyUI format such
    as nvfp4 on a card without it). Names the tensor or layer and the format."""
