"""ESA driven end to end on CPU tensors by a miniature engine (tests/sparse/sparse_engine.py): budget shrink,
retrieval pipeline, delta loads from a real UcmDram store, failed loads, batching, preemption, resident mode."""

from __future__ import annotations

import contextlib
import threading
import time

import pytest
import torch
from sparse_engine import MiniEngine

from ucm.device import StreamGate, get_backend
from ucm.device.cpu import CpuBackend
from ucm.sparse.budget import window_layout
from ucm.sparse.config import EsaConfig
from ucm.sparse.esa.schedule import EsaSchedule
from ucm.store import create_store

BS, LAYERS, HKV, D = 4, 3, 2, 16


def dram_store(layers: int = LAYERS):
    row = layers * 2 * BS * HKV * D * 4  # every layer's k and v page, float32
    return create_store("UcmDram", {"kv_block_size": row, "max_cache_size": 400 * row}, get_backend("cpu"))


def decode_steps(engine: MiniEngine, req_id: str, n: int):
    """Run n steps, yielding each one's records before the next runs (so assertions see that step's state)."""
    for _ in range(n):
        yield engine.step([req_id])[req_id]


def test_ratio_one_offload_equals_dense():
    engine = MiniEngine(EsaConfig(sparse_ratio=1.0), offload=True, store=dram_store())
    engine.add("a", prompt=61)
    engine.step()  # prefill
    for records in decode_steps(engine, "a", 30):  # 7 generated blocks: they leave the local window
        for rec in records:
            assert sorted(rec.positions) == list(range(len(rec.positions)))
            torch.testing.assert_close(rec.output, rec.dense_output, atol=1e-5, rtol=1e-5)


def _spares(config: EsaConfig) -> int:
    """Spare blocks a request of 40 prompt blocks of 4 holds for loads ahead (k = 7: 2 at the default 0.4)."""
    return window_layout(160, 4, config).num_spare


def test_offload_shrinks_finds_needles_and_never_reads_freed_blocks():
    config = EsaConfig(init_window_sz=1, local_window_sz=2, sparse_ratio=0.2, retrieval_stride=3)
    engine = MiniEngine(config, offload=True, store=dram_store(), needle_scale=6.0)
    req = engine.add("a", prompt=160)  # 40 blocks: sink 1, 37 candidates -> k = 7, local 2
    engine.step()
    prefill_blocks = len(req.block_ids)
    needles = engine.needles(req)
    for d, records in enumerate(decode_steps(engine, "a", 12)):
        # the budget: sink, k, local, tail and the spare blocks of loads ahead (ESA's default prefetch_ratio)
        assert sum(1 for b in req.block_ids if b) == 1 + 7 + 2 + 1 + _spares(config)
        for rec in records:  # MiniEngine already checked every attended block holds its true KV
            assert torch.isfinite(rec.output).all()
            assert len(rec.positions) <= 1 + 7 + 2 + 1
            if d == 0 or d >= 4:  # initial selection from the prefill query; later retrievals keep them
                assert set(needles) <= set(rec.positions), (d, rec.positions)
            cos = torch.nn.functional.cosine_similarity(rec.output.flatten(), rec.dense_output.flatten(), dim=0)
            assert cos > 0.9
    assert prefill_blocks == 40
    assert engine.store.stats().blocks_loaded > 0


@pytest.mark.parametrize("staged", [False, True], ids=["layer-hooks", "boundary"])
def test_long_generation_offloads_generated_blocks_and_retrieves_them(staged):
    # 40 prompt blocks of 4 (sink 1, 37 candidates -> k = 7, local 2), 25 blocks generated; the needle at block
    # 45 is a generated block: dumped when it fills, freed once it leaves the local window, loaded back when chosen
    config = EsaConfig(init_window_sz=1, local_window_sz=2, sparse_ratio=0.2, retrieval_stride=2)
    engine = MiniEngine(config, offload=True, store=dram_store(2), num_layers=2, needle_scale=6.0,
                        needle_blocks=[13, 45], stage_queries=staged)
    req = engine.add("a", prompt=160, max_tokens=200)
    by_id: list[str] = []  # ids loaded one by one (not through a pin of the request's blocks)
    load = engine.store.load
    engine.store.load = lambda ids, destination: (by_id.extend(ids), load(ids, destination))[1]
    engine.step()
    attended_after_freed = 0
    freed_for = 0  # steps since block 45 left the local window (freed: its dump is confirmed)
    for _ in range(100):
        records = engine.step()["a"]
        # the budget, whatever the output length
        assert sum(1 for b in req.block_ids if b) == 1 + 7 + 2 + 1 + _spares(config)
        freed_for += len(req.block_ids) > 45 and req.block_ids[45] == 0
        for rec in records:  # MiniEngine checked every attended block holds its true KV
            assert len(rec.positions) == 1 + 7 + 2 + 1
            assert 13 in rec.positions
            if freed_for > 4:  # a candidate since; the next retrieval (submit, consume, wait) loaded it back
                assert 45 in rec.positions, freed_for
                attended_after_freed += 1
    assert attended_after_freed > 0
    # generated blocks are pinned once their stored copies are confirmed, as the prompt's: none loaded by id
    assert by_id == []
    state = engine.worker._requests["a"]
    assert state.pin_len > 45 and 1 < len(state.pins) <= 8  # extended as blocks were generated, merged past 8
    assert req.held == set()
    generated = engine.hashes(req, req.num_computed_tokens // 4)[40:]
    assert len(generated) == 25 and all(engine.store.lookup(generated))  # every generated block is stored
    # preempted: re-prefills prompt + 100 outputs densely, then shrinks to the same budget and finds both needles
    engine.preempt("a")
    engine.step()
    for _ in range(6):
        for rec in engine.step()["a"]:
            assert {13, 45} <= set(rec.positions) and len(rec.positions) == 11
        assert sum(1 for b in req.block_ids if b) == 11 + _spares(config)


def test_failed_decode_dump_keeps_the_block_resident():
    config = EsaConfig(init_window_sz=1, local_window_sz=2, sparse_ratio=0.2, retrieval_stride=2)
    # a needle in generated block 45, after the unstored 42: the request's pins stop before 42 (a pin resolves
    # its blocks once), so 45 is loaded by id when selected
    engine = MiniEngine(config, offload=True, store=dram_store(2), num_layers=2, skip_dump={42},
                        needle_scale=6.0, needle_blocks=[13, 45])
    req = engine.add("a", prompt=160, max_tokens=100)
    engine.step()
    needle_attended = 0
    for _ in range(50):  # 12 blocks generated: block 42 left the local window long ago
        records = engine.step()["a"]
        if req.num_computed_tokens > 46 * 4:
            assert req.held == {42} and req.block_ids[42] != 0
            assert sum(1 for b in req.block_ids if b) == 1 + 7 + 2 + 1 + 1 + _spares(config)
            for rec in records:  # attended where it lies, never loaded (it has no stored copy)
                assert 42 in rec.positions and torch.isfinite(rec.output).all()
                needle_attended += 45 in rec.positions and req.block_ids[45] == 0  # freed, so loaded
    assert needle_attended > 0
    assert engine.worker._requests["a"].pin_len <= 42
    assert not engine.store.lookup(engine.hashes(req, 43)[42:])[0]
    assert sum(s.load_failures for s in engine.stats) == 0


@pytest.mark.parametrize("staged", [False, True], ids=["layer-hooks", "boundary"])
@pytest.mark.parametrize("stride", [1, 2, 3, 10])
def test_pipeline_order(stride, staged):
    """Layer hooks: submit at d = 2 (mod s), consume at submit + max(1, s - 2) after the layer's attention, loads
    attended from the next step (UCM's 2 / 0 / 1 for s >= 3). Boundary (staged queries): the same submit and
    consume steps, every layer at once: submitted after the forward, consumed and waited before the forward of
    the consume step, which attends the new blocks. d = 0 applies the selection scored at the end of prefill."""
    config = EsaConfig(sparse_ratio=0.25, retrieval_stride=stride)
    engine = MiniEngine(config, offload=True, store=dram_store(2), num_layers=2, stage_queries=staged)
    req = engine.add("a", prompt=200)  # 50 blocks: sink 1, 47 candidates, k = 11, local 2
    engine.step()
    assert engine.stats[-1].retrievals == 2  # the initial retrieval of each layer
    schedule = EsaSchedule(stride)
    attended = []
    steps = 13 if stride < 10 else 24
    for d in range(steps):
        records = engine.step()["a"]
        st = engine.stats[-1]
        assert st.retrievals == (2 if schedule.is_submit(d) else 0), d
        assert st.retrievals_consumed == (2 if d == 0 or schedule.is_consume(d) else 0), d
        if not (d == 0 or schedule.is_consume(d)):  # only loads ahead (boundary, stride > 3) between them
            assert st.blocks_loaded == st.blocks_prefetched, d
        if not staged or schedule.lag < 3 or not 1 <= (d - 2) % stride < schedule.lag - 1:
            assert st.blocks_prefetched == 0, d
        tail = min(len(req.block_ids) - 48, 3)  # local window + partial tail (generated blocks become candidates)
        for rec in records:  # no slot is ever left out: all k work blocks are attended every step
            assert len(rec.positions) == 1 + 11 + tail
        # per request, summed over the step's layers (steady steps too, which reuse the first layer's view)
        assert st.request_blocks == {"a": [2 * (1 + 11 + tail), 2 * len(req.block_ids), 2]}, d
        # one batched selection a layer (layer hooks), one for all layers (boundary)
        assert len(st.retrieval_s) == (1 if schedule.is_submit(d) else 0) * (1 if staged else 2), d
        attended.append([set(rec.positions[1:12]) for rec in records])
    changed = [d for d in range(1, steps) if attended[d] != attended[d - 1]]
    assert changed, "random queries must change the selection"
    for d in changed:  # a new selection shows up exactly one step after a consume (boundary: at the consume)
        if staged:
            assert schedule.is_consume(d), (d, changed)
        else:
            assert schedule.is_wait(d) and schedule.is_consume(d - 1), (d, changed)


@pytest.mark.parametrize("staged", [False, True], ids=["layer-hooks", "boundary"])
def test_failed_loads_keep_previous_blocks_and_are_reported(staged):
    config = EsaConfig(sparse_ratio=0.3, retrieval_stride=2)
    engine = MiniEngine(config, offload=True, store=dram_store(), needle_scale=6.0, skip_dump={13, 20, 21},
                        stage_queries=staged)
    req = engine.add("a", prompt=120)  # needles at blocks 10 and 16
    engine.step()
    failed = set()
    for _ in range(8):
        records = engine.step()["a"]
        failed.update(engine.stats[-1].failed_block_hashes)
        for rec in records:
            assert torch.isfinite(rec.output).all()
            assert set(engine.needles(req)) <= set(rec.positions)
    assert engine.store.stats().load_failures > 0
    assert failed and failed <= {engine.hashes(req)[p] for p in (13, 20, 21)}


@pytest.mark.parametrize("staged", [False, True], ids=["layer-hooks", "boundary"])
def test_batch_at_different_steps_with_dense_request_and_preemption(staged):
    config = EsaConfig(sparse_ratio=0.2, retrieval_stride=2, min_blocks=8)
    engine = MiniEngine(config, offload=True, store=dram_store(), needle_scale=6.0, stage_queries=staged)
    a = engine.add("a", prompt=130)
    engine.step(["a"])
    for _ in range(3):
        engine.step(["a"])
    b = engine.add("b", prompt=90)
    engine.add("short", prompt=10)  # < min_blocks: dense
    engine.step(["a", "b", "short"])  # a decodes while b and short prefill
    for _ in range(5):
        records = engine.step()
        for rid, req in (("a", a), ("b", b)):
            for rec in records[rid]:
                assert set(engine.needles(req)) <= set(rec.positions)
        for rec in records["short"]:
            torch.testing.assert_close(rec.output, rec.dense_output, atol=1e-5, rtol=1e-5)
    engine.preempt("a")
    outputs_before = a.num_output
    records = engine.step()  # a re-prefills prompt + outputs (dense), b and short decode
    assert records["a"] == [] and a.num_output == outputs_before + 1
    for _ in range(4):
        records = engine.step()
        for rec in records["a"]:
            assert set(engine.needles(a)) <= set(rec.positions)
            assert torch.isfinite(rec.output).all()
    for rid in ("a", "b", "short"):
        engine.finish(rid)
    assert engine.worker._requests == {}


def test_resident_mode_selects_without_freeing():
    config = EsaConfig(sparse_ratio=0.2, retrieval_stride=1)
    engine = MiniEngine(config, offload=False, needle_scale=6.0)
    req = engine.add("a", prompt=160)
    engine.step()
    for records in decode_steps(engine, "a", 5):
        assert 0 not in req.block_ids  # nothing freed
        for rec in records:
            assert len(rec.positions) == 1 + 7 + min(len(req.block_ids) - 38, 3)
            assert set(engine.needles(req)) <= set(rec.positions)


def test_offload_without_store_is_a_config_error():
    from ucm.errors import UcmConfigError
    from ucm.sparse import UcmSparseRole, create_sparse

    with pytest.raises(UcmConfigError, match="store"):
        create_sparse("ESA", None, UcmSparseRole.WORKER, block_size=16, backend=get_backend("cpu"))


@pytest.mark.parametrize("block_size", [3, 16])
def test_any_block_size_offload(block_size):
    config = EsaConfig(sparse_ratio=0.2, retrieval_stride=2)
    row = LAYERS * 2 * block_size * HKV * D * 4
    store = create_store("UcmDram", {"kv_block_size": row, "max_cache_size": 200 * row}, get_backend("cpu"))
    engine = MiniEngine(config, offload=True, store=store, block_size=block_size, needle_scale=6.0)
    req = engine.add("a", prompt=40 * block_size + 1)  # ragged: the last prompt block holds one token
    engine.step()
    for _ in range(block_size + 2):  # fills the ragged block, then opens a new one
        records = engine.step()["a"]
        plan = engine.scheduler.block_plan(req, 0)
        assert sum(1 for b in req.block_ids if b) == plan.num_blocks
        for rec in records:
            assert set(engine.needles(req)) <= set(rec.positions)
            assert torch.isfinite(rec.output).all()
    assert len(req.block_ids) == 42


@pytest.mark.parametrize("staged", [False, True], ids=["layer-hooks", "boundary"])
def test_requests_at_different_decode_steps_retrieve_in_one_launch_per_layer(staged):
    # b starts decoding 3 steps after a: both follow the worker's clock, so each retrieval step scores both
    # requests of a layer in one batched launch (one scoring + top-k per layer, whatever the batch size); with
    # staged queries one launch scores every layer and request of the step
    config = EsaConfig(sparse_ratio=0.2, retrieval_stride=4, min_blocks=8)
    engine = MiniEngine(config, offload=True, store=dram_store(), needle_scale=6.0, stage_queries=staged)
    a = engine.add("a", prompt=130)
    engine.step(["a"])
    for _ in range(2):
        engine.step(["a"])
    b = engine.add("b", prompt=110)
    engine.step(["a", "b"])
    retriever = engine.worker.retriever
    launches: list[int] = []
    original = retriever.submit_batch

    def counting(queries, reps, ks, parts=1):
        launches.append(len(reps))
        return original(queries, reps, ks, parts)

    retriever.submit_batch = counting
    for _ in range(12):
        records = engine.step(["a", "b"])
        for rid, req in (("a", a), ("b", b)):
            for rec in records[rid]:
                assert set(engine.needles(req)) <= set(rec.positions)
    # 12 steps at stride 4: three retrieval steps, each one launch per layer covering both requests
    assert launches == ([2 * LAYERS] * 3 if staged else [2] * (3 * LAYERS)), launches


@pytest.mark.parametrize("pack_bytes", [1, 3000, 1 << 30])
def test_batched_selection_packed_in_bounded_launches_picks_what_one_launch_picks(monkeypatch, pack_bytes):
    """The representations of a batched selection are packed at most `PACK_BYTES` per launch (their copy is
    device memory outside the engine's KV budget): any packing selects, per request, what one launch selects."""
    from ucm.sparse.esa import retriever as retriever_module

    gen = torch.Generator().manual_seed(3)
    blocks, ks = [40, 7, 25, 3, 60], [8, 9, 5, 0, 12]  # k above a request's block count, and k 0
    reps = [torch.randn(n * 2, 2, 16, generator=gen) for n in blocks]  # 2 parts per block
    queries = torch.randn(len(blocks), 4, 16, generator=gen)
    retriever = retriever_module.EsaRetriever(get_backend("cpu"))
    want = retriever.submit_batch(queries, reps, ks, parts=2)
    want_rows = [want.row(r) for r in range(len(blocks))]
    monkeypatch.setattr(retriever_module, "PACK_BYTES", pack_bytes)
    got = retriever.submit_batch(queries, reps, ks, parts=2)
    assert [got.row(r) for r in range(len(blocks))] == want_rows
    assert [len(r) for r in want_rows] == [min(k, n) for k, n in zip(ks, blocks, strict=True)]
    assert all(got.array(r).tolist() == want_rows[r] for r in range(len(blocks)))
    assert retriever_module._pack_groups([5, 5, 5], 10) == [(0, 2), (2, 3)]
    assert retriever_module._pack_groups([20, 5], 10) == [(0, 1), (1, 2)] and retriever_module._pack_groups([], 9) == []


class _GateEvent:
    def __init__(self, gate: threading.Event):
        self.gate = gate

    def query(self) -> bool:
        return self.gate.is_set()

    def synchronize(self) -> None:
        self.gate.wait()


class _GatedBackend(CpuBackend):
    """The CPU backend whose copies count as finished only once ``gate`` is set (loads in flight, as on a GPU)."""

    def __init__(self):
        super().__init__()
        self.gate = threading.Event()
        self.gate.set()

    def record_event(self, stream=None):
        return _GateEvent(self.gate)


def test_loads_in_flight_for_a_request_left_out_of_a_step_are_waited_before_that_step():
    # its work slots may be handed to another request from that step on: no copy may still be writing them
    row = LAYERS * 2 * BS * HKV * D * 4
    backend = _GatedBackend()
    store = create_store("UcmDram", {"kv_block_size": row, "max_cache_size": 400 * row}, backend)
    engine = MiniEngine(EsaConfig(sparse_ratio=0.2, retrieval_stride=3), offload=True, store=store,
                        needle_scale=6.0)  # layer hooks: boundary mode waits its loads in the consume step
    a = engine.add("a", prompt=160)
    engine.add("b", prompt=120)
    engine.step()  # prefill both
    engine.step()  # first decode step: initial selections loaded and waited
    while not engine.worker.schedule.is_consume(engine.worker._phase + 1):
        engine.step()
    backend.gate.clear()
    engine.step(["a"])  # a consumes its retrieval: its delta loads stay in flight
    in_flight = [ls for ls in engine.worker._requests["a"].layers if ls.load_task is not None]
    assert in_flight and not any(ls.load_task.done() for ls in in_flight)
    opener = threading.Timer(0.4, backend.gate.set)
    opener.start()
    started = time.monotonic()
    engine.step(["b"])
    assert time.monotonic() - started >= 0.35  # the step began only once a's loads had landed
    assert all(ls.load_task is None for ls in engine.worker._requests["a"].layers)
    for _ in range(4):  # a attends its new blocks (MiniEngine checks every attended block holds its true KV)
        for rec in engine.step()["a"]:
            assert set(engine.needles(a)) <= set(rec.positions)


def test_boundary_steps_between_stages_are_steady_and_unstaged_rows_fall_back_to_layer_hooks():
    # boundary mode: after the first decode step, no step needs a per-layer hook (the engine may run each as one
    # full graph), also the submit and consume steps; a request whose query row is not staged (here: the second
    # of a stage of one row) makes its submit step use the layer hooks, and still finds its needles
    config = EsaConfig(sparse_ratio=0.2, retrieval_stride=3)
    engine = MiniEngine(config, offload=True, store=dram_store(), needle_scale=6.0, stage_queries=True,
                        stage_rows=1)
    a = engine.add("a", prompt=160)
    engine.step()
    engine.step()  # the initial selection's loads
    steady = []
    for _ in range(9):
        for rec in engine.step()["a"]:
            assert set(engine.needles(a)) <= set(rec.positions)
        steady.append(engine.worker._steady)
    assert all(steady), steady
    assert sum(s.retrievals for s in engine.stats[-9:]) == 3 * LAYERS
    b = engine.add("b", prompt=120)
    engine.step(["a", "b"])  # b's prefill
    engine.step(["a", "b"])
    submits = 0
    for _ in range(9):
        records = engine.step(["a", "b"])
        schedule, phase = engine.worker.schedule, engine.worker._phase
        if schedule.is_submit(phase):
            assert not engine.worker._steady  # b's row is not staged: this step submits in the layer hooks
            assert len(engine.stats[-1].retrieval_s) == LAYERS
            submits += 1
        for rid, req in (("a", a), ("b", b)):
            for rec in records[rid]:
                assert set(engine.needles(req)) <= set(rec.positions)
    assert submits == 3


def test_boundary_mode_falls_back_to_layer_hooks_when_the_engine_does_not_stage_queries(caplog):
    # an engine that registers a stage but never copies into it: the first submit sees the poisoned rows, warns
    # once and the worker retrieves in the layer hooks from then on (never from stale or missing queries)
    config = EsaConfig(sparse_ratio=0.2, retrieval_stride=2)
    engine = MiniEngine(config, offload=True, store=dram_store(), needle_scale=6.0, stage_queries=True)
    engine.stage_queries = False  # registered, never written
    a = engine.add("a", prompt=160)
    engine.step()
    with caplog.at_level("WARNING"):
        for _ in range(12):
            for rec in engine.step()["a"]:
                assert set(engine.needles(a)) <= set(rec.positions)
    assert engine.worker.query_stage(engine.layer_names[0]) is None
    assert sum("did not stage the queries" in r.message for r in caplog.records) == 1
    assert sum(s.retrievals_consumed for s in engine.stats[-12:]) > 0


@pytest.mark.parametrize("staged", [False, True], ids=["layer-hooks", "boundary"])
def test_initial_selection_by_attention_keeps_the_blocks_the_last_prompt_queries_attend(staged):
    """initial_selection "attention": the first decode step attends the candidates that the last
    ``initial_queries`` prompt queries pay the most attention (exact softmax over the prompt's full blocks),
    checked against a brute-force computation from the engine's true keys and queries, in every layer."""
    config = EsaConfig(sparse_ratio=0.2, retrieval_stride=3, initial_selection="attention", initial_queries=5)
    engine = MiniEngine(config, offload=True, store=dram_store(), stage_queries=staged)
    req = engine.add("a", prompt=161)  # 40 full blocks + 1 token: sink 1, candidates 1..37, local 2
    engine.step()
    records = engine.step(["a"])["a"]
    full = 161 // BS
    for layer, rec in enumerate(records):
        keys, _ = engine.truth(req, layer, range(full * BS))
        queries = torch.stack([engine.query(req, layer, p) for p in range(161 - 5, 161)])  # [w, hq, d]
        mass = torch.zeros(full)
        for q in queries:
            for h in range(engine.hq):
                logits = keys[:, h // (engine.hq // engine.hkv)] @ q[h] / D**0.5
                mass += torch.softmax(logits, 0).view(full, BS).sum(1)
        chosen = sorted(p for p in rec.positions if 1 <= p < full - 2)
        assert len(chosen) == 7  # int(37 * 0.2)
        best = sorted((mass[1 : full - 2].topk(7).indices + 1).tolist())
        assert chosen == best, (layer, chosen, best)


def test_initial_selection_by_attention_finds_planted_needles():
    config = EsaConfig(sparse_ratio=0.2, retrieval_stride=3, initial_selection="attention")
    engine = MiniEngine(config, offload=True, store=dram_store(), needle_scale=6.0)
    req = engine.add("a", prompt=160)
    engine.step()
    needles = engine.needles(req)
    for records in decode_steps(engine, "a", 3):
        for rec in records:
            assert set(needles) <= set(rec.positions)
            cos = torch.nn.functional.cosine_similarity(rec.output.flatten(), rec.dense_output.flatten(), dim=0)
            assert cos > 0.9


def _run_stride10(prefetch_ratio: float, store, *, skip_dump=None, steps: int = 34, backend=None):
    """Two requests decoding in boundary mode at stride 10 (random queries: the selection churns every cycle);
    per step, what each layer attended and the step's stats."""
    config = EsaConfig(sparse_ratio=0.25, retrieval_stride=10, prefetch_ratio=prefetch_ratio)
    engine = MiniEngine(config, offload=True, store=store, num_layers=LAYERS, stage_queries=True,
                        skip_dump=skip_dump, backend=backend)
    engine.add("a", prompt=200, max_tokens=60)
    engine.add("b", prompt=160, max_tokens=60)
    engine.step()
    attended = []
    for _ in range(steps):
        records = engine.step()
        attended.append({rid: [(tuple(r.positions), r.output) for r in recs] for rid, recs in records.items()})
    return engine, attended


def test_loads_ahead_into_spare_slots_attend_exactly_what_consume_step_loads_do():
    """The steps between a submit and its consume load the new blocks into spare slots; the consume step moves
    them into the work slots on the device. The attention sees the same blocks, with their true KV (MiniEngine
    checks every attended block), at the same steps as when everything loads at the consume step."""
    plain, attended_plain = _run_stride10(0.0, dram_store())
    ahead, attended_ahead = _run_stride10(1.0, dram_store())
    assert plain.worker._requests["a"].layout.num_spare == 0
    assert ahead.worker._requests["a"].layout.num_spare == 11  # k = int(47 * 0.25) = 11
    for d, (one, other) in enumerate(zip(attended_plain, attended_ahead, strict=True)):
        for rid in one:
            assert [p for p, _ in one[rid]] == [p for p, _ in other[rid]], (d, rid)
            for (_, x), (_, y) in zip(one[rid], other[rid], strict=True):
                torch.testing.assert_close(x, y)
    schedule = ahead.worker.schedule
    consume_loads = {name: sum(st.blocks_loaded - st.blocks_prefetched for d, st in enumerate(engine.stats[1:])
                               if schedule.is_consume(d)) for name, engine in (("plain", plain), ("ahead", ahead))}
    prefetched = sum(st.blocks_prefetched for st in ahead.stats)
    assert sum(st.blocks_prefetched for st in plain.stats) == 0
    assert prefetched > 0 and consume_loads["plain"] > 0
    # with k spare slots every new block of a selection fits: nothing is left for the consume steps to load
    assert consume_loads["ahead"] == 0
    assert sum(st.blocks_loaded for st in ahead.stats) == sum(st.blocks_loaded for st in plain.stats)


def test_a_failed_load_ahead_is_loaded_again_at_the_consume_step_and_reported_once():
    # blocks 13 and 20 have no stored copy: their loads fail ahead and again at the consume step; the slots keep
    # their blocks, exactly as without loads ahead
    plain, attended_plain = _run_stride10(0.0, dram_store(), skip_dump={13, 20})
    ahead, attended_ahead = _run_stride10(1.0, dram_store(), skip_dump={13, 20})
    for one, other in zip(attended_plain, attended_ahead, strict=True):
        assert {r: [p for p, _ in v] for r, v in one.items()} == {r: [p for p, _ in v] for r, v in other.items()}
    failures = [sum(st.load_failures for st in engine.stats) for engine in (plain, ahead)]
    assert failures[0] > 0 and failures[0] == failures[1]


def test_loads_ahead_for_a_request_left_out_of_a_step_are_waited_before_that_step():
    # its spare slots may be handed to another request from that step on: no copy may still be writing them
    row = LAYERS * 2 * BS * HKV * D * 4
    backend = _GatedBackend()
    store = create_store("UcmDram", {"kv_block_size": row, "max_cache_size": 400 * row}, backend)
    engine = MiniEngine(EsaConfig(sparse_ratio=0.25, retrieval_stride=10, prefetch_ratio=0.25), offload=True,
                        store=store, stage_queries=True)
    engine.add("a", prompt=200)
    engine.add("b", prompt=160)
    engine.step()
    worker = engine.worker
    while not worker._prefetch_layers(worker._phase + 1):
        engine.step()
    backend.gate.clear()
    engine.step()  # both load ahead into their spare slots; the loads stay in flight
    ahead = [ls for ls in worker._requests["a"].layers if ls.prefetch is not None]
    assert ahead and not any(ls.prefetch[4].done() for ls in ahead)
    opener = threading.Timer(0.4, backend.gate.set)
    opener.start()
    started = time.monotonic()
    engine.step(["b"])
    assert time.monotonic() - started >= 0.35  # the step began only once a's loads had landed
    assert all(ls.prefetch is None for ls in worker._requests["a"].layers)
    for _ in range(12):  # a's consume loads everything at the consume step (MiniEngine checks the KV)
        engine.step()


class _Held(StreamGate):
    held = True

    def __init__(self):
        self.opened = threading.Event()
        self.how: list[str] = []

    @property
    def is_open(self) -> bool:
        return self.opened.is_set()

    def open(self) -> None:
        self.how.append("host")
        self.opened.set()

    def open_after(self, stream) -> None:
        self.how.append("forward")
        self.opened.set()


class _HeldEvent:
    def __init__(self, gate: _Held | None):
        self.gate = gate

    def query(self) -> bool:
        return self.gate is None or self.gate.opened.is_set()

    def synchronize(self) -> None:
        # on a GPU this wait would last until the gate's timeout
        assert self.query(), "a host wait on a held stream that nobody opened"


class _HoldingBackend(CpuBackend):
    """The CPU backend with streams that can be held (`Backend.hold_stream`), as on a GPU: an event recorded on a
    held stream, or on a stream that waited for such an event, happens once the gate opens. Copies still run at
    once on the host: what this checks is who opens the gates, when, and that no wait meets a closed one."""

    def __init__(self):
        super().__init__()
        self.gates: list[_Held] = []
        self._on: dict[int, _Held] = {}  # id(stream) -> the gate its queued work waits on
        self._default = torch.Stream(device="cpu")
        self._current = self._default

    def current_stream(self):
        return self._current

    @contextlib.contextmanager
    def use_stream(self, stream):
        before, self._current = self._current, stream if stream is not None else self._current
        try:
            yield
        finally:
            self._current = before

    def hold_stream(self, stream) -> _Held:
        gate = _Held()
        self.gates.append(gate)
        self._on[id(stream)] = gate
        return gate

    def record_event(self, stream=None) -> _HeldEvent:
        return _HeldEvent(self._on.get(id(stream if stream is not None else self._current)))

    def wait_event(self, event, stream=None) -> None:
        gate = getattr(event, "gate", None)
        if gate is not None and not gate.opened.is_set():
            self._on[id(stream if stream is not None else self._current)] = gate


def test_loads_ahead_from_a_held_stream_start_at_the_next_forward_and_attend_the_same():
    """Loads ahead are queued at the end of a step from a held stream (on a GPU: so the next step's input copies
    go first on the copy engines). The next step's forward_begin opens it; no host wait ever meets a closed gate;
    what every layer attends is what it attends without loads ahead."""
    _, attended_plain = _run_stride10(0.0, dram_store())
    backend = _HoldingBackend()
    row = LAYERS * 2 * BS * HKV * D * 4
    store = create_store("UcmDram", {"kv_block_size": row, "max_cache_size": 400 * row}, backend)
    held, attended_held = _run_stride10(1.0, store, backend=backend)
    assert sum(st.blocks_prefetched for st in held.stats) > 0
    assert backend.gates and all(g.how and g.how[0] == "forward" for g in backend.gates)
    assert sum(st.ahead_held for st in held.stats) == len(backend.gates)
    assert sum(st.ahead_released_late for st in held.stats) == 0
    for one, other in zip(attended_plain, attended_held, strict=True):
        for rid in one:
            assert [p for p, _ in one[rid]] == [p for p, _ in other[rid]]
            for (_, x), (_, y) in zip(one[rid], other[rid], strict=True):
                torch.testing.assert_close(x, y)


def _held_loads_ahead(*prompts: int) -> tuple[_HoldingBackend, MiniEngine]:
    """Requests a, b, ... decoding on a held-stream backend, stepped until a step has queued loads ahead (held)."""
    backend = _HoldingBackend()
    row = LAYERS * 2 * BS * HKV * D * 4
    store = create_store("UcmDram", {"kv_block_size": row, "max_cache_size": 400 * row}, backend)
    engine = MiniEngine(EsaConfig(sparse_ratio=0.25, retrieval_stride=10, prefetch_ratio=0.25), offload=True,
                        store=store, stage_queries=True, backend=backend)
    for name, prompt in zip("abcdefgh"[: len(prompts)], prompts, strict=True):
        engine.add(name, prompt=prompt)
    engine.step()
    while not engine.worker._prefetch_layers(engine.worker._phase + 1):
        engine.step()
    engine.step()  # loads ahead; the gate is closed until the next step's forward
    assert engine.stats[-1].ahead_held == 1
    return backend, engine


def test_a_held_load_ahead_waited_before_the_next_forward_is_opened_from_the_host_first():
    # a request left out of the next step has its loads ahead waited in execute_begin, before forward_begin
    backend, engine = _held_loads_ahead(200, 160)
    gate, worker = backend.gates[-1], engine.worker
    assert not gate.opened.is_set()
    assert any(not ls.prefetch[4].done() for ls in worker._requests["a"].layers if ls.prefetch is not None)
    engine.step(["b"])
    assert gate.how[0] == "host"
    assert all(ls.prefetch is None for ls in worker._requests["a"].layers)


def test_a_held_load_ahead_its_timeout_released_is_counted_late():
    backend, engine = _held_loads_ahead(200)
    backend.gates[-1].opened.set()  # what the gate's timeout does when the next step is late
    engine.step()
    assert engine.stats[-1].ahead_released_late == 1
