"""A scalar reward head on raw waveforms, loadable with ``AutoModelForAudioClassification``.

``MusicRewardModel`` serves both learned rewards of MusicRL that work on audio: the MOS quality estimator
(regression on 1-5 ratings) and, as an audio-space alternative to the token-space model, the Bradley-Terry user
preference model. It takes waveforms at any rate, resamples them on the model's device, computes its features in
torch (deterministic, no NumPy round trip), encodes them with a backbone, optionally concatenates a prompt
embedding, and returns one logit per clip.

Backbones (chosen by ``config.backbone_config``):

- built-in log-mel conv encoder (no backbone config): tiny, any clip length, for tests and CPU demos;
- CLAP's HTSAT audio tower: ``MusicRewardModel.from_backbone("laion/larger_clap_music")`` (48 kHz, 10 s context);
- AST: ``MusicRewardModel.from_backbone("MIT/ast-finetuned-audioset-10-10-0.4593")`` (16 kHz, 10.24 s context).

Clips longer than the backbone context are cut into context-sized windows whose embeddings are averaged.

Shapes: B batch, C channels, N samples, W windows, F feature frames, M mel bins, D embedding width, U text tokens.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
from torch import nn
from transformers import (
    ASTFeatureExtractor,
    ASTModel,
    AutoConfig,
    ByT5Tokenizer,
    ClapAudioModelWithProjection,
    ClapFeatureExtractor,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.modeling_outputs import SequenceClassifierOutput

from ..audio import check_sampling_rate, resample, split_windows
from ..loading import load_pretrained
from .configuration_music_reward import SUPPORTED_BACKBONES, MusicRewardConfig
from .feature_extraction_music_reward import MusicRewardFeatureExtractor
from .features import ClapFeatureSettings, ast_features, log_mel_spectrogram, repeat_pad

__all__ = ["MusicRewardModel", "MusicRewardPreTrainedModel", "MelConvEncoder"]


class MusicRewardPreTrainedModel(PreTrainedModel):
    config_class = MusicRewardConfig
    config: MusicRewardConfig
    base_model_prefix = "music_reward"
    main_input_name = "input_values"
    input_modalities = "audio"
    supports_gradient_checkpointing = False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Conv2d) or isinstance(module, nn.Conv1d):
            # He init keeps the conv encoder's activations O(1) through its GELU stack; the library default
            # (normal, std 0.02) shrinks them ~20x per layer, so an untrained model would score every clip alike.
            init.kaiming_normal_(module.weight, nonlinearity="relu")
            if module.bias is not None:
                init.zeros_(module.bias)
        else:
            super()._init_weights(module)


class MelConvEncoder(nn.Module):
    """Built-in encoder: normalised log-mel ``[B, F, M]`` -> stride-2 3x3 convs with GELU -> mean -> ``[B, D]``.

    Frequency and time are averaged out, so clips of any length give comparable embeddings.
    """

    def __init__(self, config: MusicRewardConfig) -> None:
        super().__init__()
        channels = [1, *config.conv_channels]
        self.convs = nn.ModuleList(
            nn.Conv2d(channels[i], channels[i + 1], kernel_size=3, stride=2, padding=1)
            for i in range(len(channels) - 1)
        )
        self.activation = nn.GELU()
        self.projection = nn.Linear(channels[-1], config.hidden_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        hidden = features.transpose(1, 2).unsqueeze(1)  # [B, 1, M, F]
        for conv in self.convs:
            hidden = self.activation(conv(hidden))
        return self.projection(hidden.mean(dim=(2, 3)))  # [B, C] -> [B, D]


@functools.lru_cache(maxsize=1)
def _byt5_tokenizer() -> ByT5Tokenizer:
    # ByT5 needs no vocabulary file (ids are UTF-8 bytes + 3), so prompts tokenise identically everywhere, offline.
    return ByT5Tokenizer()


class MusicRewardModel(MusicRewardPreTrainedModel):
    """Scalar reward on raw audio: ``forward(input_values, ...)`` -> ``SequenceClassifierOutput(logits=[B, 1])``.

    >>> model = MusicRewardModel(MusicRewardConfig(conv_channels=[4, 8], hidden_size=8)).eval()
    >>> model(torch.zeros(2, 16_000), sampling_rate=16_000).logits.shape
    torch.Size([2, 1])
    """

    def __init__(self, config: MusicRewardConfig) -> None:
        super().__init__(config)
        backbone_type = config.backbone_type
        if backbone_type == "conv":
            self.backbone = MelConvEncoder(config)
            embedding_size = config.hidden_size
        elif backbone_type == "clap_audio_model":
            if config.max_length_s is None:
                raise ValueError(
                    "MusicRewardConfig: a CLAP backbone needs max_length_s (its context, 10 s for LAION CLAP)."
                )
            self.backbone = ClapAudioModelWithProjection(config.backbone_config)
            embedding_size = config.backbone_config.projection_dim
        elif backbone_type == "audio-spectrogram-transformer":
            if config.max_length_s is None:
                raise ValueError("MusicRewardConfig: an AST backbone needs max_length_s (its context, 10.24 s).")
            self.backbone = ASTModel(config.backbone_config)
            embedding_size = config.backbone_config.hidden_size
        else:  # MusicRewardConfig validates this already; kept for configs edited by hand
            raise ValueError(f"Unsupported backbone {backbone_type!r}; supported: {sorted(SUPPORTED_BACKBONES)}.")
        text_size = 0
        if config.text_vocab_size:
            self.text_embeddings = nn.Embedding(config.text_vocab_size, config.text_hidden_size, padding_idx=0)
            # One conv over neighbouring bytes turns the byte bag into a bag of byte trigrams (word pieces).
            self.text_conv = nn.Conv1d(config.text_hidden_size, config.text_hidden_size, kernel_size=3, padding=1)
            text_size = config.text_hidden_size
        self.classifier = nn.Sequential(
            nn.Linear(embedding_size + text_size, config.hidden_size), nn.GELU(), nn.Dropout(config.classifier_dropout)
        )
        self.score = nn.Linear(config.hidden_size, 1)
        self.post_init()

    # construction ----------------------------------------------------------------------------------------------------

    @classmethod
    def from_backbone(
        cls, backbone: str | os.PathLike, allow_pickle_weights: bool = False, **config_kwargs: Any
    ) -> MusicRewardModel:
        """A reward head on a pretrained audio encoder, loaded by Hub id or local path; the head starts random.

        ``backbone`` is a CLAP checkpoint (``"laion/larger_clap_music"``, ``"laion/clap-htsat-unfused"``: the audio
        tower and its projection are kept) or an AST checkpoint (``"MIT/ast-finetuned-audioset-10-10-0.4593"``: the
        encoder is kept, its AudioSet classifier dropped). The feature settings are read from the checkpoint's
        feature extractor so that the torch features match what the backbone was trained on. ``config_kwargs`` go to
        :class:`MusicRewardConfig` (e.g. ``hidden_size``, ``text_vocab_size=384`` for prompt conditioning). A backbone
        whose weights are only pickles (``pytorch_model.bin``) raises :class:`~musicrl_trl.loading.ModelLoadingError`
        unless ``allow_pickle_weights=True``.
        """
        backbone_config = AutoConfig.from_pretrained(backbone)
        model_type = backbone_config.model_type
        if model_type in ("clap", "clap_audio_model"):
            load = ClapAudioModelWithProjection.from_pretrained
            encoder = load_pretrained(load, backbone, "reward backbone", allow_pickle_weights=allow_pickle_weights)
            settings = ClapFeatureSettings.from_feature_extractor(ClapFeatureExtractor.from_pretrained(backbone))
            feature_kwargs = dict(
                sampling_rate=settings.sampling_rate,
                num_mel_bins=settings.num_mel_bins,
                n_fft=settings.n_fft,
                hop_length=settings.hop_length,
                f_min=settings.f_min,
                f_max=settings.f_max,
                mel_scale="htk" if settings.fusion else "slaney",
                mel_norm=None if settings.fusion else "slaney",
                max_length_s=settings.max_length_s,
                feature_mean=0.0,  # HTSAT batch-normalises the log-mel itself
                feature_std=1.0,
            )
        elif model_type == "audio-spectrogram-transformer":
            load = ASTModel.from_pretrained
            encoder = load_pretrained(load, backbone, "reward backbone", allow_pickle_weights=allow_pickle_weights)
            extractor = ASTFeatureExtractor.from_pretrained(backbone)
            feature_kwargs = dict(
                sampling_rate=extractor.sampling_rate,
                num_mel_bins=encoder.config.num_mel_bins,
                # Kaldi frames: 25 ms windows every 10 ms, so max_length frames span 25 ms + (max_length - 1) * 10 ms.
                max_length_s=0.025 + (encoder.config.max_length - 1) * 0.010,
                feature_mean=extractor.mean if extractor.do_normalize else 0.0,
                feature_std=2 * extractor.std if extractor.do_normalize else 1.0,
            )
        else:
            raise ValueError(
                f"MusicRewardModel.from_backbone: {os.fspath(backbone)!r} is a {model_type!r} checkpoint; supported "
                "backbones are CLAP (e.g. laion/larger_clap_music) and AST "
                "(e.g. MIT/ast-finetuned-audioset-10-10-0.4593)."
            )
        config = MusicRewardConfig(backbone_config=encoder.config, **feature_kwargs, **config_kwargs)
        model = cls(config)
        model.backbone.load_state_dict(encoder.state_dict())
        # The model starts from the backbone's weights: its card's base_model and inherited licence (musicrl_trl.hub).
        model.name_or_path = model.config.name_or_path = os.fspath(backbone)
        return model

    def save_pretrained(
        self, save_directory: str | os.PathLike, is_main_process: bool = True, push_to_hub: bool = False, **kwargs: Any
    ) -> None:
        """``PreTrainedModel.save_pretrained`` (safetensors) plus the pass-through feature extractor, so that
        ``pipeline("audio-classification", model=save_directory)`` loads the result (``push_to_hub`` uploads both)."""
        hub_keys = ("repo_id", "commit_message", "create_pr", "private")
        hub_kwargs = {key: kwargs.pop(key) for key in hub_keys if key in kwargs}
        super().save_pretrained(save_directory, is_main_process=is_main_process, **kwargs)
        if is_main_process:
            MusicRewardFeatureExtractor(sampling_rate=self.config.sampling_rate).save_pretrained(save_directory)
        if push_to_hub and is_main_process:
            # PreTrainedModel uploads before this method writes the extractor; push_to_hub saves (through this
            # method) into a fresh folder and uploads everything.
            repo_id = hub_kwargs.pop("repo_id", os.path.basename(os.path.normpath(os.fspath(save_directory))))
            self.push_to_hub(repo_id, token=kwargs.get("token"), **hub_kwargs)

    # inputs ----------------------------------------------------------------------------------------------------------

    @staticmethod
    def tokenize_prompts(prompts: list[str], device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """``input_ids`` and ``text_attention_mask`` ``[B, U]`` for a text-conditioned model (ByT5 byte ids)."""
        if isinstance(prompts, str) or not all(isinstance(prompt, str) for prompt in prompts):
            raise ValueError("tokenize_prompts expects a list of strings, one prompt per clip.")
        encoded = _byt5_tokenizer()(list(prompts), padding=True, truncation=True, max_length=512, return_tensors="pt")
        return {
            "input_ids": encoded["input_ids"].to(device),
            "text_attention_mask": encoded["attention_mask"].to(device),
        }

    def _mono_waveforms(self, input_values: torch.Tensor) -> torch.Tensor:
        if not isinstance(input_values, torch.Tensor):
            raise ValueError(
                f"MusicRewardModel: input_values must be a tensor [B, N] or [B, C, N], got {type(input_values)}."
            )
        if input_values.dim() == 3:
            input_values = input_values.mean(dim=1)  # downmix [B, C, N] -> [B, N]
        if input_values.dim() != 2 or input_values.shape[-1] == 0:
            raise ValueError(
                f"MusicRewardModel: input_values must be raw audio of shape [B, N] or [B, C, N], got "
                f"{tuple(input_values.shape)}."
            )
        if not torch.isfinite(input_values).all():
            raise ValueError(
                "MusicRewardModel: input_values contain NaN or inf; sanitise them first, e.g. "
                "`torch.nan_to_num(audio)`."
            )
        return input_values.to(device=self.device, dtype=torch.float32)

    # audio encoding --------------------------------------------------------------------------------------------------

    def _normalise(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.config.feature_mean) / self.config.feature_std

    def _log_mel(self, audio: torch.Tensor) -> torch.Tensor:
        config = self.config
        return log_mel_spectrogram(
            audio,
            config.sampling_rate,
            config.n_fft,
            config.hop_length,
            config.num_mel_bins,
            config.f_min,
            config.f_max,
            mel_scale=config.mel_scale,
            norm=config.mel_norm,
        )

    def _window_embeddings(self, windows: torch.Tensor) -> torch.Tensor:
        """Embed windows ``[W', L]`` (one length, at most the context) with the pretrained backbone -> ``[W', D]``."""
        config = self.config
        dtype = self.backbone.dtype
        if config.backbone_type == "clap_audio_model":
            features = self._normalise(
                self._log_mel(repeat_pad(windows, round(config.max_length_s * config.sampling_rate)))
            )
            features = features.unsqueeze(1)  # [W', 1, F, M]
            if config.backbone_config.enable_fusion:
                # What ClapFeatureExtractor feeds a fusion model for clips up to its context: the same mel 4 times and
                # is_longer False (it would then flag one clip at random; a reward must not).
                features = features.expand(-1, 4, -1, -1)
            is_longer = torch.zeros(features.shape[0], 1, dtype=torch.bool, device=features.device)
            output = self.backbone(input_features=features.to(dtype), is_longer=is_longer)
            return nn.functional.normalize(output.audio_embeds, dim=-1)
        features = ast_features(
            windows,
            config.sampling_rate,
            config.backbone_config.num_mel_bins,
            config.backbone_config.max_length,
            do_normalize=False,
        )
        return self.backbone(input_values=self._normalise(features).to(dtype)).pooler_output

    def _embed_equal_length(self, audio: torch.Tensor) -> torch.Tensor:
        """Embeddings ``[b, D]`` of unpadded mono clips ``[b, N]`` at the model's rate."""
        if self.config.backbone_type == "conv":
            return self.backbone(self._normalise(self._log_mel(audio)).to(self.backbone.projection.weight.dtype))
        # Pretrained backbones have a fixed context: embed context-sized windows of every clip, average per clip.
        windows = split_windows(audio[:, None], self.config.sampling_rate, self.config.max_length_s)  # [b, W, 1, L]
        per_window = self._window_embeddings(windows.flatten(0, 2))  # [b * W, D]
        return per_window.view(windows.shape[0], windows.shape[1], -1).mean(dim=1)

    def embed_audio(
        self, input_values: torch.Tensor, attention_mask: torch.Tensor | None = None, sampling_rate: int | None = None
    ) -> torch.Tensor:
        """Audio embedding ``[B, D]`` of waveforms ``[B, N]`` or ``[B, C, N]`` at ``sampling_rate`` (default: the
        model's).

        ``attention_mask`` ``[B, N]`` (1 = real sample) marks right padding in batches of unequal clips. Padded
        batches are embedded clip by clip on their real samples, so a clip scores the same padded or alone.
        """
        config = self.config
        audio = self._mono_waveforms(input_values)  # [B, N]
        batch_size, num_samples = audio.shape
        rate = (
            config.sampling_rate if sampling_rate is None else check_sampling_rate(sampling_rate, "MusicRewardModel")
        )
        if attention_mask is None:
            lengths = torch.full((batch_size,), num_samples, dtype=torch.long, device=audio.device)
        else:
            lengths = attention_mask.to(audio.device).long().sum(-1)
            if (lengths == 0).any():
                raise ValueError("MusicRewardModel: attention_mask marks a clip with no samples.")
        if rate != config.sampling_rate:
            audio = resample(audio, rate, config.sampling_rate)
            # ceil(length * new / old): the resampled length of each clip's real samples
            lengths = torch.clamp((lengths * config.sampling_rate + rate - 1) // rate, max=audio.shape[-1])
        if bool((lengths == audio.shape[-1]).all()):
            return self._embed_equal_length(audio)
        return torch.cat([self._embed_equal_length(audio[i : i + 1, : int(lengths[i])]) for i in range(batch_size)])

    def embed_text(self, input_ids: torch.Tensor, text_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Prompt embedding ``[B, text_hidden_size]``: byte embeddings, a trigram conv, masked mean."""
        input_ids = input_ids.to(self.device)
        mask = (input_ids != 0) if text_attention_mask is None else text_attention_mask.to(self.device).bool()
        hidden = self.text_embeddings(input_ids)  # [B, U, E]
        hidden = nn.functional.gelu(self.text_conv(hidden.transpose(1, 2))).transpose(1, 2)
        mask = mask.to(hidden.dtype)[..., None]
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    # forward ---------------------------------------------------------------------------------------------------------

    def forward(
        self,
        input_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        text_attention_mask: torch.Tensor | None = None,
        sampling_rate: int | None = None,
        labels: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> SequenceClassifierOutput | tuple:
        r"""Score raw waveforms.

        Args:
            input_values: audio ``[B, N]`` or ``[B, C, N]`` (channels are averaged), float in [-1, 1].
            attention_mask: ``[B, N]``, 1 for real samples, 0 for right padding.
            input_ids: prompt byte ids ``[B, U]`` from :meth:`tokenize_prompts`; required iff the model is
                text-conditioned (``config.text_vocab_size > 0``).
            text_attention_mask: ``[B, U]``; defaults to ``input_ids != 0``.
            sampling_rate: rate of ``input_values``; default ``config.sampling_rate`` (what the pipeline feeds).
            labels: ``[B]`` target scores (e.g. MOS); gives an MSE ``loss``.

        Returns:
            ``SequenceClassifierOutput`` with ``logits`` ``[B, 1]`` (and ``loss`` with labels).
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        embedding = self.embed_audio(input_values, attention_mask, sampling_rate)  # [B, D]
        if self.config.text_vocab_size:
            if input_ids is None:
                raise ValueError(
                    "MusicRewardModel: this model is text-conditioned (config.text_vocab_size > 0); pass the prompts "
                    "as `**model.tokenize_prompts(prompts)`."
                )
            embedding = torch.cat([embedding, self.embed_text(input_ids, text_attention_mask).to(embedding.dtype)], -1)
        elif input_ids is not None:
            raise ValueError(
                "MusicRewardModel: input_ids were passed but this model has no text input (config.text_vocab_size=0)."
            )
        logits = self.score(self.classifier(embedding))  # [B, 1]
        loss = None
        if labels is not None:
            loss = nn.functional.mse_loss(logits.squeeze(-1).float(), labels.to(logits.device).float().view(-1))
        if not return_dict:
            return (logits,) if loss is None else (loss, logits)
        return SequenceClassifierOutput(loss=loss, logits=logits)
