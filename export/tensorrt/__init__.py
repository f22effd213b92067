"""TensorRT engines built from an ONNX artifact, and what a runtime needs to check before using one.

Modules, one job each:
- ``precision``  which GPUs each TensorRT release supports, ``--precision auto``, the build mode
- ``layers``     which layers an FP16 engine keeps in FP32 (LayerNorm statistics, softmax)
- ``builder``    ONNX parser -> network -> serialized engine (needs TensorRT and a GPU)
- ``engine_artifact``  the whole ``cpm export trt`` pipeline and the engine artifact on disk (validated
  by ``export.validate``, the same validator as ONNX exports)

The runtime side (profiles, compatibility checks, CUDA calls, the logger, the backend) lives in
``cpm_infer.backends.trt``. Only ``builder`` and ``engine_artifact`` touch TensorRT; nothing here
imports torch.
"""
