"""Configuration of MusicPPOTrainer: TRL's PPOConfig with MusicRL's defaults and the music-specific fields."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from trl.experimental.ppo import PPOConfig


@dataclass
class MusicPPOConfig(PPOConfig):
    r"""
    Configuration for [`MusicPPOTrainer`]. The defaults reproduce MusicRL (Cideron et al., 2024): KL-regularised
    REINFORCE with a learned value baseline, undiscounted returns, one gradient update per rollout batch, sampling at
    temperature 0.99, and the exact per-step KL to the anchor over the whole codebook. Full PPO is the same trainer
    with ``num_ppo_epochs > 1``, ``num_mini_batches > 1`` and ``lam < 1`` (clipping is always applied with
    ``cliprange``; at the first update of a rollout the ratio is 1, so it has no effect in the paper's setting).

    A rollout step is one MusicGen decoder step: the K codes drawn together at one position of the delayed layout
    (see `musicrl_trl.codebooks`). Rewards are sequence-level and are added at the last step.

    Parameters that control generation:
        response_length (`int`, defaults to `253`): decoder steps per rollout (frames + K - 1; 50 frames = 1 s).
        audio_duration_s (`float`, *optional*): rollout length in seconds instead; overrides `response_length`.
        temperature (`float`, defaults to `0.99`): sampling temperature (MusicRL: 0.99).
        top_k (`int`, defaults to `0`): top-k filtering, 0 for the whole codebook. MusicGen ships 250; any value
            here is applied identically when sampling and when computing log-probs and KL.
        guidance_scale (`float`, defaults to `1.0`): classifier-free guidance; > 1 trains the guided distribution
            that is sampled (twice the compute).
        max_prompt_length (`int`, defaults to `256`): longest prompt in tokens; longer ones are an error.

    Parameters that control the reward:
        reward_weights (`list[float]`, *optional*): one weight per reward function; all 1 if not set (MusicRL-R
            combines adherence and quality linearly).
        drop_nonfinite_rewards (`bool`, defaults to `False`): drop samples with a NaN/inf reward from the update
            (counted in `objective/dropped_samples`) instead of raising an error.

    Parameters that control the loss:
        kl_estimator (`"full"`, `"k1"` or `"k3"`, defaults to `"full"`): `"full"` is the exact KL summed over
            the codebook at every step (MusicRL); `k1`/`k3` are TRL's one-sample estimators.
        kl_coef (`float`, defaults to `0.05`): weight of the KL penalty (MusicRL's alpha).
        num_ppo_epochs (`int`, defaults to `1`): gradient passes per rollout batch (MusicRL: 1).
        gamma (`float`, defaults to `1.0`), lam (`float`, defaults to `1.0`): discount and GAE lambda (MusicRL:
            undiscounted Monte-Carlo returns, i.e. both 1).
        whiten_advantages (`bool`, defaults to `True`): normalise advantages over the batch, as TRL does.

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

    These parameters have other defaults than in TRL's `PPOConfig`: `temperature` 0.99, `num_ppo_epochs` 1,
    `lam` 1.0, `kl_estimator` "full", `response_length` 253, `bf16` False and `gradient_checkpointing` False (the
    tiny offline default runs on CPU), `logging_steps` 1, `per_device_train_batch_size` 4, `save_strategy` "no".
    """

    # Overridden defaults
    temperature: float = field(default=0.99, metadata={"help": "Sampling temperature (MusicRL: 0.99)."})
    num_ppo_epochs: int = field(
        default=1, metadata={"help": "Gradient passes over each rollout batch (MusicRL: 1; PPO: e.g. 4)."}
    )
    lam: float = field(default=1.0, metadata={"help": "GAE lambda (MusicRL: 1, Monte-Carlo returns)."})
    gamma: float = field(default=1.0, metadata={"help": "Discount factor (MusicRL: 1, undiscounted)."})
    kl_estimator: Literal["full", "k1", "k3"] = field(
        default="full",
        metadata={
            "help": "KL to the anchor per step: 'full' = exact KL summed over the whole codebook (MusicRL); 'k1', "
            "'k3' = TRL's one-sample estimators from the sampled code's log-ratio."
        },
    )
    response_length: int = field(
        default=253, metadata={"help": "Decoder steps per rollout (frames + K - 1; MusicGen makes 50 frames/s)."}
    )
    bf16: bool | None = field(default=False, metadata={"help": "bf16 mixed precision (set it on GPUs)."})
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute activations in the backward pass to save memory."}
    )
    logging_steps: float = field(default=1, metadata={"help": "Log every this many updates."})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "Rollouts per device per micro-batch."})
    save_strategy: str = field(
        default="no", metadata={"help": "Checkpoint strategy ('no' or 'steps' with save_steps)."}
    )

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

    def __post_init__(self):
        super().__post_init__()
        if self.kl_estimator not in ("full", "k1", "k3"):
            raise ValueError(f"kl_estimator must be 'full', 'k1' or 'k3', got {self.kl_estimator!r}.")
        if self.audio_duration_s is not None and self.audio_duration_s <= 0:
            raise ValueError(f"audio_duration_s must be > 0 seconds, got {self.audio_duration_s}.")
        if self.guidance_scale < 1:
            raise ValueError(f"guidance_scale must be >= 1 (1 disables guidance), got {self.guidance_scale}.")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 keeps the whole codebook), got {self.top_k}.")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}.")
        if not 0 <= self.gamma <= 1 or not 0 <= self.lam <= 1:
            raise ValueError(f"gamma and lam must lie in [0, 1], got gamma={self.gamma}, lam={self.lam}.")
        if self.reward_weights is not None and any(w != w for w in self.reward_weights):
            raise ValueError("reward_weights contains NaN.")
