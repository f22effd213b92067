"""benchmarks/peers/llamacpp_native.py: parsing llama.cpp's own benchmark output (recorded samples in
tests/data/llamacpp_native/), the build cache's key, the converter's staging folder. Nothing here builds llama.cpp
or downloads anything; the checks that run the tools skip unless a build is already in the cache."""

from __future__ import annotations

import importlib.util
import json
import os
import stat
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data" / "llamacpp_native"
DEMO = ROOT / "cpm_infer" / "demo" / "sanguo"


def _load():
    path = ROOT / "benchmarks" / "peers" / "llamacpp_native.py"
    spec = importlib.util.spec_from_file_location("llamacpp_native", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


ln = _load()


# -- parsing ----------------------------------------------------------------------------------------------


def test_parse_llama_bench_decode_sample():
    (r,) = ln.parse_llama_bench((DATA / "llama-bench-decode.json").read_text())
    assert r["kind"] == "decode" and r["n_gen"] == 64 and r["n_prompt"] == 0 and r["n_depth"] == 16
    assert len(r["samples_ms"]) == len(r["ms_per_token"]) == 3
    assert r["ms_per_token"] == pytest.approx([ms / 64 for ms in r["samples_ms"]])
    assert r["avg_ms"] / 64 == pytest.approx(sum(r["ms_per_token"]) / 3, rel=1e-6)
    assert 1 < r["ms_per_token"][0] < 1000 and r["n_threads"] == 2
    assert r["type"] and r["build"].split()[0]  # llama.cpp's own build id, reported with the numbers


def test_parse_llama_bench_prefill_sample():
    (r,) = ln.parse_llama_bench((DATA / "llama-bench-prefill.json").read_text())
    assert r["kind"] == "prefill" and r["n_prompt"] == 128 and r["n_gen"] == 0
    assert r["ms_per_token"] is None and len(r["samples_ms"]) == 3
    assert r["avg_ts"] == pytest.approx(sum(128e3 / ms for ms in r["samples_ms"]) / 3, rel=1e-4)  # its t/s


def test_parse_llama_bench_jsonl_and_log_lines():
    """-o jsonl gives one object per line; log lines around the JSON are ignored."""
    records = json.loads((DATA / "llama-bench-decode.json").read_text())
    text = "some log line\n" + "\n".join(json.dumps(r) for r in records) + "\n"
    (r,) = ln.parse_llama_bench(text)
    assert r["n_gen"] == 64
    (again,) = ln.parse_llama_bench("load: log [not json\n" + json.dumps(records))
    assert again["samples_ms"] == r["samples_ms"]


def test_parse_batched_bench_jsonl_sample():
    (row,) = ln.parse_batched_bench((DATA / "batched-bench.jsonl").read_text())
    assert (row["pp"], row["tg"], row["pl"]) == (16, 32, 8)
    assert row["speed_tg"] == pytest.approx(8 * 32 / row["t_tg"], rel=1e-3)
    assert row["step_ms"] == pytest.approx(row["t_tg"] / 32 * 1e3)


def test_parse_batched_bench_markdown_sample():
    rows = ln.parse_batched_bench((DATA / "batched-bench.md").read_text())
    assert [(r["pp"], r["tg"], r["pl"]) for r in rows] == [(16, 32, 1), (16, 32, 8)]
    for row in rows:
        assert row["speed_tg"] == pytest.approx(row["pl"] * 32 / row["t_tg"], rel=0.01)  # table rounds to 3 digits


def test_batched_decode_retries_when_the_logger_lost_the_row(monkeypatch):
    """llama-batched-bench prints through an asynchronous logger that is not flushed at exit: a run whose output
    lacks the wanted row is repeated; a batch-1 run is asked for after the wanted one."""
    outputs = iter(["main: n_kv_max = 2048\n", (DATA / "batched-bench.jsonl").read_text()])
    calls = []
    monkeypatch.setattr(ln, "_run", lambda cmd: calls.append(cmd) or next(outputs))
    tools = ln.Tools(Path("/nonexistent"), "0.3.36")
    row = ln.batched_decode(tools, Path("m.gguf"), batch=8, prompt=16, n_gen=32)
    assert row["pl"] == 8 and len(calls) == 2
    assert calls[0][calls[0].index("-npl") + 1] == "8,1" and calls[0][calls[0].index("-ntg") + 1] == "32"
    monkeypatch.setattr(ln, "_run", lambda cmd: "main: n_kv_max = 2048\n")
    with pytest.raises(RuntimeError, match="no batch-8 row in 3 runs"):
        ln.batched_decode(tools, Path("m.gguf"), batch=8)


def test_parse_batched_bench_rejects_output_without_rows():
    with pytest.raises(ValueError, match="no llama-batched-bench result rows"):
        ln.parse_batched_bench("main: n_kv_max = 2048\n|    PP |     TG |\n")


# -- version, cache, build key ------------------------------------------------------------------------------


def test_pinned_version_is_the_peers_extra_pin(tmp_path):
    assert ln.pinned_version() == "0.3.36"  # pyproject.toml's peers extra
    toml = tmp_path / "pyproject.toml"
    toml.write_text(
        '[project]\nname = "x"\n[project.optional-dependencies]\npeers = ["gguf==1", "llama_cpp_python == 9.8.7"]\n'
    )
    assert ln.pinned_version(toml) == "9.8.7"
    toml.write_text('[project]\nname = "x"\n[project.optional-dependencies]\npeers = ["llama-cpp-python>=1"]\n')
    with pytest.raises(ValueError, match="pins no"):
        ln.pinned_version(toml)


def test_cache_dir_is_keyed_by_version(tmp_path):
    assert (
        ln.default_cache_dir("0.3.36", {"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "cpm-infer" / "llama.cpp-0.3.36"
    )
    assert ln.default_cache_dir("1.0", {}) == Path.home() / ".cache" / "cpm-infer" / "llama.cpp-1.0"


def test_stamp_reuse_rules():
    key = ln.build_key("0.3.36", ln.CMAKE_OPTIONS, "Ninja")
    stamp = {"key": key, "targets": ["llama-bench", "llama-batched-bench", "llama-quantize", "llama-server"]}
    assert ln.stamp_reusable(stamp, key, ["llama-bench"])
    assert ln.stamp_reusable(stamp, ln.build_key("0.3.36", list(ln.CMAKE_OPTIONS), "Ninja"), ln.TARGETS)
    assert not ln.stamp_reusable(stamp, key, ["llama-bench", "llama-speculative"])  # a target not built
    assert not ln.stamp_reusable(stamp, ln.build_key("0.3.37", ln.CMAKE_OPTIONS, "Ninja"), ["llama-bench"])
    assert not ln.stamp_reusable(stamp, ln.build_key("0.3.36", (*ln.CMAKE_OPTIONS, "-DGGML_AVX512=OFF"), "Ninja"), [])
    assert not ln.stamp_reusable(stamp, ln.build_key("0.3.36", ln.CMAKE_OPTIONS, None), [])  # other generator
    assert not ln.stamp_reusable(None, key, [])


def test_amx_is_switched_off_only_where_the_cpu_reports_it():
    assert ln.cpu_has_amx("processor\t: 0\nflags\t\t: fpu avx2 avx512f amx_bf16 amx_tile amx_int8 arch_capabilities\n")
    assert not ln.cpu_has_amx("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_vnni\n")
    assert not ln.cpu_has_amx("model name\t: amx_tile lookalike\nflags\t\t: fpu avx2\n")  # only the flags line
    assert ln.default_cmake_options(amx=False) == ln.CMAKE_OPTIONS
    with_amx = ln.default_cmake_options(amx=True)
    assert with_amx[: len(ln.CMAKE_OPTIONS)] == ln.CMAKE_OPTIONS and "-DGGML_NATIVE=ON" in with_amx
    assert with_amx[len(ln.CMAKE_OPTIONS) :] == (
        "-DCMAKE_C_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16",
        "-DCMAKE_CXX_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16",
    )
    assert not ln.stamp_reusable(  # a build made with AMX is not reused for one without, and back
        {"key": ln.build_key("0.3.36", with_amx, "Ninja"), "targets": list(ln.TARGETS)},
        ln.build_key("0.3.36", ln.CMAKE_OPTIONS, "Ninja"),
        ln.TARGETS,
    )


def _fake_build(cache: Path, key: dict, targets) -> None:
    (cache / "build" / "bin").mkdir(parents=True)
    for name in targets:
        exe = cache / "build" / "bin" / name
        exe.write_text("#!/bin/sh\n")
        exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    (cache / "build" / ln.STAMP).write_text(json.dumps({"key": key, "targets": list(targets)}))


def test_build_reuses_a_complete_cached_build(tmp_path, monkeypatch):
    monkeypatch.setattr(ln.shutil, "which", lambda name: None)  # no ninja: the key's generator is None

    def no_subprocess(*args, **kwargs):
        raise AssertionError(f"nothing may run: {args}")

    monkeypatch.setattr(ln.subprocess, "run", no_subprocess)
    _fake_build(tmp_path, ln.build_key("0.3.36", ln.default_cmake_options(), None), ln.TARGETS)
    tools = ln.build("0.3.36", tmp_path)
    assert tools.bin == tmp_path / "build" / "bin" and tools.has(ln.TARGETS)
    assert ln.find_tools("0.3.36", tmp_path) == tools
    assert ln.find_tools("0.3.37", tmp_path) is None  # the stamp is another version's
    os.remove(tools.exe("llama-server"))
    assert ln.find_tools("0.3.36", tmp_path) is None
    with pytest.raises(AssertionError, match="nothing may run"):  # incomplete: it would fetch and build
        ln.build("0.3.36", tmp_path)


def test_fetch_source_unpacks_a_cached_sdist_without_pip(tmp_path, monkeypatch):
    import tarfile

    tools = ln.Tools(tmp_path / "cache", "9.9.9")
    (tools.cache / "sdist").mkdir(parents=True)
    member = tmp_path / "CMakeLists.txt"
    member.write_text("project(x)\n")
    with tarfile.open(tools.cache / "sdist" / "llama_cpp_python-9.9.9.tar.gz", "w:gz") as tar:
        tar.add(member, "llama_cpp_python-9.9.9/vendor/llama.cpp/CMakeLists.txt")
    monkeypatch.setattr(ln.subprocess, "run", lambda *a, **k: pytest.fail(f"pip must not run: {a}"))
    assert (
        ln.fetch_source(tools)
        == tools.llama_cpp
        == tools.cache / "src" / "llama_cpp_python-9.9.9" / "vendor" / "llama.cpp"
    )
    assert (tools.llama_cpp / "CMakeLists.txt").read_text() == "project(x)\n"
    assert ln.fetch_source(tools) == tools.llama_cpp  # unpacked once


def test_quantized_path():
    assert ln.quantized_path(Path("/w/demo-f32.gguf"), "q4_K_M") == Path("/w/demo-q4_K_M.gguf")
    assert ln.quantized_path(Path("/w/x.gguf"), "q8_0") == Path("/w/x-q8_0.gguf")
    assert ln.QUANT_TYPES == {"q8_0": "Q8_0", "q4_0": "Q4_0", "q4_K_M": "Q4_K_M"}


# -- the converter's staging folder -------------------------------------------------------------------------


def test_stage_checkpoint_gives_the_converter_what_it_reads(tmp_path):
    stage = ln.stage_checkpoint(DEMO, tmp_path / "stage")
    config = json.loads((stage / "config.json").read_text())
    original = json.loads((DEMO / "config.json").read_text())
    assert config == original | {"n_ctx": original["n_positions"]}  # only n_ctx added
    assert (stage / "tokenizer.model").resolve() == (DEMO / "spiece.model").resolve()
    assert (stage / "model.safetensors").resolve() == (DEMO / "model.safetensors").resolve()
    assert json.loads((stage / "tokenizer_config.json").read_text()) == {"add_bos_token": False, "add_eos_token": False}
    assert not (DEMO / "tokenizer.model").exists()  # the checkpoint itself is untouched


# -- with a build in the cache (never made here) ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tools():
    found = ln.find_tools()
    if found is None:
        pytest.skip("llama.cpp's tools are not built (python benchmarks/peers/llamacpp_native.py build)")
    return found


@pytest.fixture(scope="module")
def demo_ggufs(tools, tmp_path_factory):
    pytest.importorskip("torch")
    work = tmp_path_factory.mktemp("gguf")
    return ln.convert_all(DEMO, work, "demo", tools, 2, ("f32", "q4_0"))


def test_converter_keeps_the_embedding_tied_and_quantizer_makes_it_q6_k(tools, demo_ggufs):
    f32 = ln.tensor_types(demo_ggufs["f32"], tools)
    assert "output.weight" not in f32 and f32["token_embd.weight"] == "F32"
    assert f32["blk.0.attn_qkv.weight"] == "F32" and len([n for n in f32 if n.startswith("blk.")]) == 4 * 12
    q4 = ln.tensor_types(demo_ggufs["q4_0"], tools)
    assert q4["token_embd.weight"] == "Q6_K" and q4["blk.0.ffn_up.weight"] == "Q4_0"


def test_llama_bench_and_batched_bench_run_and_parse(tools, demo_ggufs):
    d = ln.decode_ms(tools, demo_ggufs["q4_0"], n_gen=8, depth=4, threads=1, reps=1)
    assert d["kind"] == "decode" and d["ms"] > 0 and d["n_depth"] == 4
    b = ln.batched_decode(tools, demo_ggufs["q4_0"], batch=2, prompt=4, n_gen=4, threads=1, ctx=256)
    assert (b["pl"], b["tg"]) == (2, 4) and b["speed_tg"] > 0


def test_f32_greedy_tokens_equal_torch(tools, demo_ggufs):
    from cpm_infer.tokenizer import CpmTokenizer

    tok = CpmTokenizer(DEMO / "spiece.model")
    prompts = [tok.encode(text) for text in ln.VERIFY_PROMPTS[:2]]
    ours = ln.greedy_torch(DEMO, prompts, 8)
    theirs = ln.greedy_server(tools, demo_ggufs["f32"], prompts, 8, threads=1, ctx=256)
    assert theirs == ours


# -- peers_bench.py's use of it --------------------------------------------------------------------------------


def test_peers_bench_times_llama_cpp_with_its_tools_interleaved(monkeypatch):
    """peers_bench: llama.cpp's engines go through NativeRunner (the tools' clock) case by case, interleaved with
    our runners in every round; q4_K_M is a peer of int4 beside q4_0; per-round ratios pair the same round."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks" / "peers"))
    pb = importlib.import_module("peers_bench")
    from cpm_infer.bench.runners import Timing

    order = []

    class Native(pb.NativeRunner):
        def __init__(self, name, steps_s):
            self.name, self.steps_s, self.calls, self.bench, self.last = name, steps_s, [], {}, None

        def step_seconds(self, batch, prompt, steps):
            self.calls.append((batch, prompt, steps))
            order.append(self.name)
            return self.steps_s[len(self.calls) - 1]

    class Ours:
        def __init__(self, name, step_s):
            self.name, self.step_s, self.rows = name, step_s, []

        def run(self, prompts, new_tokens):
            self.rows.append((prompts.shape, new_tokens))
            order.append(self.name)
            return Timing(0.1, [self.step_s] * (new_tokens - 1), prompts.shape[0] * new_tokens)

    # Two rounds (after 3 warm-up calls); q4_0 has a slow spell in round 1, b1 case.
    q4 = Native("llama-q4_0", [1.0] * 3 + [0.020, 0.030, 0.010, 0.010, 0.030, 0.010])
    engines = {"ours-fp32": Ours("ours-fp32", 0.02), "ours-int8": Ours("ours-int8", 0.008)}
    engines |= {"ours-int4": Ours("ours-int4", 0.005), "llama-q4_0": q4}
    for name, step in (("llama-f32", 0.021), ("llama-q8_0", 0.011), ("llama-q4_K_M", 0.010)):
        engines[name] = Native(name, [1.0] * 3 + [step] * 6)
    engines["ct2-f32"] = Ours("ct2-f32", 0.04)
    times = pb.time_speed(engines, 2, 1000)

    warm_up = [(1, 16, 4), (1, 900, 4), (8, 16, 4)]
    assert q4.calls == warm_up + [(1, 16, pb.NEW - 1), (1, 900, pb.NEW - 1), (8, 16, pb.NEW - 1)] * 2
    assert engines["ours-int4"].rows[:3] == [((1, 16), 4), ((1, 900), 4), ((8, 16), 4)]
    assert order[3 * len(engines) : 4 * len(engines)] == list(engines)  # round 1, b1: every engine once, in turn
    assert times["llama-q4_0"]["b1"] == [0.020, 0.010] and times["ours-int4"]["b1"] == pytest.approx([0.005] * 2)

    speed = pb.summarize_speed(times)
    assert pb.paired(speed, "ours-int4", "llama-q4_0") == pytest.approx((0.25 + 0.5) / 2)
    rows = {t["target"]: t for t in pb.targets(speed, None)}
    assert rows["ours-int4 decode / llama-q4_K_M"]["value"] == pytest.approx(0.5)
    assert "ours-int4 decode / llama-q4_0" in rows and "ours-int8 decode / llama-q8_0" in rows
    assert pb.LLAMA_FORMATS == ("f32", "q8_0", "q4_0", "q4_K_M")
