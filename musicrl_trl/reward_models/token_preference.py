"""A preference reward model that scores MusicGen's audio codes directly, without decoding audio.

MusicRL's user-preference reward model reads "text + audio tokens" and was initialised from the generator's
checkpoint; trained from scratch it stayed at chance (Cideron et al. 2024, section 3.3). This module is that model
for MusicGen: the T5 text encoder and the MusicGen decoder trunk (embeddings, self- and cross-attention layers,
final layer norm) copied from a MusicGen checkpoint, with the per-codebook LM heads replaced by one scalar head.

Shape letters: B batch, K codebooks, T frames (codes per codebook), S = T + D + 1 delayed-grid length (D the
largest codebook delay), L prompt tokens, H decoder hidden size.

How a clip is scored::

    prompt ids [B, L] --T5--> text states [B, L, H_text] --(proj)--> cross-attention memory [B, L, H]
    codes [B, K, T] --codes_to_grid--> grid [B, K, S] --decoder trunk--> hidden [B, S, H]
    hidden [B, S, H] --pool over the columns that hold codes--> [B, H] --score--> logits [B, 1]

The decoder is causal and reads the grid in MusicGen's delayed layout, the layout it was pre-trained on, so the
pretrained weights see the inputs they know. Column 0 (start tokens only) carries no code and is left out of the
pooling. ``pooling="last"`` takes the last column that holds a code (the only one that has seen every code);
``pooling="mean"`` averages all columns that hold a code.

Long clips: with no LM heads, no [B, K, T, V] code distribution exists in its forward or backward (checked in
tests/test_teacher_forcing.py), so there is nothing to chunk the way ``MusicPPOTrainer`` chunks its heads
(``logits_chunk_size``); its memory per decoder step is the trunk's activations, [B, H] per layer.

The class attribute ``scores_codes = True`` tells the reward wrappers (``PreferenceReward``) and
``AudioRewardTrainer`` to feed it ``codes`` instead of audio.
"""

from __future__ import annotations

import os
from typing import ClassVar, Literal

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoModelForTextEncoding,
    MusicgenDecoderConfig,
    MusicgenForConditionalGeneration,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers.configuration_utils import SubConfigSpec
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.models.musicgen.modeling_musicgen import MusicgenModel

from .. import codebooks
from ..loading import load_pretrained

__all__ = ["MusicTokenPreferenceConfig", "MusicTokenPreferenceModel", "register_token_preference"]


class MusicTokenPreferenceConfig(PreTrainedConfig):
    r"""Configuration of [`MusicTokenPreferenceModel`].

    Parameters:
        text_encoder (`dict` or `PreTrainedConfig`):
            Config of the prompt encoder (MusicGen's T5 encoder).
        decoder (`dict` or `MusicgenDecoderConfig`):
            Config of the MusicGen decoder trunk that reads the codes (``num_codebooks``, ``audio_channels`` and
            ``pad_token_id`` define the delay pattern).
        pooling (`str`, *optional*, defaults to `"mean"`):
            How the per-column hidden states become one vector per clip: `"mean"` over the columns that hold codes,
            or `"last"`, the last such column.
        initializer_factor (`float`, *optional*, defaults to `0.02`):
            Standard deviation of the scalar head's initial weights.
        base_model_name_or_path (`str`, *optional*):
            The MusicGen checkpoint the trunk was copied from (for model cards).

    The model always has one output (``num_labels == 1``): a scalar reward.

    >>> from transformers import MusicgenDecoderConfig, T5Config
    >>> config = MusicTokenPreferenceConfig(text_encoder=T5Config(), decoder=MusicgenDecoderConfig())
    >>> config.num_labels, config.pooling
    (1, 'mean')
    """

    model_type: ClassVar[str] = "music_token_reward"
    sub_configs_defaults = {
        "text_encoder": SubConfigSpec(config_class=AutoConfig, model_type="t5"),
        "decoder": MusicgenDecoderConfig,
    }

    text_encoder: dict | PreTrainedConfig | None = None
    decoder: dict | PreTrainedConfig | None = None
    pooling: Literal["mean", "last"] = "mean"
    initializer_factor: float = 0.02
    base_model_name_or_path: str | None = None

    def __post_init__(self, **kwargs):
        # A reward model has exactly one output; a saved config carries id2label with one entry, a new one does not.
        kwargs.setdefault("num_labels", 1)
        super().__post_init__(**kwargs)
        if self.num_labels != 1:
            raise ValueError(
                f"MusicTokenPreferenceConfig is a scalar reward model: num_labels must be 1, got {self.num_labels}."
            )
        if self.pooling not in ("mean", "last"):
            raise ValueError(f"pooling must be 'mean' or 'last', got {self.pooling!r}.")

    def get_text_config(self, decoder: bool | None = None, encoder: bool | None = None) -> PreTrainedConfig:
        # Only the prompt encoder handles text: the "decoder" reads audio codes. The base class would find both
        # `text_encoder` and `decoder` and raise as ambiguous, which breaks `Trainer.train` (align_special_tokens).
        return self.text_encoder


class MusicTokenPreferenceModel(PreTrainedModel):
    """Scores MusicGen codes given a text prompt: MusicGen's T5 encoder + decoder trunk + a scalar head.

    Build it from a generator with :meth:`from_musicgen` (the paper's recipe), reload a trained one with
    ``from_pretrained`` (or ``AutoModelForSequenceClassification.from_pretrained`` after
    :func:`register_token_preference`).

    >>> from musicrl_trl.testing import tiny_musicgen
    >>> musicgen, processor = tiny_musicgen(num_codebooks=4)
    >>> model = MusicTokenPreferenceModel.from_musicgen(musicgen)
    >>> prompt = processor.tokenizer(["calm piano"], return_tensors="pt")
    >>> codes = torch.randint(0, 2048, (1, 4, 25))  # [B, K, T]: half a second at 50 Hz
    >>> model(**prompt, codes=codes).logits.shape
    torch.Size([1, 1])
    """

    config: MusicTokenPreferenceConfig
    config_class = MusicTokenPreferenceConfig
    base_model_prefix = "token_reward"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MusicgenDecoderLayer", "T5Block"]
    _supports_sdpa = True
    # Read by PreferenceReward and AudioRewardTrainer: feed `codes`, not audio.
    scores_codes: ClassVar[bool] = True

    def __init__(self, config: MusicTokenPreferenceConfig):
        super().__init__(config)
        self.text_encoder = AutoModelForTextEncoding.from_config(config.text_encoder)
        self.decoder = MusicgenModel(config.decoder)
        # Same rule as MusicgenForConditionalGeneration: project the text states when the widths differ and the
        # decoder's cross-attention does not take the text width itself.
        if (
            config.text_encoder.hidden_size != config.decoder.hidden_size
            and config.decoder.cross_attention_hidden_size is None
        ):
            self.enc_to_dec_proj = nn.Linear(config.text_encoder.hidden_size, config.decoder.hidden_size)
        else:
            self.enc_to_dec_proj = None
        self.score = nn.Linear(config.decoder.hidden_size, 1)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # Only the modules this class owns: the text encoder and decoder trunk are PreTrainedModels and
        # initialise themselves (transformers dispatches to their own _init_weights).
        if module is self.score:
            nn.init.normal_(module.weight, std=self.config.initializer_factor)
            nn.init.zeros_(module.bias)
        elif module is self.enc_to_dec_proj:
            nn.init.normal_(module.weight, std=self.config.initializer_factor)
            nn.init.zeros_(module.bias)

    @classmethod
    def from_musicgen(
        cls,
        model_or_path: MusicgenForConditionalGeneration | str | os.PathLike,
        pooling: Literal["mean", "last"] = "mean",
        allow_pickle_weights: bool = False,
        **from_pretrained_kwargs,
    ) -> MusicTokenPreferenceModel:
        """Copy the text encoder, projection and decoder trunk of a MusicGen model; the scalar head starts fresh.

        ``model_or_path`` is a loaded ``MusicgenForConditionalGeneration`` (left untouched: weights are copied) or a
        checkpoint id/path loaded with ``from_pretrained(**from_pretrained_kwargs)`` through
        :func:`~musicrl_trl.loading.load_pretrained`: a checkpoint with only pickle weights (``pytorch_model.bin``)
        raises :class:`~musicrl_trl.loading.ModelLoadingError` unless ``allow_pickle_weights=True``. The codec and the
        LM heads are not used. The result is in train mode, as a model fresh for training is.
        """
        if isinstance(model_or_path, (str, os.PathLike)):
            musicgen = load_pretrained(
                MusicgenForConditionalGeneration.from_pretrained,
                model_or_path,
                "MusicGen for the token preference model",
                allow_pickle_weights=allow_pickle_weights,
                **from_pretrained_kwargs,
            )
            name_or_path = str(model_or_path)
        elif isinstance(model_or_path, MusicgenForConditionalGeneration):
            musicgen = model_or_path
            name_or_path = musicgen.config.name_or_path or None
        else:
            raise TypeError(
                "from_musicgen expects a MusicgenForConditionalGeneration or a checkpoint id/path, got "
                f"{type(model_or_path).__name__}."
            )
        config = MusicTokenPreferenceConfig(
            text_encoder=musicgen.config.text_encoder.to_dict(),
            decoder=musicgen.config.decoder.to_dict(),
            pooling=pooling,
            base_model_name_or_path=name_or_path,
        )
        model = cls(config)
        model.text_encoder.load_state_dict(musicgen.text_encoder.state_dict())
        model.decoder.load_state_dict(musicgen.decoder.model.state_dict())
        if model.enc_to_dec_proj is not None:
            model.enc_to_dec_proj.load_state_dict(musicgen.enc_to_dec_proj.state_dict())
        return model.to(dtype=musicgen.dtype, device=musicgen.device).train()

    def _encode_prompt(
        self, input_ids: torch.LongTensor | None, attention_mask: torch.Tensor | None, batch_size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention memory [B, L, H] and its mask [B, L]; no prompt is MusicGen's null condition."""
        if input_ids is None:
            # MusicGen's unconditional input (as generate builds it for CFG): zero states under an all-zero mask.
            hidden = self.score.weight.new_zeros(batch_size, 1, self.config.decoder.hidden_size)
            return hidden, torch.zeros(batch_size, 1, dtype=torch.long, device=hidden.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.enc_to_dec_proj is not None:
            hidden = self.enc_to_dec_proj(hidden)
        # MusicgenForConditionalGeneration zeroes the states of padded prompt tokens before the decoder: same here.
        return hidden * attention_mask[..., None].to(hidden.dtype), attention_mask

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        codes: torch.LongTensor | None = None,
        codes_attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> SequenceClassifierOutput:
        r"""Score ``codes`` [B, K, T] given the prompt ``input_ids`` [B, L] (MusicGen's text tokenizer).

        Args:
            input_ids: prompt token ids [B, L]; ``None`` scores the codes unconditionally (MusicGen's null prompt).
            attention_mask: prompt mask [B, L], 1 for real tokens.
            codes: codes [B, K, T] in MusicGen's per-codebook order (K = ``config.decoder.num_codebooks``), each in
                ``[0, V)``, V = ``config.decoder.vocab_size``.
            codes_attention_mask: [B, T], 1 for real frames, 0 for right padding (clips of different lengths in
                one batch). ``None``: every frame is real.
            labels: optional targets [B] (or [B, 1]); gives a mean-squared-error ``loss`` (reward regression).
                Pairwise losses live in ``AudioRewardTrainer``.

        Returns:
            `SequenceClassifierOutput` with ``logits`` [B, 1] (the reward) and ``loss`` when ``labels`` are given.
        """
        if codes is None:
            raise ValueError("MusicTokenPreferenceModel scores audio codes: pass `codes` [B, K, T].")
        batch, num_codebooks, frames = codes.shape
        if num_codebooks != self.config.decoder.num_codebooks:
            raise ValueError(
                f"codes have {num_codebooks} codebooks but the model reads {self.config.decoder.num_codebooks}: "
                "pass codes from the MusicGen checkpoint this reward model was built from."
            )
        pad_token_id = self.config.decoder.pad_token_id
        audio_channels = self.config.decoder.audio_channels
        if codes_attention_mask is not None:
            # Padded frames become pad tokens, which the decoder embeds like the delay pattern's own pads.
            codes = codes.masked_fill(~codes_attention_mask.bool()[:, None, :], pad_token_id)
        grid = codebooks.codes_to_grid(codes, pad_token_id, audio_channels)  # [B, K, S]
        encoder_hidden_states, encoder_attention_mask = self._encode_prompt(input_ids, attention_mask, batch)
        # No decoder attention mask: the decoder is causal and padding is on the right, so a column that holds a
        # real code never attends to a padded one; padded columns are dropped in the pooling below.
        hidden = self.decoder(
            input_ids=grid.reshape(batch * num_codebooks, -1),
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
            use_cache=False,
        ).last_hidden_state  # [B, S, H]

        # Column c holds a real code iff frame c - 1 - d_k is real for some codebook k: columns 1 .. T_b + D.
        max_delay = codebooks.max_delay(num_codebooks, audio_channels)
        real_frames = (
            codes_attention_mask.long().sum(-1)
            if codes_attention_mask is not None
            else torch.full((batch,), frames, device=codes.device)
        )
        columns = torch.arange(grid.shape[-1], device=codes.device)
        column_mask = (columns[None, :] >= 1) & (columns[None, :] <= (real_frames + max_delay)[:, None])  # [B, S]
        if self.config.pooling == "last":
            pooled = hidden[torch.arange(batch, device=hidden.device), real_frames + max_delay]
        else:
            weights = column_mask.to(hidden.dtype)[..., None]
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
        logits = self.score(pooled)  # [B, 1]

        loss = None
        if labels is not None:
            loss = nn.functional.mse_loss(logits.squeeze(-1), labels.reshape(-1).to(logits.dtype))
        return SequenceClassifierOutput(loss=loss, logits=logits)


def register_token_preference() -> None:
    """Register the model with ``AutoConfig`` and ``AutoModelForSequenceClassification`` (idempotent).

    After this runs (``import musicrl_trl`` calls it), a saved ``MusicTokenPreferenceModel`` reloads with
    ``AutoModelForSequenceClassification.from_pretrained(path)`` in any process, like TRL's reward models. It is a
    sequence classifier with one label, not an audio classifier: it takes codes, not waveforms.
    """
    AutoConfig.register(MusicTokenPreferenceConfig.model_type, MusicTokenPreferenceConfig, exist_ok=True)
    AutoModelForSequenceClassification.register(MusicTokenPreferenceConfig, MusicTokenPreferenceModel, exist_ok=True)
