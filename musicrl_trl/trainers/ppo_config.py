"""Configuration of MusicPPOTrainer: TRL's PPO field names on ``transformers.TrainingArguments``, with MusicRL's
defaults and the music-specific fields.

TRL removed its ``PPOConfig`` with its ``PPOTrainer`` in 1.13 (huggingface/trl#7020). The fields keep the names and
meanings TRL's PPO used (``kl_coef``, ``cliprange``, ``vf_coef``, ``num_mini_batches``, ``total_episodes``, ...), so
recipes and flags written for it still work; its text-generation fields exist only to be refused with a clear error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from transformers import TrainingArguments

from ..teacher_forcing import DEFAULT_CHUNK_SIZE

#: TRL PPOConfig fields for text generation and TRL's own model loading, with TRL's defaults. MusicPPOTrainer reads
#: none of them; they stay fields so that a recipe or flag that sets one gets an error naming it, not a silent no-op.
UNUSED_TRL_PPO_FIELDS = {
    "sft_model_path": ("EleutherAI/pythia-160m", "pass the policy as `model` (--model_name_or_path)"),
    "reward_model_path": ("EleutherAI/pythia-160m", "pass reward functions as `reward_model` (--reward_model)"),
    "stop_token": (None, "a rollout is always `response_length` decoder steps; MusicGen has no stop token"),
    "stop_token_id": (None, "a rollout is always `response_length` decoder steps; MusicGen has no stop token"),
    "missing_eos_penalty": (None, "a rollout is always `response_length` decoder steps; MusicGen has no stop token"),
    "whiten_rewards": (False, "advantages are whitened with `whiten_advantages`"),
    "local_rollout_forward_batch_size": (64, "rollouts are sampled per micro-batch of `per_device_train_batch_size`"),
    "num_sample_generations": (10, "use `eval_strategy='steps'` with `eval_steps` and an `eval_dataset`"),
    "dataset_num_proc": (None, "prompts need no preprocessing"),
}

#: 253 decoder steps: 250 frames (5 s at MusicGen's 50 Hz) + 4 codebooks - 1.
DEFAULT_RESPONSE_LENGTH = 253

#: Sizes the trainer computes from the batch settings and the number of processes (as TRL's PPOTrainer did).
COMPUTED_BATCH_FIELDS = (
    "world_size",
    "num_total_batches",
    "micro_batch_size",
    "local_batch_size",
    "batch_size",
    "local_mini_batch_size",
    "mini_batch_size",
)


@dataclass
class MusicPPOConfig(TrainingArguments):
    r"""
    Configuration for [`MusicPPOTrainer`]. The defaults reproduce MusicRL (Cideron et al., 2024): KL-regularised
    REINFORCE with a learned value baseline, undiscounted returns, one gradient update per rollout batch, sampling at
    temperature 0.99, and the exact per-step KL to the anchor over the whole codebook as an analytic loss term. Full
    PPO is the same trainer with ``num_ppo_epochs > 1``, ``num_mini_batches > 1`` and ``lam < 1`` (clipping is always
    applied with ``cliprange``; at the first update of a rollout the ratio is 1, so it has no effect in the paper's
    setting).

    A rollout step is one MusicGen decoder step: the K codes drawn together at one position of the delayed layout
    (see `musicrl_trl.codebooks`). Rewards are sequence-level and are added at the last step.

    The objective. MusicRL maximises, per rollout of A decoder steps with sequence reward R,

        J = (1 - alpha) * sum_t log pi(a_t | s_t) * (R - V(s_t))  -  alpha * sum_t KL_t

    with KL_t = KL(pi(. | s_t) || pi_anchor(. | s_t)) exact over the codebook. With ``kl_penalty="loss"`` (default) the
    trainer minimises, averaged over steps and rollouts,

        loss = pg_loss + kl_coef * KL_t + vf_coef * vf_loss,   pg_loss = -ratio_t * advantage_t  (clipped as PPO)

    whose gradient is the paper's divided by (1 - alpha) when ``kl_coef = alpha / (1 - alpha)``, i.e.
    ``alpha = kl_coef / (1 + kl_coef)`` (the factor 1 / (1 - alpha) = 1 + kl_coef only rescales the learning rate).
    The KL term is differentiated analytically through the policy's full distribution at every step (no sampling
    noise), and the value network regresses the score-only return R. With ``whiten_advantages`` (default) the
    advantages are normalised over the batch first, so ``kl_coef`` weighs the KL against advantages of unit scale
    whatever the reward's scale; set it to False for the paper's exact weighting. ``kl_penalty="reward"`` is TRL's
    reward shaping instead: ``-kl_coef * KL_t`` is added to the reward of every step and enters the policy gradient
    as a (noisy) return.

    Parameters that control generation:
        response_length (`int`, defaults to `253`): decoder steps per rollout (frames + K - 1; 50 frames = 1 s).
        audio_duration_s (`float`, *optional*): rollout length in seconds instead of `response_length` (setting
            both is an error).
        temperature (`float`, defaults to `0.99`): sampling temperature (MusicRL: 0.99).
        top_k (`int`, defaults to `0`): top-k filtering, 0 for the whole codebook. MusicGen ships 250; any value
            here is applied identically when sampling and when computing log-probs and ratios. The KL to the anchor
            compares the distributions before the top-k cut: once the policy's top k codes differ from the
            anchor's, the KL between the cut distributions is infinite.
        guidance_scale (`float`, defaults to `1.0`): classifier-free guidance; > 1 trains the guided distribution
            that is sampled (twice the compute).
        max_prompt_length (`int`, defaults to `256`): longest prompt in tokens; longer ones are an error.
        rollout_backend (`"generate"`, `"static"` or `"compiled"`, defaults to `"static"`): how rollouts are
            sampled. `"generate"` drives `model.generate`; `"static"` is `musicrl_trl.sampler`'s loop over a static
            KV cache (same distribution, about 0.5x generate's time on CPU); `"compiled"` runs that loop's step
            through `torch.compile` (CUDA graphs on GPU): fastest once compiled, but each new shape or sampling
            setting compiles first (tens of seconds on CPU), so it pays off on GPUs and long runs.
        logits_chunk_size (`int` or `None`, defaults to `32`): decoder steps whose code distributions exist at once
            in the update (`musicrl_trl.teacher_forcing`). The LM heads, the sampling transform, the log-probs, the
            exact KL to the anchor and the entropy run this many steps at a time, forward and backward (each chunk is
            recomputed in the backward), and the anchor keeps its hidden states instead of its distributions, so the
            update's memory no longer grows by ~11 fp32 [batch, codebooks, 2048] tensors per decoder step (MusicRL's
            30 s clips are 1,500 steps). The loss and gradients are those of the unchunked computation to float
            round-off. `None` computes the whole clip at once (the fastest for short clips if memory allows).

    `save_model` writes these into the saved ``generation_config.json`` (``do_sample``, ``guidance_scale``,
    ``temperature``, ``top_k`` and ``max_new_tokens = response_length``), so that ``generate`` and
    ``pipeline("text-to-audio")`` on the result sample from the distribution that was trained.

    Parameters that control the reward:
        reward_weights (`list[float]`, *optional*): one weight per reward function; all 1 if not set (MusicRL-R
            combines adherence and quality linearly).
        drop_nonfinite_rewards (`bool`, defaults to `False`): drop samples with a NaN/inf reward from the update
            (counted in `objective/dropped_samples`) instead of raising an error.

    Parameters that control the loss:
        kl_penalty (`"loss"` or `"reward"`, defaults to `"loss"`): where the KL to the anchor enters (see above):
            as an analytic loss term (MusicRL) or as a per-step reward penalty (TRL's shaping).
        kl_estimator (`"full"`, `"k1"` or `"k3"`, defaults to `"full"`): `"full"` is the exact KL summed over
            the codebook at every step (MusicRL); `k1`/`k3` are TRL's one-sample estimators from the sampled codes,
            allowed only with `kl_penalty="reward"` (as a loss term their gradient does not anchor: k1's expectation
            is zero, k3's is the reverse KL's).
        kl_coef (`float`, defaults to `0.05`): weight of the KL term; MusicRL's alpha = kl_coef / (1 + kl_coef).
        num_ppo_epochs (`int`, defaults to `1`): gradient passes per rollout batch (MusicRL: 1).
        gamma (`float`, defaults to `1.0`), lam (`float`, defaults to `1.0`): discount and GAE lambda (MusicRL:
            undiscounted Monte-Carlo returns, i.e. both 1).
        whiten_advantages (`bool`, defaults to `True`): normalise advantages over the batch, as TRL does.

    Parameters that control the batches (TRL's PPO names and arithmetic):
        total_episodes (`int`, *optional*): rollouts to sample in the whole run; default `num_train_epochs` times
            the number of prompts. The run makes `num_total_batches = ceil(total_episodes / batch_size)` updates.
        per_device_train_batch_size (`int`, defaults to `4`): rollouts in one forward/backward (a micro-batch).
        gradient_accumulation_steps (`int`, defaults to `1`): micro-batches whose gradients add up to one optimizer
            step (a mini-batch of `local_mini_batch_size = per_device_train_batch_size * gradient_accumulation_steps`
            rollouts per process).
        num_mini_batches (`int`, defaults to `1`): mini-batches, i.e. optimizer steps, per PPO epoch. Each process
            samples `local_batch_size = local_mini_batch_size * num_mini_batches` rollouts per update, `batch_size =
            local_batch_size * world_size` in all; an update makes `num_ppo_epochs * num_mini_batches` steps.
            TRL's PPOTrainer (<= 1.12) sampled `per_device_train_batch_size * gradient_accumulation_steps` rollouts
            and split them into `num_mini_batches`, while accelerate stepped every `gradient_accumulation_steps`
            micro-batches: with several mini-batches it made one step for all of them. With `num_mini_batches=1`
            the two agree.
        cliprange (`float`, defaults to `0.2`), cliprange_value (`float`, defaults to `0.2`): PPO's clip of the
            probability ratio and of the value update.
        vf_coef (`float`, defaults to `0.1`): weight of the value loss.
        model_adapter_name / ref_adapter_name (`str`, *optional*): with several LoRA adapters on the policy, the one
            trained and the one used as the KL anchor.
        ds3_gather_for_generation (`bool`, defaults to `True`): under DeepSpeed ZeRO-3, gather the policy's weights
            for the rollout (faster sampling; False samples layer by layer from the shards, for models too large for
            one device).
    The trainer fills in `world_size`, `local_batch_size`, `micro_batch_size`, `batch_size`, `local_mini_batch_size`,
    `mini_batch_size` and `num_total_batches` (values given for them are replaced). TRL's text-generation fields
    (`sft_model_path`, `reward_model_path`, `stop_token`, `stop_token_id`, `missing_eos_penalty`, `whiten_rewards`,
    `local_rollout_forward_batch_size`, `num_sample_generations`, `dataset_num_proc`) are accepted only at their
    defaults: the trainer does not use them, and a changed value is an error that says what to use instead.

    Parameters that control the baseline and the KL budget:
        baseline (`"value"`, `"rloo"` or `"group_mean"`, defaults to `"value"`): what each clip's reward is compared
            with. `"value"`: a learned value network V(s_t) (MusicRL; GAE with `gamma`, `lam`). `"rloo"`: the mean
            reward of the other clips of the same prompt (Ahmadian et al. 2024), `"group_mean"`: the mean of all of
            them, divided by their std with `scale_group_rewards` (GRPO, Shao et al. 2024). The value-free baselines
            need `num_generations >= 2`, build, save and push no value network (less memory, nothing to tune), and
            ignore `vf_coef`, `cliprange_value`, `share_value_backbone` and `lora_value_trunk`. With
            `kl_penalty="reward"` the baseline compares whole shaped returns (score - kl_coef * KL of the clip).
        num_generations (`int`, defaults to `1`): clips per prompt and update, sampled together (each prompt's text
            is encoded once); `local_batch_size` must be a multiple of it, and each process keeps its groups whole.
        scale_group_rewards (`bool`, defaults to `False`): see `baseline`.
        kl_target (`float`, *optional*): a KL budget in nats per clip. After every update `kl_coef` (its starting
            value) is multiplied by `1 + clip(KL / kl_target - 1, -0.2, 0.2) * batch_size / kl_horizon`, the
            proportional controller of Ziegler et al. (2019), chosen over a dual update for its bounded steps: the
            KL answers a change of coefficient only after a few updates, and bounded multiplicative steps keep the
            loop from oscillating. The coefficient is logged as `objective/kl_coef` and saved with checkpoints.
        kl_horizon (`int`, *optional*): the controller's horizon in rollouts; default `batch_size` (at most 20 %
            change per update: on the tiny model at lr 1e-2 a horizon of 4 batches had not reached a 10-nat target
            after 60 updates, one batch held it within 10 %; see benchmarks/RESULTS.md).

    Parameters that control the optimisation:
        max_grad_norm (`float`, defaults to `1.0`): the gradient norm is clipped to this before every optimizer
            step (`None` or 0: not clipped) and logged as `grad_norm` (TRL's PPOTrainer never clipped). A step whose
            gradient norm is not finite, or whose mini-batch kept no sample, is skipped with a warning and counted
            in `objective/skipped_steps`; the weights never take a non-finite value from a reward.
        learning_rate (`float`, defaults to `1e-5`): a starting point for full fine-tuning of musicgen-small; LoRA
            usually wants about 10x more. Tiny test models learn at 1e-3 to 1e-2.
        lr_scheduler_type (defaults to `"constant"`, no warmup): transformers' default linear decay to zero took
            the reward gain of 100-update runs on the tiny model from 16-35 % (constant) down to 2-4 %; RL collects
            new data until the end, so the step size is kept. A warmup (``constant_with_warmup``) spends its first
            update at learning rate 0, a whole rollout for nothing; Adam's bias correction and ``max_grad_norm``
            already bound the first steps. ``benchmarks/bench_kl_frontier.py`` measures the KL forms under it.

    Parameters that control the models:
        share_value_backbone (`bool`, defaults to `False`): put the value head on the policy's decoder instead of a
            separate value network initialised from it (less memory; MusicRL used a separate network).
        lora_value_trunk (`bool`, *optional*): with LoRA (`peft_config`), train the separate value trunk through
            LoRA adapters of its own instead of fully. Default: yes for quantized policies (the only way to train a
            4/8-bit trunk), no otherwise (MusicRL trained its value network fully). Saves the trunk's gradients and
            Adam state (12 bytes per decoder parameter, ~5 GB for musicgen-small).
        train_text_encoder (`bool`, defaults to `False`): also update the T5 text encoder (frozen otherwise; the
            audio codec is never in the gradient path).
        save_merged_lora (`bool`, defaults to `True`): with LoRA, `save_model` also writes the merged full model
            to `<output_dir>/merged` so that `pipeline("text-to-audio", model=...)` loads it directly.
        plot_training_curves (`bool`, defaults to `True`): write `training_curves.png` (reward against KL and
            against step) and `log_history.json` to `output_dir` at the end of training.
        allow_pickle_weights (`bool`, defaults to `False`): when `model` or `ref_model` is an id or path, also load
            a checkpoint whose weights are pickles only (`pytorch_model.bin`); refused by default, since unpickling
            can run arbitrary code. Only for sources you trust.

    Parameters that control publishing (`push_to_hub`, see `musicrl_trl.hub`):
        push_lora (`"adapter"`, `"merged"` or `"both"`, defaults to `"both"`): what a LoRA policy's repo holds: the
            adapter (for `PeftModel.from_pretrained`), the merged full weights (for `from_pretrained` and
            `pipeline("text-to-audio")`), or the merged weights at the root and the adapter in `adapter/`.
        hub_license (`str`, *optional*): licence id for the card; default: the most restrictive licence of the base
            model, the KL anchor and the reward models, read from their cards.
        hub_sample_prompts (`list[str]`, *optional*): prompts of the card's audio samples, sampled with a fixed seed
            at the start of training and at every card; default: three built-in prompts, `[]` for none.

    Parameters that control evaluation (`trainer.evaluate()`, and every `eval_steps` with `eval_strategy="steps"`):
        eval_num_samples_per_prompt (`int`, defaults to `4`): clips sampled per prompt of `eval_dataset`; logged as
            `eval/scores`, `eval/rewards/<name>/mean`, `eval/kl` (exact KL to the anchor, nats per clip),
            `eval/entropy_q{k}` and `eval/diversity/*` (spread of the clips of one prompt).

    These parameters have other defaults than in TRL's `PPOConfig`: `temperature` 0.99, `num_ppo_epochs` 1,
    `lam` 1.0, `kl_estimator` "full", `response_length` 253, `learning_rate` 1e-5, `lr_scheduler_type`
    "constant", `bf16` False and `gradient_checkpointing` False (the tiny
    offline default runs on CPU), `logging_steps` 1, `per_device_train_batch_size` 4, `save_strategy` "no", and
    `ddp_find_unused_parameters` False (TRL's PPOTrainer built its Accelerator with DDP's default, False).

    Logged metrics (TRL's names where they exist): `objective/scores` (mean combined reward), `objective/kl` (KL to
    the anchor per rollout, nats, summed over steps, before the update), `objective/non_score_reward`
    (-kl_coef * KL), `objective/rlhf_reward` (their sum, the regularised objective), `objective/entropy` (negative
    log-likelihood of the sampled codes), `rewards/<name>/mean`, `policy/entropy_q{k}` (per codebook),
    `policy/approxkl_avg`, `policy/clipfrac_avg`, `policy/first_ratio_max_error` (on-policy check, ~0),
    `loss/policy_avg`, `loss/kl_avg` (the KL loss term, mean per step), `loss/value_avg`, `val/ratio`, `lr`,
    `grad_norm` (before clipping, mean over the update's optimizer steps), `objective/skipped_steps`,
    `objective/kl_coef` (the coefficient of the update; it moves with `kl_target`),
    and `timing/rollout_s`, `timing/rewards_s`, `timing/update_s` (seconds per phase of the update).
    """

    # Overridden defaults
    temperature: float = field(default=0.99, metadata={"help": "Sampling temperature (MusicRL: 0.99)."})
    num_ppo_epochs: int = field(
        default=1, metadata={"help": "Gradient passes over each rollout batch (MusicRL: 1; PPO: e.g. 4)."}
    )
    lam: float = field(default=1.0, metadata={"help": "GAE lambda (MusicRL: 1, Monte-Carlo returns)."})
    gamma: float = field(default=1.0, metadata={"help": "Discount factor (MusicRL: 1, undiscounted)."})
    learning_rate: float = field(
        default=1e-5,
        metadata={"help": "Adam learning rate (full fine-tuning of musicgen-small; LoRA usually wants ~10x more)."},
    )
    lr_scheduler_type: str = field(
        default="constant",
        metadata={
            "help": "Learning-rate schedule. RL keeps collecting new data until the end, so the step size is kept "
            "(a linear decay to 0 took most of the learning of short runs away)."
        },
    )
    kl_penalty: Literal["loss", "reward"] = field(
        default="loss",
        metadata={
            "help": "Where the KL to the anchor enters: 'loss' = kl_coef * KL as an analytic loss term, "
            "differentiated through the whole codebook (MusicRL); 'reward' = -kl_coef * KL added to every step's "
            "reward (TRL's shaping)."
        },
    )
    kl_coef: float = field(
        default=0.05,
        metadata={"help": "Weight of the KL to the anchor; MusicRL's alpha = kl_coef / (1 + kl_coef)."},
    )
    kl_estimator: Literal["full", "k1", "k3"] = field(
        default="full",
        metadata={
            "help": "KL to the anchor per step: 'full' = exact KL summed over the whole codebook (MusicRL); 'k1', "
            "'k3' = TRL's one-sample estimators from the sampled code's log-ratio."
        },
    )
    response_length: int = field(
        default=DEFAULT_RESPONSE_LENGTH,
        metadata={"help": "Decoder steps per rollout (frames + K - 1; MusicGen makes 50 frames/s)."},
    )
    bf16: bool | None = field(default=False, metadata={"help": "bf16 mixed precision (set it on GPUs)."})
    ddp_find_unused_parameters: bool | None = field(
        default=False,
        metadata={
            "help": "DDP: look for parameters without a gradient after every backward. Every trainable parameter "
            "of the policy and value network takes part in each update, so the search (Trainer's default for a "
            "wrapper module) only costs time."
        },
    )
    # None, not False: transformers 5.25 warns that `gradient_checkpointing` is deprecated whenever it is not None
    # (it became an alias of `activation_checkpointing`); None resolves to False without the warning.
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Recompute activations in the backward pass to save memory."}
    )
    logging_steps: float = field(
        default=1,
        metadata={
            "help": "Log every this many updates (a ratio < 1: that fraction of the run); the metrics are averaged "
            "over the updates since the last log."
        },
    )
    per_device_train_batch_size: int = field(default=4, metadata={"help": "Rollouts per device per micro-batch."})
    save_strategy: str = field(
        default="no", metadata={"help": "Checkpoint strategy ('no' or 'steps' with save_steps)."}
    )

    # TRL's PPO fields (names and meanings as in TRL's PPOConfig <= 1.12)
    num_mini_batches: int = field(default=1, metadata={"help": "Mini-batches each local rollout batch is split into."})
    total_episodes: int | None = field(
        default=None,
        metadata={"help": "Rollouts in the whole run (default: num_train_epochs x the number of prompts)."},
    )
    cliprange: float = field(default=0.2, metadata={"help": "PPO clip range of the probability ratio."})
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss."})
    cliprange_value: float = field(default=0.2, metadata={"help": "Clip range of the value update."})
    model_adapter_name: str | None = field(
        default=None, metadata={"help": "With several LoRA adapters: the one that is trained."}
    )
    ref_adapter_name: str | None = field(
        default=None, metadata={"help": "With several LoRA adapters: the one used as the KL anchor."}
    )
    ds3_gather_for_generation: bool = field(
        default=True,
        metadata={
            "help": "Under DeepSpeed ZeRO-3, gather the policy's weights for the rollout (faster); False samples from "
            "the shards, for models too large for one device."
        },
    )
    # Computed by the trainer (TRL's names); values given here are replaced.
    world_size: int | None = field(default=None, metadata={"help": "Computed: number of processes."})
    num_total_batches: int | None = field(default=None, metadata={"help": "Computed: updates in the run."})
    micro_batch_size: int | None = field(
        default=None, metadata={"help": "Computed: per_device_train_batch_size x world_size."}
    )
    local_batch_size: int | None = field(
        default=None, metadata={"help": "Computed: rollouts per process and update."}
    )
    batch_size: int | None = field(default=None, metadata={"help": "Computed: rollouts per update, all processes."})
    local_mini_batch_size: int | None = field(default=None, metadata={"help": "Computed: mini-batch per process."})
    mini_batch_size: int | None = field(default=None, metadata={"help": "Computed: mini-batch, all processes."})
    # TRL's text-generation fields: not used, refused unless at TRL's default (see UNUSED_TRL_PPO_FIELDS).
    sft_model_path: str = field(default="EleutherAI/pythia-160m", metadata={"help": "Not used (TRL text PPO)."})
    reward_model_path: str = field(default="EleutherAI/pythia-160m", metadata={"help": "Not used (TRL text PPO)."})
    stop_token: str | None = field(default=None, metadata={"help": "Not used (TRL text PPO)."})
    stop_token_id: int | None = field(default=None, metadata={"help": "Not used (TRL text PPO)."})
    missing_eos_penalty: float | None = field(default=None, metadata={"help": "Not used (TRL text PPO)."})
    whiten_rewards: bool = field(default=False, metadata={"help": "Not used (see whiten_advantages)."})
    local_rollout_forward_batch_size: int = field(default=64, metadata={"help": "Not used (TRL text PPO)."})
    num_sample_generations: int = field(default=10, metadata={"help": "Not used (see eval_strategy)."})
    dataset_num_proc: int | None = field(default=None, metadata={"help": "Not used (TRL text PPO)."})

    # Generation
    audio_duration_s: float | None = field(
        default=None, metadata={"help": "Rollout length in seconds of audio; overrides response_length."}
    )
    top_k: int = field(
        default=0, metadata={"help": "Top-k filtering when sampling and in all log-probs; 0 keeps the codebook."}
    )
    guidance_scale: float = field(
        default=1.0, metadata={"help": "Classifier-free guidance scale; > 1 trains the guided distribution."}
    )
    max_prompt_length: int = field(default=256, metadata={"help": "Longest prompt in tokens; longer is an error."})
    rollout_backend: Literal["generate", "static", "compiled"] = field(
        default="static",
        metadata={
            "help": "How rollouts are sampled: 'generate' (model.generate), 'static' (static-KV-cache loop, same "
            "distribution, faster) or 'compiled' (that loop through torch.compile / CUDA graphs; compiles first)."
        },
    )

    logits_chunk_size: int | None = field(
        default=DEFAULT_CHUNK_SIZE,
        metadata={
            "help": "Decoder steps whose code distributions are computed at once in the update (bounded memory for "
            "long clips; same loss and gradients); None computes the whole clip at once."
        },
    )

    # Reward
    reward_weights: list[float] | None = field(
        default=None, metadata={"help": "Weight of each reward function (default: all 1)."}
    )
    drop_nonfinite_rewards: bool = field(
        default=False,
        metadata={"help": "Drop samples whose reward is NaN/inf from the update instead of raising an error."},
    )

    # Loss
    whiten_advantages: bool = field(default=True, metadata={"help": "Normalise advantages over the batch."})
    baseline: Literal["value", "rloo", "group_mean"] = field(
        default="value",
        metadata={
            "help": "What the reward is compared with: 'value' = a learned value network (MusicRL); 'rloo' = the mean "
            "of the other clips of the same prompt (needs num_generations >= 2); 'group_mean' = the mean of all "
            "clips of the prompt (GRPO; with scale_group_rewards also divided by their std). The value-free "
            "baselines build no value network."
        },
    )
    num_generations: int = field(
        default=1,
        metadata={"help": "Clips sampled per prompt in each update (a group); rloo and group_mean compare within it."},
    )
    scale_group_rewards: bool = field(
        default=False,
        metadata={"help": "With baseline='group_mean', divide each group's advantages by its reward std (GRPO)."},
    )
    kl_target: float | None = field(
        default=None,
        metadata={
            "help": "Hold the exact KL to the anchor near this many nats per clip by adapting kl_coef (its starting "
            "value) after every update, with Ziegler et al.'s proportional controller; None keeps kl_coef fixed."
        },
    )
    kl_horizon: int | None = field(
        default=None,
        metadata={
            "help": "Rollouts over which the KL controller moves kl_coef by at most 20 %% (Ziegler et al.'s horizon); "
            "default batch_size, i.e. at most 20 %% per update."
        },
    )

    # Models
    share_value_backbone: bool = field(
        default=False,
        metadata={"help": "Value head on the policy decoder instead of a separate value network (less memory)."},
    )
    lora_value_trunk: bool | None = field(
        default=None,
        metadata={
            "help": "With LoRA, train the separate value trunk through its own LoRA adapters instead of fully "
            "(default: yes for 4/8-bit policies, no otherwise)."
        },
    )
    train_text_encoder: bool = field(default=False, metadata={"help": "Also train the T5 text encoder."})
    save_merged_lora: bool = field(
        default=True, metadata={"help": "With LoRA, also save merged weights to <output_dir>/merged."}
    )
    plot_training_curves: bool = field(
        default=True, metadata={"help": "Write training_curves.png and log_history.json at the end of training."}
    )
    allow_pickle_weights: bool = field(
        default=False,
        metadata={
            "help": "Load a model or ref_model id/path whose weights are pickles only (pytorch_model.bin); refused "
            "by default, since unpickling can run arbitrary code. Only for sources you trust."
        },
    )

    # Publishing
    push_lora: Literal["adapter", "merged", "both"] = field(
        default="both",
        metadata={
            "help": "What push_to_hub uploads for a LoRA policy: 'adapter' (PeftModel.from_pretrained), 'merged' "
            "(full weights: from_pretrained and pipeline('text-to-audio')) or 'both' (merged at the root, the adapter "
            "in adapter/)."
        },
    )
    hub_license: str | None = field(
        default=None,
        metadata={
            "help": "Licence of the pushed model's card (e.g. 'cc-by-nc-4.0'); default: the most restrictive of the "
            "base model, the anchor and the reward models, read from their cards."
        },
    )
    hub_sample_prompts: list[str] | None = field(
        default=None,
        metadata={
            "help": "Prompts of the card's before/after audio samples (fixed seed); default: three built-in prompts. "
            "Pass none of them (an empty list) to skip the samples."
        },
    )

    # Evaluation
    eval_num_samples_per_prompt: int = field(
        default=4,
        metadata={
            "help": "Clips per eval prompt in evaluate() (every eval_steps with eval_strategy='steps'): their spread "
            "gives the diversity metrics."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        for name, (default, instead) in UNUSED_TRL_PPO_FIELDS.items():
            if getattr(self, name) != default:
                raise ValueError(
                    f"{name}={getattr(self, name)!r}: MusicPPOTrainer does not use this field of TRL's text PPOConfig "
                    f"({instead}). Remove it from your flags, config file or recipe."
                )
        if self.kl_penalty not in ("loss", "reward"):
            raise ValueError(
                f"kl_penalty must be 'loss' (KL as an analytic loss term, MusicRL) or 'reward' (per-step reward "
                f"penalty, TRL), got {self.kl_penalty!r}."
            )
        if self.kl_coef < 0 or self.kl_coef != self.kl_coef:
            raise ValueError(f"kl_coef must be >= 0 (0 removes the anchor), got {self.kl_coef}.")
        if self.kl_estimator not in ("full", "k1", "k3"):
            raise ValueError(f"kl_estimator must be 'full', 'k1' or 'k3', got {self.kl_estimator!r}.")
        if self.kl_penalty == "loss" and self.kl_estimator != "full":
            # Differentiated as a loss, k1's expected gradient is zero and k3's is that of the reverse KL.
            raise ValueError(
                f"kl_estimator={self.kl_estimator!r} cannot be a loss term (kl_penalty='loss'): its gradient does not "
                "pull the policy towards the anchor (k1's expected gradient is 0, k3's is the reverse KL's). Use "
                "kl_estimator='full' (the exact KL over the codebook, MusicRL's), or kl_penalty='reward' to put a "
                "k1/k3 estimate into the rewards as TRL's PPO did."
            )
        if self.audio_duration_s is not None and self.response_length != DEFAULT_RESPONSE_LENGTH:
            raise ValueError(
                f"audio_duration_s={self.audio_duration_s} and response_length={self.response_length} both set the "
                "rollout length: give one of them."
            )
        if self.baseline not in ("value", "rloo", "group_mean"):
            raise ValueError(f"baseline must be 'value', 'rloo' or 'group_mean', got {self.baseline!r}.")
        if not isinstance(self.num_generations, int) or self.num_generations < 1:
            raise ValueError(f"num_generations must be an integer >= 1, got {self.num_generations!r}.")
        if self.baseline != "value" and self.num_generations < 2:
            raise ValueError(
                f"baseline={self.baseline!r} compares the clips of one prompt with each other: set num_generations to "
                "2 or more (e.g. 4), or use baseline='value'."
            )
        if self.scale_group_rewards and self.baseline != "group_mean":
            raise ValueError("scale_group_rewards applies to baseline='group_mean' only.")
        if self.kl_target is not None and not self.kl_target > 0:
            raise ValueError(f"kl_target must be > 0 nats per clip (or None), got {self.kl_target}.")
        if self.kl_target is not None and self.kl_coef <= 0:
            raise ValueError("kl_target adapts kl_coef multiplicatively from its starting value: set kl_coef > 0.")
        if self.kl_horizon is not None and self.kl_horizon < 1:
            raise ValueError(f"kl_horizon must be >= 1 rollout, got {self.kl_horizon}.")
        if self.max_grad_norm is not None and (self.max_grad_norm < 0 or self.max_grad_norm != self.max_grad_norm):
            raise ValueError(f"max_grad_norm must be >= 0 (0 or None: no clipping), got {self.max_grad_norm}.")
        if self.rollout_backend not in ("generate", "static", "compiled"):
            raise ValueError(
                f"rollout_backend must be 'generate', 'static' or 'compiled', got {self.rollout_backend!r}."
            )
        if self.audio_duration_s is not None and self.audio_duration_s <= 0:
            raise ValueError(f"audio_duration_s must be > 0 seconds, got {self.audio_duration_s}.")
        if self.logits_chunk_size is not None and (
            isinstance(self.logits_chunk_size, bool) or not isinstance(self.logits_chunk_size, int)
            or self.logits_chunk_size < 1
        ):
            raise ValueError(
                f"logits_chunk_size must be a positive number of decoder steps (e.g. 32) or None (no chunking), got "
                f"{self.logits_chunk_size!r}."
            )
        from ..rollout import SamplingConfig

        SamplingConfig(self.guidance_scale, self.temperature, self.top_k)  # refuses values it cannot sample with
        # Out-of-range sizes used to fail deep in the batch arithmetic (ZeroDivisionError) or, for a negative
        # total_episodes, to run no update and save the untouched model as if it had trained.
        if self.total_episodes is not None and self.total_episodes < 1:
            raise ValueError(f"total_episodes must be >= 1 rollout (or unset: one epoch), got {self.total_episodes}.")
        if self.per_device_train_batch_size < 1:
            raise ValueError(
                f"per_device_train_batch_size={self.per_device_train_batch_size}: it must be an integer >= 1 "
                "(rollouts per device per micro-batch)."
            )
        if not self.learning_rate > 0 or self.learning_rate == float("inf"):
            raise ValueError(f"learning_rate must be a finite number > 0 (e.g. 1e-5), got {self.learning_rate}.")
        if self.response_length < 1:
            raise ValueError(f"response_length must be >= 1 decoder step, got {self.response_length}.")
        if not 0 <= self.gamma <= 1 or not 0 <= self.lam <= 1:
            raise ValueError(f"gamma and lam must lie in [0, 1], got gamma={self.gamma}, lam={self.lam}.")
        if self.reward_weights is not None and any(w != w for w in self.reward_weights):
            raise ValueError("reward_weights contains NaN.")
        if self.push_lora not in ("adapter", "merged", "both"):
            raise ValueError(f"push_lora must be 'adapter', 'merged' or 'both', got {self.push_lora!r}.")
        if self.eval_num_samples_per_prompt < 1:
            raise ValueError(f"eval_num_samples_per_prompt must be >= 1, got {self.eval_num_samples_per_prompt}.")
