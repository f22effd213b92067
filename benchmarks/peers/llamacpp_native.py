"""llama.cpp as its users run it: its own converter, quantizer and native tools, built from the pinned source.

The source is the llama-cpp-python sdist the ``peers`` extra pins (it vendors llama.cpp in ``vendor/llama.cpp``).

    python benchmarks/peers/llamacpp_native.py build                 # once per version: many minutes on 2 cores
    python benchmarks/peers/llamacpp_native.py bench CHECKPOINT --work-dir /tmp/llnative --threads 2
    python benchmarks/peers/llamacpp_native.py verify cpm_infer/demo/sanguo --work-dir /tmp/llnative
    python benchmarks/peers/llamacpp_native.py speculative --target T.gguf --draft D.gguf --tokenizer CKPT --out DIR

- ``build``: ``pip download --no-deps --no-binary :all: llama-cpp-python==<pin>`` (the version is read from the
  ``peers`` extra in pyproject.toml), unpacked, then ``cmake`` on ``vendor/llama.cpp`` (``CMAKE_OPTIONS``: Release,
  ``-march=native``, no HTTPS, no prebuilt web UI, so nothing is fetched at build time; AMX switched off where
  the CPU reports it, see ``NO_AMX``) and only ``TARGETS``.
  Everything lives in ``~/.cache/cpm-infer/llama.cpp-<version>/`` ($XDG_CACHE_HOME honoured); a stamp
  (``build/cpm-infer-build.json``) records version, options and targets, and a later call with the same key and
  every binary present reuses the build.
- ``convert``: the source's own ``convert_hf_to_gguf.py`` with the source's own ``gguf-py`` (what the script puts
  first on its path). Two adapters, both outside llama.cpp's files, in a staging folder of links to the
  checkpoint (see ``convert``): ``config.json`` gains ``n_ctx`` (= ``n_positions``), which the converter's GPT-2
  class reads and transformers 5 no longer writes; and the GPT-2 class's vocabulary step, which only takes a
  Hugging Face BPE tokenizer with a pre-tokenizer hash it knows, is pointed at the converter's own SentencePiece
  step (``_set_vocab_sentencepiece``, the one its LLaMA class uses) reading CPM's ``spiece.model`` /
  ``chinese_vocab.model`` as ``tokenizer.model``; ``tokenizer_config.json`` says no BOS/EOS is added (CPM adds
  none). Weights, hyperparameters and tensor layout are the converter's, untouched: the token embedding stays
  tied to the output (no ``output.weight``), so ``llama-quantize`` stores it as q6_K.
- ``quantize``: ``llama-quantize F32 OUT Q8_0|Q4_0|Q4_K_M`` with its default per-tensor recipe.
- Timing, parsed from the tools' own output (llama.cpp's clock, no Python loop): ``llama-bench -p 0 -n N -d D
  -o json`` (decode, batch 1, ``-d``: tokens already in the cache), ``llama-bench -p 128 -n 0`` (prefill), and
  ``llama-batched-bench -npp P -ntg N -npl 8,1 --output-format jsonl`` (decode of 8 sequences per step; see
  ``batched_decode`` for the trailing batch-1 run).
- ``verify`` / ``greedy_server``: tokens from ``llama-server`` (``/completion`` with the prompt as token ids,
  temperature 0, EOS ignored) against our torch backend's. llama.cpp's own text tokenizer would not split like
  CPM's (jieba first, spaces and newlines mapped to U+2582 / U+2583), so ids go in and ids come out.
- ``speculative``: llama.cpp's own speculative decoding, the peer of ``benchmarks/speculative.py pair``. Two
  ``llama-server`` processes on the target GGUF, one alone and one with the draft GGUF (``-md D --spec-type
  draft-simple --spec-draft-n-max K``; see ``server_command``); per prompt one request to each, interleaved
  (``speculative_pair``), batch 1, prompt ids in (``--prompt-ids`` or pair's held-out prompts tokenized with
  ``--tokenizer``), EOS ignored, greedy and our CLI's default sampling (temperature 1.0, top-p 0.9; the request
  names its samplers and switches llama.cpp's other ones off). Timed by the server's own clock
  (``timings.predicted_ms`` over ``predicted_n - 1`` steps: the prefill of both models is not in it, drafting
  is), acceptance from its ``draft_n_accepted / draft_n``, verify passes from ``/metrics``. How llama.cpp
  speculates: its draft proposes its top token each time (a top-10 sampler, the first candidate), up to K while
  ``--spec-draft-p-min`` allows; the target samples every position with the request's sampler and a proposal
  stands while it equals the target's token. Greedy that is exact; sampled it is exact too, the draft's
  proposal being a point mass, but the acceptance is the target's probability of the draft's top token, where
  our engine's draft samples and accepts by the rejection rule: sampled acceptances of the two do not compare
  one to one. ``-md`` without ``--spec-type`` loads the draft and never speculates (this llama.cpp).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "llama-cpp-python"
# Release build for this CPU; no HTTPS (LLAMA_OPENSSL, LLAMA_CURL: the latter is deprecated and ignored by this
# llama.cpp, passed for older ones) and no web UI (LLAMA_USE_PREBUILT_UI=ON would download it from Hugging Face
# at build time); no tests.
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
)
# -march=native without AMX: on a CPU that reports AMX (amx_tile in /proc/cpuinfo) ggml's AMX kernels
# (ggml-cpu/amx, used for q4_0 / q4_K / q8_0 matrix products of more than one row) crashed on the 2-core Xeon
# guest this was written on (SIGILL at `tilezero` in tinygemm_kernel_amx, SIGSEGV with 2 threads, any prompt
# of 16 tokens); batch-1 decode does not use them (ggml's m=1 path is AVX512-VNNI). Only added where AMX is
# reported, so the build key says when it was.
NO_AMX = ("-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16")
TARGETS = ("llama-bench", "llama-batched-bench", "llama-quantize", "llama-server")
QUANT_TYPES = {"q8_0": "Q8_0", "q4_0": "Q4_0", "q4_K_M": "Q4_K_M"}  # ours -> llama-quantize's name
FORMATS = ("f32", *QUANT_TYPES)
STAMP = "cpm-infer-build.json"


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- version, cache, build ------------------------------------------------------------------------------


def pinned_version(pyproject: Path = ROOT / "pyproject.toml") -> str:
    """The llama-cpp-python version the ``peers`` extra pins (``llama-cpp-python==X``)."""
    extra = re.search(r"^peers\s*=\s*\[([^\]]*)\]", pyproject.read_text(encoding="utf-8"), re.M)
    for requirement in re.findall(r"[\"']([^\"']+)[\"']", extra.group(1) if extra else ""):
        match = re.fullmatch(r"\s*llama[-_]cpp[-_]python\s*==\s*([\w.]+)\s*", requirement)
        if match:
            return match.group(1)
    raise ValueError(f"{pyproject}: the peers extra pins no {PACKAGE}==VERSION")


def default_cache_dir(version: str, env: dict | None = None) -> Path:
    """``$XDG_CACHE_HOME/cpm-infer/llama.cpp-<version>`` (``~/.cache`` when unset): one build per version."""
    env = os.environ if env is None else env
    base = Path(env["XDG_CACHE_HOME"]) if env.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "cpm-infer" / f"llama.cpp-{version}"


def cpu_has_amx(cpuinfo: str | None = None) -> bool:
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return False
    return bool(re.search(r"^flags\s*:.*\bamx_tile\b", cpuinfo, re.M))


def default_cmake_options(amx: bool | None = None) -> tuple[str, ...]:
    """``CMAKE_OPTIONS``, plus -march=native's AMX switched off (C and C++) when the CPU reports AMX."""
    amx = cpu_has_amx() if amx is None else amx
    if not amx:
        return CMAKE_OPTIONS
    flags = " ".join(NO_AMX)
    return (*CMAKE_OPTIONS, f"-DCMAKE_C_FLAGS={flags}", f"-DCMAKE_CXX_FLAGS={flags}")


def build_key(version: str, options: Sequence[str] = CMAKE_OPTIONS, generator: str | None = None) -> dict:
    """What a build depends on. A build is reused when its stamp holds the same key (and the targets wanted)."""
    return {"version": version, "cmake_options": list(options), "generator": generator}


def stamp_reusable(stamp: dict | None, key: dict, targets: Sequence[str]) -> bool:
    """A stamp's build serves ``key`` and ``targets``: same version, options, generator; the targets a subset."""
    if not stamp or stamp.get("key") != key:
        return False
    return set(targets) <= set(stamp.get("targets", ()))


@dataclass(frozen=True)
class Tools:
    """A built llama.cpp: its source (``convert_hf_to_gguf.py``, ``gguf-py``) and binaries."""

    cache: Path
    version: str

    @property
    def source(self) -> Path:  # the unpacked sdist
        return self.cache / "src" / f"llama_cpp_python-{self.version}"

    @property
    def llama_cpp(self) -> Path:
        return self.source / "vendor" / "llama.cpp"

    @property
    def build_dir(self) -> Path:
        return self.cache / "build"

    @property
    def bin(self) -> Path:
        return self.build_dir / "bin"

    def exe(self, name: str) -> Path:
        return self.bin / name

    def stamp(self) -> dict | None:
        path = self.build_dir / STAMP
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def has(self, targets: Sequence[str]) -> bool:
        return all(os.access(self.exe(t), os.X_OK) for t in targets)


def find_tools(version: str | None = None, cache: Path | None = None, targets: Sequence[str] = TARGETS) -> Tools | None:
    """The cached build when it is complete for ``targets`` (whatever options it was made with), else None."""
    version = version or pinned_version()
    tools = Tools(cache or default_cache_dir(version), version)
    stamp = tools.stamp()
    if stamp and stamp.get("key", {}).get("version") == version and tools.has(targets):
        return tools
    return None


def fetch_source(tools: Tools) -> Path:
    """Download (pip, from PyPI) and unpack the sdist into the cache, once."""
    if (tools.llama_cpp / "CMakeLists.txt").is_file():
        return tools.llama_cpp
    sdist_dir = tools.cache / "sdist"
    name = f"llama_cpp_python-{tools.version}.tar.gz"
    if not (sdist_dir / name).is_file():
        say(f"pip download {PACKAGE}=={tools.version} (sdist)")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        subprocess.run([*cmd, f"{PACKAGE}=={tools.version}", "-d", str(sdist_dir)], check=True)
    unpack = tools.cache / "src.tmp"
    shutil.rmtree(unpack, ignore_errors=True)
    with tarfile.open(sdist_dir / name) as tar:
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python >= 3.10.12 / 3.11.4
        tar.extractall(unpack, **safe)
    shutil.rmtree(tools.cache / "src", ignore_errors=True)
    unpack.replace(tools.cache / "src")
    return tools.llama_cpp


def build(
    version: str | None = None,
    cache: Path | None = None,
    *,
    targets: Sequence[str] = TARGETS,
    jobs: int = 2,
    options: Sequence[str] | None = None,
) -> Tools:
    """llama.cpp's tools for ``version`` (default: the pinned one), built once into the cache and reused.
    Other options than the cached build's: reconfigured from scratch in the same folder (its CMake cache
    dropped), so ninja recompiles what the new options change; another generator: the folder is emptied."""
    version = version or pinned_version()
    options = default_cmake_options() if options is None else tuple(options)
    tools = Tools(cache or default_cache_dir(version), version)
    generator = "Ninja" if shutil.which("ninja") else None
    key = build_key(version, options, generator)
    if stamp_reusable(tools.stamp(), key, targets) and tools.has(targets):
        return tools
    source = fetch_source(tools)
    old = tools.stamp()
    if old and old.get("key", {}).get("generator") != generator:  # a CMake build folder cannot switch
        shutil.rmtree(tools.build_dir, ignore_errors=True)
    elif old and old.get("key") != key:  # options left out would stay in CMakeCache.txt
        (tools.build_dir / "CMakeCache.txt").unlink(missing_ok=True)
        (tools.build_dir / STAMP).unlink(missing_ok=True)
    wanted = sorted(set(targets) | set(old["targets"] if old and old.get("key") == key else ()))
    start = time.perf_counter()
    configure = ["cmake", "-S", str(source), "-B", str(tools.build_dir), *(["-G", generator] if generator else [])]
    say(f"configuring llama.cpp {version}: {' '.join(options)}")
    subprocess.run([*configure, *options], check=True)
    configured = time.perf_counter()
    say(f"building {', '.join(wanted)} with -j{jobs}")
    subprocess.run(
        ["cmake", "--build", str(tools.build_dir), "--config", "Release", "-j", str(jobs), "--target", *wanted],
        check=True,
    )
    done = time.perf_counter()
    stamp = {
        "key": key,
        "targets": wanted,
        "configure_s": round(configured - start, 1),
        "build_s": round(done - configured, 1),
        "jobs": jobs,
        "built_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        "compiler": _compiler(tools.build_dir),
    }
    (tools.build_dir / STAMP).write_text(json.dumps(stamp, indent=2), encoding="utf-8")
    if not tools.has(wanted):
        raise RuntimeError(f"llama.cpp build finished but {tools.bin} lacks some of {wanted}")
    return tools


def _compiler(build_dir: Path) -> str | None:
    try:
        text = (build_dir / "CMakeCache.txt").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    match = re.search(r"^CMAKE_CXX_COMPILER:\w+=(.+)$", text, re.M)
    if not match:
        return None
    out = subprocess.run([match.group(1), "--version"], capture_output=True, text=True, check=False)
    return out.stdout.splitlines()[0] if out.stdout else match.group(1)


def build_info(tools: Tools) -> dict:
    """The stamp plus llama.cpp's own build id (``llama-bench --version``-style, from its JSON when run)."""
    return {"cache": str(tools.cache), **(tools.stamp() or {})}


# -- convert, quantize ----------------------------------------------------------------------------------

# Runs convert_hf_to_gguf.py as ``python convert_hf_to_gguf.py ARGS`` would, after giving its GPT-2 class the
# converter's own SentencePiece vocabulary step (CPM's tokenizer is a SentencePiece model, not a BPE one).
_CONVERT_BOOT = """\
import os, runpy, sys
from pathlib import Path
script = Path(sys.argv[1]).resolve()
sys.argv = sys.argv[1:]
sys.path.insert(0, str(script.parent))
if "NO_LOCAL_GGUF" not in os.environ:
    sys.path.insert(1, str(script.parent / "gguf-py"))
import conversion.gpt2 as gpt2
gpt2.GPT2Model.set_vocab = lambda self: self._set_vocab_sentencepiece()
runpy.run_path(str(script), run_name="__main__")
"""


def stage_checkpoint(checkpoint: Path, stage: Path) -> Path:
    """``stage``: links to the checkpoint's weights, its SentencePiece file as ``tokenizer.model``, its config
    with ``n_ctx``, and a ``tokenizer_config.json`` that adds no BOS/EOS: what the converter reads."""
    from cpm_infer.checkpoint import open_checkpoint

    ckpt = open_checkpoint(checkpoint)
    stage.mkdir(parents=True, exist_ok=True)
    for weights in ckpt.weight_files:
        (stage / weights.name).symlink_to(weights.resolve())
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (checkpoint / index).is_file():
            (stage / index).symlink_to((checkpoint / index).resolve())
    (stage / "tokenizer.model").symlink_to(ckpt.tokenizer_file.resolve())
    config = dict(ckpt.config)
    config.setdefault("n_ctx", config.get("n_positions", 1024))
    (stage / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    tok_config = {"add_bos_token": False, "add_eos_token": False}
    (stage / "tokenizer_config.json").write_text(json.dumps(tok_config), encoding="utf-8")
    return stage


def convert(checkpoint: Path, out_gguf: Path, tools: Tools | None = None, *, outtype: str = "f32") -> Path:
    """``checkpoint`` (HF GPT-2 + CPM SentencePiece) -> GGUF with llama.cpp's converter (reused when there)."""
    out_gguf = Path(out_gguf)
    if out_gguf.is_file():
        return out_gguf
    tools = tools or require_tools(targets=())
    out_gguf.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_gguf.with_name(out_gguf.name + ".tmp")
    with tempfile.TemporaryDirectory(dir=out_gguf.parent, prefix=".stage-") as stage:
        stage_checkpoint(Path(checkpoint), Path(stage))
        script = tools.llama_cpp / "convert_hf_to_gguf.py"
        cmd = [sys.executable, "-c", _CONVERT_BOOT, str(script), stage, "--outtype", outtype, "--outfile", str(tmp)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    tmp.replace(out_gguf)
    return out_gguf


def quantized_path(f32_gguf: Path, qtype: str) -> Path:
    """``x-f32.gguf`` -> ``x-q4_K_M.gguf`` (``x.gguf`` -> ``x-q4_K_M.gguf``)."""
    stem = f32_gguf.stem.removesuffix("-f32")
    return f32_gguf.with_name(f"{stem}-{qtype}.gguf")


def quantize(
    f32_gguf: Path, qtype: str, out: Path | None = None, tools: Tools | None = None, *, threads: int = 2
) -> Path:
    """``llama-quantize`` with its default recipe for ``qtype`` (q8_0, q4_0, q4_K_M); reused when there."""
    out = Path(out) if out else quantized_path(Path(f32_gguf), qtype)
    if out.is_file():
        return out
    tools = tools or require_tools(targets=("llama-quantize",))
    tmp = out.with_name(out.name + ".tmp")
    cmd = [str(tools.exe("llama-quantize")), str(f32_gguf), str(tmp), QUANT_TYPES[qtype], str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"llama-quantize {qtype} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    tmp.replace(out)
    return out


def tensor_types(gguf_file: Path, tools: Tools) -> dict[str, str]:
    """Tensor name -> type of a GGUF file, read with the source's gguf-py."""
    code = (
        "import json, sys; from gguf import GGUFReader; "
        "print(json.dumps({t.name: t.tensor_type.name for t in GGUFReader(sys.argv[1]).tensors}))"
    )
    env = {**os.environ, "PYTHONPATH": str(tools.llama_cpp / "gguf-py")}
    proc = subprocess.run([sys.executable, "-c", code, str(gguf_file)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout)


def use_binding_from_build(tools: Tools) -> None:
    """Make ``import llama_cpp`` load the pinned sdist's Python code over the ``libllama`` built here (the same
    vendored llama.cpp a ``pip install`` would compile, without a second build). The binding's own Python
    dependencies (numpy, diskcache, jinja2, typing-extensions) must be importable."""
    os.environ["LLAMA_CPP_LIB_PATH"] = str(tools.bin)
    if str(tools.source) not in sys.path:
        sys.path.insert(0, str(tools.source))


def require_tools(version: str | None = None, targets: Sequence[str] = TARGETS) -> Tools:
    tools = find_tools(version, targets=targets)
    if tools is None:
        raise RuntimeError(
            "llama.cpp's tools are not built: python benchmarks/peers/llamacpp_native.py build (many minutes)"
        )
    return tools


# -- timing: the tools' own output ----------------------------------------------------------------------


def _bench_records(text: str) -> list[dict]:
    """llama-bench's records: the JSON array of ``-o json`` or the lines of ``-o jsonl``, log lines around them
    ignored."""
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\[", text):
        try:
            value, _ = decoder.raw_decode(text, match.start())
        except ValueError:
            continue
        if isinstance(value, list) and value and all(isinstance(v, dict) and "avg_ns" in v for v in value):
            return value
    records = []
    for line in text.splitlines():
        if line.strip().startswith("{"):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict) and "avg_ns" in value:
                records.append(value)
    if not records:
        raise ValueError("no llama-bench records in the output")
    return records


def parse_llama_bench(text: str) -> list[dict]:
    """``llama-bench -o json`` (or ``-o jsonl``) -> one record per test with llama-bench's own numbers and, per
    repetition, ms per token (decode) or ms per prompt (prefill)."""
    records = _bench_records(text)
    out = []
    for r in records:
        n_prompt, n_gen = int(r["n_prompt"]), int(r["n_gen"])
        kind = "decode" if n_gen > 0 and n_prompt == 0 else "prefill" if n_prompt > 0 and n_gen == 0 else "mixed"
        samples_ms = [ns / 1e6 for ns in r.get("samples_ns") or [r["avg_ns"]]]
        per = n_gen if kind == "decode" else 1
        out.append(
            {
                "kind": kind,
                "n_prompt": n_prompt,
                "n_gen": n_gen,
                "n_depth": int(r.get("n_depth", 0)),
                "n_threads": r.get("n_threads"),
                "avg_ms": r["avg_ns"] / 1e6,
                "avg_ts": r.get("avg_ts"),
                "samples_ms": samples_ms,
                "ms_per_token": [ms / per for ms in samples_ms] if kind == "decode" else None,
                "type": r.get("model_type"),
                "model_size": r.get("model_size"),
                "flash_attn": r.get("flash_attn"),
                "build": f"{r.get('build_commit')} ({r.get('build_number')})",
                "cpu": r.get("cpu_info"),
            }
        )
    return out


_BATCHED_ROW = re.compile(r"^\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|" + r"\s*([\d.]+)\s*\|" * 6)
_BATCHED_KEYS = ("pp", "tg", "pl", "n_kv", "t_pp", "speed_pp", "t_tg", "speed_tg", "t", "speed")


def parse_batched_bench(text: str) -> list[dict]:
    """``llama-batched-bench`` output, ``--output-format jsonl`` or its markdown table -> one dict per row
    (``pp``, ``tg``, ``pl``, ``t_pp``, ``t_tg`` seconds, ``speed_tg`` = pl * tg / t_tg tokens/s, ...)."""
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{") and '"speed_tg"' in line:
            rows.append(json.loads(line))
        elif match := _BATCHED_ROW.match(line):
            values = match.groups()
            rows.append(
                {k: (int(v) if i < 4 else float(v)) for i, (k, v) in enumerate(zip(_BATCHED_KEYS, values, strict=True))}
            )
    if not rows:
        raise ValueError("no llama-batched-bench result rows in the output")
    for row in rows:
        row["step_ms"] = row["t_tg"] / row["tg"] * 1e3  # one decode step of the whole batch
    return rows


def _run(cmd: Sequence[str], timeout: float = 1800) -> str:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{Path(cmd[0]).name} failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return proc.stdout + "\n" + proc.stderr


def llama_bench(
    tools: Tools, model: Path, *, n_prompt: int, n_gen: int, depth: int = 0, threads: int = 2, reps: int = 5
) -> dict:
    """One llama-bench test (its defaults otherwise: batch 2048/512, flash attention auto, mmap, warm-up run)."""
    cmd = [str(tools.exe("llama-bench")), "-m", str(model), "-p", str(n_prompt), "-n", str(n_gen)]
    cmd += ["-d", str(depth), "-t", str(threads), "-r", str(reps), "-o", "json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"llama-bench failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    (record,) = parse_llama_bench(proc.stdout)
    return record | {"command": " ".join(cmd)}


def decode_ms(tools: Tools, model: Path, *, n_gen: int = 64, depth: int = 0, threads: int = 2, reps: int = 5) -> dict:
    """Batch-1 decode: ``llama-bench -p 0 -n n_gen -d depth``; ms/token per repetition and their median."""
    r = llama_bench(tools, model, n_prompt=0, n_gen=n_gen, depth=depth, threads=threads, reps=reps)
    return r | {"ms": statistics.median(r["ms_per_token"])}


def prefill_ms(tools: Tools, model: Path, *, n_prompt: int = 128, threads: int = 2, reps: int = 5) -> dict:
    """Prefill of ``n_prompt`` tokens: ``llama-bench -p n_prompt -n 0``; ms per repetition and their median."""
    r = llama_bench(tools, model, n_prompt=n_prompt, n_gen=0, threads=threads, reps=reps)
    return r | {"ms": statistics.median(r["samples_ms"])}


def batched_decode(
    tools: Tools,
    model: Path,
    *,
    batch: int = 8,
    prompt: int = 16,
    n_gen: int = 32,
    threads: int = 2,
    ctx: int = 2048,
    tries: int = 3,
) -> dict:
    """``llama-batched-bench`` for ``batch`` sequences of ``prompt`` tokens then ``n_gen`` decode steps (one
    llama_decode of ``batch`` tokens each): step ms and tokens/s of the batch, llama.cpp's own clock.

    The tool prints its rows through llama.cpp's asynchronous logger, which is never flushed at exit
    (common/log.cpp: "logs may be lost if not flushed before the program exits"); on a busy machine the last
    row was often missing. So a batch-1 run is asked for after the wanted one (its row may be the one lost)
    and a run without the wanted row is repeated, up to ``tries`` times."""
    cmd = [str(tools.exe("llama-batched-bench")), "-m", str(model), "-c", str(ctx), "-b", "2048", "-ub", "512"]
    cmd += ["-npp", str(prompt), "-ntg", str(n_gen), "-npl", f"{batch},1" if batch != 1 else "1,1"]
    cmd += ["-t", str(threads), "-tb", str(threads), "--output-format", "jsonl"]
    for _ in range(tries):
        try:
            rows = parse_batched_bench(_run(cmd))
        except ValueError:
            continue
        if rows[0]["pl"] == batch:
            return rows[0] | {"command": " ".join(cmd)}
    raise RuntimeError(f"llama-batched-bench printed no batch-{batch} row in {tries} runs: {' '.join(cmd)}")


class NativeRunner:
    """One GGUF file timed by llama.cpp's tools, case by case, for a harness that interleaves engines.

    ``step_seconds(batch, prompt, steps)``: seconds per decode step after ``prompt`` tokens, ``steps`` steps;
    batch 1 -> ``llama-bench -p 0 -n steps -d prompt -r reps``, batch > 1 -> ``llama-batched-bench -npp prompt
    -ntg steps -npl batch``. Same positions as a harness that prefills ``prompt`` tokens then times ``steps``
    decode steps."""

    def __init__(self, name: str, tools: Tools, model: Path, *, threads: int, reps: int = 1) -> None:
        self.name, self.tools, self.model, self.threads, self.reps = name, tools, Path(model), threads, reps
        self.last: dict | None = None
        self.bench: dict = {}  # llama-bench's build id, CPU and settings, from its last record

    def step_seconds(self, batch: int, prompt: int, steps: int) -> float:
        if batch == 1:
            r = decode_ms(self.tools, self.model, n_gen=steps, depth=prompt, threads=self.threads, reps=self.reps)
            self.last = r
            self.bench = {k: r[k] for k in ("build", "cpu", "type", "flash_attn", "n_threads")}
            return r["ms"] / 1e3
        row = batched_decode(self.tools, self.model, batch=batch, prompt=prompt, n_gen=steps, threads=self.threads)
        self.last = row
        return row["step_ms"] / 1e3

    def prefill_seconds(self, prompt: int) -> float:
        """Seconds to process a ``prompt``-token prompt at batch 1: ``llama-bench -p prompt -n 0 -r reps``."""
        r = prefill_ms(self.tools, self.model, n_prompt=prompt, threads=self.threads, reps=self.reps)
        self.last = r
        return r["ms"] / 1e3


# -- greedy tokens through llama-server -------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict, timeout: float = 300) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def server_command(
    tools: Tools,
    model: Path,
    port: int,
    *,
    threads: int = 2,
    ctx: int = 1024,
    draft: Path | None = None,
    draft_max: int = 4,
    metrics: bool = False,
) -> list[str]:
    """``llama-server`` on loopback with one slot. With ``draft``: ``-md DRAFT --spec-type draft-simple``
    (without the type this llama.cpp loads the draft and never speculates), ``--spec-draft-n-max K`` (the old
    ``--draft-max`` / ``--draft-min`` are removed in it), drafts of any length and confidence kept (n-min 0,
    p-min 0), the draft on the same threads."""
    cmd = [str(tools.exe("llama-server")), "-m", str(model), "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["-t", str(threads), "-tb", str(threads), "-c", str(ctx), "-np", "1"]
    if draft is not None:
        cmd += ["-md", str(draft), "--spec-type", SPEC_TYPE, "--spec-draft-n-max", str(draft_max)]
        cmd += ["--spec-draft-n-min", "0", "--spec-draft-p-min", "0", "-td", str(threads), "-tbd", str(threads)]
    if metrics:
        cmd.append("--metrics")
    return cmd


class LlamaServer:
    """A ``llama-server`` process for a ``with`` block: started, waited for (``/health``), stopped; its log kept
    in a temporary file for the error when it does not start."""

    def __init__(self, cmd: Sequence[str], start_timeout: float = 120) -> None:
        self.cmd, self.start_timeout = list(cmd), start_timeout
        self.base = f"http://127.0.0.1:{cmd[cmd.index('--port') + 1]}"

    def __enter__(self) -> LlamaServer:
        self.log = tempfile.TemporaryFile()
        self.process = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT)
        try:
            self._wait()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _wait(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.base}/health", timeout=5) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"llama-server did not start: {' '.join(self.cmd)}\n{self.log_tail()}")
            time.sleep(0.5)

    def log_tail(self, chars: int = 3000) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-chars:]

    def completion(self, body: dict, timeout: float = 300) -> dict:
        return _post(f"{self.base}/completion", body, timeout)

    def get(self, path: str, timeout: float = 30) -> str:
        with urllib.request.urlopen(f"{self.base}{path}", timeout=timeout) as response:
            return response.read().decode()

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


def greedy_server(
    tools: Tools, model: Path, prompts: Sequence[Sequence[int]], new_tokens: int, *, threads: int = 2, ctx: int = 1024
) -> list[list[int]]:
    """Greedy continuations from ``llama-server`` (loopback): prompt ids in, ``new_tokens`` ids out, EOS ignored."""
    with LlamaServer(server_command(tools, model, _free_port(), threads=threads, ctx=ctx)) as server:
        out = []
        for ids in prompts:
            body = {"prompt": [int(t) for t in ids], "n_predict": new_tokens, "temperature": 0}
            body |= {"ignore_eos": True, "return_tokens": True, "cache_prompt": False}
            out.append([int(t) for t in server.completion(body)["tokens"]])
        return out


def greedy_torch(checkpoint: Path, prompts: Sequence[Sequence[int]], new_tokens: int) -> list[list[int]]:
    """Our torch backend's greedy tokens for the same prompt ids."""
    from cpm_infer.backends import load_backend
    from cpm_infer.bench.runners import IdsTokenizer
    from cpm_infer.config import GenerationConfig
    from cpm_infer.engine.generate import generate

    backend = load_backend("torch", checkpoint)
    backend = backend[0] if isinstance(backend, tuple) else backend
    config = GenerationConfig(temperature=0, max_new_tokens=new_tokens, ignore_eos=True, ban_unk=False)
    results = generate(backend, [list(p) for p in prompts], config, IdsTokenizer(backend.spec.vocab_size))
    return [list(r.token_ids) for r in results]


# -- speculative decoding through llama-server ----------------------------------------------------------------

SPEC_TYPE = "draft-simple"  # llama.cpp's speculation with a standalone draft model (``--spec-type``)
# A request samples as our engine does: temperature, then top-k, then top-p, nothing else. llama-server's own
# chain is penalties, DRY, top-n-sigma, top-k 40, typical, top-p 0.95, min-p 0.05, XTC, temperature; the request
# names its samplers and switches the rest off.
SERVER_SAMPLERS = ("temperature", "top_k", "top_p")
SERVER_SAMPLING_OFF = {
    "min_p": 0.0,
    "typical_p": 1.0,
    "top_n_sigma": -1.0,
    "xtc_probability": 0.0,
    "dynatemp_range": 0.0,
    "repeat_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "dry_multiplier": 0.0,
    "mirostat": 0,
}
# Our settings without a mapping to llama-server here: a sampling mode must leave them at these values.
_UNMAPPED = {
    "min_p": 0.0,
    "typical_p": 1.0,
    "repetition_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "no_repeat_ngram_size": 0,
}


def sampling_body(temperature: float, *, top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> dict:
    """The sampling fields of a ``/completion`` request (temperature 0: greedy; top_k 0: off)."""
    body = {"temperature": float(temperature), "top_k": int(top_k), "top_p": float(top_p), "seed": int(seed)}
    return body | {"samplers": list(SERVER_SAMPLERS)} | SERVER_SAMPLING_OFF


def spec_modes(labels: Sequence[str]) -> dict[str, dict]:
    """Our benchmark sampling modes (``greedy``, ``default`` = the CLI's: temperature 1.0, top-p 0.9, top-k 0,
    from ``cpm_infer.bench.runners``) as request fields; a setting without a mapping here is an error."""
    from cpm_infer.bench.runners import parse_sampling

    modes = {}
    for label in labels:
        config = parse_sampling(label).config(1)
        unmapped = {k: getattr(config, k) for k, off in _UNMAPPED.items() if getattr(config, k) != off}
        if unmapped:
            raise ValueError(f"sampling {label!r}: {unmapped} has no llama-server mapping here")
        modes[label] = sampling_body(config.temperature, top_k=config.top_k, top_p=config.top_p)
    return modes


def completion_body(ids: Sequence[int], new_tokens: int, sampling: dict) -> dict:
    """Prompt ids in, ``new_tokens`` ids out, EOS ignored (llama-server bans the end-of-generation tokens), no
    prompt cache between requests."""
    body = {"prompt": [int(t) for t in ids], "n_predict": new_tokens, "ignore_eos": True, "return_tokens": True}
    return body | {"cache_prompt": False} | sampling


def completion_record(response: dict) -> dict:
    """A ``/completion`` response -> llama-server's own numbers for it (``timings``): ``n`` tokens made, ``ms``
    from the first new token to the last (``predicted_ms``: the prefill of target and draft is in ``prompt_ms``,
    not here), ``per_token_ms`` = ms / (n - 1) (``predicted_per_token_ms``); with a draft ``draft_n`` (tokens
    proposed) and ``draft_n_accepted`` (both 0 when the server did not speculate: it leaves them out)."""
    t = response["timings"]
    return {
        "n": int(t["predicted_n"]),
        "ms": float(t["predicted_ms"]),
        "per_token_ms": float(t["predicted_per_token_ms"]),
        "prompt_n": int(t["prompt_n"]),
        "prompt_ms": float(t["prompt_ms"]),
        "draft_n": int(t.get("draft_n", 0)),
        "draft_n_accepted": int(t.get("draft_n_accepted", 0)),
        "tokens": [int(x) for x in response.get("tokens", ())],
        "speculative_types": (response.get("generation_settings") or {}).get("speculative.types"),
    }


def parse_metrics(text: str) -> dict[str, float]:
    """llama-server's ``/metrics`` (Prometheus text) -> name without the ``llamacpp:`` prefix (labels kept) ->
    value."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name.removeprefix("llamacpp:")] = float(value)
    return out


def summarize_runs(runs: Sequence[dict]) -> dict:
    """Requests of one server in one mode, pooled: ms/token = all ``predicted_ms`` / all decode steps (n - 1
    each; with equal n, the mean of the requests' ``predicted_per_token_ms``), its median over requests,
    tokens/s, and with a draft the accepted share of proposed tokens and llama.cpp's mean accepted length
    (1 + accepted / verify passes, as its log prints it)."""
    steps = sum(r["n"] - 1 for r in runs)
    ms = sum(r["ms"] for r in runs)
    proposed, accepted = sum(r["draft_n"] for r in runs), sum(r["draft_n_accepted"] for r in runs)
    passes = [r["verify_steps"] for r in runs if r.get("verify_steps") is not None]
    verify = sum(passes) if len(passes) == len(runs) else 0  # every request's count, or none
    return {
        "requests": len(runs),
        "tokens": sum(r["n"] for r in runs),
        "ms_per_token": ms / steps,
        "median_ms_per_token": statistics.median(r["per_token_ms"] for r in runs),
        "tok_s": 1e3 * steps / ms,
        "draft_n": proposed,
        "draft_n_accepted": accepted,
        "acceptance": accepted / proposed if proposed else None,
        "mean_accepted_len": 1 + accepted / verify if verify else None,
    }


def _request(server: LlamaServer, body: dict) -> dict:
    record = completion_record(server.completion(body))
    if record["n"] != body["n_predict"]:
        raise RuntimeError(f"llama-server made {record['n']} tokens, not {body['n_predict']} (context too small?)")
    return record


def _verify_passes(server: LlamaServer) -> float | None:
    return parse_metrics(server.get("/metrics")).get("spec_decode_num_drafts_total")


def speculative_pair(
    alone: LlamaServer,
    drafted: LlamaServer,
    prompts: Sequence[Sequence[int]],
    modes: dict[str, dict],
    *,
    new_tokens: int,
    repeats: int,
    warmup_tokens: int = 8,
) -> list[dict]:
    """Per mode: a warm-up request to each server, then ``repeats`` passes over the prompts, each prompt to the
    target alone then to the target with its draft (interleaved); a request's seed is its index in the mode, the
    same for both servers. Verify passes per request from the drafting server's ``/metrics`` (its
    ``spec_decode_num_drafts_total`` before and after). Greedy: the two servers' tokens compared."""
    rows = []
    for label, sampling in modes.items():
        for server in (alone, drafted):
            warm = _request(server, completion_body(prompts[0], warmup_tokens, sampling))
            speculating = SPEC_TYPE in (warm["speculative_types"] or "")
            if speculating != (server is drafted):
                raise RuntimeError(f"llama-server speculative.types {warm['speculative_types']!r}: {server.cmd}")
        runs: dict[str, list[dict]] = {"alone": [], "draft": []}
        mismatches = 0
        for r in range(repeats):
            for i, ids in enumerate(prompts):
                body = completion_body(ids, new_tokens, sampling | {"seed": r * len(prompts) + i})
                a = _request(alone, body)
                before = _verify_passes(drafted)
                d = _request(drafted, body)
                after = _verify_passes(drafted)
                d["verify_steps"] = None if before is None or after is None else int(after - before)
                mismatches += sampling["temperature"] == 0 and a["tokens"] != d["tokens"]
                for key, rec in (("alone", a), ("draft", d)):
                    runs[key].append({"repeat": r, "prompt": i, **{k: v for k, v in rec.items() if k != "tokens"}})
        plain, spec = summarize_runs(runs["alone"]), summarize_runs(runs["draft"])
        rows.append(
            {
                "sampling": label,
                "request": sampling,
                "alone": plain,
                "draft": spec,
                "speedup": plain["ms_per_token"] / spec["ms_per_token"],
                "greedy_mismatches": mismatches if sampling["temperature"] == 0 else None,
                "runs": runs,
            }
        )
    return rows


def load_prompt_ids(path: Path) -> list[list[int]]:
    """A JSON file: a list of prompts (each a list of token ids), or an object with that list under
    ``prompts``."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    prompts = data["prompts"] if isinstance(data, dict) else data
    if not prompts or not all(isinstance(p, list) and p and all(isinstance(t, int) for t in p) for p in prompts):
        raise ValueError(f"{path}: want a non-empty list of non-empty lists of token ids")
    return prompts


def held_out_prompt_ids(tokenizer: Path, count: int, chars: int, text: Path | None = None) -> list[list[int]]:
    """The prompts of ``benchmarks/speculative.py pair``: its ``held_out_prompts`` (the first ``chars``
    characters of the held-out chapter's first ``count`` paragraphs), tokenized by CPM's tokenizer of
    ``tokenizer`` (a model folder, or its SentencePiece file)."""
    import importlib.util

    from cpm_infer.tokenizer import CpmTokenizer

    path = ROOT / "benchmarks" / "speculative.py"
    if not path.is_file():
        raise RuntimeError(f"{path} is missing (its held_out_prompts makes the prompts); use --prompt-ids FILE")
    spec = importlib.util.spec_from_file_location("cpm_speculative_bench", path)
    pair_bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pair_bench)
    if Path(tokenizer).is_dir():
        from cpm_infer.checkpoint import open_checkpoint

        tokenizer = open_checkpoint(Path(tokenizer)).tokenizer_file
    tok = CpmTokenizer(tokenizer)
    return [tok.encode(p) for p in pair_bench.held_out_prompts(text or pair_bench.DEMO_TEXT, count, chars)]


def speculative_markdown(result: dict, command: str) -> str:
    s = result["settings"]
    setup = (
        f"target `{result['target']}`, draft `{result['draft']}` (`--spec-type {SPEC_TYPE} --spec-draft-n-max "
        f"{s['draft_max']}`), {s['threads']} threads, batch 1, {s['prompts']} prompts x {s['repeats']} repeats, "
        f"{s['new_tokens']} new tokens, EOS ignored; llama.cpp {result['build'].get('llama_build', '?')}."
    )
    lines = ["# llama.cpp speculative decoding (llama-server, native)", "", f"`{command}`", "", setup, ""]
    lines += [
        "| sampling | ms/token alone | ms/token with draft | tok/s alone | tok/s with draft | speedup | accepted "
        "| mean accepted length | greedy mismatches |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        a, d = r["alone"], r["draft"]
        acc = "-" if d["acceptance"] is None else f"{d['acceptance']:.1%}"
        mal = "-" if d["mean_accepted_len"] is None else f"{d['mean_accepted_len']:.2f}"
        mism = "-" if r["greedy_mismatches"] is None else str(r["greedy_mismatches"])
        lines.append(
            f"| {r['sampling']} | {a['ms_per_token']:.2f} | {d['ms_per_token']:.2f} | {a['tok_s']:.1f} "
            f"| {d['tok_s']:.1f} | {r['speedup']:.2f}x | {acc} | {mal} | {mism} |"
        )
    lines += [
        "",
        "ms/token: llama-server's `timings.predicted_ms` over `predicted_n - 1` decode steps, pooled over the "
        "requests (llama.cpp's clock; prefill not included, drafting included). Accepted: `draft_n_accepted / "
        "draft_n`. Mean accepted length: 1 + accepted / verify passes (`/metrics`).",
        f"Load average before / after: {result['loadavg'][0]} / {result['loadavg'][1]}.",
    ]
    return "\n".join(lines) + "\n"


def run_speculative(
    tools: Tools,
    target: Path,
    draft: Path,
    prompts: Sequence[Sequence[int]],
    labels: Sequence[str],
    *,
    new_tokens: int,
    draft_max: int,
    threads: int,
    repeats: int,
    ctx: int = 0,
) -> dict:
    """Both servers up (target alone; target with ``-md draft``), ``speculative_pair`` over them, then down."""
    modes = spec_modes(labels)
    common = {"threads": threads, "ctx": ctx, "metrics": True}
    loadavg = [[round(x, 2) for x in os.getloadavg()]]
    with (
        LlamaServer(server_command(tools, target, _free_port(), **common)) as alone,
        LlamaServer(server_command(tools, target, _free_port(), draft=draft, draft_max=draft_max, **common)) as drafted,
    ):
        props = json.loads(drafted.get("/props"))
        rows = speculative_pair(alone, drafted, prompts, modes, new_tokens=new_tokens, repeats=repeats)
        commands = {"alone": alone.cmd, "draft": drafted.cmd}
    loadavg.append([round(x, 2) for x in os.getloadavg()])
    settings = {"draft_max": draft_max, "threads": threads, "repeats": repeats, "new_tokens": new_tokens}
    return {
        "kind": "llama.cpp speculative",
        "target": str(target),
        "draft": str(draft),
        "settings": settings | {"prompts": len(prompts), "ctx": ctx},
        "build": build_info(tools) | {"llama_build": props.get("build_info")},
        "server_commands": commands,
        "prompts": [list(map(int, p)) for p in prompts],
        "loadavg": loadavg,
        "rows": rows,
    }


# -- CLI ------------------------------------------------------------------------------------------------


def convert_all(checkpoint: Path, work: Path, name: str, tools: Tools, threads: int, formats=FORMATS) -> dict:
    """f32 from the converter, the rest from llama-quantize: format -> path (reused when there)."""
    f32 = convert(checkpoint, work / f"{name}-f32.gguf", tools)
    return {f: f32 if f == "f32" else quantize(f32, f, tools=tools, threads=threads) for f in formats}


def bench_formats(tools: Tools, files: dict, *, threads: int, reps: int, rounds: int) -> dict:
    """Per format: decode ms/token (llama-bench -p 0 -n 64: batch 1, past 0-63), prefill-128 ms (-p 128 -n 0),
    batch-8 decode tokens/s (llama-batched-bench -npp 16 -ntg 32 -npl 8);
    ``rounds`` passes over the formats (interleaved), medians of the rounds' values and, under ``best``, the
    best round (least time, most tokens/s: on a shared machine other jobs only ever add time)."""
    raw: dict = {f: {"decode_ms": [], "prefill128_ms": [], "b8_tokens_per_s": []} for f in files}
    for r in range(rounds):
        say(f"round {r + 1}/{rounds}")
        for fmt, path in files.items():
            raw[fmt]["decode_ms"].append(decode_ms(tools, path, n_gen=64, threads=threads, reps=reps)["ms"])
            raw[fmt]["prefill128_ms"].append(prefill_ms(tools, path, threads=threads, reps=reps)["ms"])
            b8 = batched_decode(tools, path, batch=8, prompt=16, n_gen=32, threads=threads)
            raw[fmt]["b8_tokens_per_s"].append(b8["speed_tg"])
    best = {"decode_ms": min, "prefill128_ms": min, "b8_tokens_per_s": max}
    return {
        fmt: {k: statistics.median(v) for k, v in values.items()}
        | {"best": {k: best[k](v) for k, v in values.items()}, "rounds": values, "file": str(files[fmt])}
        for fmt, values in raw.items()
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="Download the pinned sdist and build the tools (cached).")
    b.add_argument("--jobs", type=int, default=2)
    c = sub.add_parser("convert", help="Checkpoint -> f32 GGUF with llama.cpp's converter.")
    c.add_argument("checkpoint", type=Path)
    c.add_argument("out", type=Path)
    q = sub.add_parser("quantize", help="f32 GGUF -> llama-quantize TYPE.")
    q.add_argument("gguf", type=Path)
    q.add_argument("type", choices=sorted(QUANT_TYPES))
    q.add_argument("--threads", type=int, default=2)
    t = sub.add_parser("bench", help="Convert, quantize and time every format of a checkpoint.")
    t.add_argument("checkpoint", type=Path)
    t.add_argument("--work-dir", type=Path, required=True)
    t.add_argument("--name", default=None, help="File name prefix (default: the checkpoint folder's name).")
    t.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--reps", type=int, default=5, help="llama-bench -r.")
    t.add_argument("--rounds", type=int, default=1, help="Passes over the formats, interleaved.")
    t.add_argument("--json", type=Path, default=None)
    v = sub.add_parser("verify", help="Greedy ids: llama-server on the GGUF files vs our torch backend.")
    v.add_argument("checkpoint", type=Path)
    v.add_argument("--work-dir", type=Path, required=True)
    v.add_argument("--name", default=None, help="File name prefix (default: the checkpoint folder's name).")
    v.add_argument("--formats", nargs="+", default=["f32"], choices=FORMATS)
    v.add_argument("--new-tokens", type=int, default=16)
    v.add_argument("--threads", type=int, default=2)
    s = sub.add_parser("speculative", help="llama.cpp's speculative decoding: llama-server with and without a draft.")
    s.add_argument("--target", type=Path, required=True, help="target GGUF")
    s.add_argument("--draft", type=Path, required=True, help="draft GGUF (same vocabulary)")
    s.add_argument("--prompt-ids", type=Path, default=None, help="JSON: a list of prompts, each a list of token ids")
    s.add_argument(
        "--tokenizer", type=Path, default=None, help="model folder (or spiece file) to tokenize the held-out prompts"
    )
    s.add_argument("--text", type=Path, default=None, help="held-out text (default: benchmarks/speculative.py's)")
    s.add_argument("--prompts", type=int, default=6, help="held-out paragraphs (as speculative.py pair)")
    s.add_argument("--prompt-chars", type=int, default=120)
    s.add_argument("--new-tokens", type=int, default=96)
    s.add_argument("--draft-max", type=int, default=4, help="--spec-draft-n-max: tokens the draft proposes")
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--repeats", type=int, default=2, help="passes over the prompts")
    s.add_argument("--sampling", nargs="+", default=["greedy", "default"], choices=["greedy", "default"])
    s.add_argument("--ctx", type=int, default=0, help="llama-server -c (0: the model's trained context)")
    s.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    if args.command == "build":
        tools = build(jobs=args.jobs)
        print(json.dumps(build_info(tools), indent=2))
    elif args.command == "convert":
        print(convert(args.checkpoint, args.out))
    elif args.command == "quantize":
        print(quantize(args.gguf, args.type, threads=args.threads))
    elif args.command == "bench":
        tools = require_tools()
        name = args.name or args.checkpoint.resolve().name
        files = convert_all(args.checkpoint, args.work_dir, name, tools, args.threads, args.formats)
        load_before = os.getloadavg()
        result = bench_formats(tools, files, threads=args.threads, reps=args.reps, rounds=args.rounds)
        print(f"Median of {args.rounds} rounds (best round in brackets), {args.threads} threads:")
        print("| format | decode ms/token (batch 1, past 0-63) | prefill 128 ms | batch 8 decode tok/s |")
        print("|---|---:|---:|---:|")
        for fmt, r in result.items():
            b = r["best"]
            print(
                f"| {fmt} | {r['decode_ms']:.2f} ({b['decode_ms']:.2f}) | {r['prefill128_ms']:.1f} "
                f"({b['prefill128_ms']:.1f}) | {r['b8_tokens_per_s']:.0f} ({b['b8_tokens_per_s']:.0f}) |"
            )
        if args.json:
            report = {"build": build_info(tools), "checkpoint": str(args.checkpoint), "threads": args.threads}
            report |= {"rounds": args.rounds, "reps": args.reps, "loadavg": [load_before, os.getloadavg()]}
            args.json.write_text(json.dumps(report | {"results": result}, indent=2), encoding="utf-8")
    elif args.command == "verify":
        from cpm_infer.checkpoint import open_checkpoint
        from cpm_infer.tokenizer import CpmTokenizer

        tools = require_tools()
        name = args.name or args.checkpoint.resolve().name
        files = convert_all(args.checkpoint, args.work_dir, name, tools, args.threads, args.formats)
        tok = CpmTokenizer(open_checkpoint(args.checkpoint).tokenizer_file)
        prompts = [tok.encode(text) for text in VERIFY_PROMPTS]
        ours = greedy_torch(args.checkpoint, prompts, args.new_tokens)
        for fmt, path in files.items():
            theirs = greedy_server(tools, path, prompts, args.new_tokens, threads=args.threads)
            for p, a, b in zip(prompts, ours, theirs, strict=True):
                same = sum(1 for _ in iter_prefix(a, b))
                print(f"{fmt}: prompt {len(p)} ids, {same}/{len(a)} leading tokens equal; torch {a}; llama.cpp {b}")
    elif args.command == "speculative":
        if (args.prompt_ids is None) == (args.tokenizer is None):
            parser.error("speculative: give --prompt-ids FILE or --tokenizer MODEL_DIR (held-out prompts), not both")
        if args.prompt_ids is not None:
            prompts = load_prompt_ids(args.prompt_ids)
        else:
            prompts = held_out_prompt_ids(args.tokenizer, args.prompts, args.prompt_chars, args.text)
        result = run_speculative(
            require_tools(targets=("llama-server",)),
            args.target,
            args.draft,
            prompts,
            args.sampling,
            new_tokens=args.new_tokens,
            draft_max=args.draft_max,
            threads=args.threads,
            repeats=args.repeats,
            ctx=args.ctx,
        )
        command = "python benchmarks/peers/llamacpp_native.py " + " ".join(sys.argv[1:] if argv is None else argv)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "result.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        (args.out / "result.md").write_text(speculative_markdown(result, command), encoding="utf-8")
        print(speculative_markdown(result, command))


VERIFY_PROMPTS = ("却说曹操", "孔明笑曰：", "玄德大喜，遂与关、张", "次日，")


def iter_prefix(a: Sequence[int], b: Sequence[int]):
    for x, y in zip(a, b, strict=False):
        if x != y:
            return
        yield x


if __name__ == "__main__":
    main()
