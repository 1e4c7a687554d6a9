"""The job's one progress bar: images done / total, images per minute (this run), ETA."""

from __future__ import annotations

import time


class JobProgress:
    def __init__(self, total: int, done: int, enabled: bool):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=done, desc="images", unit="image", disable=not enabled,
                        bar_format="{desc}: {n}/{total} |{bar}| {postfix}")
        self.start = time.monotonic()
        self.made = 0
        self._postfix()

    def update(self, count: int) -> None:
        self.made += count
        self.bar.update(count)
        self._postfix()

    def rate(self) -> float:
        """Images per minute made by this run so far."""
        return 60.0 * self.made / max(time.monotonic() - self.start, 1e-9)

    def _postfix(self) -> None:
        left = self.bar.total - self.bar.n
        if self.made:
            eta = left / self.rate() * 60.0
            self.bar.set_postfix_str(f"{self.rate():.1f} images/min, ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}")
        else:
            self.bar.set_postfix_str("starting workers…")

    def close(self) -> None:
        self.bar.close()
