"""What keeps a bad step out of the weights: non-finite gradients and gradient-norm spikes.

Both decide on the device or once per step on the host, and both are part of what a checkpoint
holds or guarantees, so a resumed run decides as the uninterrupted one would.
"""

import json

import torch


class NonFinite(Exception):
    pass


class SpikeGuard:
    """Skips an update whose gradient norm is a spike: more than `zscore` standard deviations
    above the mean of the last `window` accepted steps' norms (llm.c added such a guard after a
    spike derailed its 1.5B run). Off when zscore is 0; it needs the norm on the host, one sync
    per step. Its history is part of the checkpoint, so a resumed run decides as the whole would."""

    MIN_HISTORY = 10  # no verdict on fewer norms than this (e.g. the first steps of a run)

    def __init__(self, zscore: float, window: int):
        self.zscore, self.window, self.norms, self.skipped = zscore, window, [], 0

    def _stats(self) -> tuple[float, float]:
        mean = sum(self.norms) / len(self.norms)
        return mean, (sum((x - mean) ** 2 for x in self.norms) / len(self.norms)) ** 0.5

    def describe(self) -> str:
        mean, std = self._stats()
        return f"recent mean {mean:.4g}, std {std:.3g}, train.spike_zscore={self.zscore:g}"

    def is_spike(self, x: float) -> bool:
        if not self.zscore:
            return False
        if len(self.norms) >= min(self.MIN_HISTORY, self.window):
            mean, std = self._stats()
            if x > mean + self.zscore * max(std, 1e-6 * mean):
                self.skipped += 1
                return True
        self.norms = (self.norms + [x])[-self.window:]
        return False

    def state_dict(self) -> dict:  # a string: DCP saves it as one object, whatever its length
        return {"guard": json.dumps({"norms": self.norms, "skipped": self.skipped})}

    def load_state_dict(self, state: dict):
        s = json.loads(state["guard"])
        self.norms, self.skipped = s["norms"][-self.window:], s["skipped"]


class NonFiniteSteps:
    """Finds steps whose gradient norm is NaN/inf without a host sync per step. check() runs on
    the device and gives the optimizer's found_inf flag (the update is skipped there); report()
    reads the count only where the host waits anyway (log and checkpoint steps). Under
    on_nonfinite=stop it then ends the run before any save: the updates since the bad step were
    skipped or came after it, and none of them reaches a checkpoint."""

    def __init__(self, device, mode: str, log):
        self.mode, self.log, self.total = mode, log, 0
        self.count = torch.zeros((), dtype=torch.int64, device=device)  # since the last report
        self.first = torch.zeros((), dtype=torch.int64, device=device)  # its first bad step, or 0

    def check(self, grad_norm: torch.Tensor, step: int) -> torch.Tensor:
        bad = ~torch.isfinite(grad_norm)
        self.first = torch.where((self.count == 0) & bad, step, self.first)
        self.count += bad
        return bad.float()

    def report(self, ckpt, metrics):
        n, first = torch.stack([self.count, self.first]).tolist()
        if not n:
            return
        self.count.zero_(), self.first.zero_()
        if self.mode == "stop":
            ckpt.wait()  # the save in flight holds the last good step: commit it first
            metrics.close()
            raise NonFinite(f"non-finite gradient norm at step {first}: stopping; the checkpoints are "
                            f"untouched (train.on_nonfinite=skip skips such batches)")
        self.total += n
        more = f" and {n - 1} more since" if n > 1 else ""
        self.log(f"step {first}{more}: non-finite gradient norm, update skipped ({self.total} so far)", flush=True)
