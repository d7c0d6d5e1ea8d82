"""Publishing to the Hub, shared by every trainer of the library (see :mod:`musicrl_trl.hub` for cards and uploads).

``HubPublishingMixin`` replaces ``transformers.Trainer``'s ``push_to_hub`` and checkpoint pushes with safe ones:

- only safetensors, JSON and text go up (``Trainer`` uploads ``training_args.bin``, and with
  ``hub_strategy="checkpoint"`` the optimizer, scheduler and RNG pickles): the subclass lists the files;
- the card is the library's own (base model, rewards, inherited licence, samples), written by the subclass's
  ``create_model_card``, and a non-commercial ingredient warns;
- a checkpoint is pushed once, from its published folder (see :mod:`.checkpointing`), blocking.

A subclass (listed before ``Trainer`` in its bases) implements :meth:`_prepare_push` and
:meth:`_checkpoint_push_files`, and calls :meth:`_capture_hub_sources` first thing in its ``__init__``.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from .. import hub
from ..rollout import unwrap_musicgen
from . import fsdp
from .value_model import VALUE_WEIGHTS_NAME

__all__ = ["HubPublishingMixin", "PolicyPublishingMixin"]


class HubPublishingMixin:
    """Safe Hub pushes for a ``transformers.Trainer`` subclass (see the module docstring)."""

    def _capture_hub_sources(self, model: Any, ref_model: Any = None) -> None:
        """Remember where the starting model (and a separate anchor) came from, Hub id or the path given, and the
        launch command, for the card: a model object only keeps ``name_or_path``, which may name a temporary folder
        that is gone by the time the model is pushed. Call it before a path is loaded."""
        self.hub_base_model = hub.model_source(model)
        self.hub_anchor_model = hub.model_source(ref_model) if ref_model is not None else self.hub_base_model
        self.hub_command = hub.launch_command()

    def _write_card(
        self, output_dir: str | None, license: str | None, render: Callable[[str, Any], str]
    ) -> hub.LicenseResolution | None:
        """On the main process: resolve the licence (``license``, else ``args.hub_license``, else the ingredients'),
        render the card with ``render(output_dir, resolution)`` and write it to ``output_dir/README.md`` (default
        ``args.output_dir``). Returns the licence resolution (None on other processes)."""
        if not self.is_world_process_zero():
            return None
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        resolution = self.license_resolution(license or self.args.hub_license)
        with open(os.path.join(output_dir, hub.CARD_NAME), "w", encoding="utf-8") as handle:
            handle.write(render(output_dir, resolution))
        return resolution

    def _prepare_push(self, revision: str | None, options: dict[str, Any]) -> tuple[dict[str, str], Any]:
        """Write what a push needs besides the saved model (card, merged weights...) and return the files to upload
        (``path_in_repo -> local file``) and the licence resolution. Pop the options you take from ``options``;
        what is left is an error."""
        raise NotImplementedError

    def _checkpoint_push_files(self, checkpoint_folder: str) -> dict[str, str]:
        """The files of a published checkpoint to upload (``path_in_repo -> local file``)."""
        raise NotImplementedError

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        **options: Any,
    ):
        """Save the model to ``output_dir`` and upload it with its card to ``args.hub_model_id`` (safetensors, JSON
        and text only). Files the Hub already has are not uploaded again: an unchanged model makes no new commit.
        ``options`` are the trainer's own (e.g. ``dataset_name=``, ``license=``, ``tags=``)."""
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        token = token if token is not None else self.args.hub_token
        if self.hub_model_id is None:
            self.init_hf_repo(token=token, private=private)
        self.save_model(self.args.output_dir, _internal_call=True)  # on every process (collective under DeepSpeed)
        if not self.is_world_process_zero():
            return None
        revision = revision or self.args.hub_revision
        files, resolution = self._prepare_push(revision, options)
        if options:
            raise TypeError(f"push_to_hub got unexpected arguments {sorted(options)}.")
        hub.warn_license(resolution, self.hub_model_id)
        self._finish_current_push()
        return hub.upload_files(
            self.hub_model_id, files, commit_message, token=token, revision=revision, run_as_future=not blocking
        )

    def _push_published_checkpoint(self, checkpoint_folder: str) -> None:
        """Push a published checkpoint (see :class:`.checkpointing.CrashSafeCheckpointsMixin`), blocking and
        safetensors-only; nothing with ``hub_strategy="end"``."""
        if not self.is_world_process_zero() or self.args.hub_strategy == "end":
            return
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        hub.upload_files(
            self.hub_model_id, self._checkpoint_push_files(checkpoint_folder),
            f"Training in progress, step {self.state.global_step}", token=self.args.hub_token,
            revision=self.args.hub_revision,
        )


class PolicyPublishingMixin(HubPublishingMixin):
    """What a trained MusicGen policy publishes: its card (base model, anchor, rewards and their licences, samples
    before and after, training curves), and for a LoRA policy the adapter, the merged weights or both
    (``push_lora``). Used by :class:`~musicrl_trl.MusicPPOTrainer`."""

    def write_training_curves(self, output_dir: str) -> None:
        """``log_history.json`` and ``training_curves.png``: reward against KL and against step (the paper's plots)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, "log_history.json"), "w") as f:
            json.dump(self.state.log_history, f, indent=2)
        logs = [entry for entry in self.state.log_history if "objective/scores" in entry]
        if not logs:
            return
        steps = [entry["step"] for entry in logs]
        scores = [entry["objective/scores"] for entry in logs]
        kls = [entry["objective/kl"] for entry in logs]
        figure, (by_kl, by_step) = plt.subplots(1, 2, figsize=(10, 4))
        by_kl.plot(kls, scores, marker="o", markersize=3)
        by_kl.set(xlabel="KL(policy || anchor) per rollout", ylabel="reward", title="reward vs KL")
        # Per-update rewards are noisy (a handful of clips each): a moving average shows the trend at a glance.
        window = max(1, len(scores) // 10)
        smoothed = np.convolve(scores, np.ones(window) / window, mode="valid")
        by_step.plot(steps, scores, label="reward", alpha=0.4)
        by_step.plot(steps[window - 1 :], smoothed, label=f"reward, mean of {window}", linewidth=2)
        for name in self.reward_names:
            key = f"rewards/{name}/mean"
            if len(self.reward_names) > 1 and key in logs[0]:
                by_step.plot(steps, [entry[key] for entry in logs], label=name, alpha=0.7)
        by_step.set(xlabel="update", ylabel="reward", title="reward vs step")
        by_step.legend()
        figure.tight_layout()
        figure.savefig(os.path.join(output_dir, "training_curves.png"), dpi=100)
        plt.close(figure)

    def _init_hub_publishing(self) -> None:
        self._hub_license_sources: list[hub.LicenseSource] | None = None  # read once, at the first card
        if self.is_peft_model and self.hub_base_model is not None:
            # peft records the base model's name_or_path at wrapping time; make it the id or path the user gave.
            for peft_config in self.accelerator.unwrap_model(self.model).policy.peft_config.values():
                peft_config.base_model_name_or_path = self.hub_base_model
        self.add_callback(hub.BeforeTrainingSamplesCallback(self))

    # How the card names the model the policy is kept close to (DPO: "reference model").
    anchor_license_role = "KL anchor"

    def license_resolution(self, override: str | None = None) -> hub.LicenseResolution:
        """The licence of the trained policy: ``override``, else the most restrictive among the base model, the
        anchor and every reward model (read from their cards; see :func:`musicrl_trl.hub.resolve_license`)."""
        from ..reward_models.combination import RewardCombination

        if self._hub_license_sources is None:  # read once: every checkpoint writes a card
            sources = [hub.find_license(self.hub_base_model, "base model")]
            if self.hub_anchor_model != self.hub_base_model:
                sources.append(hub.find_license(self.hub_anchor_model, self.anchor_license_role))
            # A trainer without rewards (DPO) has none to list.
            for name, reward in zip(getattr(self, "reward_names", ()), getattr(self, "reward_funcs", ())):
                parts = reward.rewards.items() if isinstance(reward, RewardCombination) else [(name, reward)]
                for part_name, part in parts:
                    sources.append(hub.reward_license(part, f"reward '{part_name}'"))
            self._hub_license_sources = sources
        return hub.resolve_license(self._hub_license_sources, override)

    def create_model_card(
        self,
        model_name: str | None = None,
        dataset_name: str | None = None,
        tags: str | list[str] | None = None,
        output_dir: str | None = None,
        license: str | None = None,
        layout: str | None = None,
        repo_id: str | None = None,
        sample_url_prefix: str = "",
    ) -> hub.LicenseResolution | None:
        """Write the policy card (``hub_cards/policy_card.md.jinja``) to ``output_dir/README.md``, with audio samples
        of the current policy (``samples/after_*.wav``) and the training curves. Replaces TRL's text-generation card;
        TRL calls it before every checkpoint, whose folder then gets a copy. Returns the licence resolution."""
        def render(output_dir: str, resolution: hub.LicenseResolution) -> str:
            prefix = sample_url_prefix
            if not prefix and self.args.push_to_hub and self.hub_model_id:
                prefix = hub.resolve_url_prefix(self.hub_model_id, self.args.hub_revision)
            hub.write_policy_samples(self, output_dir, "after")
            if self.args.plot_training_curves and self.state.log_history:
                self.write_training_curves(output_dir)
            return hub.render_policy_card(
                self, layout or self._card_layout(), resolution,
                repo_id=repo_id or self.args.hub_model_id, output_dir=output_dir, dataset_name=dataset_name,
                sample_url_prefix=prefix, tags=[tags] if isinstance(tags, str) else (tags or []),
            )

        # The card's samples sample the policy on the main process: under FSDP every process takes part in
        # gathering the weights first (a no-op otherwise). Call it on every process there, as _save_checkpoint and
        # push_to_hub do.
        with fsdp.gathered_weights(self.model, part="policy"):
            return self._write_card(output_dir, license, render)

    def _prepare_push(self, revision: str | None, options: dict) -> tuple[dict[str, str], hub.LicenseResolution]:
        """For ``push_to_hub``: a LoRA policy goes up as ``args.push_lora`` says (``push_lora=`` overrides it):
        ``"adapter"``, ``"merged"`` or ``"both"`` (merged at the root, the adapter in ``adapter/``);
        ``dataset_name=``, ``license=`` and ``tags=`` go to the card (with samples and curves)."""
        push_lora = options.pop("push_lora", None) or self.args.push_lora
        if push_lora not in ("adapter", "merged", "both"):
            raise ValueError(f"push_lora must be 'adapter', 'merged' or 'both', got {push_lora!r}.")
        layout = self.hub_layout(push_lora)
        if layout in ("merged", "both"):
            self._save_merged_policy(os.path.join(self.args.output_dir, "merged"))
        resolution = self.create_model_card(
            dataset_name=options.pop("dataset_name", None), tags=options.pop("tags", None),
            license=options.pop("license", None), layout=layout, repo_id=self.hub_model_id,
            sample_url_prefix=hub.resolve_url_prefix(self.hub_model_id, revision),
        )
        return self._hub_files(layout), resolution

    def hub_layout(self, push_lora: str | None = None) -> str:
        """What a push uploads: ``"full"`` weights for a fully trained policy; for LoRA, ``push_lora`` (default
        ``args.push_lora``): ``"adapter"``, ``"merged"`` or ``"both"``."""
        return (push_lora or self.args.push_lora) if self.is_peft_model else "full"

    def _card_layout(self) -> str:
        # A card describes the repo it will be pushed to, else the local output_dir (adapter at its root for LoRA).
        if self.args.push_to_hub:
            return self.hub_layout()
        return "adapter" if self.is_peft_model else "full"

    def _hub_files(self, layout: str, weights_folder: str | None = None) -> dict[str, str]:
        """``path_in_repo -> local file`` of a push: the policy from ``weights_folder`` (``output_dir`` or a
        checkpoint) as ``layout`` says, and the card, samples, curves and log from ``output_dir``."""
        card_files = hub.hub_files(self.args.output_dir)
        card_files = {path: local for path, local in card_files.items() if hub.is_card_file(path)}
        weights = {
            path: local
            for path, local in hub.hub_files(weights_folder or self.args.output_dir, subfolders=()).items()
            if not hub.is_card_file(path) and path not in (VALUE_WEIGHTS_NAME, "trainer_state.json")
        }
        if layout in ("merged", "both"):
            adapter = {f"adapter/{name}": weights[name] for name in hub.ADAPTER_FILES if name in weights}
            weights = hub.hub_files(os.path.join(self.args.output_dir, "merged"), subfolders=())
            if layout == "both":
                weights.update(adapter)
        return {**weights, **card_files}

    def _save_merged_policy(self, directory: str, full_state: dict | None = None) -> None:
        """The LoRA policy merged into its base weights, with the processor: a plain MusicGen checkpoint.
        ``full_state``: the policy's full state dict, when its weights are sharded (FSDP): merged in a fresh copy."""
        policy = self.accelerator.unwrap_model(self.model).policy
        if full_state is not None:
            from peft import get_peft_model

            base = unwrap_musicgen(policy)
            fresh = get_peft_model(type(base)(base.config), copy.deepcopy(policy.peft_config[policy.active_adapter]))
            fresh.load_state_dict(full_state)
            policy = fresh
        else:
            policy = copy.deepcopy(policy)
        policy = policy.merge_and_unload()
        policy.generation_config = self.trained_generation_config()
        policy.save_pretrained(directory)
        self.processing_class.save_pretrained(directory)

    def _checkpoint_push_files(self, checkpoint_folder: str) -> dict[str, str]:
        """A checkpoint's policy (as ``push_lora`` says for LoRA, else full weights), card and samples, for the repo
        root; optimizer, scheduler and RNG states stay local."""
        layout = self.hub_layout()
        if layout in ("merged", "both"):
            self._save_merged_policy(os.path.join(self.args.output_dir, "merged"))  # the weights as of this step
        return self._hub_files(layout, checkpoint_folder)
