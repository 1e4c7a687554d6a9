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


class MetadataError(Krea2LiteError, ValueError):
    """A PNG without readable krea2_lite metadata (generate --from-png); the message names the file."""


class PromptFileError(Krea2LiteError, ValueError):
    """A prompt file (generate --prompts) that is empty or has a bad line; the message names file and line."""
