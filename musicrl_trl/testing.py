"""Tiny, seeded, offline models for tests and the offline demo.

No weights can be downloaded on the machines this library is developed and tested on, so every test and the
offline demo build their models here: random weights, real architectures, real processors, saved to disk and
reloaded with ``from_pretrained`` exactly as a checkpoint from the Hub would be. The real models load by id with the
same code paths (``MusicgenForConditionalGeneration.from_pretrained("facebook/musicgen-small")``,
``ClapModel.from_pretrained("laion/larger_clap_music")``).

Every builder takes a ``seed`` and gives the same weights for the same seed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

import torch
from transformers import (
    ByT5Tokenizer,
    ClapAudioConfig,
    ClapConfig,
    ClapFeatureExtractor,
    ClapModel,
    ClapProcessor,
    ClapTextConfig,
    EncodecConfig,
    EncodecFeatureExtractor,
    GenerationConfig,
    MusicgenConfig,
    MusicgenDecoderConfig,
    MusicgenForConditionalGeneration,
    MusicgenProcessor,
    RobertaTokenizer,
    T5Config,
)

__all__ = [
    "tiny_musicgen",
    "tiny_musicgen_config",
    "save_tiny_musicgen",
    "tiny_clap",
    "tiny_clap_config",
    "save_tiny_clap",
    "tiny_music_reward",
    "save_tiny_music_reward",
]

# MusicGen's codec runs at 32 kHz with a hop of 640 samples: 50 frames per second, 2048 codes per codebook
# (11 bits). EnCodec derives its number of codebooks from the bandwidth, K = bandwidth / (50 * 11 bits).
TINY_SAMPLING_RATE = 32_000
TINY_UPSAMPLING_RATIOS = (8, 5, 4, 4)
CODEBOOK_SIZE = 2048
TARGET_RMS = 0.1
LOGIT_SCALE = 2.0
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
        raise ValueError(
            f"Stereo MusicGen interleaves left/right codebooks: num_codebooks must be even, got {num_codebooks}."
        )
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


def _structure_lm_heads(model: MusicgenForConditionalGeneration, generator: torch.Generator) -> None:
    # In a trained MusicGen, codes that sound alike get similar logits. Random lm_heads have no such structure,
    # so a policy could only learn an audio reward code by code (2048 per codebook), far too slowly for tests and
    # the demo. Tying each head to its codec codebook through a random projection (logit_v = e_v . R h) lets the
    # decoder steer towards regions of the codec's embedding space, i.e. towards how the audio sounds.
    codec_layers = model.audio_encoder.quantizer.layers
    audio_channels = model.decoder.config.audio_channels
    hidden = model.decoder.config.hidden_size
    for k, head in enumerate(model.decoder.lm_heads):
        embed = codec_layers[k // audio_channels].codebook.embed  # [V, codec dim]
        projection = torch.randn(embed.shape[-1], hidden, generator=generator) / hidden**0.5
        weight = embed @ projection
        # Scaled so that logits spread like a trained model's (a few nats of entropy, not log 2048).
        head.weight.copy_(weight * (LOGIT_SCALE / weight.norm(dim=-1).mean()))


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
        _structure_lm_heads(model, generator)
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
    num_codebooks: int = 4,
    audio_channels: int = 1,
    seed: int = 0,
    save_directory: str | os.PathLike | None = None,
    quantization_config=None,
) -> tuple[MusicgenForConditionalGeneration, MusicgenProcessor]:
    """A tiny random MusicGen (T5 text encoder, EnCodec codec, K-codebook decoder) and its processor.

    Both are saved to ``save_directory`` (a temporary directory if not given) and loaded back with
    ``from_pretrained``, so they go through the same loading path as a Hub checkpoint. The model is in eval mode.
    ``quantization_config`` is passed to ``from_pretrained`` (e.g.
    ``musicrl_trl.quantization.musicgen_quantization_config(load_in_4bit=True)``). Under torch.distributed, rank 0
    builds and saves the model once and every rank loads it (see ``_built_once``).

    >>> model, processor = tiny_musicgen(num_codebooks=4)
    >>> model.decoder.num_codebooks, model.config.sampling_rate
    (4, 32000)
    """
    with _built_once(save_directory, "tiny-musicgen-") as (path, builds_here):
        if builds_here:
            save_tiny_musicgen(path, num_codebooks, audio_channels, seed)
        return _load_tiny_musicgen(path, quantization_config)


def _load_tiny_musicgen(
    path: str, quantization_config=None
) -> tuple[MusicgenForConditionalGeneration, MusicgenProcessor]:
    model = MusicgenForConditionalGeneration.from_pretrained(path, quantization_config=quantization_config)
    processor = MusicgenProcessor.from_pretrained(path)
    return model.eval(), processor


def _distributed_world() -> tuple[int, int]:
    """(rank, world size) of an initialised torch.distributed group, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


@contextlib.contextmanager
def _built_once(save_directory, prefix: str):
    """A directory to build a tiny model in, and whether this process builds it.

    Under torch.distributed (e.g. ``ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2``) ``save_pretrained`` writes
    on rank 0 only, so ranks that each built and saved to their own temporary folder found it empty
    (``OSError: no file named model.safetensors``). Here rank 0 builds in one folder, every rank waits at a barrier
    and loads from it, and rank 0 removes a temporary folder after the last rank has loaded. The ranks must share a
    filesystem (one machine); the tiny models are for tests and the offline demo.
    """
    rank, world_size = _distributed_world()
    if world_size == 1:
        if save_directory is not None:
            yield os.fspath(save_directory), True
            return
        with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
            yield tmp, True
        return
    temporary = save_directory is None
    path = [tempfile.mkdtemp(prefix=prefix) if temporary and rank == 0 else os.fspath(save_directory or "")]
    torch.distributed.broadcast_object_list(path, src=0)
    try:
        if rank == 0:
            yield path[0], True
        else:
            torch.distributed.barrier()  # rank 0 has saved
            yield path[0], False
    finally:
        if rank == 0:
            torch.distributed.barrier()  # releases the other ranks to load
        torch.distributed.barrier()  # every rank has loaded
        if temporary and rank == 0:
            shutil.rmtree(path[0], ignore_errors=True)


# --------------------------------------------------------------------------------------------------------------------
# Tiny CLAP (text-audio embedding model for the text-adherence reward) and tiny MusicRewardModel.
# --------------------------------------------------------------------------------------------------------------------

# A small corpus of music-description words: the tiny CLAP's BPE tokenizer is trained on it offline with the
# `tokenizers` library (the real laion/larger_clap_music uses RoBERTa's 50k BPE vocabulary).
_MUSIC_CORPUS = (
    "upbeat electronic dance music with a bright synth lead and four on the floor kick drum",
    "dark ambient drone with deep sub bass and low rumbling textures",
    "calm solo piano melody, slow tempo, soft and emotional",
    "energetic rock song with distorted electric guitar riffs, bass guitar and live drums",
    "lofi hip hop beat with vinyl crackle, jazzy chords and a relaxed groove",
    "orchestral film score with strings, brass, timpani and a heroic theme",
    "acoustic folk song with fingerpicked guitar, harmonica and warm vocals",
    "shimmering high bells and sparkling glockenspiel over airy pads",
    "heavy metal with fast double bass drums, screaming vocals and aggressive guitars",
    "smooth jazz saxophone solo with upright bass, brushed drums and piano comping",
    "reggae rhythm with offbeat guitar skank, organ bubble and a deep bassline",
    "classical string quartet, violin, viola and cello, baroque counterpoint",
    "funky disco groove with slap bass, wah guitar, horns and claps",
    "chill house track with a mellow bassline, crisp hi hats and a female vocal chop",
    "epic trailer music with huge drums, choir and rising tension",
    "minimal techno loop, hypnotic, repetitive, dark and driving at 128 bpm",
    "happy ukulele tune with whistling and handclaps, cheerful and bright",
    "melancholic cello and piano duet in a minor key, sad and slow",
    "latin salsa with congas, timbales, trumpets and a lively piano montuno",
    "trap beat with booming 808 bass, rolling hi hats and snare",
    "ambient electronic soundscape with evolving synth pads and gentle arpeggios",
    "blues shuffle with harmonica, slide guitar and a walking bass line",
    "country song with banjo, fiddle, pedal steel guitar and a warm male voice",
    "drum and bass with fast breakbeats, reese bass and atmospheric pads",
    "flute and harp playing a peaceful, high, delicate melody in a major key",
)
TINY_CLAP_SAMPLING_RATE = 48_000


def _train_music_bpe(directory: str, vocab_size: int = 600) -> RobertaTokenizer:
    from tokenizers import ByteLevelBPETokenizer

    # RoBERTa's special-token order (<s>=0, <pad>=1, </s>=2, <unk>=3, <mask>=4): ClapTextConfig defaults to
    # bos 0 / pad 1 / eos 2 and computes position ids from the pad id.
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        list(_MUSIC_CORPUS), vocab_size=vocab_size, min_frequency=1,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"], show_progress=False,
    )
    bpe.save_model(directory)
    return RobertaTokenizer(
        vocab=os.path.join(directory, "vocab.json"), merges=os.path.join(directory, "merges.txt"), model_max_length=128
    )


def tiny_clap_config(vocab_size: int) -> ClapConfig:
    """A CLAP config with the real feature layout (64 mel bins, 256 x 256 HTSAT input) and tiny towers."""
    text_config = ClapTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=130,  # 128 tokens + RoBERTa's offset of pad_token_id + 1
    )
    audio_config = ClapAudioConfig(
        window_size=8,
        num_mel_bins=64,
        spec_size=256,
        patch_embeds_hidden_size=16,
        hidden_size=32,  # HTSAT's last stage width: patch_embeds_hidden_size * 2 ** (len(depths) - 1)
        depths=[1, 1],
        num_attention_heads=[1, 2],
        num_hidden_layers=2,
        enable_fusion=False,
    )
    return ClapConfig(text_config=text_config.to_dict(), audio_config=audio_config.to_dict(), projection_dim=16)


def save_tiny_clap(save_directory: str | os.PathLike, seed: int = 0) -> str:
    """Build the tiny CLAP and its ``ClapProcessor`` and save both to ``save_directory`` (safetensors)."""
    save_directory = os.fspath(save_directory)
    os.makedirs(save_directory, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tiny-clap-bpe-") as tmp:
        tokenizer = _train_music_bpe(tmp)
    torch_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = ClapModel(tiny_clap_config(len(tokenizer)))
    finally:
        torch.random.set_rng_state(torch_state)
    with torch.no_grad():
        # HTSAT batch-normalises each mel bin with running statistics; a fresh BatchNorm assumes mean 0 and
        # variance 1, but log-mels of music sit around -20 dB with a spread of ~20 dB. Statistics of that size make
        # the tiny model's embeddings depend on the audio instead of saturating.
        model.audio_model.audio_encoder.batch_norm.running_mean.fill_(-20.0)
        model.audio_model.audio_encoder.batch_norm.running_var.fill_(20.0**2)
    # The settings of laion/larger_clap_music's extractor (non-fusion: Slaney mel filters, one mel channel).
    feature_extractor = ClapFeatureExtractor(
        feature_size=64,
        sampling_rate=TINY_CLAP_SAMPLING_RATE,
        hop_length=480,
        max_length_s=10,
        fft_window_size=1024,
        frequency_min=50,
        frequency_max=14_000,
        truncation="rand_trunc",
        padding="repeatpad",
    )
    model.save_pretrained(save_directory)
    ClapProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer).save_pretrained(save_directory)
    return save_directory


def tiny_clap(seed: int = 0, save_directory: str | os.PathLike | None = None) -> tuple[ClapModel, ClapProcessor]:
    """A tiny random CLAP (HTSAT audio tower, RoBERTa text tower, 16-dim embeddings) and its ``ClapProcessor``.

    The tokenizer is a byte-level BPE trained offline on a built-in corpus of music descriptions. Both are saved to
    ``save_directory`` (a temporary directory if not given) and loaded back with ``from_pretrained``. Eval mode.

    >>> model, processor = tiny_clap()
    >>> model.config.projection_dim, processor.feature_extractor.sampling_rate
    (16, 48000)
    """
    if save_directory is None:
        with tempfile.TemporaryDirectory(prefix="tiny-clap-") as tmp:
            return _load_tiny_clap(save_tiny_clap(tmp, seed))
    return _load_tiny_clap(save_tiny_clap(save_directory, seed))


def _load_tiny_clap(path: str) -> tuple[ClapModel, ClapProcessor]:
    model = ClapModel.from_pretrained(path)
    processor = ClapProcessor.from_pretrained(path)
    return model.eval(), processor


def save_tiny_music_reward(save_directory: str | os.PathLike, seed: int = 0, text_conditioned: bool = False) -> str:
    """Build a tiny :class:`~musicrl_trl.reward_models.MusicRewardModel` (built-in conv encoder) and save it.

    The pass-through feature extractor is saved beside it, so ``pipeline("audio-classification")`` loads the directory.
    """
    from musicrl_trl.reward_models import MusicRewardConfig, MusicRewardModel

    config = MusicRewardConfig(
        conv_channels=[8, 16, 32],
        hidden_size=32,
        sampling_rate=16_000,
        text_vocab_size=BYT5_VOCAB_SIZE if text_conditioned else 0,
        text_hidden_size=16,
    )
    torch_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = MusicRewardModel(config)
    finally:
        torch.random.set_rng_state(torch_state)
    with torch.no_grad():
        # An untrained head (normal init, std 0.02) scores every clip within ~1e-3 of the others. Calibrate it on a
        # fixed set of probe clips (noise at several levels, low and high tones) so that its scores spread like MOS
        # ratings (std 0.5 around 3, the middle of the 1-5 scale): tiny-model rewards then vary with the audio and
        # QualityReward's rescaled score sits near 0.5.
        generator = torch.Generator().manual_seed(seed)
        time = torch.arange(16_000) / 16_000
        probes = [level * torch.randn(16_000, generator=generator) for level in (0.01, 0.05, 0.1, 0.3)]
        probes += [0.3 * torch.sin(2 * torch.pi * frequency * time) for frequency in (110.0, 440.0, 1760.0, 5000.0)]
        probes = torch.stack(probes)
        text = model.tokenize_prompts(["calm piano"] * len(probes)) if text_conditioned else {}
        logits = model(probes, sampling_rate=16_000, **text).logits[:, 0]
        scale = 0.5 / logits.std().clamp_min(1e-12)
        model.score.weight.mul_(scale)
        model.score.bias.copy_(3.0 - (logits.mean() - model.score.bias) * scale)  # mean over the probes: 3
    model.save_pretrained(save_directory)
    return os.fspath(save_directory)


def tiny_music_reward(
    seed: int = 0, save_directory: str | os.PathLike | None = None, text_conditioned: bool = False
):
    """A tiny random ``MusicRewardModel`` (16 kHz log-mel conv encoder, ~10k parameters), saved and reloaded.

    Reloaded with ``AutoModelForAudioClassification.from_pretrained`` (the path a trained reward model takes), in
    eval mode. ``text_conditioned`` adds the byte-level prompt input. Returns the model only: its feature extractor
    is a pass-through that the model does not need.

    >>> model = tiny_music_reward()
    >>> model.config.model_type, model.config.sampling_rate
    ('music_reward', 16000)
    """
    from transformers import AutoModelForAudioClassification

    if save_directory is None:
        with tempfile.TemporaryDirectory(prefix="tiny-music-reward-") as tmp:
            save_tiny_music_reward(tmp, seed, text_conditioned)
            return AutoModelForAudioClassification.from_pretrained(tmp).eval()
    save_tiny_music_reward(save_directory, seed, text_conditioned)
    return AutoModelForAudioClassification.from_pretrained(save_directory).eval()
