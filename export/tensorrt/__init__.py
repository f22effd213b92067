"""TensorRT engines built from an ONNX artifact, and what a runtime needs to check before using one.

Modules, one job each:
- ``profiles``   optimization profiles (prefill / decode) derived from ``cpm_infer.kv.dynamic_axes``
- ``precision``  which GPUs each TensorRT release supports, ``--precision auto``, the build mode
- ``layers``     which layers an FP16 engine keeps in FP32 (LayerNorm statistics, softmax)
- ``compat``     engine-vs-machine checks on load (TensorRT version, GPU model)
- ``cuda``       the few CUDA runtime calls we need, through cuda-python
- ``builder``    ONNX parser -> network -> serialized engine (needs TensorRT and a GPU)
- ``validate``   engine vs reference logits: tolerance and greedy agreement
- ``engine_artifact``  the whole ``cpm export trt`` pipeline and the engine artifact on disk

Only ``builder`` and ``engine_artifact`` touch TensorRT; nothing here imports torch, so a server
that runs an engine needs neither torch nor onnx.
"""
