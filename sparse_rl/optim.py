"""``MaskedAdamW``: AdamW on the selected entries only, with compact optimizer state.

For a parameter with ``k`` selected entries out of ``n``, the state holds ``exp_avg`` and ``exp_avg_sq`` of length
``k`` (fp32, or uint8 codes + one fp32 absmax per block of <= 256 entries with ``state_bits=8``), plus an fp32
``master`` copy of the ``k`` entries when the parameter is stored in bf16/fp16 (at RL learning rates most updates are
below half a bf16 ulp and would be rounded away). Which entry owns which slot is given by a 1-bit mask and per-tile
offsets (``sparse_rl.kernels.layout``), 0.13 bytes per parameter. Unselected entries are never written.

The class owns bookkeeping only (param groups, state, checkpoints). The arithmetic runs in one launch per
(param group, device, dtype, step count): the Triton kernels on CUDA, their numba port on CPU; both give
bit-identical results.

For the weight sync (:mod:`sparse_rl.sync`) the step can also keep a bf16 copy of the selected entries
(:meth:`MaskedAdamW.track_rounded`): the step already reads and writes each selected entry, so rounding it there costs
one 2-byte store per entry, where a separate scan would read the dense parameter again. Nothing of it exists, and the
step is unchanged, until a sync asks for it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .kernels import BACKENDS, launch
from .kernels.dispatch import backend_for
from .mask import SubnetworkMask
from .restrict.compact import compact_grad_of, zero_compact_grads
from .restrict.sharded import local_selection, local_tensor

_LOW_PRECISION = (torch.bfloat16, torch.float16)
_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_STATE_DICT_KEY = "sparse_rl"


class MaskedAdamW(torch.optim.Optimizer):
    """AdamW that updates only the entries selected by a :class:`SubnetworkMask`.

    Args:
        named_params: ``model.named_parameters()`` (or param-group dicts with ``params`` and ``param_names``); the
            names are how each tensor finds its selection in ``mask``.
        mask: the subnetwork. Every optimised parameter must be in it.
        master_weights: keep an fp32 copy of the selected entries of bf16/fp16 parameters.
        state_bits: 32 for fp32 moments, 8 for bitsandbytes-style blockwise 8-bit moments (needs bitsandbytes).
        stochastic_rounding: round bf16/fp16 parameters stochastically instead of keeping a master copy (requires
            ``master_weights=False``); unbiased in expectation, at no state cost.
        backend: ``"auto"`` (Triton for CUDA tensors, the numba CPU path for CPU tensors), ``"triton"`` (also on CPU
            tensors under ``TRITON_INTERPRET=1``, for testing the kernel), or ``"cpu"``.
        seed: seed of the stochastic-rounding stream (a function of seed, step and parameter, so runs are repeatable).
        skip_nonfinite: skip a step whose gradients hold a NaN or an infinity (as ``torch.amp.GradScaler`` does):
            weights, moments and step counts stay as they were, the gradients are consumed, and ``skipped_steps``
            counts it. Without it such a step writes NaN into every selected entry the gradient reaches (gradient
            clipping multiplies all gradients by a NaN norm); unselected entries are never written either way.

    Gradients are read from ``param.grad`` (dense; only the selected entries are read) or, for parameters under
    :mod:`sparse_rl.restrict.compact`, from ``param.compact_grad`` (the selected entries only), which the step consumes.
    """

    def __init__(
        self,
        named_params: Iterable,
        mask: SubnetworkMask,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        master_weights: bool = True,
        *,
        state_bits: int = 32,
        stochastic_rounding: bool = False,
        backend: str = "auto",
        seed: int = 0,
        skip_nonfinite: bool = False,
    ):
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid betas: {betas}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid eps: {eps}")
        if state_bits not in (32, 8):
            raise ValueError(f"state_bits must be 32 or 8, got {state_bits!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if stochastic_rounding and master_weights:
            raise ValueError("stochastic_rounding replaces the fp32 master copy: pass master_weights=False with it")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(_as_named_groups(named_params), defaults)
        self.mask = mask
        self.master_weights = master_weights
        self.state_bits = state_bits
        self.stochastic_rounding = stochastic_rounding
        self.backend = backend
        self.seed = int(seed)
        self.skip_nonfinite = skip_nonfinite
        self.skipped_steps = 0
        self._mask_digests: dict[str, str] | None = None
        self._layouts: dict[torch.Tensor, object] = {}
        self._tensor_ids: dict[torch.Tensor, int] = {}
        self._ids_by_name: dict[str, int] = {}
        self._names: dict[torch.Tensor, str] = {}
        self._tile_tables: dict[tuple, torch.Tensor] = {}
        self._tensor_tables: dict[tuple, dict] = {}  # launch tables of addresses, see _tensor_table
        self._rounded: dict[torch.Tensor, torch.Tensor] = {}  # see track_rounded
        self._rounded_users: dict[torch.Tensor, int] = {}
        for group in self.param_groups:
            if "param_names" not in group:
                raise ValueError("MaskedAdamW needs parameter names: pass model.named_parameters()")
            for name, param in zip(group["param_names"], group["params"]):
                self._register(name, param)
        if state_bits == 8:
            from .kernels.layout import quantisation_maps

            quantisation_maps()  # fail now, not at the first step, when bitsandbytes is missing

    def _register(self, name: str, param: torch.Tensor) -> None:
        from .kernels.layout import SelectionLayout

        if name not in self.mask:
            raise ValueError(f"parameter {name!r} is optimised but absent from the mask; "
                             "freeze it (requires_grad=False) or add it to the mask")
        selection = self.mask[name]
        if tuple(selection.shape) != tuple(param.shape):
            raise ValueError(f"mask for {name!r} has shape {tuple(selection.shape)} but the parameter has "
                             f"shape {tuple(param.shape)}")
        if param.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"parameter {name!r} has dtype {param.dtype}; MaskedAdamW steps float32, bfloat16 and "
                            "float16 parameters")
        if not local_tensor(param).is_contiguous():
            raise ValueError(f"parameter {name!r} is not contiguous; MaskedAdamW indexes its flat storage")
        self._tensor_ids[param] = self._ids_by_name.setdefault(name, len(self._ids_by_name))  # stable on rebind
        self._names[param] = name
        # A DTensor (FSDP2) parameter is stepped through its local shard, with the mask cut the same way.
        self._layouts[param] = SelectionLayout.from_selection(local_selection(param, selection),
                                                              local_tensor(param).device)

    def _rebind_swapped_params(self) -> None:
        """Register parameters that replaced the ones the optimizer was built with: accelerate's FSDP2 ``prepare``
        swaps ``param_groups[i]["params"]`` for the sharded DTensors after creation (``param_names`` stay)."""
        for group in self.param_groups:
            for name, param in zip(group["param_names"], group["params"]):
                if param in self._layouts:
                    continue
                stale = [p for p, n in self._names.items() if n == name]
                if any(self.state.get(p) for p in stale):
                    raise RuntimeError(f"parameter {name!r} was replaced after MaskedAdamW had stepped it; its compact "
                                       "state belongs to the old tensor. Shard the model before the first step")
                for old in stale:
                    for table in (self._layouts, self._names, self._tensor_ids):
                        table.pop(old, None)
                    self.state.pop(old, None)
                self._tile_tables.clear()
                self._tensor_tables.clear()
                self._register(name, param)

    def _layout(self, param: torch.Tensor):
        layout = self._layouts[param]
        if layout.tile_offsets.device != param.device:  # the model moved after the optimizer was built
            layout.mask_words = layout.mask_words.to(param.device)
            layout.tile_offsets = layout.tile_offsets.to(param.device)
            layout.block_offsets = layout.block_offsets.to(param.device)
            self._tile_tables.clear()
            self._tensor_tables.clear()
        return layout

    # ------------------------------------------------------------------ state
    def _init_state(self, param: torch.Tensor) -> dict:
        state = self.state[param]
        if not state:
            self._tensor_tables.clear()  # new state tensors: new addresses
            layout = self._layout(param)
            k, device = layout.num_selected, param.device
            state["step"] = torch.tensor(0.0)
            if self.state_bits == 8:
                state["exp_avg"] = torch.zeros(k, dtype=torch.uint8, device=device)
                state["exp_avg_sq"] = torch.zeros(k, dtype=torch.uint8, device=device)
                state["absmax1"] = torch.zeros(layout.num_blocks, dtype=torch.float32, device=device)
                state["absmax2"] = torch.zeros(layout.num_blocks, dtype=torch.float32, device=device)
            else:
                state["exp_avg"] = torch.zeros(k, dtype=torch.float32, device=device)
                state["exp_avg_sq"] = torch.zeros(k, dtype=torch.float32, device=device)
            if self.master_weights and param.dtype in _LOW_PRECISION:
                selection = local_selection(param, self.mask[self._names[param]]).reshape(-1).to(device)
                state["master"] = local_tensor(param).detach().reshape(-1)[selection].float()
        return state

    def state_bytes(self) -> int:
        """Bytes held by optimizer state (moments, absmax, master copies), the selection layout and launch tables."""
        quantised = self.state_bits == 8
        total = sum(layout.nbytes(quantised) for layout in self._layouts.values())
        total += sum(t.numel() * t.element_size() for t in self._tile_tables.values())
        for tables in self._tensor_tables.values():  # the host copy, and the device copy where it is another
            total += tables["host"].numel() * 8 * (1 if tables["table"] is tables["host"] else 2)
        for state in self.state.values():
            total += sum(v.numel() * v.element_size() for k, v in state.items() if torch.is_tensor(v) and k != "step")
        return total

    # ------------------------------------------------------------------ rounded copy (weight sync)
    def track_rounded(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """From now on, keep for each parameter of ``params`` (name -> the tensor this optimizer steps) a bf16 vector
        of its selected entries in slot order (the mask's flat-index order, as ``mask.flat_indices(name)``) that every
        step rewrites with the new values: fp32 values rounded as ``tensor.to(torch.bfloat16)`` rounds them on CPU
        (nearest even, NaN to ``0xFFFF``), a bf16 parameter's bits as stored. The vectors are filled from the
        parameters now and returned by name; the fused scan of :class:`sparse_rl.sync.PatchProducer` compares them
        with what it last sent. Callers that track the same parameter share its copy (it is only read);
        :meth:`untrack_rounded` releases it.

        CPU parameters stepped by the numba path only (fp32 or bf16): the Triton kernels do not write the copy, and
        are refused here rather than leaving it stale. Only this optimizer's steps update it; anything else that
        writes the parameters must be followed by :meth:`refresh_rounded`."""
        by_name = {name: param for param, name in self._names.items()}
        tracked = {}
        for name, model_param in params.items():
            param = by_name.get(name)
            if param is None:
                raise ValueError(f"parameter {name!r} is not optimised by this MaskedAdamW: a rounded copy of it would "
                                 "never be updated")
            if param is not model_param:
                raise ValueError(f"parameter {name!r} given to track_rounded is not the tensor this MaskedAdamW steps "
                                 "under that name (another model, or a copy)")
            if local_tensor(param) is not param:
                raise TypeError(f"parameter {name!r} is sharded (DTensor): the rounded copy needs whole tensors")
            if param.dtype not in (torch.float32, torch.bfloat16):
                raise TypeError(f"parameter {name!r} is {param.dtype}: the rounded copy is kept for float32 and "
                                "bfloat16 parameters only")
            if backend_for(param.device, self.backend) != "cpu":
                raise RuntimeError(f"parameter {name!r} is stepped by the Triton kernel ({param.device}, "
                                   f"backend={self.backend!r}), which does not keep a rounded copy; only the CPU "
                                   "path does")
            tracked[name] = param
        self._tensor_tables.clear()  # new table column
        for param in tracked.values():
            if param not in self._rounded:
                self._rounded[param] = self._read_rounded(param)
            self._rounded_users[param] = self._rounded_users.get(param, 0) + 1
        return {name: self._rounded[param] for name, param in tracked.items()}

    def selection_layout(self, name: str):
        """The :class:`~sparse_rl.kernels.layout.SelectionLayout` (bitmask and per-tile offsets) of parameter
        ``name``: which entry owns which slot of its compact state and rounded copy."""
        for param, param_name in self._names.items():
            if param_name == name:
                return self._layout(param)
        raise KeyError(f"parameter {name!r} is not optimised by this MaskedAdamW")

    def refresh_rounded(self) -> None:
        """Refill the rounded copies from the parameters (after something other than a step wrote them)."""
        for param, rounded in self._rounded.items():
            rounded.copy_(self._read_rounded(param))

    def untrack_rounded(self, params: dict[str, torch.Tensor]) -> None:
        """Release the rounded copies of ``params`` taken with :meth:`track_rounded`; a copy no one holds is dropped,
        and once none is left the steps write the parameters and state only, as before."""
        for param in params.values():
            if param in self._rounded_users:
                self._rounded_users[param] -= 1
                if self._rounded_users[param] == 0:
                    del self._rounded_users[param], self._rounded[param]
        self._tensor_tables.clear()

    def _read_rounded(self, param: torch.Tensor) -> torch.Tensor:
        selection = self.mask[self._names[param]].reshape(-1).to(param.device)
        return param.detach().reshape(-1)[selection].to(torch.bfloat16)

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._rebind_swapped_params()
        # Per-parameter Python work is kept to a few attribute reads: at 1% density the CPU kernel steps a 135M model
        # in ~10 ms, about what naive bookkeeping (a tensor op and a table row per tensor) costs for its 272 tensors.
        buckets: dict[tuple, list[torch.Tensor]] = {}
        for group_index, group in enumerate(self.param_groups):
            for param in group["params"]:
                grad = param.grad
                compact = compact_grad_of(param)
                if grad is None and compact is None:
                    continue
                if grad is not None and compact is not None:
                    raise RuntimeError(f"parameter {self._names[param]!r} has both a dense .grad and a compact_grad: "
                                       "it was given a gradient outside the compact-gradient hook")
                if grad is not None and grad.is_sparse:
                    raise RuntimeError("MaskedAdamW does not support sparse gradients")
                if not param.is_contiguous():
                    raise RuntimeError(f"parameter {self._names[param]!r} is no longer contiguous (its .data was "
                                       "replaced after MaskedAdamW was built); MaskedAdamW steps its flat storage, "
                                       "so call .contiguous() on it before stepping")
                if not self.state.get(param):
                    if self._layout(param).num_selected == 0:
                        continue
                    self._init_state(param)
                if compact is not None and compact.numel() != self._layout(param).num_selected:
                    raise RuntimeError(f"compact gradient of {self._names[param]!r} has {compact.numel()} entries but "
                                       f"the mask selects {self._layout(param).num_selected}")
                key = (group_index, param.device, param.dtype, compact is not None)
                buckets.setdefault(key, []).append(param)
        if self.skip_nonfinite and not _all_finite(buckets):
            self.skipped_steps += 1
            for (_, _, _, compact), params in buckets.items():
                if compact:
                    zero_compact_grads(params)
            return loss
        for (group_index, device, dtype, compact), params in buckets.items():
            steps = [self.state[p]["step"] for p in params]
            torch._foreach_add_(steps, 1)
            counts = torch.stack(steps).tolist() if len({s.device for s in steps}) == 1 else [int(s) for s in steps]
            by_count: dict[int, list[torch.Tensor]] = {}
            for param, count in zip(params, counts):
                by_count.setdefault(int(count), []).append(param)
            for step, same_step in by_count.items():
                self._launch(self.param_groups[group_index], device, dtype, step, same_step, compact)
            if compact:  # consumed: a later backward must start from zero even if only model.zero_grad() runs
                zero_compact_grads(params)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Also drops the compact gradients (:mod:`sparse_rl.restrict.compact`), which ``set_to_none=False`` cannot keep
        as zeros: the next backward starts them afresh either way."""
        super().zero_grad(set_to_none=set_to_none)
        zero_compact_grads(p for group in self.param_groups for p in group["params"])

    def _launch(self, group: dict, device: torch.device, dtype: torch.dtype, step: int,
                params: list[torch.Tensor], compact: bool = False) -> None:
        from .kernels.layout import AdamWScalars, KernelVariant, tile_table

        beta1, beta2 = group["betas"]
        scalars = AdamWScalars.for_step(lr=float(group["lr"]), beta1=float(beta1), beta2=float(beta2),
                                        eps=float(group["eps"]), weight_decay=float(group["weight_decay"]),
                                        step=step, seed=self.seed)
        if compact:
            grads = [compact_grad_of(p).contiguous() for p in params]
        else:
            grads = [local_tensor(p.grad).contiguous() for p in params]  # kept alive to launch
        key = (device, compact, *(self._tensor_ids[p] for p in params))
        if self._rounded and backend_for(device, self.backend) != "cpu" and any(p in self._rounded for p in params):
            raise RuntimeError("a rounded copy (track_rounded) is kept for parameters now stepped by the Triton "
                               "kernel, which does not write it; untrack_rounded() first")
        table = self._tensor_table(key, params, grads)
        tiles = self._tile_tables.get(key)
        if tiles is None:
            tiles = self._tile_tables[key] = tile_table([self._layout(p) for p in params], device)
        qmaps = None
        if self.state_bits == 8:
            from .kernels.layout import quantisation_maps

            qmaps = quantisation_maps(device)
        variant = KernelVariant(dtype, has_master="master" in self.state[params[0]], compact_grad=compact,
                                stochastic_rounding=self.stochastic_rounding and dtype in _LOW_PRECISION,
                                state_bits=self.state_bits)
        launch(table, tiles, scalars, variant, qmaps=qmaps, backend=self.backend)

    def _tensor_table(self, key: tuple, params: list[torch.Tensor], grads: list[torch.Tensor]) -> torch.Tensor:
        """The launch's table of addresses, rebuilt only when a parameter's or a state tensor's address changed; a
        step usually changes only the gradients' (``zero_grad(set_to_none=True)`` frees them), one column."""
        from .kernels.layout import COL_GRAD, tensor_table_row

        param_addresses = [local_tensor(p).data_ptr() for p in params]
        grad_addresses = [g.data_ptr() for g in grads]
        cached = self._tensor_tables.get(key)
        if cached is None or cached["params"] != param_addresses:
            rows = []
            for param, grad in zip(params, grads):
                state = self.state[param]
                rows.append(tensor_table_row(
                    param=local_tensor(param), grad=grad, layout=self._layout(param), exp_avg=state["exp_avg"],
                    exp_avg_sq=state["exp_avg_sq"], master=state.get("master"), absmax1=state.get("absmax1"),
                    absmax2=state.get("absmax2"), tensor_id=self._tensor_ids[param],
                    rounded=self._rounded.get(param),
                ))
            host = torch.tensor(rows, dtype=torch.int64)
            cached = self._tensor_tables[key] = dict(host=host, table=host.to(key[0]), params=param_addresses,
                                                     grads=grad_addresses)
        elif cached["grads"] != grad_addresses:
            cached["host"][:, COL_GRAD] = torch.tensor(grad_addresses, dtype=torch.int64)
            if cached["table"] is not cached["host"]:
                cached["table"].copy_(cached["host"])
            cached["grads"] = grad_addresses
        return cached["table"]

    # ------------------------------------------------------------------ checkpoints
    def mask_digests(self) -> dict[str, str]:
        """Per-parameter SHA-256 of the selections this optimizer steps (computed once; the mask never changes)."""
        if self._mask_digests is None:
            names = set(self._ids_by_name)
            self._mask_digests = {n: d for n, d in self.mask.digests().items() if n in names}
        return self._mask_digests

    def state_dict(self) -> dict:
        """``torch.optim.Optimizer.state_dict`` plus the mask's per-tensor digests, so the compact state can only
        be loaded back into an optimizer of the same mask (equal counts are not enough: the slots would belong to
        other entries)."""
        state_dict = super().state_dict()
        state_dict[_STATE_DICT_KEY] = {"mask_digests": dict(self.mask_digests())}
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        """Load exactly: ``torch.optim.Optimizer.load_state_dict`` casts every state tensor to its parameter's dtype,
        which would turn fp32 moments of a bf16 parameter (or uint8 codes) into bf16. We restore the saved dtypes
        afterwards, and refuse a checkpoint whose state does not fit this optimizer's mask or state_bits."""
        saved_state = state_dict["state"]
        self._check_saved_mask(state_dict.get(_STATE_DICT_KEY, {}).get("mask_digests"))
        self._rebind_swapped_params()
        super().load_state_dict(state_dict)
        self._tensor_tables.clear()
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, param in zip(saved_ids, params):
            if saved_id not in saved_state:
                continue
            for key, value in saved_state[saved_id].items():
                if torch.is_tensor(value):
                    device = value.device if key == "step" else param.device
                    self.state[param][key] = value.detach().clone().to(device)
            self._check_loaded_state(param)

    def _check_saved_mask(self, saved: dict[str, str] | None) -> None:
        if saved is None:  # written before state carried digests: counts are checked per tensor below
            return
        for name, digest in self.mask_digests().items():
            if saved.get(name) != digest:
                raise ValueError(f"optimizer state of {name!r} was saved with a different mask: its selection "
                                 "differs (equal counts are not enough, each moment belongs to one entry); resume with "
                                 "the mask the checkpoint was trained with, or start a new optimizer")

    def _check_loaded_state(self, param: torch.Tensor) -> None:
        state, layout = self.state[param], self._layout(param)
        name = self._names[param]
        expected_dtype = torch.uint8 if self.state_bits == 8 else torch.float32
        if state["exp_avg"].dtype != expected_dtype:
            raise ValueError(f"optimizer state of {name!r} holds {state['exp_avg'].dtype} moments but this optimizer "
                             f"has state_bits={self.state_bits}: the checkpoint was saved with other state_bits")
        if state["exp_avg"].numel() != layout.num_selected:
            raise ValueError(f"optimizer state for {name!r} has {state['exp_avg'].numel()} entries but the mask "
                             f"selects {layout.num_selected}: the checkpoint was saved with a different mask")
        if self.state_bits == 8 and state["absmax1"].numel() != layout.num_blocks:
            raise ValueError(f"optimizer state for {name!r} has {state['absmax1'].numel()} quantisation blocks but "
                             f"the mask makes {layout.num_blocks}: the checkpoint was saved with a different mask")
        wants_master = self.master_weights and param.dtype in _LOW_PRECISION
        if wants_master != ("master" in state):
            raise ValueError(f"optimizer state for {name!r} {'lacks' if wants_master else 'has'} an fp32 master "
                             f"copy but this optimizer has master_weights={self.master_weights}")


def _all_finite(buckets: dict[tuple, list[torch.Tensor]]) -> bool:
    """Whether every gradient the step would read is finite: one max-abs reduction per tensor, one host sync."""
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for (_, device, _, compact), params in buckets.items():
        grads = [compact_grad_of(p) if compact else local_tensor(p.grad) for p in params]
        by_device.setdefault(device, []).extend(g for g in grads if g.numel())
    for grads in by_device.values():
        norms = torch._foreach_norm(grads, float("inf")) if grads else []
        if norms and not bool(torch.stack(norms).isfinite().all()):
            return False
    return True


def unwrap_optimizer(optimizer: torch.optim.Optimizer | None) -> torch.optim.Optimizer | None:
    """The optimizer inside accelerate's ``AcceleratedOptimizer`` (what ``Trainer.optimizer`` holds after
    ``train()`` starts), or ``optimizer`` itself."""
    return getattr(optimizer, "optimizer", optimizer)


def _as_named_groups(named_params: Iterable) -> list[dict]:
    items = list(named_params)
    if not items:
        raise ValueError("MaskedAdamW got an empty parameter list")
    if isinstance(items[0], dict):
        return items
    if isinstance(items[0], tuple) and len(items[0]) == 2 and isinstance(items[0][0], str):
        return [{"params": [p for _, p in items], "param_names": [n for n, _ in items]}]
    raise TypeError("MaskedAdamW expects model.named_parameters() or param-group dicts with 'param_names'")
