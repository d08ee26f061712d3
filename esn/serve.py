"""Serve a saver with ESN exits inside its base on Ray Serve.

The parts of the network, in running order, are one deployment each:

- part 0, the saver. Its answer is exit 0, and it hands the ESN's first token on;
- part n (1 … N), base stage n (with the stem for n = 1) followed by ESN exit n. It hands its
  feature map and the bus tokens on;
- part N + 1, the base's head, which answers whatever is left.

A request goes to the next part only while no exit fires, so the base's later stages never run
for a sample that has already left. Each part batches its requests with ``@serve.batch``. The
ingress, with its routes, audit, retries and metrics, is the one in :mod:`tinysaver.serve`; an
audit there runs the base's remaining parts from where the answer left.

Thresholds come from an :class:`esn.policy.ExitPolicy`. :func:`esn.policy.calibrated_policy` picks
them on the zoo's calibration split, or the user gives them. Parts run eager PyTorch, because they
are cut out of the eager model.
"""
from __future__ import annotations

import math
import os
from collections import Counter
from pathlib import Path

from tinysaver.serve import GRACEFUL_SHUTDOWN_S, ServeOptions, ingress_app, stage_options

from .policy import ExitPolicy


def file_sha256(path: str | Path) -> str:
    import hashlib

    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def part_names(saver: str, base: str, num_exits: int) -> list[str]:
    """Stage names in answers and metrics: the saver, ``<base>/exit<n>``, the base."""
    return [saver, *(f"{base}/exit{n}" for n in range(1, num_exits + 1)), base]


class ExitPartRunner:
    """Part ``part`` of saver + ESN + base outside Ray (see the module docstring), on ``device``.

    Items are (decoded uint8 image (C, H, W), carry of the previous part); answers are (class,
    confidence, carry for the next part), the carry a dict of one sample's CPU tensors (None after
    the base's head), so that neighbouring parts may run on different devices.
    """

    def __init__(self, zoo_dir: str | Path, checkpoint: str | Path, part: int, temperature: float = 1.0,
                 accept_preprocess_change: bool = False, device: str = "cpu", sha256: str | None = None):
        from tinysaver.zoo import load_zoo

        from .staged import staged
        from .train import load_esn

        if sha256 is not None and file_sha256(checkpoint) != sha256:
            # a replica Serve restarts must not mix a retrained ESN with the parts still running
            raise RuntimeError(f"{checkpoint} changed after the service was built; restart the service")
        esn, ck = load_esn(checkpoint)
        if not 0 <= part <= esn.num_exits + 1:
            raise ValueError(f"part must be in 0..{esn.num_exits + 1} (saver, exits, base head), got {part}")
        self.esn, self.part, self.temperature, self.device = esn.to(device), part, float(temperature), device
        key = ck["saver"] if part == 0 else ck["base"]
        self.model = load_zoo(zoo_dir).load_model(key, device=device, accept_preprocess_change=accept_preprocess_change)
        self.model.module.eval().requires_grad_(False)
        self.split = staged(self.model.module, ck["settings"]["granularity"]) if part > 0 else None

    def _run(self, images: list, carries: list) -> tuple:
        import torch

        from tinysaver.transforms import prepare_batch

        from .exits import exit_score
        from .staged import saver_outputs

        def stacked(key):
            return torch.stack([c[key] for c in carries]).to(self.device)

        def image_batch():
            return prepare_batch(images, self.model.preprocess).to(self.device)

        esn, n = self.esn, self.part
        if n == 0:
            feat, logits = saver_outputs(self.model.module, image_batch())
            carry = {"tokens": esn.begin(feat, logits)["tokens"], "saver_logits": logits}
        elif n <= esn.num_exits:
            x = self.split.stages[n - 1](self.split.stem(image_batch()) if n == 1 else stacked("x"))
            logits, state = esn.step(n, x, {"tokens": stacked("tokens"), "saver_logits": stacked("saver_logits")})
            carry = {"x": x, **state}
        else:  # the base's head answers the rest
            logits, carry = self.split.tail(stacked("x")), None
        logits = logits.float().cpu()
        if carry is None:
            conf, pred = (logits / self.temperature).softmax(-1).max(-1)
        else:
            pred, conf = exit_score(esn, n, logits, self.temperature)
        return pred, conf, carry

    def __call__(self, items: list) -> list[tuple[int, float, dict | None]]:
        import torch

        with torch.inference_mode():
            pred, conf, carry = self._run([img for img, _ in items], [c for _, c in items])
            # one row each, copied to the CPU: a view would pickle the whole batch's storage
            rows = [None] * len(items) if carry is None else [
                {k: v[i].cpu().clone() for k, v in carry.items()} for i in range(len(items))]
        return [(p, c, r) for p, c, r in zip(pred.tolist(), conf.float().tolist(), rows)]


def _part_deployment():
    from ray import serve

    from tinysaver.serve import stage_device

    @serve.deployment(graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_S)
    class ExitPart:
        """One :class:`ExitPartRunner`, with dynamic batching."""

        def __init__(self, zoo_dir: str, checkpoint: str, sha256: str, part: int, temperature: float,
                     max_batch_size: int, wait_s: float, accept_preprocess_change: bool, num_gpus: float = 0.0):
            self.run = ExitPartRunner(zoo_dir, checkpoint, part, temperature, accept_preprocess_change,
                                      stage_device(num_gpus), sha256)
            self.classify.set_max_batch_size(max_batch_size)
            self.classify.set_batch_wait_timeout_s(wait_s)
            self.sizes: Counter = Counter()

        @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
        async def classify(self, items: list) -> list[tuple[int, float, dict | None]]:
            """(image, carry of the previous part) → (class, confidence, carry for the next part)."""
            out = self.run(items)
            self.sizes[len(items)] += 1
            return out

        def stats(self) -> dict:
            return {"batch_sizes": {int(k): v for k, v in sorted(self.sizes.items())}, "pid": os.getpid(),
                    "device": self.run.device}

    return ExitPart


def check_policy(policy: ExitPolicy, num_exits: int) -> None:
    """One threshold for the saver and each exit (a confidence in [0, 1], or inf to disable it), and
    temperatures for those and the base head when given."""
    want = num_exits + 1
    if len(policy.thresholds) != want:
        raise ValueError(f"the saver and {num_exits} ESN exits need {want} thresholds, got {len(policy.thresholds)}")
    for i, t in enumerate(policy.thresholds):
        if not (math.isinf(t) and t > 0) and not 0.0 <= t <= 1.0:
            raise ValueError(f"threshold {i} must be a confidence in [0, 1] or inf (never exit), got {t}")
    if policy.temperatures is not None:
        if len(policy.temperatures) != want + 1 or not all(t > 0 for t in policy.temperatures):
            raise ValueError(f"give {want + 1} temperatures > 0 (saver, exits, base head), got {policy.temperatures}")


def build_esn_app(checkpoint: str | Path, zoo, policy: ExitPolicy, options: ServeOptions | None = None):
    """A Ray Serve application for the saver, the ESN exits of ``checkpoint`` and their base.

    ``policy`` holds one threshold per running-order exit (the saver, then exits 1 … N), as
    :func:`esn.policy.calibrated_policy` returns. Checked before anything is deployed: the
    checkpoint, its models in ``zoo``, the thresholds and the per-stage options.
    """
    from tinysaver.cascade import zoo_class_names

    from .train import load_esn

    checkpoint = Path(checkpoint).resolve()  # replicas may run in another working directory
    esn, ck = load_esn(checkpoint)
    if ck["zoo"] != zoo.name:
        raise ValueError(f"{checkpoint} was trained on zoo {ck['zoo']!r}'s models; serve it with --zoo {ck['zoo']}")
    for key in (ck["saver"], ck["base"]):
        zoo.model(key)
    check_policy(policy, esn.num_exits)
    o = options or ServeOptions()
    names = part_names(ck["saver"], ck["base"], esn.num_exits)
    if any(b != "eager" for b in o.per_stage("backend", len(names))):
        raise ValueError("ESN exits run on eager PyTorch (each part is cut out of the eager model); drop --backend")
    temps = policy.temperatures or [1.0] * len(names)
    Part = _part_deployment()
    sha = file_sha256(checkpoint)
    parts = [Part.options(**opt).bind(str(zoo.path), str(checkpoint), sha, i, t, o.max_batch_size,
                                      o.batch_wait_timeout_s, o.accept_preprocess_change,
                                      opt["ray_actor_options"]["num_gpus"])
             for i, (t, opt) in enumerate(zip(temps, stage_options(o, names)))]
    return ingress_app(parts, names, policy.thresholds, zoo_class_names(zoo), o, base_from=1)


__all__ = ["ExitPartRunner", "build_esn_app", "check_policy", "part_names"]
