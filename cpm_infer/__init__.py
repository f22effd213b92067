"""cpm-infer: fast CPM (Chinese GPT-2) generation on CPUs and GPUs."""

__version__ = "0.1.0"
