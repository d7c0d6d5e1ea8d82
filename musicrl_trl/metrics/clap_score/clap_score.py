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
    audio: every clip as a list of float samples in [-1, 1] (mono).
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
