"""What keeps a run from destroying its own good work: the divergence guard and the run folder's
first-step guard.

A run stops, with a message that names the cause and the last healthy checkpoint, when

- the loss or the gradient norm is not finite (before the optimizer touches the weights);
- the weights are not finite after an update (before anything is saved);
- it collapsed: the gradient norm is 0 for `patience` steps in a row, or a token loss sits at
  ln(vocab) (uniform predictions) for `patience` steps after the run had been well below it;
- the loss is far above its running minimum for `patience` steps in a row (a spike that does
  not recover): its moving average exceeds `spike_factor` × the lowest moving average + 1.

A checkpoint written inside a suspicious streak is marked unhealthy, and pruning keeps the newest
healthy ones (see checkpoint.prune). When the guard stops a run whose trouble first showed at step F,
the weights of step F − 1 already produced it: the checkpoints from step F − 1 on are moved aside
(`checkpoints/diverged-step-N`, kept for a look) so that `resume=true` continues from a healthy one.
"""
from __future__ import annotations

import contextlib
import math
import shutil
from pathlib import Path

import torch


class TrainError(RuntimeError):
    """The run cannot go on (NaN loss, a run folder that would be overwritten, ...)."""


class Diverged(TrainError):
    """The guard stopped a run that diverged or collapsed. `first_bad` is the first step whose loss
    showed it: the weights of step first_bad − 1 (that update produced them) are already suspect."""

    def __init__(self, cause: str, step: int, first_bad: int, hint: str):
        self.cause, self.step, self.first_bad, self.hint = cause, step, first_bad, hint
        super().__init__(f"training stopped at step {step}: {cause}")


def weights_finite(params: list[torch.nn.Parameter]) -> bool:
    """Whether every trainable weight is finite (one fused norm pass; DTensors by their shard)."""
    local = [p.detach().to_local() if hasattr(p, "to_local") else p.detach() for p in params]
    local = [t for t in local if t.numel()]
    if not local:
        return True
    norms = torch._foreach_norm(local)
    return bool(torch.isfinite(torch.stack([n.float() for n in norms]).sum()))


class DivergenceGuard:
    """Watches one run's losses, gradient norms and weights; raises Diverged with the cause.

    `token_loss`: the loss is a mean token cross-entropy (SFT), so ln(vocab) means uniform
    predictions. `spikes`: the loss should trend down (not GRPO's policy loss, which hovers at 0).
    `patience` = 0 turns off the collapse and spike rules (non-finite values always stop a run)."""

    def __init__(self, *, vocab_size: int, token_loss: bool, spikes: bool = True, patience: int = 3,
                 spike_factor: float = 2.0):
        self.uniform = math.log(vocab_size) if token_loss and vocab_size > 1 else None
        self.spikes, self.patience, self.spike_factor = spikes, patience, spike_factor
        self.streaks = {"zero_grad": 0, "uniform": 0, "spike": 0}
        self.ema = self.min_ema = self.min_loss = None

    @property
    def healthy(self) -> bool:
        """No warning sign in progress: a checkpoint written now may be kept as healthy."""
        return not any(self.streaks.values())

    def check_loss(self, loss: float, step: int) -> None:
        if not math.isfinite(loss):
            raise Diverged(f"loss is {loss}, before the weights were updated", step, step,
                           "lower train.lr, check the data")

    def check_grad(self, norm: float, step: int) -> None:
        if not math.isfinite(norm):
            raise Diverged(f"gradient norm is {norm}, before the weights were updated", step, step,
                           "lower train.lr or set train.max_grad_norm")

    def check_weights(self, params, step: int, reduce=float) -> None:
        """After the update of `step`; `reduce` sums a number over ranks (shards differ under FSDP)."""
        if reduce(float(not weights_finite(params))) > 0:
            raise Diverged("the update made weights non-finite (NaN/Inf); nothing was saved from them", step,
                           step + 1, "lower train.lr")

    def _count(self, name: str, bad: bool, step: int, cause, hint: str) -> None:
        self.streaks[name] = self.streaks[name] + 1 if bad else 0
        if self.patience and self.streaks[name] >= self.patience:
            raise Diverged(cause(), step, step - self.streaks[name] + 1, hint)

    def observe(self, loss: float, norm: float, step: int, *, expect_grad: bool = True) -> None:
        """After a finite step: update the streaks; stop on a collapse or an unrecovered spike."""
        self._count("zero_grad", expect_grad and norm == 0.0, step,
                    lambda: f"the gradient norm has been 0 for {self.patience} steps (loss {loss:.4f}): "
                            "the model collapsed and no longer learns", "lower train.lr")
        self.min_loss = loss if self.min_loss is None else min(self.min_loss, loss)
        if self.uniform is not None:
            knew_better = self.min_loss < 0.9 * self.uniform
            self._count("uniform", knew_better and abs(loss - self.uniform) < 0.02 * self.uniform, step,
                        lambda: f"the loss has sat at ln(vocab) = {self.uniform:.2f} (uniform predictions) for "
                                f"{self.patience} steps after reaching {self.min_loss:.4f}: the model collapsed",
                        "lower train.lr")
        if self.spikes:
            self.ema = loss if self.ema is None else 0.7 * self.ema + 0.3 * loss
            self.min_ema = self.ema if self.min_ema is None else min(self.min_ema, self.ema)
            self._count("spike", self.ema > self.spike_factor * max(self.min_ema, 0.0) + 1.0, step,
                        lambda: f"the loss ({loss:.4f}, moving average {self.ema:.4f}) has stayed far above its "
                                f"running minimum ({self.min_ema:.4f}) for {self.patience} steps: the run diverged",
                        "lower train.lr or raise train.warmup")


def stopped(run_dir: Path, error: Diverged, note=print, main: bool = True) -> TrainError:
    """Set aside the checkpoints the divergence may have reached (step ≥ first_bad − 1; the main
    process does it) and say which healthy checkpoint a resume continues from."""
    from . import checkpoint as ckpt

    moved = ckpt.set_aside_from(run_dir, error.first_bad - 1) if main else []
    if moved:
        note(f"[tunesmith] set aside {len(moved)} checkpoint(s) written as the run diverged: "
             f"{', '.join(p.name for p in moved)}")
    last = ckpt.latest_checkpoint(run_dir)
    if last is None:
        return TrainError(f"{error}; no healthy checkpoint was written: start again ({error.hint})")
    return TrainError(f"{error}; last healthy checkpoint: {last} (resume=true continues from it; {error.hint})")


@contextlib.contextmanager
def run_folder(run_dir: Path, main: bool = True):
    """Create the run folder; if the run fails before its first step (`started()` not yet called),
    remove it again when this run created it, so a typo leaves nothing behind."""
    run_dir = Path(run_dir)
    created = main and not run_dir.exists()
    state = {"started": False}
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
    try:
        yield lambda: state.update(started=True)
    except BaseException:
        if created and not state["started"]:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
