"""The memory-bounded export paths, on a tiny model forced to external data (no big model in CI).

What keeps CPM-large's export within ~1x its weights is structural, so that is what is checked:
graph rewrites never read the weights, the torch model is gone before ONNX Runtime loads the graph,
one ONNX Runtime session lives at a time, quantization is ORT's own quantizers applied node by node
(identical output), weights sit at aligned offsets of one shared data file, and the inline layout is
written without materialising the model. Peak RSS itself is measured by benchmarks/export_memory.py.
"""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")


def _checkpoint(tiny_vocab: Path, out: Path) -> Path:
    from conftest import make_tiny_model
    from test_export_onnx import randomize_vectors

    from cpm_infer.tokenizer import CpmTokenizer
    from cpm_infer.torch_model import save_checkpoint

    tok = CpmTokenizer(tiny_vocab)
    model = randomize_vectors(make_tiny_model(tok.vocab_size, n_embd=64, eod_id=tok.eod_id, pad_id=tok.pad_id))
    return save_checkpoint(model, tiny_vocab, out)


@pytest.fixture(scope="module")
def checkpoint(tiny_vocab, tmp_path_factory) -> Path:
    return _checkpoint(tiny_vocab, tmp_path_factory.mktemp("mem") / "ckpt")


@pytest.fixture(scope="module")
def gate_text(tmp_path_factory) -> Path:
    from conftest import CORPUS

    path = tmp_path_factory.mktemp("gate") / "gate.txt"
    path.write_text((CORPUS + "\n") * 3, encoding="utf-8")
    return path


def refuse_weight_reads(monkeypatch, root: Path) -> None:
    """Make onnx fail to read external weights of files under ``root`` into a protobuf (ORT's quantizer
    may still save and reload its own one-weight scratch models elsewhere)."""
    import onnx.external_data_helper as helper

    def guard(real):
        def check(*args, **kwargs):
            base = Path(kwargs.get("base_dir", args[1] if len(args) > 1 else "."))
            if base.resolve().is_relative_to(root.resolve()):
                raise AssertionError(f"a graph rewrite read the external weights in {base} into memory")
            return real(*args, **kwargs)

        return check

    for name in ("load_external_data_for_model", "load_external_data_for_tensor"):
        monkeypatch.setattr(helper, name, guard(getattr(helper, name)))
    monkeypatch.setattr(onnx, "load_external_data_for_model", helper.load_external_data_for_model)
    real_to_array = onnx.numpy_helper.to_array

    def to_array(tensor, base_dir=""):
        if helper.uses_external_data(tensor) and Path(base_dir).resolve().is_relative_to(root.resolve()):
            raise AssertionError(f"a graph rewrite read {tensor.name} into memory")
        return real_to_array(tensor, base_dir)

    monkeypatch.setattr(onnx.numpy_helper, "to_array", to_array)


def test_external_layout_shares_one_aligned_data_file(checkpoint, tmp_path, monkeypatch):
    """--optimize on a graph forced to external data: the fused and the portable graph read one data
    file, every tensor at a 64-KiB offset (memory-mappable), and fusions never read the weights."""
    import json

    from cpm_infer.artifact import read_manifest
    from export.onnx_export import export_onnx
    from export.onnx_weights import ALIGN, external_info, is_external, load_graph

    refuse_weight_reads(monkeypatch, tmp_path)
    out = export_onnx(checkpoint, tmp_path / "opt", optimize=True, external_data_threshold=0).path
    manifest = read_manifest(out)
    assert manifest.graph_files == {
        "model": "model_optimized.onnx",
        "portable": "model.onnx",
        "weights": "model.onnx.data",
    }
    assert sorted(p.name for p in out.iterdir() if p.suffix in (".onnx", ".data")) == [
        "model.onnx",
        "model.onnx.data",
        "model_optimized.onnx",
    ]
    for graph in ("model.onnx", "model_optimized.onnx"):
        model = load_graph(out / graph)
        external = [t for t in model.graph.initializer if is_external(t)]
        assert external and all(len(t.dims) >= 2 for t in external)  # matrices out, vectors inline
        assert all(int(external_info(t)["offset"]) % ALIGN == 0 for t in external)
        assert {external_info(t)["location"] for t in external} == {"model.onnx.data"}
        assert (out / graph).stat().st_size < 200_000
    reports = json.loads((out / "validation.json").read_text())
    assert [r["status"] for r in reports] == ["passed", "passed"]
    assert {c["via"] for c in reports[1]["checks"]} == {"graph", "backend"}


def test_torch_model_is_freed_before_onnx_runtime_loads(checkpoint, tmp_path, monkeypatch):
    """Every weight tensor of the torch model is unreachable when the first validation session starts."""
    import export.onnx_export as onnx_export
    import export.validate as validate
    from cpm_infer import torch_model

    tensors: list[weakref.ref] = []
    load = torch_model.load_model

    def watched_load(*args, **kwargs):
        model, tok = load(*args, **kwargs)
        tensors.extend(weakref.ref(p) for p in model.parameters())
        return model, tok

    seen: list[int] = []
    real = validate.validate_onnx_graph

    def watched_validate(*args, **kwargs):
        gc.collect()
        seen.append(sum(ref() is not None for ref in tensors))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch_model, "load_model", watched_load)
    monkeypatch.setattr(onnx_export, "validate_onnx_graph", watched_validate)
    for fp16 in (False, True):
        tensors.clear()
        onnx_export.export_onnx(checkpoint, tmp_path / f"art-{fp16}", fp16=fp16, external_data_threshold=0)
        assert tensors and seen[-1] == 0


def test_one_onnx_runtime_session_at_a_time(checkpoint, gate_text, tmp_path, monkeypatch):
    """Validation of both graphs and the quality gate of both graphs: never two sessions alive."""
    from cpm_infer.backends import ort_backend
    from export.onnx_export import export_onnx
    from export.quantize import QuantizeOptions

    live: list[weakref.ref] = []
    most = [0]
    real = ort_backend.create_session

    def counted(*args, **kwargs):
        gc.collect()
        alive = [r for r in live if r() is not None]
        most[0] = max(most[0], len(alive) + 1)
        session = real(*args, **kwargs)
        live.append(weakref.ref(session))
        return session

    monkeypatch.setattr(ort_backend, "create_session", counted)
    export_onnx(
        checkpoint,
        tmp_path / "q",
        optimize=True,
        quantize=QuantizeOptions("int8", gate_text),
        external_data_threshold=0,
    )
    assert len(live) == 4 and most[0] == 1  # 2 validations + 2 gate runs, one after the other


# Uniform recipes: ORT's whole-model round-to-nearest quantizer takes one setting for every matrix, the defaults mix
# (int4: 4 and 8 bits; int8: k-quant blocks and a round-to-nearest head; k-quant's equality: tests/test_quantize.py).
_RTN8 = {"symmetric": True, "algorithm": "rtn", "lm_head_block_size": None}


@pytest.mark.parametrize(
    ("scheme", "overrides"),
    [("int8", {**_RTN8, "block_size": 32}), ("int8", {**_RTN8, "block_size": None}), ("int4", {"recipe": "fast"})],
)
def test_streamed_quantization_equals_onnx_runtime_whole_model(checkpoint, tmp_path, scheme, overrides, monkeypatch):
    """Node-by-node quantization from memory-mapped weights gives ORT's whole-model result exactly."""
    from onnx import numpy_helper

    from cpm_infer.artifact import read_manifest
    from export.onnx_export import export_onnx
    from export.quantize import config_for
    from export.quantize_graph import _embedding_gather, quantize_graph, untie_lm_head

    art = export_onnx(checkpoint, tmp_path / "fp32", optimize=True, external_data_threshold=0).path
    spec, config = read_manifest(art).spec, config_for(scheme, **overrides)
    with monkeypatch.context() as patched:
        refuse_weight_reads(patched, tmp_path)
        quantize_graph(art / "model_optimized.onnx", tmp_path / "streamed.onnx", spec, config)
    streamed = onnx.load(str(tmp_path / "streamed.onnx"), load_external_data=False)

    # The reference: ORT's quantizers on the whole model in memory, as the export did before.
    model = onnx.load(str(art / "model_optimized.onnx"))
    untie_lm_head(model, spec)
    initializers = {t.name: t for t in model.graph.initializer}
    nodes = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in initializers]
    if not config.block_wise:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        onnx.save(model, str(tmp_path / "in.onnx"))
        quantize_dynamic(
            tmp_path / "in.onnx",
            tmp_path / "whole.onnx",
            weight_type=QuantType.QInt8,
            per_channel=True,
            reduce_range=True,
            nodes_to_quantize=nodes,
            op_types_to_quantize=["MatMul", "Gather"],
            extra_options={"MatMulConstBOnly": True, "DefaultTensorType": 1},
        )
        whole = onnx.load(str(tmp_path / "whole.onnx"))
    else:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        kinds: tuple[str, ...] = ("MatMul",)
        if config.embedding != "float32":
            nodes.append(_embedding_gather(model, spec, initializers))
            kinds = ("MatMul", "Gather")
        quantizer = MatMulNBitsQuantizer(
            model,
            bits=config.bits,
            block_size=config.block_size,
            is_symmetric=config.symmetric,
            accuracy_level=config.accuracy_level,
            nodes_to_exclude=[n.name for n in model.graph.node if n.op_type in kinds and n.name not in nodes],
            op_types_to_quantize=kinds,
            quant_axes=(("MatMul", 0), ("Gather", 1)),
        )
        quantizer.process()
        whole = quantizer.model.model
    got = {t.name: numpy_helper.to_array(t, str(tmp_path)) for t in streamed.graph.initializer}
    want = {t.name: numpy_helper.to_array(t, str(tmp_path)) for t in whole.graph.initializer}
    assert sorted(got) == sorted(want)
    assert all(np.array_equal(got[k], want[k]) for k in want)

    def nodes_of(m):
        return sorted((n.op_type, n.name, tuple(n.input), tuple(n.output), str(n.attribute)) for n in m.graph.node)

    assert nodes_of(streamed) == nodes_of(whole)
    assert {(o.domain, o.version) for o in streamed.opset_import} == {(o.domain, o.version) for o in whole.opset_import}


def test_pack_inline_equals_onnx_save(checkpoint, tmp_path):
    """The field-by-field writer produces the same model as onnx's own (in-memory) serialisation."""
    from export.onnx_export import export_onnx
    from export.onnx_weights import pack_inline

    art = export_onnx(checkpoint, tmp_path / "ext", external_data_threshold=0).path
    pack_inline(art / "model.onnx", tmp_path / "packed.onnx")
    packed = onnx.load(str(tmp_path / "packed.onnx"))
    reference = onnx.load(str(art / "model.onnx"))  # loads the external data into the protobuf
    for tensor in reference.graph.initializer:
        tensor.ClearField("data_location")
        del tensor.external_data[:]
    assert packed == reference
    onnx.checker.check_model(packed)


def test_pack_inline_copies_without_a_memory_map(checkpoint, tmp_path, monkeypatch):
    """Packing reads the data file through a bounded buffer: the pages of a memory map would count in
    the process's resident set (the whole data file by the end), the page cache does not."""
    import mmap

    from export.onnx_export import export_onnx
    from export.onnx_weights import _copy_range, pack_inline

    art = export_onnx(checkpoint, tmp_path / "ext", external_data_threshold=0).path
    reference = onnx.load(str(art / "model.onnx"))

    def refuse(*args, **kwargs):
        raise AssertionError("pack_inline memory-mapped the data file")

    monkeypatch.setattr(mmap, "mmap", refuse)
    monkeypatch.setattr(np, "memmap", refuse)
    pack_inline(art / "model.onnx", tmp_path / "packed.onnx")
    monkeypatch.undo()
    packed = onnx.load(str(tmp_path / "packed.onnx"))
    assert [t.raw_data for t in packed.graph.initializer] == [t.raw_data for t in reference.graph.initializer]

    data = bytes(range(256)) * 5
    (tmp_path / "bytes").write_bytes(data)
    with open(tmp_path / "bytes", "rb", buffering=0) as source, open(tmp_path / "copy", "wb") as out:
        _copy_range(source, 3, 1000, out, chunk=7)  # many chunks, a short last one
    assert (tmp_path / "copy").read_bytes() == data[3:1003]
    with open(tmp_path / "bytes", "rb", buffering=0) as source, pytest.raises(OSError, match="ends before"):
        _copy_range(source, 1200, 200, tmp_path.joinpath("short").open("wb"))


def _rss_file() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) * 1024
    pytest.skip("no /proc/self/status RssFile here")


def test_page_out_drops_mapped_checkpoint_pages_and_keeps_values(tmp_path):
    """A float16 export converts memory-mapped float32 checkpoint weights one by one: each converted
    tensor's pages are handed back, and the tensor still reads the same values (from the file)."""
    from safetensors.torch import load_file, save_file

    from export.gpt2 import page_out

    values = torch.from_numpy(np.random.default_rng(0).standard_normal(4 * 2**20, dtype=np.float32))  # 16 MiB
    save_file({"w": values}, str(tmp_path / "w.safetensors"))
    mapped = load_file(str(tmp_path / "w.safetensors"))["w"]  # how checkpoints are loaded
    assert torch.equal(mapped, values)  # every page resident
    before = _rss_file()
    if not page_out(mapped):
        pytest.skip("madvise(MADV_PAGEOUT) is not supported here")
    assert before - _rss_file() > 8 * 2**20
    assert torch.equal(mapped, values)
    heap = values.clone()
    page_out(heap)  # heap memory: left as it is
    assert torch.equal(heap, values)


def test_float16_conversion_hands_back_each_float32_weight(checkpoint, monkeypatch):
    """from_hf(take=True) pages out every float32 weight it converts, and only those."""
    import export.gpt2 as gpt2
    from cpm_infer.torch_model import load_model

    model, _ = load_model(checkpoint)
    reference = gpt2.ExportGPT2.from_hf(model, torch.float16)
    converted = sum(1 for p in reference.parameters() if p.dtype == torch.float16)
    paged: list[int] = []
    real = gpt2.page_out
    monkeypatch.setattr(gpt2, "page_out", lambda t: paged.append(t.numel()) or real(t))
    module = gpt2.ExportGPT2.from_hf(model, torch.float16, take=True)
    assert len(paged) == converted and all(paged)
    for (name, want), got in zip(reference.state_dict().items(), module.state_dict().values(), strict=True):
        assert torch.equal(got, want), name
