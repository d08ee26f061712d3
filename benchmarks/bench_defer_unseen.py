"""Does deferral training help a saver fine-tuned on images it never saw?

    python benchmarks/bench_defer_unseen.py

The zoo's savers were trained on all of ``train``, so fine-tuning them there (``bench_defer.py``)
shows them few of the mistakes a deferral loss learns from. Here ``train`` is cut in two seeded
halves: the saver is trained from scratch on half A with the zoo's own recipe (its entry of
``zoo_index/configs/fashion-mnist-train.yaml``, ``tinysaver.train``), then fine-tuned on half B, which
it never saw, with each loss for the same number of epochs:

- ``cross-entropy``: the control, the same extra training without a deferral term;
- ``base-aware`` at each α (the base's classes on B are the zoo's recorded predictions).

The zoo's saver (trained on all of ``train``) fine-tuned on the same half B with the same losses is
the seen-data case beside it. Every variant's threshold is chosen on ``calib`` and reported on
``test`` (``bench_defer.evaluate``: zero loss, guaranteed ε = 1, label-free); training reads
``train`` only and the epoch count is fixed in advance (no early stopping), so no choice looks at
``calib`` or ``test``. The base is resnet10t, which was itself trained on all of ``train``.
"""
import argparse
import time

import numpy as np

from bench_defer import evaluate, print_table


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="resnet10t")
    ap.add_argument("--saver", default="mobilenetv3_small_075")
    ap.add_argument("--alphas", default="0.5,1")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0, help="the seed of the A/B halves and of the fine-tuning order")
    ap.add_argument("--config", default="zoo_index/configs/fashion-mnist-train.yaml")
    args = ap.parse_args()

    import torch
    from safetensors.torch import load_file

    from tinysaver.costs import model_cost
    from tinysaver.data import load_dataset
    from tinysaver.decoding import DecodedSet
    from tinysaver.defer import fine_tune_epoch, saver_outputs
    from tinysaver.models import create_model
    from tinysaver.train import TrainConfig, model_label, spec_for, train_one
    from tinysaver.yamlfile import read_mapping
    from tinysaver.zoo import load_zoo

    torch.set_num_threads(max(torch.get_num_threads(), 1))
    zoo = load_zoo("fashion-mnist")
    sets = {s: load_dataset(zoo.splits[s]["source"], progress=False) for s in ("train", "calib", "test")}
    for s, d in sets.items():
        if d.fingerprint != zoo.splits[s]["fingerprint"]:
            raise SystemExit(f"split {s!r} on disk differs from the one the zoo was profiled on")
    labels = {s: d.labels.astype(np.int64) for s, d in sets.items()}
    base = {s: zoo.predictions(args.base, s).pred.astype(np.int64) for s in sets}
    ratio = model_cost(zoo, args.saver, "flops") / model_cost(zoo, args.base, "flops")
    train = sets["train"]
    perm = np.random.default_rng(args.seed).permutation(len(train))
    half_a, half_b = np.sort(perm[: len(perm) // 2]), np.sort(perm[len(perm) // 2:])
    alphas = [float(a) for a in args.alphas.split(",")]
    print(f"zoo fashion-mnist; {args.saver} → {args.base} (FLOPs ratio {ratio:.3f}); train halves A {len(half_a)}, "
          f"B {len(half_b)} (seed {args.seed}); fine-tuning {args.epochs} epochs at lr {args.lr:g}, α {alphas}")

    cfg = TrainConfig(**read_mapping(args.config, "a training config"))
    entry = next(e for e in cfg.models if model_label(e) == args.saver)
    t0 = time.perf_counter()
    res = train_one(entry, cfg, DecodedSet("train-A", [train.ids[i] for i in half_a], train.labels[half_a],
                                            train.images[torch.from_numpy(half_a)]),
                    sets["calib"], sets["test"], "cpu")
    print(f"{args.saver} from scratch on half A ({entry.get('train_samples', cfg.train_samples)} samples, the zoo's "
          f"recipe): test accuracy {100 * res['test_acc']:.2f} % ({time.perf_counter() - t0:.0f} s)", flush=True)
    starts = {"A only": res["state_dict"], "all of train (the zoo's)": load_file(zoo.model_spec(args.saver).checkpoint)}

    model = create_model(spec_for(entry, cfg))
    pre = model.preprocess
    rows = []

    def row(name, seconds=None):
        outs = [saver_outputs(model.module, sets[s].images, np.arange(len(sets[s])), pre, 256) for s in ("calib", "test")]
        r = evaluate(name, *outs, labels["calib"], labels["test"], base["calib"], base["test"], ratio, 0, seconds)
        print(f"  {name}: zero-loss exits on test {r['zero_exit_test']:.1f} %, saver accuracy "
              f"{r['saver_acc_test']:.2f} %", flush=True)
        rows.append(r)

    for seen, state in starts.items():
        model.module.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
        start = {k: v.clone() for k, v in model.module.state_dict().items()}
        row(f"saver trained on {seen}")
        for loss, alpha in [("cross-entropy", 0.0)] + [("base-aware", a) for a in alphas]:
            model.module.load_state_dict(start)
            torch.manual_seed(args.seed)
            opt = torch.optim.AdamW(model.module.parameters(), lr=args.lr, weight_decay=0.0)
            t0 = time.perf_counter()
            for epoch in range(1, args.epochs + 1):
                order = half_b[np.random.default_rng(args.seed * 1000 + epoch).permutation(len(half_b))]
                fine_tune_epoch(model.module, pre, train.images, order, labels["train"], base["train"], opt, loss,
                                alpha, batch_size=128)
            row(f"{seen}, then {loss}{f' α={alpha:g}' if loss != 'cross-entropy' else ''} on B",
                time.perf_counter() - t0)

    print_table(rows)
    unseen = [r for r in rows if r["variant"].startswith("A only, then")]
    ce = next(r for r in unseen if "cross-entropy" in r["variant"])
    best = max((r for r in unseen if "base-aware" in r["variant"]), key=lambda r: r["zero_exit_test"])
    print(f"unseen half B, zero-loss exits on test: cross-entropy {ce['zero_exit_test']:.1f} % "
          f"best base-aware {best['zero_exit_test']:.1f} % ({best['variant']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
