"""The TensorRT runtime: what running an engine artifact needs, without the exporter.

- ``backend``   ``TrtBackend``: two profiles (prefill, decode), preallocated KV buffers, the named-tensor API
- ``profiles``  optimization-profile limits derived from ``cpm_infer.kv`` (shared with the builder)
- ``compat``    engine-vs-machine checks on load (TensorRT version, GPU model)
- ``cuda``      the few CUDA runtime calls we need, through cuda-python
- ``logger``    the one process-wide TensorRT logger (forwards to Python logging)

Building engines lives in ``export.tensorrt``, which imports from here, never the other way round.
"""
