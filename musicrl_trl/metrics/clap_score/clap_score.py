"""CLAP score: how well clips match their text prompts, as the mean CLAP text-audio cosine over 10 s windows."""

import datasets
import evaluate
import torch

from musicrl_trl.evaluation import clap_score

_DESCRIPTION = """\
CLAP score of generated music: for every clip, the cosine similarity between the CLAP embedding of its prompt and the
CLAP embeddings of the clip's windows (10 s by default), averaged over the windows; clap_score is the mean over clips.
This is musicrl_trl's text-adherence reward (TextAdherenceReward), the open stand-in for MusicRL's MuLan score:
deterministic (no random crops), resampled once to CLAP's rate.
"""

_KWARGS_DESCRIPTION = """\
Args:
    prompts: the text prompt of every clip.
    audio: the clips as the rewards take them: a tensor or array [B, C, N] or [B, N], or a list of 1-D clips (lists
        or arrays of float samples in [-1, 1]; clips may differ in length). Channels are averaged to mono.
    sampling_rate: the clips' sampling rate in Hz (32000 for MusicGen).
    model_name_or_path: CLAP checkpoint, Hub id or local path (default "laion/larger_clap_music").
    window_s: window length in seconds (default 10, MusicRL's).
Returns:
    clap_score: mean over clips.
    scores: one score per clip.
"""

_CITATION = """\
@inproceedings{laionclap2023,
    title     = {Large-scale Contrastive Language-Audio Pretraining with Feature Fusion and Keyword-to-Caption
                 Augmentation},
    author    = {Wu, Yusong and Chen, Ke and Zhang, Tianyu and Hui, Yuchen and Berg-Kirkpatrick, Taylor and
                 Dubnov, Shlomo},
    booktitle = {ICASSP},
    year      = 2023
}
"""


def _mono_clips(audio):
    """[B, C, N] or [B, N] (tensor or array), or a list of clips, as a list of 1-D float32 numpy arrays."""
    import numpy as np

    if audio is None:
        return None
    if isinstance(audio, torch.Tensor):
        audio = audio.detach().float().cpu().numpy()
    if isinstance(audio, np.ndarray):
        if audio.ndim not in (2, 3):
            raise ValueError(
                f"audio: expected a [B, C, N] or [B, N] batch of clips, got an array of shape {tuple(audio.shape)}; "
                "wrap a single clip as [clip]."
            )
        audio = list(audio)
    clips = []
    for index, clip in enumerate(audio):
        clip = clip.detach().float().cpu().numpy() if isinstance(clip, torch.Tensor) else np.asarray(clip, "float32")
        if clip.ndim == 2:
            clip = clip.mean(axis=0)  # [C, N] -> mono
        if clip.ndim != 1:
            raise ValueError(f"audio: clip {index} has shape {clip.shape}; give each clip as [N] or [C, N] samples.")
        clips.append(clip.astype("float32"))
    return clips


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ClapScore(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"prompts": datasets.Value("string"), "audio": datasets.Sequence(datasets.Value("float32"))}
            ),
            reference_urls=["https://huggingface.co/laion/larger_clap_music"],
        )

    def compute(self, *, prompts=None, audio=None, **kwargs):
        """``evaluate.Metric.compute`` with ``audio`` in the reward convention (see the module's inputs)."""
        # evaluate checks inputs against `features` (one 1-D float sequence per clip) before `_compute` sees them,
        # and refuses a [B, C, N] tensor with "Module inputs don't match the expected format": convert first.
        return super().compute(prompts=prompts, audio=_mono_clips(audio), **kwargs)

    def _compute(self, prompts, audio, sampling_rate, model_name_or_path="laion/larger_clap_music", window_s=10.0):
        from musicrl_trl.reward_models import TextAdherenceReward

        key = (str(model_name_or_path), float(window_s))
        if getattr(self, "_reward_key", None) != key:  # load the CLAP model once per checkpoint
            self._reward = TextAdherenceReward(str(model_name_or_path), window_s=window_s)
            self._reward_key = key
        scores = []
        for prompt, clip in zip(prompts, audio):  # clips may differ in length: one at a time
            waveform = torch.as_tensor(clip, dtype=torch.float32).reshape(1, 1, -1)
            scores.append(float(clap_score([prompt], waveform, sampling_rate, self._reward)[0]))
        return {"clap_score": sum(scores) / len(scores), "scores": scores}
