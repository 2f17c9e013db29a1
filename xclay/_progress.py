"""Progress bars: shown on an interactive terminal or notebook (``progress=None``), always
(``True``) or never (``False``)."""

from __future__ import annotations

from typing import Any


def progress_bar(total: int, progress: bool | None, *, desc: str, unit: str) -> Any:
    """A tqdm bar to ``update()``; use it as a context manager."""
    if progress is False:
        # Plain tqdm, not tqdm.auto: importing that in a notebook without ipywidgets warns,
        # even for a bar that is never shown.
        from tqdm import tqdm

        return tqdm(total=total, disable=True)
    from tqdm.auto import tqdm as auto_tqdm

    # tqdm's disable=None: a bar only on an interactive terminal.
    return auto_tqdm(total=total, unit=unit, desc=desc, disable=None if progress is None else False)
