"""Would one ONNX graph holding saver and base avoid the price of switching models at batch 1?

    python benchmarks/bench_one_graph.py --zoo fashion-mnist --base resnet10t --images 500

bench_alternation.py shows that a saver and a base called in turn on ONNX Runtime cost more than
their separate times. Part of that could be the switch between two sessions (two thread pools, two
arenas, two Python calls). This script removes that switch: it joins the two cached exports into
one graph whose ``If`` node runs the base only when the saver's max-softmax confidence is below the
threshold, so one ``session.run`` answers one image. It times, per image at batch 1 on prepared
tensors (no decoding or resizing in the loop), interleaved for ``--repeats`` repetitions:

- the base alone;
- two sessions, as ``Cascade`` runs them: the saver, then the base when the saver does not exit;
- the one graph.

It first checks that the one graph answers exactly as the two sessions do. This is a measurement,
not a backend: the threshold is baked into the graph, and the graph has one thread setting for both
models.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from tinysaver.data import load_dataset
from tinysaver.policy import exits
from tinysaver.runtimes import make_runner
from tinysaver.selector import SelectorConfig, select
from tinysaver.transforms import prepare_batch
from tinysaver.zoo import load_zoo
from common import parser, table_head


def one_graph(saver_onnx, base_onnx, threshold: float, num_classes: int):
    """saver → If(max softmax ≥ threshold: saver logits, else: base logits), inputs (saver x, base x)."""
    import onnx
    from onnx import TensorProto, compose, helper

    s = compose.add_prefix(onnx.load(str(saver_onnx)), "saver_")
    b = compose.add_prefix(onnx.load(str(base_onnx)), "base_")
    s_logits, b_logits = s.graph.output[0].name, b.graph.output[0].name

    def logits_info(name):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", num_classes])

    # a batch exits only if every sample in it does; at batch 1 that is the cascade's rule
    decide = [
        helper.make_node("Softmax", [s_logits], ["prob"], axis=-1),
        helper.make_node("ReduceMax", ["prob"], ["conf"], keepdims=0),
        helper.make_node("Constant", [], ["threshold"],
                         value=helper.make_tensor("threshold", TensorProto.FLOAT, [], [threshold])),
        helper.make_node("GreaterOrEqual", ["conf", "threshold"], ["exits"]),
        helper.make_node("Cast", ["exits"], ["exits_f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMin", ["exits_f"], ["all_exit_f"], keepdims=0),
        helper.make_node("Cast", ["all_exit_f"], ["all_exit"], to=TensorProto.BOOL),
    ]
    then = helper.make_graph([helper.make_node("Identity", [s_logits], ["then_logits"])], "saver_answers", [],
                             [logits_info("then_logits")])
    otherwise = helper.make_graph([*b.graph.node, helper.make_node("Identity", [b_logits], ["else_logits"])],
                                  "base_answers", [], [logits_info("else_logits")])
    graph = helper.make_graph(
        [*s.graph.node, *decide, helper.make_node("If", ["all_exit"], ["logits"], then_branch=then,
                                                  else_branch=otherwise)],
        "saver_then_base", [s.graph.input[0], b.graph.input[0]], [logits_info("logits")],
        initializer=[*s.graph.initializer, *b.graph.initializer])
    model = helper.make_model(graph, opset_imports=s.opset_import)
    model.ir_version = s.ir_version
    onnx.checker.check_model(model)
    return model


def main() -> int:
    ap = parser("fashion-mnist")
    ap.add_argument("--base", default="resnet10t")
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", default="1,2", help="SAVER,BASE threads of the two sessions; the one graph "
                                                     "uses the larger")
    args = ap.parse_args()
    import onnxruntime as ort

    t_saver, t_base = map(int, args.threads.split(","))
    zoo = load_zoo(args.zoo)
    sel = select(zoo, args.base, SelectorConfig()).best
    if len(sel.models) != 2:
        raise SystemExit(f"{args.base} has no single saver in {args.zoo}")
    saver, base = (zoo.load_model(k) for k in sel.models)
    threshold = float(sel.thresholds[0])
    rs, rb = make_runner(saver, "onnxruntime", threads=t_saver), make_runner(base, "onnxruntime", threads=t_base)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = max(t_saver, t_base), 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as make_runner's sessions
    graph = one_graph(rs.export_path, rb.export_path, threshold, base.num_classes)
    session = ort.InferenceSession(graph.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    imgs = load_dataset(f"{args.zoo}:test", progress=False, limit=args.images).images
    xs = [prepare_batch(imgs[i:i + 1], saver.preprocess) for i in range(len(imgs))]
    xb = [prepare_batch(imgs[i:i + 1], base.preprocess) for i in range(len(imgs))]
    ns, nb = [x.numpy() for x in xs], [x.numpy() for x in xb]

    def two_sessions():
        out = []
        for a, b in zip(xs, xb):
            logits = rs(a)
            if not exits(logits.softmax(-1).max(-1).values.numpy(), threshold)[0]:
                logits = rb(b)
            out.append(int(logits.argmax()))
        return out

    def one_session():
        return [int(session.run(None, {names[0]: a, names[1]: b})[0].argmax()) for a, b in zip(ns, nb)]

    def base_alone():
        return [int(rb(b).argmax()) for b in xb]

    with torch.inference_mode():
        same = np.mean(np.array(two_sessions()) == np.array(one_session()))
        loops = {"base alone": base_alone, "two sessions": two_sessions, "one graph": one_session}
        ms = {k: [] for k in loops}
        for _ in range(args.repeats):
            for k, f in loops.items():
                t0 = time.perf_counter()
                f()
                ms[k].append((time.perf_counter() - t0) / len(imgs) * 1e3)
    ms = {k: np.array(v) for k, v in ms.items()}
    exit_ratio = float(np.mean([exits(rs(a).softmax(-1).max(-1).values.numpy(), threshold)[0] for a in xs]))
    print(f"{args.base} ← {sel.models[0]}, threshold {threshold:.4f}, {len(imgs)} {args.zoo} test images at batch 1, "
          f"exit ratio {exit_ratio:.1%}; threads saver {t_saver}, base {t_base}, one graph {max(t_saver, t_base)}; "
          f"{args.repeats} interleaved repetitions, medians (min–max)")
    print(f"one graph answers as the two sessions on {same:.1%} of images\n")
    table_head("| path | ms per image | speedup over the base alone |")
    for k, v in ms.items():
        r = ms["base alone"] / v
        print(f"| {k} | {np.median(v):.3f} ({v.min():.3f}–{v.max():.3f}) | {np.median(r):.2f}× ({r.min():.2f}–{r.max():.2f}) |")
    r = ms["two sessions"] / ms["one graph"]
    print(f"\ntwo sessions / one graph: {np.median(r):.2f} ({r.min():.2f}–{r.max():.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
