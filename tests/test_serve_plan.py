"""What a service is before anything deploys: options, plans, the serve run builder's arguments,
unschedulable replicas."""
import pytest

from tests.helpers import stage_plan
from tinysaver.errors import CascadeError, ServeError
from tinysaver.serve import ServiceSpec, ServeOptions


def test_options_choose_the_layout_and_plans_are_checked():
    assert ServeOptions().resolved_layout() == "fused"
    assert ServeOptions(num_gpus=[0, 1]).resolved_layout() == "per-stage"  # per-stage resources given
    assert ServeOptions(replicas=[1, 2]).resolved_layout() == "per-stage"
    assert ServeOptions(layout="per-stage").resolved_layout() == "per-stage"
    with pytest.raises(ServeError, match="--layout must be one of fused, per-stage"):
        ServeOptions(layout="both")
    with pytest.raises(ServeError, match="--max-body-mb must be > 0"):
        ServeOptions(max_body_bytes=0)
    o = ServeOptions()
    with pytest.raises(CascadeError, match="1 saver\\(s\\) need as many thresholds, got 0"):
        stage_plan(("a", "b"), ())
    with pytest.raises(CascadeError, match="must lie in \\[0, 1\\]"):
        stage_plan(("a", "b"), (1.5,))
    with pytest.raises(CascadeError, match="a model cannot be its own saver"):
        stage_plan(("a", "a"), (0.5,))
    p = ServiceSpec(stage_plan(("a", "b"), (0.5,)), o)
    with pytest.raises(Exception):  # frozen: a deployment's plan cannot change under it
        p.stages.base_from = 0
    assert p.stages.base_from == 1  # the last stage alone is the base unless told
    with pytest.raises(ServeError, match="--adapt retunes from audits: give --audit"):
        ServeOptions(adapt=True)
    adapt = ServeOptions(adapt=True, audit=0.05)
    assert ServiceSpec(stage_plan(("a", "b"), (0.5,)), adapt).options.adapt
    with pytest.raises(ServeError, match="one saver before its base; this policy has 3 stages"):
        ServiceSpec(stage_plan(("a", "b", "c"), (0.5, 0.5)), adapt)
    with pytest.raises(ServeError, match=r"2 stages \(ESN exits\)"):
        ServiceSpec(stage_plan(("a", "b"), (0.5,)), adapt, factory="esn.serve:stages")


def test_the_builder_types_serve_run_arguments_and_refuses_bad_ones():
    from tinysaver.serve.builders import _typed, app

    got = _typed({"resources": '{"node2": 1}', "replicas": "2", "num_cpus": "0.5", "backend": "onnxruntime,eager",
                  "layout": "fused", "max-pixels": "1000", "accept_preprocess_change": "true"})
    assert got == {"resources": {"node2": 1}, "replicas": 2, "num_cpus": 0.5, "backend": ["onnxruntime", "eager"],
                   "layout": "fused", "max_pixels": 1000, "accept_preprocess_change": True}
    sel = _typed({"tolerance": "1.5", "max_stages": "3", "label_free": "true", "cost": "latency:cpu:bs1",
                  "saver": "a,b", "threshold": "0.5", "max_pixels": "none"})
    assert sel == {"tolerance": 1.5, "max_stages": 3, "label_free": True, "cost": "latency:cpu:bs1",
                   "saver": ["a", "b"], "threshold": 0.5, "max_pixels": None}
    for bad, says in ((("num_cpus", "lots"), "num_cpus: must be a number, got 'lots' (text)"),
                      (("tolerance", "abc"), "tolerance: must be a number, got 'abc' (text)"),
                      (("audit", "nan"), "audit: must be a finite number (not NaN or infinity), got 'nan' (text)"),
                      (("threshold", "x"), "threshold: must be a number, got 'x' (text)")):
        with pytest.raises(ServeError) as e:  # one line naming the argument, never a bare ValueError
            _typed(dict([bad]))
        assert str(e.value) == f"tinysaver.serve:app: {says}", str(e.value)
    with pytest.raises(ServeError, match=r"^tinysaver\.serve:app: colour: is not a known field$"):
        app({"zoo": "fashion-mnist", "base": "resnet10t", "colour": "red"})


def test_a_replica_no_node_can_hold_is_named_with_what_it_lacks():
    from tinysaver.serve.builders import replica_needs, unschedulable

    o = ServeOptions(layout="per-stage", num_cpus=0.25, num_gpus=[0, 1], resources=[{}, {"node2": 1}])
    plan = ServiceSpec(stage_plan(("s", "b"), (0.5,)), o)
    needs = replica_needs(plan)
    assert needs["the base stage (b)"] == {"CPU": 0.25, "GPU": 1.0, "node2": 1.0}
    assert needs["the saver stage (s)"] == {"CPU": 0.25}
    one_node = [{"Alive": True, "Resources": {"CPU": 2.0, "node2": 1.0}}]
    assert unschedulable(needs, one_node) == "the base stage (b) needs GPU=1; the largest node of this cluster has GPU=0"
    assert unschedulable(needs, [*one_node, {"Alive": True, "Resources": {"CPU": 4, "GPU": 1, "node2": 2}}]) is None
    fused = ServiceSpec(stage_plan(("s", "b"), (0.5,)), ServeOptions(resources={"nowhere": 1}))
    assert unschedulable(replica_needs(fused), one_node).startswith("the fused replica (every stage) needs nowhere=1")


def test_the_fused_layout_runs_on_onnxruntime_where_the_zoo_vouches_for_every_export(tmp_path):
    """No --backend: a fused service on CPU takes ONNX Runtime when the zoo records an exact export of
    each stage's model; the per-stage layout, a GPU, a model without that record, or a backend given
    by hand keep what they say."""
    import shutil

    import yaml

    from tinysaver.selector import SelectorConfig, select
    from tinysaver.serve import service_spec
    from tinysaver.zoo import load_zoo

    zoo = load_zoo("fashion-mnist")
    sel = select(zoo, "resnet10t", SelectorConfig()).best
    assert set(service_spec(sel, zoo).stages.backends) == {"onnxruntime"}
    assert set(service_spec(sel, zoo, ServeOptions(layout="per-stage")).stages.backends) == {"eager"}
    assert set(service_spec(sel, zoo, ServeOptions(backend="eager")).stages.backends) == {"eager"}
    # one stage's export not vouched for (the profiler found it inexact): eager for all
    copy = tmp_path / "zoo"
    shutil.copytree(zoo.path, copy)
    manifest = yaml.safe_load((copy / "zoo.yaml").read_text())
    manifest["models"][sel.savers[0].model]["backends"]["onnxruntime"]["exact"] = False
    (copy / "zoo.yaml").write_text(yaml.safe_dump(manifest))
    assert set(service_spec(sel, load_zoo(copy)).stages.backends) == {"eager"}
