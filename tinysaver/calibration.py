"""Confidence calibration and uncertainty: temperature scaling, ECE, conformal prediction sets.

Everything here works on arrays (logits, probabilities, labels), so the zoo's models, ESN exits and
the related exit methods in ``esn/`` share one implementation.

- Temperature scaling (Guo et al., 2017): one scalar ``T`` per model or exit, fitted on a labelled
  split by minimising the negative log-likelihood of ``softmax(logits / T)``. It never changes the
  predicted class, only the confidence the selector and the exit policies threshold.
- Expected calibration error: torchmetrics' ``MulticlassCalibrationError`` with 15 equal-width bins
  (top-label ECE, L1), the definition used by the seed papers.
- Split conformal sets (the LAC score, ``1 − p(true class)``): ``conformal_quantile`` on a labelled
  split, then ``prediction_sets`` hold every class with ``p ≥ 1 − q``. For a cascade, each answering
  stage gets its own quantile from the calibration samples it answered (seed ``003_*``'s "gated"
  variant), falling back to the pooled quantile when a stage answered fewer than ``min_per_stage``.
"""
from __future__ import annotations

import importlib.util
import math

import numpy as np
import torch
from tqdm.auto import tqdm

from .errors import MissingExtraError, UsageError
from .policy import confidence

ECE_BINS = 15
T_RANGE = (0.05, 20.0)  # a temperature outside this range means the logits carry no usable scale


def _require_torchmetrics():
    if importlib.util.find_spec("torchmetrics") is None:
        raise MissingExtraError("ECE needs torchmetrics: pip install -e '.[calibration]'") from None


def _check(logits: torch.Tensor, labels) -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.as_tensor(logits).float()
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    if logits.dim() != 2 or len(logits) != len(labels):
        raise UsageError(f"need logits (N, K) and labels (N,), got {tuple(logits.shape)} and {tuple(labels.shape)}")
    if len(labels) == 0:
        raise UsageError("cannot calibrate on an empty split")
    if (labels < 0).any() or (labels >= logits.shape[1]).any():
        raise UsageError("calibration needs a labelled split: every label must be a class index in [0, K)")
    return logits, labels


def fit_temperature(logits, labels) -> float:
    """The temperature ``T`` minimising NLL of ``softmax(logits / T)`` on (N, K) logits and (N,) labels."""
    from scipy.optimize import minimize_scalar

    logits, labels = _check(logits, labels)

    def nll(log_t: float) -> float:
        return float(torch.nn.functional.cross_entropy(logits / math.exp(log_t), labels))

    # NLL is smooth and unimodal in log T; a bounded scalar search is exact enough and deterministic
    res = minimize_scalar(nll, bounds=tuple(math.log(t) for t in T_RANGE), method="bounded",
                          options={"xatol": 1e-5})
    return float(math.exp(res.x))


def softmax_t(logits, temperature: float = 1.0) -> torch.Tensor:
    """(N, K) probabilities of ``softmax(logits / temperature)`` in float32."""
    if not temperature > 0:
        raise UsageError(f"temperature must be > 0, got {temperature}")
    return (torch.as_tensor(logits).float() / temperature).softmax(-1)


def ece(probs, labels, n_bins: int = ECE_BINS) -> float:
    """Top-label expected calibration error (fraction in [0, 1]) of (N, K) probabilities."""
    _require_torchmetrics()
    from torchmetrics.classification import MulticlassCalibrationError

    probs = torch.as_tensor(probs).float()
    _, labels = _check(probs, labels)
    metric = MulticlassCalibrationError(num_classes=probs.shape[1], n_bins=n_bins, norm="l1")
    return float(metric(probs, labels))


def top_label_ece(conf, correct, n_bins: int = ECE_BINS) -> float:
    """ECE from the max probability (N,) and whether the top class was right (N,): what a zoo stores.

    Equal to `ece` on the full probabilities, because top-label ECE reads only these two.
    """
    _require_torchmetrics()
    from torchmetrics.classification import BinaryCalibrationError

    conf = torch.as_tensor(np.asarray(conf, dtype=np.float32))
    correct = torch.as_tensor(np.asarray(correct, dtype=bool)).long()
    if conf.shape != correct.shape or conf.dim() != 1 or len(conf) == 0:
        raise UsageError("need conf (N,) and correct (N,) of the same non-zero length")
    return float(BinaryCalibrationError(n_bins=n_bins, norm="l1")(conf, correct))


def conformal_quantile(probs, labels, alpha: float) -> float:
    """LAC quantile ``q`` for coverage ``1 − alpha``: the ⌈(n+1)(1−α)⌉-th smallest ``1 − p(true)``."""
    if not 0 < alpha < 1:
        raise UsageError(f"alpha must be in (0, 1), got {alpha}")
    probs = torch.as_tensor(probs).float()
    _, labels = _check(probs, labels)
    scores = np.sort(1.0 - probs[torch.arange(len(labels)), labels].numpy())
    n = len(scores)
    k = math.ceil((n + 1) * (1 - alpha))
    return 1.0 if k > n else float(scores[k - 1])  # too few samples for this α: the set holds every class


def prediction_sets(probs, q: float) -> np.ndarray:
    """(N, K) bool: class k is in sample i's set when ``1 − p_ik ≤ q``."""
    return (1.0 - torch.as_tensor(probs).float().numpy()) <= q


def cascade_conformal(calib_probs, calib_labels, calib_stage, test_probs, test_stage, alpha: float,
                      min_per_stage: int = 20) -> tuple[np.ndarray, dict[int, float]]:
    """Conformal sets for a cascade, each stage with the quantile of the calibration samples it answered.

    ``*_probs`` (N, K) are the answering stage's probabilities, ``*_stage`` (N,) its index.
    Returns the test sets (N, K) and the quantile used per stage.
    """
    calib_stage, test_stage = np.asarray(calib_stage), np.asarray(test_stage)
    calib_probs, test_probs = torch.as_tensor(calib_probs).float(), torch.as_tensor(test_probs).float()
    labels = np.asarray(calib_labels)
    pooled = conformal_quantile(calib_probs, labels, alpha)
    qs: dict[int, float] = {}
    sets = np.zeros(tuple(test_probs.shape), bool)
    for s in np.union1d(np.unique(calib_stage), np.unique(test_stage)):
        mine = calib_stage == s
        qs[int(s)] = (conformal_quantile(calib_probs[mine], labels[mine], alpha)
                      if mine.sum() >= min_per_stage else pooled)
        rows = test_stage == s
        sets[rows] = prediction_sets(test_probs[rows], qs[int(s)])
    return sets, qs


def coverage_and_size(sets: np.ndarray, labels) -> tuple[float, float]:
    """(empirical coverage, mean set size) of (N, K) bool sets."""
    labels = np.asarray(labels)
    return float(sets[np.arange(len(labels)), labels].mean()), float(sets.sum(1).mean())


# --- a zoo's models --------------------------------------------------------------------------------------

def model_logits(model, data, batch_size: int = 256, desc: str | None = None) -> torch.Tensor:
    """(N, K) float32 logits of a zoo model (``Zoo.load_model``) on a DecodedSet, eager PyTorch; with
    ``desc``, a progress bar on stderr (minutes per model on a 2-core machine)."""
    from .transforms import prepare_batch

    out = []
    with torch.inference_mode():
        for s in tqdm(range(0, len(data), batch_size), desc=desc, unit="batch", disable=desc is None, leave=False):
            out.append(model.module(prepare_batch(data.batch(s, s + batch_size), model.preprocess)).float())
    return torch.cat(out) if out else torch.zeros(0, model.num_classes)


def calibrate_zoo(zoo: str, models=None, fit_split: str = "calib", root=None, log=print,
                  min_agreement: float = 0.999):
    """Fit a temperature per measured model on ``fit_split`` and store, for every split, the
    temperature-scaled confidences (``calibration/<model>/<split>.npz``) and the ECE before and after
    (``models.<key>.calibration`` in zoo.yaml). Predictions are read, never written.

    Each model is rebuilt from its zoo entry and run again, because the zoo keeps only top-k
    probabilities; if it no longer gives the stored classes (``min_agreement``), nothing is written.
    """
    from .data import load_dataset
    from .zoo import (MANIFEST, ZooError, atomic_write_npz, atomic_write_yaml, load_zoo, model_dirname, writable,
                      zoo_lock)

    _require_torchmetrics()
    z = writable(load_zoo(zoo, root), root, log)  # a bundled zoo is copied to the write root first
    if fit_split not in z.splits:
        raise ZooError(f"zoo {z.name!r} has no split {fit_split!r} to fit temperatures on; splits: "
                       f"{', '.join(z.splits)} (pass --fit-split; ECE on that split is then in-sample)")
    keys = list(models) if models else z.measured()
    for k in keys:
        if not z.has_predictions(k):
            raise ZooError(f"{k!r} in zoo {zoo!r} is {z.entry(k).status}: it has no predictions to calibrate")
    with zoo_lock(z.path):
        data: dict = {}

        def split_data() -> dict:  # the images, only for a model whose logits the zoo does not keep
            for split, meta in z.splits.items():
                if split not in data:
                    data[split] = load_dataset(meta["source"], progress=False)
                    if data[split].fingerprint != meta["fingerprint"]:
                        raise ZooError(f"split {split!r} on disk differs from the one zoo {z.name!r} was profiled on")
            return data

        labels_of = {split: z.split_arrays(split)[1] for split in z.splits}
        for i, key in enumerate(keys, 1):
            how = "reading its logits" if z.entry(key).status == "imported" else "running it on every split"
            log(f"{key} ({i}/{len(keys)}): {how}")
            # imported logits are the model's output as given; a profiled model runs again in float32
            # (a zoo keeps its logits, if at all, in float16)
            kept = ({split: z.predictions(key, split).logits for split in z.splits}
                    if z.entry(key).status == "imported" else {"": None})
            if all(lg is not None for lg in kept.values()):
                logits = {split: torch.from_numpy(np.asarray(lg, np.float32)) for split, lg in kept.items()}
            else:
                model = z.load_model(key)
                logits = {split: model_logits(model, ds, desc=f"{key} on {split}") for split, ds in split_data().items()}
            for split, lg in logits.items():
                stored = z.predictions(key, split).pred
                agree = float((lg.argmax(-1).numpy() == stored).mean())
                if agree < min_agreement:
                    raise ZooError(f"{key!r} gives the stored class on only {100 * agree:.2f} % of split {split!r}: "
                                   "its checkpoint is not the one profiled; re-profile before calibrating")
            t = fit_temperature(logits[fit_split], labels_of[fit_split])
            eces = {}
            for split, lg in logits.items():
                labels = labels_of[split]
                if (np.asarray(labels) < 0).any():
                    continue  # an unlabelled split has no ECE
                eces[split] = {"before": ece(softmax_t(lg), labels), "after": ece(softmax_t(lg, t), labels)}
            for split, lg in logits.items():
                atomic_write_npz(z.path / "calibration" / model_dirname(key) / f"{split}.npz",
                                 fingerprint=np.array(z.splits[split]["fingerprint"]),
                                 conf=confidence(lg, t)[0].numpy().astype(np.float32))
            z.manifest["models"][key]["calibration"] = {"method": "temperature", "fit_split": fit_split,
                                                        "temperature": round(t, 6), "ece_bins": ECE_BINS,
                                                        "ece": eces}
            atomic_write_yaml(z.path / MANIFEST, z.manifest)  # the manifest names the files only once they exist
            log(f"{key}: T = {t:.3f}; ECE (%) " + ", ".join(
                f"{s} {100 * e['before']:.2f} → {100 * e['after']:.2f}" for s, e in eces.items()))
    return z.path


__all__ = ["ECE_BINS", "T_RANGE", "fit_temperature", "softmax_t", "ece", "top_label_ece",
           "conformal_quantile", "prediction_sets", "cascade_conformal", "coverage_and_size", "model_logits",
           "calibrate_zoo"]
