"""Tiny, seeded, offline models for tests and the offline demo.

No weights can be downloaded on the machines this library is developed and tested on, so every test and the
offline demo build their models here: random weights, real architectures, real processors, saved to disk and
reloaded with ``from_pretrained`` exactly as a checkpoint from the Hub would be. The real models load by id with the
same code paths (``MusicgenForConditionalGeneration.from_pretrained("facebook/musicgen-small")``,
``ClapModel.from_pretrained("laion/larger_clap_music")``).

Every builder takes a ``seed`` and gives the same weights for the same seed.
"""

from __future__ import annotations

import os
import tempfile

import torch
from transformers import (
    ByT5Tokenizer,
    EncodecConfig,
    EncodecFeatureExtractor,
    GenerationConfig,
    MusicgenConfig,
    MusicgenDecoderConfig,
    MusicgenForConditionalGeneration,
    MusicgenProcessor,
    T5Config,
)

__all__ = ["tiny_musicgen", "tiny_musicgen_config", "save_tiny_musicgen"]

# MusicGen's codec runs at 32 kHz with a hop of 640 samples: 50 frames per second, 2048 codes per codebook
# (11 bits). EnCodec derives its number of codebooks from the bandwidth, K = bandwidth / (50 * 11 bits).
TINY_SAMPLING_RATE = 32_000
TINY_UPSAMPLING_RATIOS = (8, 5, 4, 4)
CODEBOOK_SIZE = 2048
TARGET_RMS = 0.1
# ByT5 has 256 byte ids + 3 specials + 125 sentinels = 384 ids and needs no vocabulary file.
BYT5_VOCAB_SIZE = 384


def tiny_musicgen_config(num_codebooks: int = 4, audio_channels: int = 1) -> MusicgenConfig:
    """A MusicGen config with the real codebook layout (2048 codes, 50 Hz, delay pattern) and tiny layers.

    ``num_codebooks`` is the decoder's K. Stereo models (``audio_channels=2``) interleave left and right codebooks,
    so K must be even and the codec itself quantises each channel with K / 2 codebooks, as in
    ``facebook/musicgen-stereo-small`` (K = 8).
    """
    if audio_channels not in (1, 2):
        raise ValueError(f"audio_channels must be 1 (mono) or 2 (stereo), got {audio_channels}.")
    if audio_channels == 2 and num_codebooks % 2:
        raise ValueError(f"Stereo MusicGen interleaves left/right codebooks: num_codebooks must be even, got {num_codebooks}.")
    codec_codebooks = num_codebooks // audio_channels
    frame_rate = TINY_SAMPLING_RATE // (8 * 5 * 4 * 4)
    # A hair above the exact value so that float rounding in EncodecConfig.num_quantizers never drops a codebook.
    bandwidth_kbps = codec_codebooks * frame_rate * 11 / 1000 + 1e-4
    text_encoder = T5Config(
        vocab_size=BYT5_VOCAB_SIZE,
        d_model=32,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        dropout_rate=0.1,
        feed_forward_proj="relu",
        pad_token_id=0,
        eos_token_id=1,
    )
    audio_encoder = EncodecConfig(
        sampling_rate=TINY_SAMPLING_RATE,
        audio_channels=1,
        target_bandwidths=[bandwidth_kbps],
        codebook_size=CODEBOOK_SIZE,
        hidden_size=16,
        num_filters=4,
        num_residual_layers=1,
        num_lstm_layers=1,
        upsampling_ratios=list(TINY_UPSAMPLING_RATIOS),
        use_causal_conv=False,
        normalize=False,
        chunk_length_s=None,
        overlap=None,
    )
    decoder = MusicgenDecoderConfig(
        vocab_size=CODEBOOK_SIZE,
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_codebooks=num_codebooks,
        audio_channels=audio_channels,
        max_position_embeddings=2048,
        dropout=0.1,
        attention_dropout=0.0,
        activation_dropout=0.0,
        pad_token_id=CODEBOOK_SIZE,
        bos_token_id=CODEBOOK_SIZE,
        decoder_start_token_id=CODEBOOK_SIZE,
    )
    config = MusicgenConfig(text_encoder=text_encoder, audio_encoder=audio_encoder, decoder=decoder)
    if config.audio_encoder.num_quantizers != codec_codebooks:
        raise RuntimeError(
            f"tiny codec has {config.audio_encoder.num_quantizers} codebooks, expected {codec_codebooks}"
        )
    return config


def _randomise_codec(model: MusicgenForConditionalGeneration, generator: torch.Generator) -> None:
    # A fresh EncodecModel has all-zero codebooks (every code decodes to the same audio) and decoder biases that
    # dominate the output. Random codebook vectors and zero decoder biases make the audio depend on the codes,
    # so that audio rewards vary with what the policy samples and learning is visible.
    codec = model.audio_encoder
    for layer in codec.quantizer.layers:
        dim = layer.codebook.embed.shape[-1]
        layer.codebook.embed.copy_(torch.randn(layer.codebook.embed.shape, generator=generator) / dim**0.5)
        layer.codebook.embed_avg.copy_(layer.codebook.embed)
    for name, param in codec.decoder.named_parameters():
        if name.endswith("bias"):
            param.zero_()
    # Tiny random conv stacks output audio near 1e-3; rescale the last conv (its weight-norm gain) so that random
    # codes decode to a level real music has (RMS about 0.1), which keeps loudness-style rewards meaningful.
    codes = torch.randint(0, CODEBOOK_SIZE, (1, 2, len(codec.quantizer.layers), 50), generator=generator)
    rms = codec.decode(codes, [None]).audio_values.pow(2).mean().sqrt()
    last_conv = codec.decoder.layers[-1].conv
    last_conv.parametrizations.weight.original0.mul_(TARGET_RMS / rms)


def _musicgen_generation_config(num_codebooks: int) -> GenerationConfig:
    # The same sampling defaults facebook/musicgen-small ships with (top-k 250, CFG 3), so that code written
    # against the tiny model behaves as it will against the real one.
    return GenerationConfig(
        do_sample=True,
        guidance_scale=3.0,
        top_k=250,
        max_length=1500,
        pad_token_id=CODEBOOK_SIZE,
        bos_token_id=CODEBOOK_SIZE,
        decoder_start_token_id=CODEBOOK_SIZE,
    )


def save_tiny_musicgen(
    save_directory: str | os.PathLike, num_codebooks: int = 4, audio_channels: int = 1, seed: int = 0
) -> str:
    """Build the tiny MusicGen and its processor and save both to ``save_directory`` (safetensors)."""
    config = tiny_musicgen_config(num_codebooks, audio_channels)
    generator = torch.Generator().manual_seed(seed)
    torch_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = MusicgenForConditionalGeneration(config)
    finally:
        torch.random.set_rng_state(torch_state)
    with torch.no_grad():
        _randomise_codec(model, generator)
    model.generation_config = _musicgen_generation_config(num_codebooks)
    processor = MusicgenProcessor(
        feature_extractor=EncodecFeatureExtractor(
            feature_size=audio_channels, sampling_rate=TINY_SAMPLING_RATE, padding_value=0.0
        ),
        tokenizer=ByT5Tokenizer(),
    )
    model.save_pretrained(save_directory)
    processor.save_pretrained(save_directory)
    return str(save_directory)


def tiny_musicgen(
    num_codebooks: int = 4, audio_channels: int = 1, seed: int = 0, save_directory: str | os.PathLike | None = None
) -> tuple[MusicgenForConditionalGeneration, MusicgenProcessor]:
    """A tiny random MusicGen (T5 text encoder, EnCodec codec, K-codebook decoder) and its processor.

    Both are saved to ``save_directory`` (a temporary directory if not given) and loaded back with
    ``from_pretrained``, so they go through the same loading path as a Hub checkpoint. The model is in eval mode.

    >>> model, processor = tiny_musicgen(num_codebooks=4)
    >>> model.decoder.num_codebooks, model.config.sampling_rate
    (4, 32000)
    """
    if save_directory is None:
        with tempfile.TemporaryDirectory(prefix="tiny-musicgen-") as tmp:
            return _load_tiny_musicgen(save_tiny_musicgen(tmp, num_codebooks, audio_channels, seed))
    return _load_tiny_musicgen(save_tiny_musicgen(save_directory, num_codebooks, audio_channels, seed))


def _load_tiny_musicgen(path: str) -> tuple[MusicgenForConditionalGeneration, MusicgenProcessor]:
    model = MusicgenForConditionalGeneration.from_pretrained(path)
    processor = MusicgenProcessor.from_pretrained(path)
    return model.eval(), processor
