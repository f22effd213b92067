"""The ``cpm`` command line. Command modules import only typer at module level; torch, onnxruntime
and tensorrt are imported inside the commands, so ``cpm --help`` is instant."""
