"""The default cascade as a module-level Serve ``Application``, for Ray's ``serve build``.

``serve build`` takes a built application only (not a builder with arguments), so
``serve build tinysaver.serve.default:app -o serve.yaml`` writes the config of the bundled
Fashion-MNIST zoo's ``resnet10t`` cascade (its best saver at zero loss, fused layout), which
``serve run serve.yaml`` and a KubeRay ``RayService`` run. For another cascade, name the builder
with its arguments in the config (``import_path: tinysaver.serve:app`` and ``args: {zoo: …,
base: …}``), as ``deploy/kuberay/rayservice.yaml`` does. Importing this module reads the zoo and
runs the selector (about a second); no model is loaded until a replica starts.
"""
from .builders import app as build

app = build({"base": "resnet10t"})


__all__ = ["app"]
