"""Which saver the selector picks for each Fashion-MNIST base when the cost is FLOPs, or measured
batch-1 latency on eager PyTorch, ONNX Runtime or OpenVINO (the rows `tinysaver profile
--latency-only` stored in the zoo).

    python benchmarks/select_by_backend.py
"""
from tinysaver.zoo import load_zoo
from tinysaver.selector import select_all, SelectorConfig
from common import table_head
zoo = load_zoo("fashion-mnist")
costs = ["flops", "latency:cpu:bs1:eager", "latency:cpu:bs1:onnxruntime", "latency:cpu:bs1:openvino"]
res = {c: {s.base: s for s in select_all(zoo, SelectorConfig(cost=c))[0]} for c in costs}
table_head("| base | " + " | ".join(f"saver on {c} (saving)" for c in costs) + " |")
for b in res["flops"]:
    cells = []
    for c in costs:
        s = res[c][b]
        cells.append(f"{s.models[0]} ({s.saving_pct:.0f} %)" if s.found else "none")
    print(f"| {b} | " + " | ".join(cells) + " |")
