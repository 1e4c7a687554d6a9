"""What the operator configured for the service (the only paths it may touch), checked once."""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from .. import checks


@dataclass(frozen=True)
class ServeConfig:
    model: str
    quant: str | None = None
    dtype: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    replicas: int = 1
    token_sha256: str | None = None  # the token itself never leaves the driver
    lora_dir: str | None = None
    max_batch_size: int = 4
    batch_wait_s: float = 0.05
    max_queue: int = 16
    max_images: int = 4
    max_body_bytes: int = 64 * 1024
    gpus_per_replica: float | None = None
    cpus_per_replica: float = 1.0
    vram_gb: float | None = None
    offload: str = "auto"

    def check(self) -> "ServeConfig":
        checks.check_int("--port", self.port, 1, 65535)
        checks.check_int("--replicas", self.replicas, 1, 1024)
        checks.check_int("--max-batch-size", self.max_batch_size, 1, checks.MAX_IMAGES)
        checks.check_int("--max-queue", self.max_queue, 1, 100_000)
        checks.check_int("--max-images", self.max_images, 1, checks.MAX_IMAGES)
        if self.lora_dir is not None and not Path(self.lora_dir).is_dir():
            raise FileNotFoundError(f"--lora-dir {self.lora_dir}: not a folder")
        return self


def read_token(path: str) -> str:
    """The bearer token in --token-file (first line, stripped); its SHA-256 is what replicas get."""
    try:
        token = Path(path).read_text(encoding="utf-8").strip().splitlines()
    except OSError as exc:
        raise OSError(exc.errno, f"--token-file: cannot read it ({exc.strerror})", path) from None
    if not token or len(token[0]) < 16:
        raise ValueError(f"--token-file {path}: the first line must hold a token of at least 16 characters")
    return token[0]


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
