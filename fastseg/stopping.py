"""Stopping a run cleanly: signals become a flag, and every rank agrees on when to stop.

Slurm sends SIGUSR1 (``--signal=B:USR1@300``, forwarded by the job script) before a time limit and SIGTERM on
preemption or ``scancel``; Ctrl-C is SIGINT. Any of them sets a flag; the trainer reads it only through
:func:`agree`, so a signal that reaches one rank (or reaches ranks at different steps) still makes all of them
stop at the same step: a rank that stops alone would leave the others waiting in a collective forever.
"""

from __future__ import annotations

import os
import signal
import sys

import torch
import torch.distributed as dist

from fastseg import distributed

# Exit status after a stop signal; the Slurm job scripts requeue on it (tools/launch.sh).
REQUEUE_EXIT_CODE = 75


class StopFlag:
    """Set by SIGUSR1/SIGTERM/SIGINT. A second Ctrl-C quits at once (KeyboardInterrupt).

    Forked children (data loader workers) inherit the handler; in them the signal is ignored, so they keep
    serving batches until the trainer stops and shuts them down. ``restore`` puts back the earlier handlers.
    """

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signal_name: str | None = None
        self._pid = os.getpid()
        self._previous: dict = {}

    def __call__(self) -> bool:
        return self.signal_name is not None

    def install(self) -> StopFlag:
        self._pid = os.getpid()
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, _frame) -> None:
        if os.getpid() != self._pid:
            return
        if signum == signal.SIGINT and self.signal_name is not None:
            raise KeyboardInterrupt  # asked twice: quit now
        self.signal_name = signal.Signals(signum).name
        again = "; Ctrl-C again to quit at once" if signum == signal.SIGINT else ""
        print(f"received {self.signal_name}: stopping at the next check{again}", file=sys.stderr, flush=True)


def agree(*flags: bool | torch.Tensor, device: torch.device | str = "cpu") -> list[bool]:
    """Each flag, OR-ed over all ranks in one collective: every rank gets the same answers.

    Flags may be Python booleans or 0-d tensors on ``device`` (e.g. "the loss is not finite"), so a check
    costs one all-reduce and one host sync, whatever it checks. Without a process group it is the identity.
    """
    values = torch.stack([torch.as_tensor(f, device=device).reshape(()).float() for f in flags])
    if dist.is_initialized():
        distributed.all_reduce(values, op=dist.ReduceOp.MAX, kind="agree")
    return [bool(v) for v in values.tolist()]
