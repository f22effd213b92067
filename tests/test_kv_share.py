"""The in-place KV cache (--optimize: GroupQueryAttention, past and present bound to one buffer)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("torch")


@pytest.fixture(scope="module")
def fused(tiny_checkpoint, tmp_path_factory) -> Path:
    from export.onnx_export import export_onnx

    return export_onnx(tiny_checkpoint, tmp_path_factory.mktemp("kvshare") / "fused", optimize=True).path


def _decode(backend, prompts: list[list[int]], steps: int):
    """Greedy prefill + ``steps`` decode steps: the logits of each step, the state, the last mask and positions."""
    from cpm_infer.engine.generate import left_pad

    ids, mask, pos = left_pad(prompts, pad_id=0)
    logits, state = backend.prefill(ids, mask, pos)
    out = [logits]
    for _ in range(steps):
        token = logits.argmax(-1)[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones((len(prompts), 1), np.int64)], axis=1)
        pos = pos[:, -1:] + 1
        logits, state = backend.decode(state, token, mask, pos)
        out.append(logits)
    return out, state, mask, pos


def test_manifest_marks_shared_kv_and_backend_uses_it(fused):
    from cpm_infer.artifact import read_manifest
    from cpm_infer.backends import load_backend

    assert read_manifest(fused).details["kv_cache"] == "shared"
    backend, _ = load_backend("ort", fused)
    assert backend.kv_shared


def test_shared_buffer_matches_concat_and_eager_past_its_first_capacity(fused, tiny_checkpoint):
    """100 steps cross the first capacity (64 slots): the grown buffer keeps the prefix; the same graph
    run with separate past/present (concat, no IO binding) and eager PyTorch agree at every step."""
    from cpm_infer.backends import load_backend
    from cpm_infer.backends.ort_backend import OrtBackend

    shared, tok = load_backend("ort", fused)
    concat = OrtBackend(shared.session, shared.spec, io_binding=False)
    eager, _ = load_backend("torch", tiny_checkpoint)
    prompts = [tok.encode("话说天下大势，分久必合"), tok.encode("青山")]  # left padding in row 1
    got, state, _, _ = _decode(shared, prompts, 100)
    assert state.capacity == 128 and state.past == len(prompts[0]) + 100
    for reference in (_decode(concat, prompts, 100)[0], _decode(eager, prompts, 100)[0]):
        for a, b in zip(got, reference, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_decode_writes_in_place(fused):
    """Within its capacity, a decode step neither allocates nor moves the cache, and leaves the past as it was."""
    from cpm_infer.backends import load_backend

    backend, tok = load_backend("ort", fused)
    _, state, _, pos = _decode(backend, [tok.encode("滚滚长江东逝水")], 1)
    before = [pair[0] for pair in state.buffers]
    past = state.past
    snapshot = before[0][:, :, :past].copy()
    _, state = backend.decode(state, np.array([[5]]), np.ones((1, past + 1), np.int64), pos + 1)
    assert all(a is pair[0] for a, pair in zip(before, state.buffers, strict=True))
    np.testing.assert_array_equal(state.buffers[0][0][:, :, :past], snapshot)
    assert not np.array_equal(state.buffers[0][0][:, :, past], snapshot[:, :, -1])  # the new slot was written


def test_select_keeps_rows(fused, tiny_checkpoint):
    """Dropping a row of the shared buffer: the kept rows continue exactly like eager PyTorch."""
    from cpm_infer.backends import load_backend

    shared, tok = load_backend("ort", fused)
    eager, _ = load_backend("torch", tiny_checkpoint)
    prompts = [tok.encode("话说"), tok.encode("天下大势"), tok.encode("分久必合，合久必分")]
    rows = np.array([0, 2])
    outs = []
    for backend in (shared, eager):
        _, state, mask, pos = _decode(backend, prompts, 3)
        state = backend.select(state, rows)
        mask = np.concatenate([mask[rows], np.ones((2, 1), np.int64)], axis=1)
        logits, _ = backend.decode(state, np.array([[9], [11]]), mask, pos[rows] + 1)
        outs.append(logits)
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-4, rtol=1e-4)


def test_rows_leave_and_join_in_place_and_match_the_concat_cache(fused):
    """Rows leaving (any order, repeats, padding cut) and joining (either side wider) move inside the shared
    buffers where that is safe, and the cache then equals the same graph's separate past/present at every step."""
    from cpm_infer.backends import load_backend
    from cpm_infer.backends.ort_backend import OrtBackend
    from cpm_infer.engine.batch import DecodeBatch

    shared, tok = load_backend("ort", fused)
    concat = OrtBackend(shared.session, shared.spec, io_binding=False)
    texts = ["话说天下大势，分久必合", "青山", "滚滚长江东逝水，浪花淘尽英雄", "是非成败转头空", "白发渔樵江渚上"]
    prompts = [tok.encode(t) for t in texts]

    def views(backend, batch):
        return [v.copy() for v in backend._kv_views(batch.state)]

    batches = {}
    for backend in (shared, concat):
        _, batches[backend] = DecodeBatch.prefill(backend, prompts[:4], 0)
    moves = [("decode",), ("select", [0, 3, 2]), ("decode",), ("merge", [prompts[4]]), ("select", [1, 2, 3]),
             ("merge", [prompts[2] * 2]), ("select", [3, 0, 0]), ("decode",), ("select", [0, 2])]  # fmt: skip
    for move in moves:
        buffers = [pair[0] for pair in batches[shared].state.buffers]
        for backend, batch in batches.items():
            if move[0] == "decode":
                batch.decode(backend, [7] * batch.size)
            elif move[0] == "select":
                batch.select(backend, move[1])
            else:
                _, other = DecodeBatch.prefill(backend, move[1], 0)
                batch.merge(backend, other)
        a, b = views(shared, batches[shared]), views(concat, batches[concat])
        assert len(a) == len(b) and all(x.shape == y.shape for x, y in zip(a, b, strict=True)), move
        for x, y in zip(a, b, strict=True):
            np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-5, err_msg=str(move))
        kept = all(x is pair[0] for x, pair in zip(buffers, batches[shared].state.buffers, strict=True))
        if move == ("select", [0, 3, 2]) or move == ("select", [0, 2]):
            assert kept, f"{move} moved the cache into new buffers"
        if move == ("select", [3, 0, 0]):
            assert not kept  # slot 0 would be overwritten before rows 1 and 2 read it: new buffers


def test_reserved_buffers_serve_one_running_batch_at_a_time(fused):
    """reserve(): the first batch a join outgrows takes the reserved buffers (full context: it never grows), rows
    then join in place; once that batch is gone the next one takes them; the cache equals the unreserved one."""
    import gc

    from cpm_infer.backends import load_backend
    from cpm_infer.backends.ort_backend import OrtBackend
    from cpm_infer.engine.batch import DecodeBatch

    shared, tok = load_backend("ort", fused)
    plain = OrtBackend(shared.session, shared.spec, kv_shared=True)
    size = 2 * shared.spec.n_layer * 4 * shared.spec.n_positions * shared.spec.n_embd * 4  # 3 rows -> 4 slots
    assert shared.reserve(3, dry_run=True) == size and not shared._reserve
    assert shared.reserve(3) == size
    reserved = [buffer.ctypes.data for buffer in shared._reserve]
    prompts = [tok.encode(t) for t in ("话说天下大势", "青山依旧在", "几度夕阳红，白发渔樵江渚上")]
    for _ in range(2):  # the second batch gets the buffers the first one left
        batches = {}
        for backend in (shared, plain):
            _, batch = DecodeBatch.prefill(backend, prompts[:1], 0)
            for prompt in prompts[1:]:
                _, other = DecodeBatch.prefill(backend, [prompt], 0)
                batch.merge(backend, other)
                batch.decode(backend, [7] * batch.size)
            batches[backend] = batch
        state = batches[shared].state
        assert [pair[0].ctypes.data for pair in state.buffers] == reserved and state.capacity == shared.spec.n_positions
        for x, y in zip(shared._kv_views(state), plain._kv_views(batches[plain].state), strict=True):
            np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-5)
        _, other = DecodeBatch.prefill(shared, prompts[:1], 0)
        other.merge(shared, DecodeBatch.prefill(shared, prompts[1:2], 0)[1])  # the reserve is taken: own buffers
        assert other.state.buffers[0][0].ctypes.data not in reserved
        del batches, state, other
        gc.collect()
    _, holder = DecodeBatch.prefill(shared, prompts[:1], 0)
    holder.merge(shared, DecodeBatch.prefill(shared, prompts[1:2], 0)[1])
    assert holder.state.buffers[0][0].ctypes.data == reserved[0]
    holder.select(shared, [1, 0])  # an order that cannot move in place: the holder leaves for new buffers
    assert holder.state.buffers[0][0].ctypes.data not in reserved
    _, taker = DecodeBatch.prefill(shared, prompts[:1], 0)
    taker.merge(shared, DecodeBatch.prefill(shared, prompts[2:], 0)[1])
    assert taker.state.buffers[0][0].ctypes.data == reserved[0]  # free again, though its last holder lives on


@pytest.mark.parametrize(
    ("sizes", "axis", "extra_reader", "packed"),
    [
        ([4, 4, 4], 2, False, True),
        ([4, 4, 4], -1, False, True),
        (None, 2, False, True),  # no sizes: equal parts
        ([4, 4, 8], 2, False, False),  # unequal parts are not Q | K | V
        ([4, 4, 4], 1, False, False),  # another axis
        ([4, 4, 4], 2, True, False),  # k read elsewhere too: the Split must stay
    ],
)
def test_packed_qkv_only_from_an_equal_last_axis_split_read_once(sizes, axis, extra_reader, packed):
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.transformers.onnx_model import OnnxModel

    from export.kv_share import _packed_source

    inputs = ["x"] + (["sizes"] if sizes is not None else [])
    split = helper.make_node("Split", inputs, ["q", "k", "v"], axis=axis)
    nodes = [split, helper.make_node("Concat", ["q", "k", "v"], ["y"], axis=2)]
    if extra_reader:
        nodes.append(helper.make_node("Identity", ["k"], ["k2"]))
    init = [numpy_helper.from_array(np.array(sizes, np.int64), "sizes")] if sizes is not None else []
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 12])], [], initializer=init
    )
    model = OnnxModel(helper.make_model(graph))
    got = _packed_source(model, model.model.graph.node[0], ("q", "k", "v"), model.input_name_to_nodes())
    assert got == ("x" if packed else None)
