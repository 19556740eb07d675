"""Progress output and Weights & Biases tracking, both safe to use on every rank.

- :class:`Progress` draws a tqdm bar when stdout is a terminal and writes plain periodic lines when it is
  a file (a Slurm log), where a bar would leave thousands of carriage-return fragments.
- :class:`Tracker` wraps wandb: ``auto`` logs online when ``WANDB_API_KEY`` is set and offline otherwise, and
  no mode ever shows a login prompt (a batch job would hang on it). Any wandb failure prints one warning and
  the tracker carries on as a no-op: losing the dashboard must never stop a training run.
- :func:`read_dotenv` loads a git-ignored ``.env`` (``WANDB_API_KEY=...``) for direct ``python train.py`` runs.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch

from fastseg.errors import UserError

MODES = ("auto", "online", "offline", "disabled")


def _is_main_process() -> bool:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def _number(value: Any) -> float | None:
    if value is None:
        return None
    # Tensors are read only here, when a line is shown, so the training loop does not wait on the GPU.
    return float(value.detach()) if isinstance(value, torch.Tensor) else float(value)


class Progress:
    """Per-epoch progress: a tqdm bar on a terminal, plain lines in a log file, nothing on other ranks.

    ``update(loss=, lr=, images_per_s=)`` advances one step; a value left as ``None`` keeps the last one
    shown (the loss may be a tensor and is read only when displayed). In a log file a line such as
    ``epoch 3/10 step 120/500 loss 0.4312 lr 8.1e-04 42.1 img/s`` appears every ``log_every`` steps and at
    least every ``interval_s`` seconds, and :meth:`close` always writes a final line for the epoch.
    """

    def __init__(
        self,
        total: int,
        desc: str = "",
        *,
        enabled: bool | None = None,
        log_every: int | None = None,
        interval_s: float = 30.0,
        initial: int = 0,
        stream: TextIO | None = None,
        tty: bool | None = None,
    ):
        self.total = total
        self.desc = desc
        self.enabled = _is_main_process() if enabled is None else enabled
        self.log_every = log_every
        self.interval_s = interval_s
        self.step = initial
        self._stream = stream if stream is not None else sys.stdout
        self._tty = tty if tty is not None else bool(getattr(self._stream, "isatty", lambda: False)())
        self._loss: Any = None
        self._lr: float | None = None
        self._images_per_s: float | None = None
        self._images = 0
        self._start = self._last_line = self._last_postfix = time.perf_counter()
        self._closed = False
        self._bar = None
        if self.enabled and self._tty:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total, initial=initial, desc=desc, file=self._stream, dynamic_ncols=True, leave=True
            )

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(
        self,
        n: int = 1,
        *,
        loss: Any = None,
        lr: float | None = None,
        images_per_s: float | None = None,
        images: int | None = None,
    ) -> None:
        """Advance ``n`` steps. ``images`` (per step) lets the bar work out images/s itself."""
        if not self.enabled:
            return
        self.step += n
        if loss is not None:
            self._loss = loss
        if lr is not None:
            self._lr = lr
        if images is not None:
            self._images += images
        if images_per_s is not None:
            self._images_per_s = images_per_s
        now = time.perf_counter()
        if self._bar is not None:
            # The postfix is redrawn at tqdm's pace, not every step: reading a tensor loss waits on the GPU.
            if now - self._last_postfix >= 0.5 or self.step >= self.total:
                self._bar.set_postfix_str(self._values(), refresh=False)
                self._last_postfix = now
            self._bar.update(n)
            return
        due = self.log_every is not None and self.step % self.log_every == 0
        if due or now - self._last_line >= self.interval_s:
            self._print(f"{self._prefix()}step {self.step}/{self.total} {self._values()}")

    def write(self, message: str) -> None:
        """Print a line without breaking the bar (rank 0 only)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message, file=self._stream)
        else:
            self._print(message)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix_str(self._values(), refresh=False)
            self._bar.close()
            return
        elapsed = time.perf_counter() - self._start
        self._print(
            f"{self._prefix()}finished {self.step}/{self.total} steps in {elapsed:.1f}s {self._values()}".rstrip()
        )

    def _prefix(self) -> str:
        return f"{self.desc} " if self.desc else ""

    def _values(self) -> str:
        parts = []
        loss = _number(self._loss)
        if loss is not None:
            parts.append(f"loss {loss:.4f}")
        if self._lr is not None:
            parts.append(f"lr {self._lr:.1e}")
        rate = self._images_per_s
        if rate is None and self._images:
            rate = self._images / max(time.perf_counter() - self._start, 1e-9)
        if rate is not None:
            parts.append(f"{rate:.1f} img/s")
        return " ".join(parts)

    def _print(self, line: str) -> None:
        print(line, file=self._stream, flush=True)
        self._last_line = time.perf_counter()


def resolve_mode(mode: str, env: Mapping[str, str] | None = None) -> str:
    """The wandb mode to use: ``auto`` becomes ``online`` with an API key, ``offline`` without.

    An explicit ``WANDB_MODE`` in the environment is honoured by ``auto`` (so ``WANDB_MODE=disabled`` works).
    """
    env = os.environ if env is None else env
    if mode not in MODES:
        raise UserError(f"--wandb: unknown mode {mode!r}; use one of {', '.join(MODES)}")
    if mode != "auto":
        return mode
    from_env = env.get("WANDB_MODE", "").strip().lower()
    if from_env in ("online", "offline", "disabled"):
        return from_env
    if from_env == "dryrun":
        return "offline"
    return "online" if env.get("WANDB_API_KEY") else "offline"


def _plain(config: Mapping[str, Any] | None) -> dict:
    # wandb stores only JSON-like values; Paths, dtypes and the like become strings.
    return json.loads(json.dumps(dict(config or {}), default=str))


class Tracker:
    """Weights & Biases run, or a no-op when disabled, on non-zero ranks, or after wandb failed.

    ``run_id`` (stored in checkpoints) makes a requeued job continue the same run: it is passed to
    ``wandb.init(id=..., resume="allow")``. ``mode`` after construction is what is really in use.
    """

    def __init__(
        self,
        mode: str = "auto",
        project: str = "fast-scnn-cityscapes",
        name: str | None = None,
        group: str | None = None,
        config: Mapping[str, Any] | None = None,
        dir: str | os.PathLike | None = None,
        enabled: bool | None = None,
        run_id: str | None = None,
        job_type: str | None = None,
    ):
        self.mode = resolve_mode(mode)
        self._run_id = run_id
        self._run = None
        self._wandb = None
        self._pending: dict[str, Any] = {}
        if enabled is None:
            enabled = _is_main_process()
        if not enabled or self.mode == "disabled":
            self.mode = "disabled"
            return
        try:
            import wandb

            self._wandb = wandb
            if self.mode == "online" and not os.environ.get("WANDB_API_KEY") and not self._has_credentials():
                print(
                    "warning: wandb: no API key (set WANDB_API_KEY in the environment or .env); logging offline",
                    file=sys.stderr,
                    flush=True,
                )
                self.mode = "offline"
            if dir is not None:
                Path(dir).mkdir(parents=True, exist_ok=True)
            self._run = wandb.init(
                project=project,
                name=name,
                group=group,
                job_type=job_type,
                config=_plain(config),
                dir=str(dir) if dir is not None else None,
                mode=self.mode,
                id=run_id,
                resume="allow" if run_id else None,
            )
            self._run_id = self._run.id
        except Exception as exc:  # tracking must never stop training
            self._fail("init", exc)

    def _has_credentials(self) -> bool:
        """Whether wandb already has credentials (.netrc, settings), checked without any prompt."""
        try:
            return bool(self._wandb.login(prompt=False, verify=False))
        except TypeError:  # a wandb without `prompt=`: trust only the environment
            return False

    @property
    def active(self) -> bool:
        return self._run is not None

    @property
    def run_id(self) -> str | None:
        """The run's id, or the one given when no run could be started (so it is not lost on resume)."""
        return self._run_id

    @property
    def run_dir(self) -> str | None:
        return getattr(self._run, "dir", None) if self._run is not None else None

    def _fail(self, what: str, exc: BaseException) -> None:
        print(
            f"warning: wandb {what} failed ({type(exc).__name__}: {exc}); training goes on without tracking",
            file=sys.stderr,
            flush=True,
        )
        self._run = None
        self._pending.clear()
        self.mode = "disabled"

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log scalars (and any staged images) at ``step``. ``None`` and NaN values are skipped."""
        if self._run is None:
            return
        data = {k: v for k, v in metrics.items() if v is not None and not _is_nan(v)}
        pending, self._pending = self._pending, {}
        try:
            for key, (images, labels, preds, captions) in pending.items():
                data[key] = [
                    self._wandb.Image(prediction_panel(img, lab, pred), caption=cap)
                    for img, lab, pred, cap in zip(images, labels, preds, captions)
                ]
        except Exception as exc:
            # Pictures are a nicety: without them the scalars still go out.
            print(
                f"warning: wandb images not logged ({type(exc).__name__}: {exc})", file=sys.stderr, flush=True
            )
            data = {k: v for k, v in data.items() if k not in pending}
        try:
            self._run.log(data, step=step)
        except Exception as exc:
            self._fail("log", exc)

    def log_per_class(
        self,
        per_class_iou: Sequence[float | None],
        step: int | None = None,
        prefix: str = "val_iou/",
        names: Sequence[str] | None = None,
    ) -> None:
        """One scalar per class, named by class; classes absent from the split (``None``) are skipped."""
        if self._run is None:
            return
        names = names or _class_names(len(per_class_iou))
        self.log({f"{prefix}{name}": v for name, v in zip(names, per_class_iou)}, step=step)

    def log_images(
        self,
        images: torch.Tensor | np.ndarray,
        labels: torch.Tensor | np.ndarray,
        preds: torch.Tensor | np.ndarray,
        step: int | None = None,
        key: str = "val/predictions",
        captions: Sequence[str] | None = None,
    ) -> None:
        """Log image | colour-coded label | colour-coded prediction side by side, one panel per image.

        ``images`` are N×3×h×w (normalised floats or uint8), ``labels`` and ``preds`` N×H×W train ids. With
        ``step=None`` the panels go out with the next :meth:`log` call, at that call's step.
        """
        if self._run is None:
            return
        captions = list(captions) if captions is not None else [None] * len(images)
        self._pending[key] = (images, labels, preds, captions)
        if step is not None:
            self.log({}, step=step)

    def val_batch_hook(
        self, epoch: int | None = None, max_images: int = 4
    ) -> Callable[[Any, torch.Tensor, torch.Tensor, torch.Tensor], None] | None:
        """A callback for validation, ``hook(indices, logits, images, labels)``, that keeps the first
        ``max_images`` images of the (unshuffled, hence fixed) split and stages their panels for the next
        :meth:`log`. ``None`` when nothing is tracked, so the caller can skip it entirely.
        """
        if self._run is None:
            return None
        kept: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []

        def hook(indices: Any, logits: torch.Tensor, images: torch.Tensor, labels: torch.Tensor) -> None:
            if len(kept) >= max_images:
                return
            preds = logits.argmax(1)
            for i in range(min(len(images), max_images - len(kept))):
                index = int(indices[i]) if indices is not None else len(kept)
                kept.append(
                    (index, images[i].detach().cpu(), labels[i].detach().cpu(), preds[i].detach().cpu())
                )
            tag = f"epoch {epoch + 1} " if epoch is not None else ""
            # Staged, not drawn: the panels are drawn once, by the next log(), however many batches came.
            self.log_images(
                [k[1] for k in kept],
                [k[2] for k in kept],
                [k[3] for k in kept],
                captions=[f"{tag}val image {k[0]}: image | label | prediction" for k in kept],
            )

        return hook

    def summary(self, values: Mapping[str, Any]) -> None:
        if self._run is None:
            return
        try:
            self._run.summary.update(dict(values))
        except Exception as exc:
            self._fail("summary", exc)

    def finish(self) -> None:
        """Flush staged images and close the run; safe to call twice."""
        if self._run is None:
            return
        if self._pending:
            self.log({})
        run, self._run = self._run, None
        try:
            run.finish()
        except Exception as exc:
            self._fail("finish", exc)


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _class_names(n: int) -> list[str]:
    try:
        from fastseg.cityscapes import CLASS_NAMES

        if len(CLASS_NAMES) == n:
            return list(CLASS_NAMES)
    except ImportError:
        pass
    return [f"class_{i}" for i in range(n)]


def prediction_panel(
    image: torch.Tensor | np.ndarray,
    label: torch.Tensor | np.ndarray,
    pred: torch.Tensor | np.ndarray,
    max_height: int = 384,
) -> np.ndarray:
    """``image | label | prediction`` as one uint8 H×3W×3 array at the label's size (capped at ``max_height``).

    A float image is taken as normalised with ``fastseg.data.MEAN``/``STD`` and mapped back to colours.
    """
    from PIL import Image

    from fastseg.cityscapes import MEAN, STD, colorize

    image = torch.as_tensor(np.asarray(image) if isinstance(image, np.ndarray) else image).detach().cpu()
    if image.dtype != torch.uint8:
        mean = torch.as_tensor(MEAN, dtype=torch.float32).view(3, 1, 1)
        std = torch.as_tensor(STD, dtype=torch.float32).view(3, 1, 1)
        image = ((image.float() * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)
    rgb = image.permute(1, 2, 0).contiguous().numpy()
    label_np = np.asarray(torch.as_tensor(label).cpu(), dtype=np.uint8)
    pred_np = np.asarray(torch.as_tensor(pred).cpu(), dtype=np.uint8)
    h, w = label_np.shape
    if h > max_height:
        h, w = max_height, max(1, round(w * max_height / h))
    size = (w, h)
    tiles = [
        np.asarray(Image.fromarray(rgb).resize(size, Image.BILINEAR)),
        np.asarray(Image.fromarray(colorize(label_np)).resize(size, Image.NEAREST)),
        np.asarray(Image.fromarray(colorize(pred_np)).resize(size, Image.NEAREST)),
    ]
    return np.concatenate(tiles, axis=1)


def read_dotenv(path: str | os.PathLike = ".env") -> dict[str, str]:
    """Load ``KEY=VALUE`` lines from ``path`` into ``os.environ`` without overriding set variables.

    Understands what ``set -a; source .env`` does for simple files: ``export`` prefixes, blank lines,
    ``#`` comments, single or double quotes, and `` # comment`` after an unquoted value. A missing file is
    fine (returns ``{}``); returns the variables it set.
    """
    path = Path(path)
    if not path.is_file():
        return {}
    loaded: dict[str, str] = {}
    for lineno, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not key.replace("_", "a").isalnum() or key[0].isdigit():
            raise UserError(
                f"{path}:{lineno}: expected KEY=VALUE, got {raw.strip()!r}; fix or remove the line"
            )
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        else:
            value = value.split(" #", 1)[0].rstrip()
        if key not in os.environ:
            os.environ[key] = value
            loaded[key] = value
    return loaded
