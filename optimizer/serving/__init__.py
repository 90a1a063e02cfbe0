"""Serving targets: where a candidate config is loaded and measured.

:class:`optimizer.serving.base.ServingTarget` is the contract every target fills; the study only talks
to that. ``EmbeddedTriton`` (:mod:`.embedded`) is the default: the Triton bundled in the nvidia-pytriton
wheel, run as a child process on loopback (:mod:`.process`). ``LocalTriton`` runs the user's own
``tritonserver`` binary the same way, ``DockerTriton`` runs NVIDIA's container, and ``RemoteTriton``
drives a server that is already running. :mod:`.control` is the model-control client, :mod:`.metrics`
and :mod:`.statistics` read what the server says about itself, ``backends/`` holds the Python-based
``onnxruntime`` backend the embedded server runs.
"""

# What ``--target`` may name (``replay`` takes the recording's directory: ``replay:DIR``); built by
# optimizer.study.targets.make_target.
TARGET_KINDS = ("embedded", "local", "docker", "remote", "replay")
