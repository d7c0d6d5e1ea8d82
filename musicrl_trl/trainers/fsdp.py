"""FSDP (version 2, ``torch.distributed.fsdp.fully_shard``) for the on-policy trainers: start-up checks, a sharded
anchor, the full weights for the rollout, full safetensors for ``save_model``, sharded state for resuming.

What is sharded, and how (see also ``examples/accelerate_configs/fsdp.yaml``):

- the training module (``MusicPolicyAndValue``: policy and value network) by ``accelerator.prepare``, one FSDP unit
  per ``MusicgenDecoderLayer`` and ``T5Block`` (policy and value trunk alike; the config may name others) plus the
  root unit, which holds what is left (decoder embeddings, LM heads, layer norms, the value head). Gradients and Adam
  state are sharded with the weights.
- a separate anchor (full fine-tuning) by :func:`shard_anchor`: its decoder layers and T5 blocks (most of its
  weights) become FSDP units of their own, without gradients or optimizer state; what is left (embeddings, LM heads,
  layer norms) stays whole on every device. Each unit all-gathers its layer around its own forward, so the anchor
  can be called as any module, also through its submodules outside a forward of its root (the anchor's decoder
  states are computed that way, and its LM heads are applied chunk by chunk during the update, issue 22): no caller
  has to gather anything. There is no root unit on purpose: a root unit would hold the LM heads, and they would then
  need a gather around every use. Memory: the anchor's layers cost 1/N of their size per device (the rest stays
  whole: for musicgen-small ~30 % of the model, mostly T5's and the decoder's embeddings and the LM heads, is not
  in a layer). The codec (``EncodecModel``) and the text encoder's root (``T5EncoderModel``: its 32k x d embedding)
  are units too, in the training module and in the anchor: the codec only decodes rollouts, and the text encoder is
  frozen unless ``train_text_encoder``, so neither needs to stay gathered through a training forward.
- the rollout: :func:`generation_weights` unshards the root unit and every unit of the policy for the length of the
  sampling loop (one all-gather per unit, not one per unit and decoder step) and reshards them after; the sampler and
  ``generate`` run on plain tensors. Cost: one full copy of the policy (and of the value network's root-level
  weights, which share the root unit) on every device during the rollout; time: one all-gather of those weights
  (benchmarks/RESULTS.md). Card samples, ``evaluate()`` and LoRA's anchor pass (the adapter-disabled policy) gather
  the same way, with :func:`gathered_weights`, on every process.

Mixed precision under FSDP is autocast, as without FSDP: weights stay float32 sharded and gathered, gradients are
reduced in float32, and the training forward runs under bf16 autocast (:func:`autocast_forward`). Not accelerate's
default for FSDP2 (bf16 parameters, ``MixedPrecisionPolicy(param_dtype=bf16)``, gradients reduced in bf16), because
the static-cache sampler, the card samples and the anchor's decoder states call MusicGen's submodules directly: FSDP's
input casting never runs there, and float32 buffers (sinusoidal positions) meet bf16 weights (a layer-norm error on
CPU). With autocast an FSDP run computes what a DDP run computes, rollouts sample in float32 as they do without FSDP,
and bf16 gradients never get summed. The cost: all-gathers move float32 (twice the bytes of bf16 parameters).

Why the CPU promotion (:func:`enable_fsdp_on_cpu_ranks`): accelerate only turns an FSDP plugin on for accelerator
devices (``AcceleratorState`` ignores it for ``MULTI_CPU``), so ``fsdp=...`` on CPU ranks was silently dropped. FSDP2
itself runs on gloo, and the tests run it there.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time

import torch
import torch.nn as nn

__all__ = [
    "FSDP_STATE_DIR",
    "MUSICGEN_LAYER_CLASSES",
    "autocast_forward",
    "check_fsdp_setup",
    "enable_fsdp_on_cpu_ranks",
    "full_state_dict",
    "gathered_weights",
    "generation_weights",
    "is_sharded",
    "shard_anchor",
    "load_sharded_training_state",
    "save_sharded_training_state",
]

logger = logging.getLogger(__name__)

#: Folder of a checkpoint that holds the sharded model and optimizer state (torch.distributed.checkpoint).
FSDP_STATE_DIR = "fsdp_state"
#: The layers that become FSDP units when the config names none (decoder layers of policy and value trunk, T5 blocks).
MUSICGEN_LAYER_CLASSES = ["MusicgenDecoderLayer", "T5Block"]
#: Units added to any configured list (see the module docstring): frozen parts that need not stay gathered.
FROZEN_PART_CLASSES = ["T5EncoderModel", "EncodecModel"]


# ------------------------------------------------------------------------------------------------ start-up
def enable_fsdp_on_cpu_ranks(trainer) -> None:
    """Turn on FSDP on gloo CPU ranks when the config asks for it (accelerate drops the plugin there silently; see the
    module docstring). Called right after ``Trainer.create_accelerator_and_postprocess``."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    args, state = trainer.args, trainer.accelerator.state
    # The config's fsdp/fsdp_config (transformers' way), or the FSDP_* variables `accelerate launch --config_file
    # fsdp.yaml` sets (accelerate's way; the plugin reads them itself).
    from_env = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if state.distributed_type != DistributedType.MULTI_CPU or (args.fsdp_plugin_args is None and not from_env):
        return
    plugin = FullyShardedDataParallelPlugin(**(args.fsdp_plugin_args or {}))
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    # Every later AcceleratorState() copies PartialState's fields over its own (accelerate's state.py does so at
    # init), which would turn this back into MULTI_CPU: set it there too, as AcceleratorState does for itself.
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    trainer.is_fsdp_enabled = True


def check_fsdp_setup(trainer, policy: nn.Module, ref_model: nn.Module | None) -> None:
    """Start-up errors for FSDP settings the trainer cannot run (instead of a failure mid-run), and the plugin's
    defaults for MusicGen (units per decoder layer and T5 block; gradients reduced in float32)."""
    from ..quantization import is_quantized

    args, plugin = trainer.args, trainer.accelerator.state.fsdp_plugin
    if plugin.fsdp_version != 2:
        raise ValueError(
            f"fsdp_version={plugin.fsdp_version}: MusicPPOTrainer runs FSDP version 2 only (the rollout gathers "
            "fully_shard units, FSDP1 has none). Set fsdp_config={'fsdp_version': 2} (or fsdp_version: 2 in the "
            "accelerate config)."
        )
    if is_quantized(policy):
        raise ValueError(
            "FSDP cannot shard a 4/8-bit (bitsandbytes) policy: its packed weights are not floating-point tensors. "
            "Run QLoRA with DDP (examples/accelerate_configs/multi_gpu.yaml), or load the policy in full or bf16 "
            "precision and use LoRA under FSDP."
        )
    modules = [module for module in (policy, ref_model) if module is not None]
    if any(p.device.type == "meta" for module in modules for p in module.parameters()):
        raise ValueError(
            "under FSDP this rank holds the policy or the anchor without weights (meta device): with "
            "fsdp_cpu_ram_efficient_loading only rank 0 loads them, but the anchor and the value network are copies "
            "of the policy made before sharding. Set fsdp_cpu_ram_efficient_loading: false (as "
            "examples/accelerate_configs/fsdp.yaml does)."
        )
    if args.rollout_backend == "compiled":
        raise ValueError(
            "rollout_backend='compiled' under FSDP: torch.compile cannot trace FSDP's hooks around the gathered "
            "layers. Use rollout_backend='static' (the same static-cache sampler, eager) or 'generate'."
        )
    from torch.distributed.fsdp import CPUOffloadPolicy

    if isinstance(plugin.cpu_offload, CPUOffloadPolicy):
        raise ValueError(
            "FSDP parameter offloading (fsdp_offload_params / cpu_offload) is not supported: the rollout gathers the "
            "weights onto the device for every sampling step. Turn it off, or use LoRA to fit the optimizer state."
        )
    if plugin.auto_wrap_policy is not None:
        # MusicPolicyAndValue has no `_no_split_modules` for accelerate to read the layer classes from.
        names = list(plugin.transformer_cls_names_to_wrap or MUSICGEN_LAYER_CLASSES)
        plugin.transformer_cls_names_to_wrap = names + [name for name in FROZEN_PART_CLASSES if name not in names]
    if plugin.mixed_precision_policy is not None:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        # Mixed precision by autocast (autocast_forward), not bf16 parameters: see the module docstring.
        plugin.mixed_precision_policy = MixedPrecisionPolicy()


def autocast_forward(model: nn.Module, accelerator) -> None:
    """Run the prepared module's forward under the accelerator's autocast, as ``accelerator.prepare`` does for DDP but
    not for FSDP2 (which relies on bf16 parameters there). A no-op without mixed precision."""
    import types

    if not accelerator.native_amp:
        return
    forward = accelerator.autocast()(type(model).forward)  # the class forward, below FSDP's module hooks
    model.forward = types.MethodType(forward, model)


def check_deepspeed_setup(trainer) -> None:
    """Start-up errors for DeepSpeed settings the trainer cannot run."""
    args = trainer.args
    if args.rollout_backend == "compiled":
        raise ValueError(
            "rollout_backend='compiled' under DeepSpeed: torch.compile cannot trace the engine's parameter hooks. "
            "Use rollout_backend='static' or 'generate'."
        )


# ------------------------------------------------------------------------------------------------ sharding
def _fsdp_units(module: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def is_sharded(module: nn.Module | None) -> bool:
    """Whether ``module`` holds FSDP units (its weights are sharded over the ranks)."""
    return module is not None and bool(_fsdp_units(module))


def shard_anchor(anchor: nn.Module, accelerator) -> nn.Module:
    """Shard a frozen anchor's layers (the training module's layer classes) over the ranks, each its own FSDP unit that
    gathers around its forward; the rest stays whole (see the module docstring). Same mixed precision as the
    training module (float32 weights, autocast around the pass), so that its logits match the policy's at the start."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    plugin = accelerator.state.fsdp_plugin
    names = set(plugin.transformer_cls_names_to_wrap or MUSICGEN_LAYER_CLASSES) | set(FROZEN_PART_CLASSES)
    anchor.requires_grad_(False).eval().to(accelerator.device)
    mp_policy = plugin.mixed_precision_policy or MixedPrecisionPolicy()  # float32 weights; the anchor pass autocasts
    # Innermost first (T5 blocks before the T5EncoderModel holding them), as fully_shard requires.
    for module in reversed(list(anchor.modules())):
        if type(module).__name__ in names and module is not anchor:
            fully_shard(module, reshard_after_forward=True, mp_policy=mp_policy)
    return anchor


@contextlib.contextmanager
def gathered_weights(module: nn.Module, timing: dict | None = None, part: str | None = None):
    """All FSDP units of ``module`` unsharded (full weights as plain tensors) inside the block, resharded after; a
    no-op for a module without FSDP units (or ``None``). Submodules may be called directly inside (the sampler, the
    adapter-disabled policy as LoRA's anchor): FSDP's hooks still run around sharded layers' forwards, but find the
    weights gathered and leave them so (``reshard_after_forward`` is off for the length of the block). ``timing``
    receives the seconds the all-gather took (``"gather_s"``) and the bytes it materialised (``"gather_bytes"``).
    ``part`` (e.g. ``"policy"``): gather the root unit and the units inside that submodule only."""
    units = _fsdp_units(module) if module is not None else []
    if units and part is not None:
        # The root unit (its forward hooks and its leftover weights, e.g. embeddings and LM heads) and the units inside
        # `part` only: the rollout needs the policy, not the value network's decoder layers.
        inside = {id(m) for m in module.get_submodule(part).modules()}
        units = [units[0], *(unit for unit in units[1:] if id(unit) in inside)]
    if not units:
        yield module
        return
    tic = time.perf_counter()
    root = units[0]
    # FSDP2 decides which unit is the root at the first forward it sees; the sampler calls inner layers first, which
    # would make a decoder layer the root (and the real root's first training forward then fails). Initialise from
    # the root now (private API: torch has no public one; a no-op once initialised).
    root._get_fsdp_state()._lazy_init()
    saved = []
    for unit in units:
        # Whether the unit reshards after forward, to restore it after (no public getter; private since torch 2.4).
        group = unit._get_fsdp_state()._fsdp_param_group
        saved.append(group is not None and group.post_forward_mesh_info is not None)
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    if timing is not None:
        timing["gather_s"] = time.perf_counter() - tic
        # Full sizes of the gathered parameters, in their compute dtype (bf16 under bf16 mixed precision).
        groups = [unit._get_fsdp_state()._fsdp_param_group for unit in units]
        timing["gather_bytes"] = sum(
            param.sharded_param.numel() * (param.param_dtype or param.orig_dtype).itemsize
            for group in groups if group is not None for param in group.fsdp_params
        )
    try:
        yield module
    finally:
        for unit, reshard in zip(units, saved):
            unit.reshard()
            unit.set_reshard_after_forward(reshard, recurse=False)


@contextlib.contextmanager
def generation_weights(model: nn.Module, accelerator, gather_deepspeed3_params: bool = True, timing=None):
    """The training module with full weights for the length of a rollout: gathered FSDP units
    (:func:`gathered_weights`), or TRL's ``unwrap_model_for_generation`` (DDP, DeepSpeed ZeRO-3)."""
    if is_sharded(model):
        with gathered_weights(model, timing, part="policy") as gathered:
            yield gathered
        return
    from trl.models.utils import unwrap_model_for_generation

    with unwrap_model_for_generation(model, accelerator, gather_deepspeed3_params=gather_deepspeed3_params) as bare:
        yield bare


# ------------------------------------------------------------------------------------------------ saving and resuming
def full_state_dict(module: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict of ``module`` on the CPU, the keys under ``prefix`` only, with the prefix
    removed. Every rank must call it (it all-gathers); only rank 0 gets the tensors (the others an empty dict), so
    that no other rank holds a second full copy."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # Tied weights (T5's shared embeddings) come back as separate copies under every name; keep the first name only,
    # as save_pretrained does for a live model (the files then equal those written without FSDP).
    names = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), name)
    aliases = {name for name, param in module.named_parameters(remove_duplicate=False) if names[id(param)] != name}
    return {
        key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix) and key not in aliases
    }


def save_sharded_training_state(model: nn.Module, optimizer, directory: str) -> None:
    """Every rank writes its shards of the model and of the optimizer state into ``directory``
    (``torch.distributed.checkpoint``; the ``.metadata`` file, written last by rank 0, marks it complete)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=directory)


def load_sharded_training_state(model: nn.Module, optimizer, directory: str) -> None:
    """Load what :func:`save_sharded_training_state` wrote into the sharded ``model`` and ``optimizer`` (the same
    number of ranks; ``torch.distributed.checkpoint`` reads tensors, never pickled objects of the checkpoint's)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if not os.path.isfile(os.path.join(directory, ".metadata")):
        raise ValueError(
            f"{directory} holds no complete sharded state (.metadata is missing): this checkpoint was not written "
            "under FSDP, or its save was interrupted. Resume from an FSDP checkpoint with the same number of ranks."
        )
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=directory)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
