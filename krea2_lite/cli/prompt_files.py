"""The prompt-file reader lives in `files/prompt_files.py` (training reads sample prompts with it too);
the command lines keep importing it from here."""

from __future__ import annotations

from ..files.prompt_files import (FORMATS, MAX_PROMPT_FILE_BYTES, MAX_PROMPT_LINES, OVERRIDES, check_value,
                                  read_prompt_file)

__all__ = ["FORMATS", "MAX_PROMPT_FILE_BYTES", "MAX_PROMPT_LINES", "OVERRIDES", "check_value", "read_prompt_file"]
