"""Configuration of :class:`~musicrl_trl.reward_models.MusicRewardModel` (model_type ``music_reward``)."""

from __future__ import annotations

from typing import Any

from transformers import CONFIG_MAPPING, AutoConfig, PreTrainedConfig

__all__ = ["MusicRewardConfig", "SUPPORTED_BACKBONES"]

# Backbone model types the head can wrap, with what they are for. `None` (no backbone config) is the built-in log-mel
# conv encoder for tiny and offline use.
SUPPORTED_BACKBONES = {
    "clap_audio_model": "CLAP's HTSAT audio tower, e.g. from laion/larger_clap_music (48 kHz log-mel, 10 s context)",
    "audio-spectrogram-transformer": "AST, e.g. MIT/ast-finetuned-audioset-10-10-0.4593 (16 kHz Kaldi fbank, 10.24 s)",
}


class MusicRewardConfig(PreTrainedConfig):
    r"""Configuration of a scalar audio reward head: MOS regression or Bradley-Terry preference score.

    The model maps raw waveforms (any rate; resampled on device to ``sampling_rate``), optionally with a text prompt,
    to one logit per clip. Its parameters fall into four groups.

    Parameters that choose the audio backbone:
        backbone_config (`dict` or `PreTrainedConfig`, *optional*):
            A transformers config of the audio encoder: a `ClapAudioConfig` (model_type ``clap_audio_model``) or an
            `ASTConfig` (``audio-spectrogram-transformer``). `None` selects the built-in log-mel conv encoder
            (``conv_channels``), small enough for tests and CPU demos. Use
            `MusicRewardModel.from_backbone(id_or_path)` to start from pretrained backbone weights; it fills in the
            feature settings below from the backbone's feature extractor.
        conv_channels (`list[int]`, *optional*, defaults to `[16, 32, 64]`):
            Channels of the built-in encoder's stride-2 3x3 conv layers (only without a backbone config).

    Parameters that control feature extraction (done in torch, on the model's device, deterministically):
        sampling_rate (`int`, *optional*, defaults to 16000):
            Rate the features are computed at; inputs at other rates are resampled first.
        num_mel_bins, n_fft, hop_length, f_min, f_max, mel_scale, mel_norm:
            Log-mel settings (dB power mel spectrogram) for the conv and CLAP backbones. For AST, ``num_mel_bins`` is
            the Kaldi fbank size and framing is Kaldi's fixed 25 ms / 10 ms.
        max_length_s (`float`, *optional*):
            The backbone's context in seconds. Longer clips are cut into windows of this length
            (`musicrl_trl.audio.split_windows`, last window shifted to the end) whose embeddings are averaged; shorter
            clips are repeat-padded (CLAP) or zero-padded (AST). `None` (conv encoder) takes any length whole.
        feature_mean, feature_std (`float`):
            Features are normalised as ``(x - feature_mean) / feature_std`` before the encoder (AST: its extractor's
            mean and twice its std; CLAP: 0 and 1, its BatchNorm normalises).

    Parameters of the head:
        hidden_size (`int`, *optional*, defaults to 64):
            Width of the conv encoder's output projection and of the scoring MLP.
        text_vocab_size (`int`, *optional*, defaults to 0):
            0 for an audio-only model. Otherwise the prompt is embedded as a bag of byte n-grams from
            `ByT5Tokenizer` ids (vocabulary 384; `MusicRewardModel.tokenize_prompts` makes them) and concatenated with
            the audio embedding.
        text_hidden_size (`int`, *optional*, defaults to 32):
            Width of the prompt embedding.
        classifier_dropout (`float`, *optional*, defaults to 0.0):
            Dropout before the last layer (training only; rewards run in eval mode).
        initializer_range (`float`, *optional*, defaults to 0.02):
            Std of the normal init of linear and embedding layers.

    The head always has one output (``num_labels=1``, label ``"score"``) and ``problem_type="regression"``: `labels`
    give an MSE loss (MOS regression) and ``pipeline("audio-classification")`` reports the raw score. Pairwise
    Bradley-Terry training calls the model on both clips and compares the logits.

    >>> config = MusicRewardConfig()
    >>> config.model_type, config.num_labels, config.id2label
    ('music_reward', 1, {0: 'score'})
    """

    model_type = "music_reward"
    sub_configs = {"backbone_config": AutoConfig}

    def __init__(
        self,
        backbone_config: dict[str, Any] | PreTrainedConfig | None = None,
        conv_channels: list[int] | tuple[int, ...] = (16, 32, 64),
        sampling_rate: int = 16_000,
        num_mel_bins: int = 64,
        n_fft: int = 512,
        hop_length: int = 256,
        f_min: float = 0.0,
        f_max: float | None = None,
        mel_scale: str = "slaney",
        mel_norm: str | None = "slaney",
        max_length_s: float | None = None,
        feature_mean: float = -40.0,
        feature_std: float = 20.0,
        hidden_size: int = 64,
        text_vocab_size: int = 0,
        text_hidden_size: int = 32,
        classifier_dropout: float = 0.0,
        initializer_range: float = 0.02,
        **kwargs: Any,
    ) -> None:
        if isinstance(backbone_config, dict):
            model_type = backbone_config.get("model_type")
            if model_type not in SUPPORTED_BACKBONES:
                raise ValueError(
                    f"MusicRewardConfig: unsupported backbone model_type {model_type!r}; supported: "
                    f"{sorted(SUPPORTED_BACKBONES)} or None for the built-in conv encoder."
                )
            backbone_config = CONFIG_MAPPING[model_type](**backbone_config)
        if backbone_config is not None and backbone_config.model_type not in SUPPORTED_BACKBONES:
            raise ValueError(
                f"MusicRewardConfig: unsupported backbone {type(backbone_config).__name__} "
                f"(model_type {backbone_config.model_type!r}); supported: {sorted(SUPPORTED_BACKBONES)}. "
                "For a full ClapConfig pass its `audio_config`."
            )
        if kwargs.get("num_labels", 1) != 1 or len(kwargs.get("id2label") or {0: "score"}) != 1:
            raise ValueError("MusicRewardConfig: the head predicts one scalar score; num_labels must be 1.")
        if text_vocab_size < 0:
            raise ValueError(
                f"MusicRewardConfig: text_vocab_size must be >= 0 (0 = no text input), got {text_vocab_size}."
            )
        if feature_std <= 0:
            raise ValueError(f"MusicRewardConfig: feature_std must be positive, got {feature_std}.")
        self.backbone_config = backbone_config
        self.conv_channels = list(conv_channels)
        self.sampling_rate = int(sampling_rate)
        self.num_mel_bins = num_mel_bins
        self.n_fft = n_fft
        self.hop_length = hop_length
        self.f_min = f_min
        self.f_max = f_max
        self.mel_scale = mel_scale
        self.mel_norm = mel_norm
        self.max_length_s = max_length_s
        self.feature_mean = feature_mean
        self.feature_std = feature_std
        self.hidden_size = hidden_size
        self.text_vocab_size = text_vocab_size
        self.text_hidden_size = text_hidden_size
        self.classifier_dropout = classifier_dropout
        self.initializer_range = initializer_range
        kwargs["id2label"] = {0: "score"}
        kwargs["label2id"] = {"score": 0}
        kwargs.setdefault("problem_type", "regression")
        super().__init__(**kwargs)

    @property
    def backbone_type(self) -> str:
        """``"conv"`` (built-in), ``"clap_audio_model"`` or ``"audio-spectrogram-transformer"``."""
        return "conv" if self.backbone_config is None else self.backbone_config.model_type
