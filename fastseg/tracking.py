"""What a user sees of a run: progress while an epoch trains, and the Weights & Biases run.

- :class:`Progress` draws a tqdm bar on a terminal and prints a plain line every ``log_every`` steps into a
  log file (a Slurm log), where a bar would leave thousands of carriage-return fragments.
- :class:`Tracker` is the wandb run. It never shows a login prompt (a batch job would hang on it), and a
  failing wandb prints one warning and turns the tracker into a no-op: losing the dashboard must never stop
  a training run.
- :func:`read_dotenv` loads the project's git-ignored ``.env`` (``WANDB_API_KEY=...``, see .env.example).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch

from fastseg.errors import UserError

DOTENV = Path(__file__).resolve().parents[1] / ".env"  # beside train.py, whatever the working directory


def _rank_zero() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


class Progress:
    """One epoch's progress: loss, learning rate and images/s, shown by rank 0 only.

    ``update(loss=, lr=, images_per_s=)`` is called once per step. The loss may be a GPU tensor: it is read
    (a host sync) only when a value is shown, every ``log_every`` steps in a log file and at most twice a
    second on a terminal.
    """

    def __init__(self, total: int, desc: str = "", *, enabled: bool | None = None, log_every: int = 50,
                 initial: int = 0, stream: TextIO | None = None):
        self.total, self.desc, self.log_every, self.step = total, desc, log_every, initial
        self.enabled = _rank_zero() if enabled is None else enabled
        self._stream = stream if stream is not None else sys.stdout
        self._bar = None
        self._shown = 0.0
        if self.enabled and self._stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, file=self._stream, dynamic_ncols=True)

    def update(self, loss: float | torch.Tensor, lr: float, images_per_s: float) -> None:
        if not self.enabled:
            return
        self.step += 1
        if self._bar is not None:
            self._bar.update(1)
            if time.monotonic() - self._shown >= 0.5:
                self._bar.set_postfix_str(_values(loss, lr, images_per_s))
                self._shown = time.monotonic()
        elif self.step % self.log_every == 0 or self.step == self.total:
            line = f"{self.desc} step {self.step}/{self.total} {_values(loss, lr, images_per_s)}"
            print(line.lstrip(), file=self._stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _values(loss: float | torch.Tensor, lr: float, images_per_s: float) -> str:
    return f"loss {float(loss):.4f} lr {lr:.1e} {images_per_s:.1f} img/s"


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


class Tracker:
    """The run's wandb log on rank 0; a no-op elsewhere, when ``mode`` is ``disabled`` or after wandb failed.

    ``mode``: ``auto`` logs online when ``WANDB_API_KEY`` is set and offline (into ``dir``; ``wandb sync``
    uploads it later) when not; ``online`` without any stored credentials warns and logs offline too.
    ``run_id`` (kept in checkpoints) makes a resumed stage continue the same wandb run. After construction
    ``mode`` says what is really in use.
    """

    def __init__(self, mode: str = "auto", project: str = "fast-scnn-cityscapes", name: str | None = None,
                 group: str | None = None, config: Mapping[str, Any] | None = None,
                 dir: str | os.PathLike | None = None, enabled: bool | None = None, run_id: str | None = None):
        self.run_id = run_id  # kept when wandb fails, so the checkpoint can still resume the run later
        self._run = None
        self._images: list = []
        if enabled is None:
            enabled = _rank_zero()
        if mode == "auto":
            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        self.mode = mode if enabled else "disabled"
        if self.mode == "disabled":
            return
        try:
            import wandb

            # Without credentials an online init would ask for a key on a terminal, or fail without one.
            if self.mode == "online" and not wandb.login(prompt=False, verify=False):
                _warn("wandb: no WANDB_API_KEY (environment or .env) and no stored login; logging offline")
                self.mode = "offline"
            if dir is not None:
                Path(dir).mkdir(parents=True, exist_ok=True)

            def init(mode: str):
                return wandb.init(
                    project=project, name=name, group=group, mode=mode, dir=None if dir is None else str(dir),
                    config=json.loads(json.dumps(dict(config or {}), default=str)),  # paths and dtypes as text
                    id=run_id, resume="allow" if run_id else None,
                )

            try:
                self._run = init(self.mode)
            except Exception as exc:
                if self.mode != "online":
                    raise
                # Compute nodes are often offline: keep the run on disk for `wandb sync` instead.
                _warn(f"wandb: online init failed ({type(exc).__name__}); logging offline, `wandb sync` uploads it")
                self.mode = "offline"
                self._run = init(self.mode)
            self.run_id = self._run.id
        except Exception as exc:  # tracking must never stop training
            self._fail("init", exc)

    def _fail(self, what: str, exc: BaseException) -> None:
        reason = " ".join(str(exc).split())  # one line, whatever wandb's message looks like
        _warn(f"wandb {what} failed ({type(exc).__name__}: {reason}); training goes on without tracking")
        self._run, self._images = None, []
        self.mode = "disabled"

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log scalars at ``step`` (``None`` values are left out), with the images :meth:`val_batch_hook` kept."""
        if self._run is None:
            return
        data = {k: v for k, v in metrics.items() if v is not None}
        if self._images:
            data["val/predictions"], self._images = self._images, []
        try:
            self._run.log(data, step=step)
        except Exception as exc:
            self._fail("log", exc)

    def log_per_class(self, per_class_iou: Sequence[float | None], step: int) -> None:
        """One ``val_iou/<class>`` scalar per class; classes absent from the split (``None``) are left out."""
        from fastseg.cityscapes import CLASS_NAMES

        self.log({f"val_iou/{name}": iou for name, iou in zip(CLASS_NAMES, per_class_iou)}, step)

    def val_batch_hook(self, epoch: int, max_images: int = 4) -> Callable | None:
        """``hook(indices, logits, images, labels)`` for ``engine.evaluate``: keeps image | label | prediction
        panels of the split's first ``max_images`` images (the same ones every epoch: validation is not
        shuffled) for the next :meth:`log`. ``None`` when nothing is tracked, so validation skips it.
        """
        if self._run is None:
            return None
        import wandb

        self._images = []

        def hook(indices, logits: torch.Tensor, images: torch.Tensor, labels: torch.Tensor) -> None:
            if self._run is None or len(self._images) >= max_images:
                return
            preds = logits.argmax(1)
            try:
                for i in range(min(len(images), max_images - len(self._images))):
                    index = int(indices[i]) if indices is not None else len(self._images)
                    panel = prediction_panel(images[i], labels[i], preds[i])
                    self._images.append(wandb.Image(panel, caption=f"epoch {epoch + 1}, val image {index}"))
            except Exception as exc:
                self._fail("image", exc)

        return hook

    def summary(self, values: Mapping[str, Any]) -> None:
        if self._run is None:
            return
        try:
            self._run.summary.update(dict(values))
        except Exception as exc:
            self._fail("summary", exc)

    def finish(self) -> None:
        """Close the run (uploads or writes what is left); safe to call twice."""
        run, self._run = self._run, None
        if run is None:
            return
        try:
            run.finish()
        except Exception as exc:
            self._fail("finish", exc)


def prediction_panel(image: torch.Tensor, label: torch.Tensor, pred: torch.Tensor,
                     height: int = 256) -> np.ndarray:
    """``image | label | prediction`` side by side as one uint8 array, ``height`` pixels high.

    ``image`` is a normalised 3×h×w tensor (as the model sees it); ``label`` and ``pred`` are H×W train ids.
    """
    from PIL import Image

    from fastseg.cityscapes import MEAN, STD, colorize

    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    rgb = ((image.detach().float().cpu() * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0)
    size = (max(1, round(label.shape[1] * height / label.shape[0])), height)
    tiles = [Image.fromarray(rgb.numpy()).resize(size, Image.BILINEAR)]
    for ids in (label, pred):
        tiles.append(Image.fromarray(colorize(ids.cpu().numpy())).resize(size, Image.NEAREST))
    return np.concatenate([np.asarray(tile) for tile in tiles], axis=1)


def read_dotenv(path: str | os.PathLike = DOTENV) -> None:
    """Export the ``KEY=VALUE`` lines of ``path`` (if it exists) that the environment does not set already.

    Blank lines and ``#`` comments are skipped; ``export KEY=VALUE``, ``KEY='value'`` and ``KEY="value"`` are
    understood, and so is ``KEY=value  # comment``. An empty value means unset (``WANDB_API_KEY=`` copied from
    .env.example is no key), in the file as in the environment. Any other line is a user error.
    """
    path = Path(path)
    if not path.is_file():
        return
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.removeprefix("export ").partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key.isidentifier():
            raise UserError(f"{path}, line {number}: expected KEY=VALUE, got {line!r}; fix or delete the line")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        else:
            value = value.split(" #", 1)[0].rstrip()
        if value and not os.environ.get(key):
            os.environ[key] = value
