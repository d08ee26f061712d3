"""What every exit method in ``esn/`` shares: running order, offline outputs, costs, dynamic inference.

An exit method is an ``nn.Module`` with

- ``uses_saver``: the saver runs first and is exit 0 (the ESN); otherwise every exit sits inside
  the base (SDN, ZTW, gates), as in their papers;
- ``num_exits``: one exit after each base stage of the shared stage split (`esn.staged`);
- ``offline(feats)`` → (num_exits, B, K) logits from cached features (`esn.train.frozen_features`);
- ``begin(saver_feat, saver_logits)`` → state, ``step(n, stage_out, state)`` → (logits (B, K), state)
  and ``select(state, keep)`` → state of the rows still open: dynamic inference, stage by stage;
- optionally ``score(n, logits)`` → (B,), the value thresholds apply to. The default is the
  max softmax of ``logits / T`` (T = 1 unless calibrated); learned gates return their exit probability.

Exits in running order: [the saver], exit 1 … N, then the base head, which answers the rest. Every
method goes through the same `ExitPolicy`, so offline evaluation and dynamic
inference apply one rule.
"""
from __future__ import annotations

import numpy as np
import torch

from tinysaver import engine
from tinysaver.calibration import fit_temperature
from tinysaver.decoding import take_images
from tinysaver.errors import UsageError
from tinysaver.measure import count_flops, flop_counter
from tinysaver.policy import confidence

from .staged import saver_outputs


def _confidence(logits: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    conf, pred = confidence(logits, temperature)
    return pred, conf


def exit_score(method, e: int, logits: torch.Tensor, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(prediction, score) of running-order exit ``e`` from its (B, K) logits."""
    n = e if method.uses_saver else e + 1  # the base stage this exit follows (0 = the saver)
    pred, conf = _confidence(logits, temperature)
    if n > 0 and hasattr(method, "score"):
        conf = method.score(n, logits)
    return pred, conf


def all_logits(method, feats: dict) -> torch.Tensor:
    """(E, B, K) logits of every exit in running order (saver first when it is one), base head excluded."""
    with torch.inference_mode():
        out = method.offline(feats).float()
        if method.uses_saver:
            out = torch.cat([feats["saver_logits"].float()[None], out])
    return out


def fit_temperatures(method, feats: dict, labels) -> list[float]:
    """One temperature per running-order exit and the base head, fitted on ``feats`` (calib)."""
    logits = all_logits(method, feats)
    return [fit_temperature(lg, labels) for lg in logits] + [fit_temperature(feats["base_logits"], labels)]


def offline_outputs(method, feats: dict, labels, temperatures=None) -> dict:
    """Everything a policy search and the evaluation read, for one split.

    ``preds``/``confs`` (E, B): each exit's class and score; ``probs`` (E + 1, B, K): each exit's
    temperature-scaled probabilities, the base head last; ``base_pred`` (B,), ``labels`` (B,).
    """
    logits = all_logits(method, feats)
    n_exits = logits.shape[0]
    temps = [1.0] * (n_exits + 1) if temperatures is None else list(temperatures)
    if len(temps) != n_exits + 1:
        raise UsageError(f"need {n_exits + 1} temperatures (exits and base head), got {len(temps)}")
    preds, confs = [], []
    with torch.inference_mode():
        for e in range(n_exits):
            p, c = exit_score(method, e, logits[e], temps[e])
            preds.append(p.numpy())
            confs.append(c.float().numpy())
        base = feats["base_logits"].float()
        probs = torch.cat([logits, base[None]]) / torch.tensor(temps).view(-1, 1, 1)
    return {"preds": np.stack(preds) if preds else np.zeros((0, len(base)), np.int64),
            "confs": np.stack(confs) if confs else np.zeros((0, len(base)), np.float32),
            "probs": probs.softmax(-1).numpy(), "base_pred": base.argmax(-1).numpy(),
            "labels": np.asarray(labels)}


# --- costs ------------------------------------------------------------------------------------------------

def _flops(fn, *args):
    c = flop_counter()
    with c, torch.inference_mode():
        out = fn(*args)
    return int(c.get_total_flops()), out


def exit_flops(pair, method) -> dict:
    """FLOPs per image of leaving at each running-order exit, the base head last.

    Leaving at exit n costs the saver (when the method runs it), the base's stem and stages 1..n,
    and the method's own work at exits 1..n (the steps dynamic inference really runs).
    Returns ``per_exit`` (E + 1,), ``base_total`` and ``overhead`` (method FLOPs at the last exit).
    """
    saver, base, st = pair.saver, pair.base, pair.base_staged
    base_total = count_flops(base.module, base.preprocess.input_size, "torch").flops
    s = count_flops(saver.module, saver.preprocess.input_size, "torch").flops if method.uses_saver else 0
    sf = sl = None
    if method.uses_saver:
        with torch.inference_mode():
            sf, sl = saver_outputs(saver.module, torch.zeros(1, *saver.preprocess.input_size))
    f, x = _flops(st.stem, torch.zeros(1, *base.preprocess.input_size))
    cum_head, state = _flops(method.begin, sf, sl)  # e.g. the ESN's saver token
    cum_base, per_exit = f, [s] if method.uses_saver else []
    for n, stage in enumerate(st.stages, start=1):
        f, x = _flops(stage, x)
        cum_base += f
        if n > method.num_exits:
            continue
        fh, (logits, state) = _flops(method.step, n, x, state)
        if hasattr(method, "score"):
            fs, _ = _flops(method.score, n, logits)
            fh += fs
        cum_head += fh
        per_exit.append(s + cum_base + cum_head)
    tail, _ = _flops(st.tail, x)
    per_exit.append(s + cum_base + cum_head + tail)
    return {"per_exit": np.array(per_exit, dtype=np.float64), "base_total": float(base_total),
            "overhead": float(cum_head), "saver": float(s)}


# --- dynamic inference --------------------------------------------------------------------------------------

class _SaverPart:
    """Exit 0: the saver on the images; hands the method's state on."""

    needs_images = True

    def __init__(self, pair, method, temperature: float, device="cpu"):
        self.pair, self.method, self.temperature, self.device = pair, method, temperature, device
        self.name = pair.saver.key

    def __call__(self, images, carry):
        from tinysaver.transforms import prepare_batch

        with torch.inference_mode():
            x = prepare_batch(images, self.pair.saver.preprocess).to(self.device)
            sf, sl = saver_outputs(self.pair.saver.module, x)
            pred, conf = exit_score(self.method, 0, sl, self.temperature)
            return pred, conf.float(), {"state": self.method.begin(sf, sl)}


class _BasePart:
    """Base stages ``first`` … ``last`` − 1 (the stem before stage 0), then exit ``exit`` of the
    method, or, for the final part (``exit`` None), the rest of the base and its head."""

    def __init__(self, pair, method, first: int, last: int, exit: int | None, temperature: float, device="cpu"):
        self.pair, self.method, self.first, self.last, self.exit = pair, method, first, last, exit
        self.temperature, self.device = temperature, device
        self.needs_images = first == 0
        base = pair.base.key
        self.name = base if exit is None else f"{base}/exit{last}"

    def __call__(self, images, carry):
        from tinysaver.transforms import prepare_batch

        st = self.pair.base_staged
        with torch.inference_mode():
            if self.first == 0:
                x = st.stem(prepare_batch(images, self.pair.base.preprocess).to(self.device))
                state = carry["state"] if carry is not None else self.method.begin(None, None)
            else:
                x, state = carry["x"], carry["state"]
            for k in range(self.first, self.last):
                x = st.stages[k](x)
            if self.exit is None:
                pred, conf = _confidence(st.tail(x), self.temperature)
                return pred, conf, None
            logits, state = self.method.step(self.last, x, state)
            pred, conf = exit_score(self.method, self.exit, logits, self.temperature)
            return pred, conf.float(), {"x": x, "state": state}


def exit_stages(pair, method, temperatures=None, device="cpu") -> list:
    """The engine's stages (see `tinysaver.engine`) of ``method`` on ``pair``, in running
    order: the saver (if the method uses it), one base part per exit, and the base's rest with its
    head. ``temperatures``: one per running-order exit and the base head (default 1). The models
    and the method must already be on ``device``; the images are moved there."""
    n_exits = method.num_exits + int(method.uses_saver)
    temps = list(temperatures or [1.0] * (n_exits + 1))
    if len(temps) != n_exits + 1:
        raise UsageError(f"need {n_exits + 1} temperatures (exits and base head), got {len(temps)}")
    stages = [_SaverPart(pair, method, temps[0], device)] if method.uses_saver else []
    e = len(stages)
    for k in range(1, method.num_exits + 1):
        stages.append(_BasePart(pair, method, k - 1, k, e, temps[e], device))
        e += 1
    stages.append(_BasePart(pair, method, method.num_exits, len(pair.base_staged.stages), None, temps[-1], device))
    return stages


def dynamic_predict(pair, method, policy, images, batch_size: int = 64, refill: bool = False,
                    pipeline: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Run a method for real: the saver (if used), then the base stage by stage on the still-open
    rows only, an exit after each stage; the base head answers the rest.

    ``policy`` is an `esn.policy.ExitPolicy` with one threshold per running-order exit.
    The stages run on `tinysaver.engine.run`: ``refill`` lets each part wait for full
    batches of survivors, ``pipeline`` runs each part in its own thread (see there). Returns
    (answer, running-order exit index) in input order; the base head is index E.
    """
    n_exits = method.num_exits + int(method.uses_saver)
    if len(policy.thresholds) != n_exits:
        raise UsageError(f"policy has {len(policy.thresholds)} thresholds for {n_exits} exits")
    stages = exit_stages(pair, method, policy.temperatures)
    n = len(images)
    answer = np.empty(n, np.int64)
    where = np.empty(n, np.int64)

    def answered(e, idx, pred, conf):
        answer[idx], where[idx] = pred, e

    with torch.inference_mode():
        engine.run(stages, policy.thresholds, n, lambda idx: take_images(images, idx), answered,
                   batch_size=batch_size, refill=refill, pipeline=pipeline)
    return answer, where


__all__ = ["exit_score", "all_logits", "fit_temperatures", "offline_outputs", "exit_flops", "exit_stages",
           "dynamic_predict"]
