"""Assemble the runners of a benchmark: the model source, the eager baselines, ORT / TensorRT artifacts.

A backend that cannot run here (package missing, no GPU, artifact for another model) is skipped with
its reason, never a crash.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from cpm_infer.artifact import ManifestError, read_manifest, sha256_files
from cpm_infer.bench.runners import HFGenerateRunner, LoopRunner, Runner, StepBytes
from cpm_infer.bench.traffic import artifact_format, float_format
from cpm_infer.checkpoint import Checkpoint, open_checkpoint
from cpm_infer.config import ModelSpec, preset
from cpm_infer.deps import require
from cpm_infer.devices import resolve_device
from cpm_infer.errors import CpmError
from cpm_infer.settings import DRAFT_TOKENS

log = logging.getLogger(__name__)

BACKENDS = ("hf", "torch", "ort", "trt")


class ArtifactMismatchError(CpmError):
    """An artifact was exported from other weights or ships another tokenizer than the checkpoint."""


class TorchGpuPeak:
    """Peak GPU memory (MiB) torch allocated on one device during a measurement: reset before each row, so a
    row's number is its own (the weights stay allocated and are part of it)."""

    def __init__(self, index: int) -> None:
        import torch

        self._cuda, self.index = torch.cuda, index

    def reset(self) -> None:
        self._cuda.synchronize(self.index)
        self._cuda.reset_peak_memory_stats(self.index)

    def read(self) -> float:
        self._cuda.synchronize(self.index)
        return self._cuda.max_memory_allocated(self.index) / 2**20


@dataclass
class BenchSetup:
    spec: ModelSpec
    runners: list[Runner] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    checkpoint: Checkpoint | None = None
    workdir: tempfile.TemporaryDirectory | None = None
    devices: dict[str, str] = field(default_factory=dict)  # runner name -> the device it ran on
    gpu_peaks: dict[str, TorchGpuPeak] = field(default_factory=dict)  # only runners whose memory torch sees
    _tokenizer: object = field(default=None, repr=False)

    def scratch(self) -> Path:
        """A temporary directory removed by :meth:`close` (random checkpoints, exports made for the run)."""
        if self.workdir is None:
            self.workdir = tempfile.TemporaryDirectory(prefix="cpm-bench-")
        return Path(self.workdir.name)

    load_s: dict[str, float] = field(default_factory=dict)  # seconds to load each artifact backend
    closers: list[Callable[[], None]] = field(default_factory=list)  # e.g. a draft's backend

    def tokenizer(self):
        """The checkpoint's tokenizer (loop runners decode text as ``cpm generate`` does)."""
        from cpm_infer.tokenizer import CpmTokenizer

        if self._tokenizer is None:
            self._tokenizer = CpmTokenizer(self.checkpoint.tokenizer_file)
        return self._tokenizer

    def close(self) -> None:
        while self.closers:
            self.closers.pop()()
        if self.workdir is not None:
            self.workdir.cleanup()
            self.workdir = None


def random_checkpoint(preset_name: str, tokenizer_file: Path, out_dir: Path, seed: int = 0) -> Path:
    """A CPM preset with random weights, saved as a checkpoint (so it can be exported like a real one)."""
    from cpm_infer.tokenizer import CpmTokenizer
    from cpm_infer.torch_model import random_model, save_checkpoint

    spec = preset(preset_name)
    tok = CpmTokenizer(tokenizer_file)
    if tok.vocab_size > spec.vocab_size:
        raise CpmError(
            f"tokenizer {tokenizer_file} has {tok.vocab_size} pieces, more than the preset's {spec.vocab_size}"
        )
    return save_checkpoint(random_model(spec, seed, eod_id=tok.eod_id, pad_id=tok.pad_id), tokenizer_file, out_dir)


def parity_model(
    work: Path, tokenizer_file: Path, *, preset_name: str = "small", seed: int = 0, say: Callable[[str], None]
) -> tuple[Path, Path]:
    """A random CPM checkpoint and its validated ``--optimize`` ONNX artifact in ``work`` (reused when there).

    initializer_range 0.1 and random biases/LayerNorms (a fresh GPT-2 has them at 0 / 1) make greedy output
    vary instead of repeating one token, so comparing runners' tokens means something; timing does not depend
    on the values. The benchmark scripts in ``benchmarks/`` share this model."""
    from cpm_infer.tokenizer import CpmTokenizer
    from cpm_infer.torch_model import hf_config, save_checkpoint

    ckpt, art = work / f"cpm-{preset_name}-random", work / f"cpm-{preset_name}-onnx"
    if not (ckpt / "config.json").is_file():
        say(f"creating a random CPM-{preset_name} checkpoint in {ckpt}")
        torch = require("torch", "torch")
        transformers = require("transformers", "torch")
        tok = CpmTokenizer(tokenizer_file)
        torch.manual_seed(seed)
        config = hf_config(preset(preset_name), tok.eod_id, tok.pad_id, base={"initializer_range": 0.1})
        model = transformers.GPT2LMHeadModel(config).eval()
        with torch.no_grad():
            for param in model.parameters():
                if param.ndim == 1:
                    param.add_(0.1 * torch.randn_like(param))
        save_checkpoint(model, tokenizer_file, ckpt)
    ensure_artifact(ckpt, art, say=say)
    return ckpt, art


def ensure_artifact(checkpoint: Path, artifact: Path, *, say: Callable[[str], None]) -> Path:
    """``artifact``: the checkpoint's validated ``--optimize`` export, made unless one of these weights by this code's
    exporter (``GRAPH_FORMAT``) is there."""
    from export.onnx_export import current_graph, export_onnx

    manifest = read_manifest(artifact) if (artifact / "manifest.json").is_file() else None
    fresh = (
        manifest is not None
        and manifest.source_sha256 == open_checkpoint(checkpoint).weights_sha256()
        and current_graph(manifest.details)
    )
    if not fresh:
        say(f"exporting {artifact} (--optimize; validated against eager)")
        export_onnx(checkpoint, artifact, force=True, optimize=True, progress=say)
    return artifact


def check_artifact_matches(artifact: Path, ckpt: Checkpoint) -> None:
    """Refuse an artifact exported from other weights, or shipping another tokenizer."""
    manifest = read_manifest(artifact)
    if manifest.source_sha256 != ckpt.weights_sha256():
        raise ArtifactMismatchError(f"{artifact} was exported from other weights than {ckpt.directory}")
    if sha256_files([artifact / manifest.tokenizer_file]) != sha256_files([ckpt.tokenizer_file]):
        raise ArtifactMismatchError(f"{artifact} ships another tokenizer than {ckpt.directory}")


def prepare(
    *,
    model: Path | None,
    preset_name: str | None,
    tokenizer_file: Path | None,
    backends: Sequence[str],
    onnx_dirs: Sequence[Path],
    trt_dirs: Sequence[Path],
    device: str,
    threads: int | None,
    say: Callable[[str], None],
    check_spec: Callable[[ModelSpec], None] = lambda spec: None,
    draft: str | None = None,
    draft_tokens: int = DRAFT_TOKENS,
) -> BenchSetup:
    """Open the model source and every requested backend. ``check_spec`` runs as soon as the model
    shape is known, before anything heavy is loaded (sweep values are checked against the context).
    ``draft`` (a model directory or ``ngram``): each loop runner that can verify gets a twin decoding
    speculatively with it, named ``<runner>+<draft>``."""
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown:
        raise CpmError(f"unknown backend(s) {', '.join(unknown)}; choose from {', '.join(BACKENDS)}")
    if (model is None) == (preset_name is None):
        raise CpmError("give exactly one of --model (a checkpoint) or --preset (random weights)")
    workdir = None
    if preset_name is not None:
        check_spec(preset(preset_name))
        if tokenizer_file is None:
            from cpm_infer.demo import demo_model_dir

            demo = demo_model_dir()
            if demo is None:
                raise CpmError("--preset needs a tokenizer file (--tokenizer) when the demo model is not installed")
            tokenizer_file = demo / "spiece.model"
        workdir = tempfile.TemporaryDirectory(prefix="cpm-bench-")
    try:
        if preset_name is not None:
            say(f"creating a random CPM-{preset_name} checkpoint")
            model = random_checkpoint(preset_name, tokenizer_file, Path(workdir.name) / preset_name)
            tokenizer_file = None
        ckpt = open_checkpoint(model, tokenizer_file)
        check_spec(ckpt.spec)
    except BaseException:
        if workdir is not None:
            workdir.cleanup()
        raise
    setup = BenchSetup(spec=ckpt.spec, checkpoint=ckpt, workdir=workdir)
    try:
        _add_eager(setup, backends, device, threads, say)
        if "ort" in backends:
            _add_ort(setup, onnx_dirs, device, threads, say)
        if "trt" in backends:
            _add_trt(setup, trt_dirs, device, say)
        if draft is not None:
            _add_drafted(setup, draft, draft_tokens, device, threads, say)
    except BaseException:
        setup.close()
        raise
    if not setup.runners:
        setup.close()
        raise CpmError("no backend could run: " + "; ".join(f"{k}: {v}" for k, v in setup.skipped.items()))
    return setup


def _add_drafted(setup: BenchSetup, draft: str, draft_tokens: int, device: str, threads: int | None, say) -> None:
    """A ``<runner>+<draft>`` twin of every loop runner whose backend can verify (torch, onnxruntime). An onnxruntime
    twin gets its own session (``share_cores``), so the runner without the draft runs as it would alone."""
    import copy

    from cpm_infer.backends.base import supports_speculation
    from cpm_infer.engine.speculative import NGRAM, open_draft, share_cores

    targets = [r for r in setup.runners if isinstance(r, LoopRunner) and supports_speculation(r.backend)]
    if not targets:
        setup.skipped["draft"] = "no runner can verify several tokens per pass (torch or ort)"
        return
    twins = [copy.copy(r.backend) if getattr(r.backend, "reopen", None) else r.backend for r in targets]
    say(f"opening the draft {draft}")
    source = draft if draft == NGRAM else Path(draft)
    opened = open_draft(source, twins[0], setup.tokenizer(), device=device, threads=threads)
    setup.closers.append(opened.close)
    share_cores(*twins[1:])
    for runner, twin in zip(targets, twins, strict=True):
        name = f"{runner.name}+{opened.name}"
        setup.runners.append(
            LoopRunner(name, twin, runner.traffic, tokenizer=runner.tokenizer, draft=opened, draft_tokens=draft_tokens)
        )
        setup.devices[name] = setup.devices.get(runner.name, "")


def _add_eager(setup: BenchSetup, backends: Sequence[str], device: str, threads: int | None, say) -> None:
    if not {"hf", "torch"} & set(backends):
        return
    try:
        from cpm_infer.backends.torch_backend import TorchBackend
        from cpm_infer.torch_model import load_model

        torch = require("torch", "torch")
        target = resolve_device(device, "torch")
        if threads:
            torch.set_num_threads(threads)
        say(f"loading the eager PyTorch model on {target}")
        model, _ = load_model(setup.checkpoint, device=str(target))
    except CpmError as exc:
        for name in ("hf", "torch"):
            if name in backends:
                setup.skipped[name] = str(exc)
        return
    fmt = float_format(str(next(model.parameters()).dtype).removeprefix("torch."))
    traffic = partial(fmt.step_bytes, setup.spec)
    runners: list[Runner] = []
    if "hf" in backends:
        runners.append(HFGenerateRunner(model, traffic))
    if "torch" in backends:
        runners.append(
            LoopRunner("torch", TorchBackend(model, device=str(target)), traffic, tokenizer=setup.tokenizer())
        )
    for runner in runners:
        setup.runners.append(runner)
        setup.devices[runner.name] = str(target)
        if target.is_cuda:
            setup.gpu_peaks[runner.name] = TorchGpuPeak(target.index)


def _add_ort(setup: BenchSetup, onnx_dirs: Sequence[Path], device: str, threads: int | None, say) -> None:
    from cpm_infer.backends import load_backend

    dirs = list(onnx_dirs)
    if not dirs:
        try:
            from export.onnx_export import export_onnx

            say("exporting the model to ONNX (validated on the CPU) for the ort backend")
            out = setup.scratch() / "onnx"  # removed with the setup: nothing is left in the temp dir
            dirs = [export_onnx(setup.checkpoint.directory, out, device="cpu", threads=threads).path]
        except CpmError as exc:
            setup.skipped["ort"] = f"export failed: {exc}"
            return
    for path in dirs:
        name = "ort" if len(dirs) == 1 else f"ort:{path.name}"
        try:
            check_artifact_matches(path, setup.checkpoint)
            target = resolve_device(device, "ort")
            say(f"loading {path} with onnxruntime on {target}")
            start = time.perf_counter()
            backend, _ = load_backend("ort", path, device=target, threads=threads)
            setup.load_s[name] = round(time.perf_counter() - start, 2)
        except (CpmError, ManifestError) as exc:
            setup.skipped[name] = str(exc)
            continue
        setup.runners.append(LoopRunner(name, backend, manifest_traffic(path, setup.spec), tokenizer=setup.tokenizer()))
        setup.devices[name] = str(target)


def _add_trt(setup: BenchSetup, trt_dirs: Sequence[Path], device: str, say) -> None:
    from cpm_infer.backends import load_backend

    if not trt_dirs:
        setup.skipped["trt"] = "no TensorRT engine given (--trt DIR; build one with cpm export trt)"
        return
    for path in trt_dirs:
        name = "trt" if len(trt_dirs) == 1 else f"trt:{path.name}"
        try:
            target = resolve_device(device, "trt")
            start = time.perf_counter()
            backend, _ = load_backend("trt", path, device=target)
            setup.load_s[name] = round(time.perf_counter() - start, 2)
        except CpmError as exc:
            setup.skipped[name] = str(exc)
            continue
        setup.runners.append(LoopRunner(name, backend, manifest_traffic(path, setup.spec), tokenizer=setup.tokenizer()))
        setup.devices[name] = str(target)


def manifest_traffic(path: Path, spec: ModelSpec) -> StepBytes | None:
    """Bytes per decode step of an artifact, from its manifest's dtype and quantization details."""
    try:
        manifest = read_manifest(path)
    except (CpmError, ManifestError):
        return None
    return partial(artifact_format(manifest.details, manifest.dtype, spec).step_bytes, spec)
