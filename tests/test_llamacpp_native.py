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


# -- speculative decoding through llama-server ---------------------------------------------------------------

# A /completion response of llama-server 0.3.36 with -md (demo f32 target, q4_0 draft, greedy, 16 tokens).
SPEC_RESPONSE = {
    "tokens": [10, 9, 17, 129, 9, 17, 129, 9, 17, 129, 9, 17, 129, 9, 17, 129],
    "stop": True,
    "stop_type": "limit",
    "tokens_predicted": 16,
    "generation_settings": {"temperature": 0.0, "speculative.types": "none,draft-simple"},
    "timings": {
        "cache_n": 0,
        "prompt_n": 5,
        "prompt_ms": 8.487,
        "prompt_per_token_ms": 1.6974,
        "prompt_per_second": 589.1363261458702,
        "predicted_n": 16,
        "predicted_ms": 27.713,
        "predicted_per_token_ms": 1.8475333333333335,
        "predicted_per_second": 541.2622235052141,
        "draft_n": 12,
        "draft_n_accepted": 12,
    },
}


def test_server_command_with_and_without_a_draft():
    tools = ln.Tools(Path("/cache"), "0.3.36")
    plain = ln.server_command(tools, Path("t.gguf"), 8080, threads=3, ctx=0)
    assert plain[0] == str(tools.exe("llama-server")) and plain[plain.index("-m") + 1] == "t.gguf"
    assert plain[plain.index("--port") + 1] == "8080" and plain[plain.index("-np") + 1] == "1"
    assert plain[plain.index("-t") + 1] == plain[plain.index("-tb") + 1] == "3" and plain[plain.index("-c") + 1] == "0"
    assert "-md" not in plain and "--spec-type" not in plain and "--metrics" not in plain
    spec = ln.server_command(tools, Path("t.gguf"), 8081, threads=2, draft=Path("d.gguf"), draft_max=6, metrics=True)
    assert spec[spec.index("-md") + 1] == "d.gguf"
    assert spec[spec.index("--spec-type") + 1] == "draft-simple"  # without it the draft is loaded and never used
    assert spec[spec.index("--spec-draft-n-max") + 1] == "6"
    assert spec[spec.index("--spec-draft-n-min") + 1] == spec[spec.index("--spec-draft-p-min") + 1] == "0"
    assert spec[spec.index("-td") + 1] == spec[spec.index("-tbd") + 1] == "2" and "--metrics" in spec
    assert "--draft-max" not in spec and "--draft-min" not in spec  # removed options in this llama.cpp


def test_completion_record_reads_the_servers_timings_and_draft_stats():
    r = ln.completion_record(SPEC_RESPONSE)
    assert (r["n"], r["ms"], r["per_token_ms"]) == (16, 27.713, pytest.approx(27.713 / 15))
    assert (r["prompt_n"], r["prompt_ms"]) == (5, 8.487)
    assert (r["draft_n"], r["draft_n_accepted"]) == (12, 12)
    assert r["tokens"] == SPEC_RESPONSE["tokens"] and r["speculative_types"] == "none,draft-simple"
    plain = {k: v for k, v in SPEC_RESPONSE["timings"].items() if not k.startswith("draft")}
    r = ln.completion_record({"timings": plain, "tokens": [1, 2]})
    assert (r["draft_n"], r["draft_n_accepted"], r["speculative_types"]) == (0, 0, None)  # left out: no speculation


def test_parse_metrics():
    text = (
        "# HELP llamacpp:spec_decode_num_drafts_total Speculative: ...\n"
        "# TYPE llamacpp:spec_decode_num_drafts_total counter\n"
        "llamacpp:spec_decode_num_drafts_total 3\n"
        "llamacpp:predicted_tokens_seconds 541.262\n"
        'llamacpp:spec_decode_num_accepted_tokens_per_pos_total{position="0"} 3\n'
    )
    m = ln.parse_metrics(text)
    assert m["spec_decode_num_drafts_total"] == 3 and m["predicted_tokens_seconds"] == 541.262
    assert m['spec_decode_num_accepted_tokens_per_pos_total{position="0"}'] == 3


def test_summarize_runs_pools_the_requests():
    runs = [
        {"n": 11, "ms": 20.0, "per_token_ms": 2.0, "draft_n": 12, "draft_n_accepted": 6, "verify_steps": 4},
        {"n": 11, "ms": 40.0, "per_token_ms": 4.0, "draft_n": 8, "draft_n_accepted": 4, "verify_steps": 2},
        {"n": 11, "ms": 30.0, "per_token_ms": 3.0, "draft_n": 0, "draft_n_accepted": 0, "verify_steps": 0},
    ]
    s = ln.summarize_runs(runs)
    assert s["ms_per_token"] == pytest.approx(90.0 / 30) and s["tok_s"] == pytest.approx(1e3 * 30 / 90.0)
    assert s["median_ms_per_token"] == 3.0 and (s["requests"], s["tokens"]) == (3, 33)
    assert s["acceptance"] == pytest.approx(10 / 20) and s["mean_accepted_len"] == pytest.approx(1 + 10 / 6)
    alone = ln.summarize_runs([{k: v for k, v in r.items() if k != "verify_steps"} | {"draft_n": 0} for r in runs])
    assert alone["acceptance"] is None and alone["mean_accepted_len"] is None
    runs[0]["verify_steps"] = None  # /metrics unreadable once: no mean length rather than a wrong one
    assert ln.summarize_runs(runs)["mean_accepted_len"] is None


def test_sampling_is_plain_temperature_top_k_top_p():
    modes = ln.spec_modes(["greedy", "default"])
    assert modes["greedy"]["temperature"] == 0
    d = modes["default"]
    assert (d["temperature"], d["top_p"], d["top_k"]) == (1.0, 0.9, 0)  # the CLI's default sampling
    for mode in modes.values():
        assert mode["samplers"] == ["temperature", "top_k", "top_p"]  # our engine's order, nothing else
        assert (mode["min_p"], mode["typical_p"], mode["top_n_sigma"], mode["xtc_probability"]) == (0, 1, -1, 0)
        assert (mode["repeat_penalty"], mode["dry_multiplier"], mode["mirostat"]) == (1, 0, 0)
    body = ln.completion_body([5, 6], 96, modes["default"] | {"seed": 7})
    assert body["prompt"] == [5, 6] and body["n_predict"] == 96 and body["seed"] == 7
    assert body["ignore_eos"] and body["return_tokens"] and body["cache_prompt"] is False


class FakeServer:
    """A llama-server stand-in: answers /completion from ``make(body)``, counts verify passes in /metrics."""

    def __init__(self, name, order, speculating, make):
        self.name, self.order, self.speculating, self.make = name, order, speculating, make
        self.cmd, self.bodies, self.passes = [name], [], 0

    def completion(self, body):
        self.bodies.append(body)
        self.order.append(self.name)
        tokens, draft_n, accepted, passes = self.make(body)
        self.passes += passes
        timings = {"predicted_n": len(tokens), "predicted_ms": 2.0 * len(tokens), "prompt_n": 3, "prompt_ms": 1.0}
        timings["predicted_per_token_ms"] = 2.0 * len(tokens) / (len(tokens) - 1)
        if draft_n:
            timings |= {"draft_n": draft_n, "draft_n_accepted": accepted}
        types = "none,draft-simple" if self.speculating else "none"
        return {"tokens": tokens, "timings": timings, "generation_settings": {"speculative.types": types}}

    def get(self, path):
        assert path == "/metrics"
        return f"llamacpp:spec_decode_num_drafts_total {self.passes}\n"


def test_speculative_pair_interleaves_and_counts(monkeypatch):
    order = []
    alone = FakeServer("alone", order, False, lambda b: ([1] * b["n_predict"], 0, 0, 0))
    seen = []

    def drafting(body):  # the second greedy request's tokens differ from the target alone
        seen.append(body["seed"])
        tokens = [1] * body["n_predict"]
        if body["temperature"] == 0 and len(seen) == 3:
            tokens[-1] = 2
        return tokens, 8, 6, 2

    drafted = FakeServer("draft", order, True, drafting)
    modes = ln.spec_modes(["greedy", "default"])
    rows = ln.speculative_pair(alone, drafted, [[5], [6, 7]], modes, new_tokens=10, repeats=2, warmup_tokens=4)
    per_mode = ["alone", "draft"] + ["alone", "draft"] * 4  # warm-up of each, then prompt by prompt
    assert order == per_mode * 2
    assert [b["seed"] for b in alone.bodies[1:5]] == [0, 1, 2, 3] and alone.bodies[0]["n_predict"] == 4
    assert [b["prompt"] for b in alone.bodies[1:5]] == [[5], [6, 7], [5], [6, 7]]
    assert [b["seed"] for b in drafted.bodies[1:5]] == [0, 1, 2, 3]
    greedy, sampled = rows
    assert greedy["greedy_mismatches"] == 1 and sampled["greedy_mismatches"] is None
    assert greedy["draft"]["acceptance"] == pytest.approx(6 / 8) and greedy["draft"]["mean_accepted_len"] == 4.0
    assert greedy["alone"]["acceptance"] is None and greedy["speedup"] == pytest.approx(1.0)
    assert [r["verify_steps"] for r in greedy["runs"]["draft"]] == [2] * 4
    assert "tokens" not in greedy["runs"]["alone"][0] and greedy["runs"]["alone"][1]["prompt"] == 1


def test_speculative_pair_refuses_a_server_that_does_not_speculate():
    order = []
    alone = FakeServer("alone", order, False, lambda b: ([1] * b["n_predict"], 0, 0, 0))
    not_drafting = FakeServer("draft", order, False, lambda b: ([1] * b["n_predict"], 0, 0, 0))
    with pytest.raises(RuntimeError, match="speculative.types 'none'"):
        ln.speculative_pair(alone, not_drafting, [[5]], ln.spec_modes(["greedy"]), new_tokens=4, repeats=1)
    short = FakeServer("draft", order, True, lambda b: ([1] * (b["n_predict"] - 1), 1, 1, 1))
    with pytest.raises(RuntimeError, match="made 7 tokens, not 8"):
        ln.speculative_pair(alone, short, [[5]], ln.spec_modes(["greedy"]), new_tokens=4, repeats=1)


def test_prompt_ids_file(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps([[1, 2, 3], [4]]))
    assert ln.load_prompt_ids(path) == [[1, 2, 3], [4]]
    path.write_text(json.dumps({"prompts": [[9]]}))
    assert ln.load_prompt_ids(path) == [[9]]
    for bad in ([], [[]], [["a"]], [[1.5]]):
        path.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match="token ids"):
            ln.load_prompt_ids(path)


@pytest.mark.skipif(not (ROOT / "benchmarks" / "speculative.py").is_file(), reason="benchmarks/speculative.py absent")
def test_held_out_prompts_are_those_of_the_pair_benchmark():
    from cpm_infer.tokenizer import CpmTokenizer

    ids = ln.held_out_prompt_ids(DEMO, 2, 120)
    tok = CpmTokenizer(DEMO / "spiece.model")
    paragraphs = [p.strip() for p in (DEMO / "heldout.txt").read_text(encoding="utf-8").splitlines()]
    texts = [p[:120] for p in paragraphs if len(p) > 60][:2]
    assert ids == [tok.encode(t) for t in texts] and len(ids) == 2 and all(ids)


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


def test_speculative_runs_on_llama_server(tools, demo_ggufs):
    """The demo f32 target with its q4_0 draft: llama.cpp speculates (proposals counted), greedy tokens equal to
    the target's alone."""
    from cpm_infer.tokenizer import CpmTokenizer

    tok = CpmTokenizer(DEMO / "spiece.model")
    prompts = [tok.encode(text) for text in ln.VERIFY_PROMPTS[:1]]
    kw = {"new_tokens": 8, "draft_max": 3, "threads": 1, "repeats": 1, "ctx": 256}
    result = ln.run_speculative(tools, demo_ggufs["f32"], demo_ggufs["q4_0"], prompts, ["greedy"], **kw)
    (row,) = result["rows"]
    assert row["greedy_mismatches"] == 0 and row["draft"]["draft_n"] > 0 and row["alone"]["draft_n"] == 0
    assert 0 <= row["draft"]["acceptance"] <= 1 and row["draft"]["mean_accepted_len"] >= 1
    assert row["alone"]["ms_per_token"] > 0 and row["speedup"] > 0 and result["build"]["llama_build"]
    assert "| greedy |" in ln.speculative_markdown(result, "cmd")


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
    times = pb.time_speed(engines, 2, 1000, cases=("b1", "ctx900", "b8"))  # prefill: tests/test_peers_bench.py

    warm_up = [(1, 16, 4), (1, 900, 4), (8, 16, 4)]
    assert q4.calls == warm_up + [(1, 16, pb.NEW - 1), (1, 900, pb.NEW - 1), (8, 16, pb.NEW - 1)] * 2
    assert engines["ours-int4"].rows[:3] == [((1, 16), 4), ((1, 900), 4), ((8, 16), 4)]
    # round 1, b1: every engine in turn, ours after an untimed warm-up call (llama-bench warms itself up)
    turn = [name for name, engine in engines.items() for _ in range(1 if isinstance(engine, pb.NativeRunner) else 2)]
    assert order[3 * len(engines) : 3 * len(engines) + len(turn)] == turn
    assert times["llama-q4_0"]["b1"] == [0.020, 0.010] and times["ours-int4"]["b1"] == pytest.approx([0.005] * 2)

    speed = pb.summarize_speed(times)
    assert pb.paired(speed, "ours-int4", "llama-q4_0") == pytest.approx((0.25 + 0.5) / 2)
    rows = {t["target"]: t for t in pb.targets(speed, None)}
    assert rows["ours-int4 decode / llama-q4_K_M"]["value"] == pytest.approx(0.5)
    assert "ours-int4 decode / llama-q4_0" in rows and "ours-int8 decode / llama-q8_0" in rows
    assert pb.LLAMA_FORMATS == ("f32", "q8_0", "q4_0", "q4_K_M")
