"""MusicDPOTrainer: losses against slow loops, sequence log-probs against the RL code's teacher forcing, the data it
reads (export-style audio, codes as stored, ties, corrupt rows), a learning test on the tiny model, the LoRA
reference, saving and checkpoints."""

import io
import math
import os

import pytest
import soundfile as sf
import torch
from datasets import Dataset, Features
from safetensors.torch import load_file

from musicrl_trl import MusicDPOConfig, MusicDPOTrainer, SamplingConfig, generate_rollout
from musicrl_trl.app.export import AUDIO_CELL, FEATURES
from musicrl_trl.audio import encode
from musicrl_trl.rollout import teacher_forced_logprobs, tokenize_prompts, unwrap_musicgen
from musicrl_trl.testing import tiny_musicgen
from musicrl_trl.trainers.dpo_loss import dpo_loss, sequence_logprobs

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["calm piano", "fast drums"]


@pytest.fixture(scope="module")
def tiny():
    return tiny_musicgen()


def fresh_model():
    return tiny_musicgen()[0]


def config(tmp_path, **overrides):
    values = dict(per_device_train_batch_size=4, max_steps=2, learning_rate=1e-3, report_to=[], logging_steps=1,
                  save_strategy="no", disable_tqdm=True, lr_scheduler_type="constant", seed=0)  # fmt: skip
    values.update(overrides)
    return MusicDPOConfig(str(tmp_path / "out"), **values)


def rollout(model, processor, count, seed=0, num_steps=12, sampling=None):
    torch.manual_seed(seed)
    prompts = [PROMPTS[index % 2] for index in range(count)]
    return generate_rollout(model, processor, prompts, num_steps=num_steps, sampling=sampling or SamplingConfig())


def code_pairs(model, processor, pairs=4, seed=0):
    """``pairs`` pairs of sampled clips of the same prompt (clip i against clip i + pairs), as stored codes."""
    sample = rollout(model, processor, 2 * pairs, seed)
    codes = sample.codes.tolist()
    rows = {"prompt": sample.prompts[:pairs], "chosen_codes": codes[:pairs], "rejected_codes": codes[pairs:]}
    return Dataset.from_dict(rows), sample


# ------------------------------------------------------------------------------------------------ the loss
def slow_dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta, loss_type, smoothing):
    losses = []
    for c, r, rc, rr in zip(chosen.tolist(), rejected.tolist(), ref_chosen.tolist(), ref_rejected.tolist()):
        h = (c - r) - (rc - rr)
        log_sigmoid = lambda x: -math.log1p(math.exp(-x))  # noqa: E731
        if loss_type == "sigmoid":
            loss = -(1 - smoothing) * log_sigmoid(beta * h) - smoothing * log_sigmoid(-beta * h)
        elif loss_type == "ipo":
            loss = (h - 1 / (2 * beta)) ** 2
        elif loss_type == "hinge":
            loss = max(0.0, 1 - beta * h)
        else:
            loss = -(1 - smoothing) * log_sigmoid(beta * h) + smoothing * log_sigmoid(-beta * h)
            loss /= 1 - 2 * smoothing
        losses.append(loss)
    return torch.tensor(losses, dtype=torch.float64)


@pytest.mark.parametrize(
    "loss_type, smoothing", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0), ("hinge", 0.0), ("robust", 0.1)]
)
def test_losses_match_slow_reference(loss_type, smoothing):
    generator = torch.Generator().manual_seed(0)
    logps = [torch.randn(16, generator=generator, dtype=torch.float64) * 5 - 100 for _ in range(4)]
    losses, chosen_rewards, rejected_rewards = dpo_loss(*logps, beta=0.3, loss_type=loss_type,
                                                        label_smoothing=smoothing)  # fmt: skip
    torch.testing.assert_close(losses, slow_dpo_loss(*logps, 0.3, loss_type, smoothing))
    torch.testing.assert_close(chosen_rewards, 0.3 * (logps[0] - logps[2]))
    torch.testing.assert_close(rejected_rewards, 0.3 * (logps[1] - logps[3]))


def test_loss_gradient_raises_chosen_and_lowers_rejected():
    chosen, rejected = torch.tensor([-10.0], requires_grad=True), torch.tensor([-10.0], requires_grad=True)
    loss, _, _ = dpo_loss(chosen, rejected, torch.tensor([-10.0]), torch.tensor([-10.0]), beta=0.1)
    loss.sum().backward()
    assert chosen.grad.item() < 0 < rejected.grad.item()


# ------------------------------------------------------------------------------------------------ log-probs
@pytest.mark.parametrize("sampling", [SamplingConfig(), SamplingConfig(guidance_scale=3.0, temperature=0.9)])
def test_sequence_logprobs_are_the_rl_teacher_forced_logprobs_summed(tiny, sampling):
    model, processor = tiny
    sample = rollout(model, processor, 3, seed=1, sampling=sampling)
    pad = model.decoder.config.pad_token_id
    with torch.no_grad():
        full = sequence_logprobs(model, sample.prompt_ids, sample.prompt_mask, sample.codes,
                                 torch.ones(3, sample.codes.shape[-1]), sampling, pad)  # fmt: skip
        tf = teacher_forced_logprobs(model, sample.prompt_ids, sample.prompt_mask, sample.grid, sampling)
    # The rollout's own log-probs (what the RL trainer's ratios start from) and one teacher-forced forward.
    torch.testing.assert_close(full, sample.logprobs.sum(dim=(1, 2)), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(full, tf.sum(dim=(1, 2)), rtol=1e-5, atol=1e-4)

    # A clip cut short and right-padded counts only its real frames: padding after it changes nothing (causal).
    codes, mask = sample.codes.clone(), torch.ones(3, sample.codes.shape[-1])
    keep = codes.shape[-1] - 3
    codes[1, :, keep:], mask[1, keep:] = pad, 0
    with torch.no_grad():
        padded = sequence_logprobs(model, sample.prompt_ids, sample.prompt_mask, codes, mask, sampling, pad)
        alone = sequence_logprobs(model, sample.prompt_ids[1:2], sample.prompt_mask[1:2], sample.codes[1:2, :, :keep],
                                  torch.ones(1, keep), sampling, pad)  # fmt: skip
    torch.testing.assert_close(padded[1], alone[0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(padded[[0, 2]], full[[0, 2]])


def test_top_k_does_not_enter_the_logprobs(tiny):
    model, processor = tiny
    sample = rollout(model, processor, 2, seed=2)
    pad = model.decoder.config.pad_token_id
    mask = torch.ones(2, sample.codes.shape[-1])
    with torch.no_grad():
        plain = sequence_logprobs(model, sample.prompt_ids, sample.prompt_mask, sample.codes, mask, SamplingConfig(),
                                  pad)  # fmt: skip
        cut = sequence_logprobs(model, sample.prompt_ids, sample.prompt_mask, sample.codes, mask,
                                SamplingConfig(top_k=1), pad)  # fmt: skip
    assert torch.isfinite(cut).all()
    torch.testing.assert_close(plain, cut)


# ------------------------------------------------------------------------------------------------ data
def wav_cell(audio, rate, name):
    buffer = io.BytesIO()
    sf.write(buffer, audio.numpy().T, rate, format="WAV", subtype="FLOAT")
    return {"bytes": buffer.getvalue(), "path": name}


def export_style_dataset(audio, rate):
    """Rows exactly as ``musicrl-app export`` writes them (Audio columns with embedded bytes, tie, bookkeeping)."""
    rows = {name: [] for name in FEATURES}
    for index, (a, b, tie) in enumerate([(0, 1, False), (2, 3, False), (0, 2, True)]):
        rows["prompt"].append(PROMPTS[0])
        rows["chosen"].append(wav_cell(audio[a], rate, f"clip{a}.wav"))
        rows["rejected"].append(wav_cell(audio[b], rate, f"clip{b}.wav"))
        rows["tie"].append(tie)
        for column in ("rater", "created_at", "pair_id", "chosen_clip_id", "rejected_clip_id", "chosen_system",
                       "rejected_system", "reason", "mode"):  # fmt: skip
            rows[column].append(f"{column}{index}")
    features = Features({**FEATURES, "chosen": AUDIO_CELL, "rejected": AUDIO_CELL})
    return Dataset.from_dict(rows, features=features).cast(FEATURES)


def test_export_dataset_trains_without_conversion(tiny, tmp_path):
    model, processor = tiny
    sample = rollout(model, processor, 4, seed=3)
    dataset = export_style_dataset(sample.audio, sample.sampling_rate)
    policy = fresh_model()
    before = {name: p.detach().clone() for name, p in policy.named_parameters() if p.requires_grad}
    trainer = MusicDPOTrainer(policy, args=config(tmp_path, per_device_train_batch_size=2), train_dataset=dataset,
                              processing_class=processor)  # fmt: skip
    assert trainer.num_ties_skipped == 1 and len(trainer.train_dataset) == 2
    # Audio is encoded with the policy's own codec, once, as it was stored.
    expected = encode(policy.audio_encoder, sample.audio[:1], sample.sampling_rate)[0]
    assert torch.equal(torch.tensor(trainer.train_dataset[0]["chosen_codes"]), expected)
    trainer.train()
    logged = trainer.state.log_history[0]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected"):  # fmt: skip
        assert math.isfinite(logged[key]), key
    assert logged["num_ties_skipped"] == 1
    changed = [name for name, p in policy.named_parameters() if name in before and not torch.equal(p, before[name])]
    decoder = [name for name in before if name.startswith("decoder.")]
    assert set(decoder) <= set(changed)


def test_audio_at_another_rate_is_resampled_before_encoding(tiny, tmp_path):
    model, processor = tiny
    sample = rollout(model, processor, 4, seed=3)
    half_rate = sample.audio[:, :, ::2]
    dataset = Dataset.from_dict({
        "prompt": PROMPTS[:2],
        "chosen": [{"array": half_rate[0, 0].numpy(), "sampling_rate": 16_000}] * 2,
        "rejected": [{"array": half_rate[1, 0].numpy(), "sampling_rate": 16_000}] * 2,
    })  # fmt: skip
    trainer = MusicDPOTrainer(fresh_model(), args=config(tmp_path), train_dataset=dataset, processing_class=processor)
    assert len(trainer.train_dataset[0]["chosen_codes"][0]) == sample.codes.shape[-1]


def test_codes_given_directly_are_used_as_stored(tiny, tmp_path):
    model, processor = tiny
    pairs, _ = code_pairs(model, processor, pairs=2)
    policy = fresh_model()
    trainer = MusicDPOTrainer(policy, args=config(tmp_path), train_dataset=pairs, processing_class=processor)
    assert list(trainer.train_dataset["chosen_codes"]) == list(pairs["chosen_codes"])
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    stored = torch.tensor(list(pairs["chosen_codes"]) + list(pairs["rejected_codes"]))
    assert torch.equal(batch["codes"], stored) and batch["frame_mask"].all()
    # The trainer's log-probs are the RL code's teacher-forced log-probs of exactly these codes.
    ids, mask = tokenize_prompts(processor, list(pairs["prompt"]) * 2)
    from musicrl_trl.codebooks import codes_to_grid

    grid = codes_to_grid(stored, policy.decoder.config.pad_token_id)
    with torch.no_grad():
        expected = teacher_forced_logprobs(policy, ids, mask, grid, SamplingConfig()).sum(dim=(1, 2))
        got = trainer.sequence_logps(policy, batch)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)


class FakeStore:
    """The votes a ``Store`` would return (the export reads only ``votes()``)."""

    def __init__(self, votes):
        self._votes = votes

    def votes(self):
        return self._votes


def test_pool_keeps_each_clips_codes_and_the_export_carries_them_into_dpo(tmp_path):
    from musicrl_trl.app.export import votes_to_dataset
    from musicrl_trl.app.pool import load_pool, make_pool
    from musicrl_trl.rollout import decode_codes
    from musicrl_trl.testing import save_tiny_musicgen

    policy_dir = save_tiny_musicgen(tmp_path / "policy")
    pool = make_pool([str(policy_dir)], PROMPTS[:1], clips_per_prompt=3, out=tmp_path / "pool", response_length=12,
                     device="cpu")  # fmt: skip
    ids = sorted(pool.clips)
    assert load_pool(tmp_path / "pool").clips[ids[0]].codes == pool.clips[ids[0]].codes is not None
    model, processor = tiny_musicgen(save_directory=policy_dir)
    wav, _ = sf.read(pool.path_of(ids[0]), dtype="float32")
    decoded = decode_codes(model, pool.codes_of(ids[0])[None])[0, 0]
    assert torch.allclose(decoded.clamp(-1, 1), torch.from_numpy(wav), atol=1 / 2**14)  # the clip's own tokens
    votes = [{"clip_a": a, "clip_b": b, "choice": choice, "prompt": PROMPTS[0], "rater": "r", "created_at": "t",
              "pair_id": f"{a}|{b}", "reason": "", "mode": "collect"}
             for a, b, choice in [(ids[0], ids[1], "b"), (ids[1], ids[2], "a"), (ids[0], ids[2], "tie")]]  # fmt: skip
    dataset, _ = votes_to_dataset(FakeStore(votes), pool)
    assert dataset["chosen_codes"][0] == pool.codes_of(ids[1]).tolist()
    trainer = MusicDPOTrainer(model, args=config(tmp_path), train_dataset=dataset, processing_class=processor)
    assert trainer.input_kind == "codes" and trainer.num_ties_skipped == 1
    assert trainer.train_dataset["rejected_codes"][1] == pool.codes_of(ids[2]).tolist()


def test_corrupt_rows_are_named_with_their_row_number(tiny, tmp_path):
    model, processor = tiny
    pairs, _ = code_pairs(model, processor, pairs=3)
    bad = pairs.to_dict()
    bad["rejected_codes"][1] = [[5000] * 9] * 4
    with pytest.raises(ValueError, match=r"Row 1 of the train dataset, column 'rejected_codes'.*outside \[0, 2048\)"):
        MusicDPOTrainer(fresh_model(), args=config(tmp_path), train_dataset=Dataset.from_dict(bad),
                        processing_class=processor)  # fmt: skip
    trainer = MusicDPOTrainer(fresh_model(), args=config(tmp_path, skip_corrupt_rows=True),
                              train_dataset=Dataset.from_dict(bad), processing_class=processor)  # fmt: skip
    assert len(trainer.train_dataset) == 2 and trainer.num_skipped_rows == 1
    empty = pairs.to_dict()
    empty["prompt"][2] = "  "
    with pytest.raises(ValueError, match=r"Row 2 .*prompt is empty"):
        MusicDPOTrainer(fresh_model(), args=config(tmp_path), train_dataset=Dataset.from_dict(empty),
                        processing_class=processor)  # fmt: skip
    audio = Dataset.from_dict({"prompt": ["a", "b"], "chosen": ["/no/such.wav", "/no/such.wav"],
                               "rejected": ["/no/such.wav", "/no/such.wav"]})  # fmt: skip
    with pytest.raises(ValueError, match=r"Row 0 .*file not found"):
        MusicDPOTrainer(fresh_model(), args=config(tmp_path), train_dataset=audio, processing_class=processor)


def test_bad_input_errors_say_what_to_change(tiny, tmp_path):
    model, processor = tiny
    pairs, _ = code_pairs(model, processor, pairs=2)
    with pytest.raises(ValueError, match="'chosen' / 'rejected'.*rename_column"):
        MusicDPOTrainer(fresh_model(), args=config(tmp_path), train_dataset=pairs.rename_column("chosen_codes", "a"),
                        processing_class=processor)  # fmt: skip
    with pytest.raises(ValueError, match="no 'prompt' column"):
        MusicDPOTrainer(fresh_model(), args=config(tmp_path), train_dataset=pairs.remove_columns("prompt"),
                        processing_class=processor)  # fmt: skip
    ties = pairs.add_column("tie", [True, True])
    with pytest.raises(ValueError, match="no decisive pair.*2 ties"):
        MusicDPOTrainer(fresh_model(), args=config(tmp_path), train_dataset=ties, processing_class=processor)
    with pytest.raises(ValueError, match="processing_class is required"):
        MusicDPOTrainer(fresh_model(), args=config(tmp_path), train_dataset=pairs)
    with pytest.raises(ValueError, match="beta must be > 0"):
        config(tmp_path, beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing=0.1 has no meaning for loss_type='ipo'"):
        config(tmp_path, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        config(tmp_path, loss_type="kto")
    with pytest.raises(ValueError, match="set max_completion_length"):
        long = Dataset.from_dict({"prompt": ["a"], "chosen_codes": [[[1] * 3000] * 4],
                                  "rejected_codes": [[[2] * 3000] * 4]})  # fmt: skip
        MusicDPOTrainer(fresh_model(), args=config(tmp_path), train_dataset=long, processing_class=processor)


# ------------------------------------------------------------------------------------------------ learning
def low_high_pairs(sample):
    """The same clip twice: chosen with codebook 0 moved into the lower half of the codebook, rejected into the upper
    half (the rest of the clip unchanged), so that the one property the votes share is where codebook 0's codes lie."""
    low, high = sample.codes.clone(), sample.codes.clone()
    low[:, 0] %= 1024
    high[:, 0] = high[:, 0] % 1024 + 1024
    return Dataset.from_dict({"prompt": sample.prompts, "chosen_codes": low.tolist(), "rejected_codes": high.tolist()})


def test_policy_learns_the_property_the_chosen_clips_share(tiny, tmp_path):
    """After DPO on pairs whose chosen clips share a code property, the implicit reward ranks held-out pairs (other
    clips, same property) as the votes did, and the policy has moved away from the reference by a measured KL."""
    model, processor = tiny
    train_pairs = low_high_pairs(rollout(model, processor, 32, seed=0, num_steps=16))
    held_out = low_high_pairs(rollout(model, processor, 16, seed=5, num_steps=16))
    args = config(tmp_path, per_device_train_batch_size=8, max_steps=-1, num_train_epochs=4, learning_rate=3e-3,
                  logging_steps=4, eval_num_samples_per_prompt=4)  # fmt: skip
    trainer = MusicDPOTrainer(fresh_model(), args=args, train_dataset=train_pairs, eval_dataset=held_out,
                              processing_class=processor)  # fmt: skip
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    logs = [entry for entry in trainer.state.log_history if "rewards/margins" in entry]
    assert logs[-1]["rewards/margins"] > logs[0]["rewards/margins"] + 1.0
    assert logs[-1]["rewards/accuracies"] == 1.0
    assert before["eval_rewards/margins"] == 0.0 and abs(before["eval_kl"]) < 1e-3
    assert after["eval_rewards/accuracies"] >= 0.75, after
    assert after["eval_rewards/margins"] > 0.5, after
    assert after["eval_kl"] > 1.0, after


# ------------------------------------------------------------------------------------------------ the reference
def test_lora_reference_is_the_adapter_disabled_policy_without_a_copy(tiny, tmp_path):
    from peft import LoraConfig

    model, processor = tiny
    pairs, _ = code_pairs(model, processor, pairs=4)
    base = fresh_model()
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
                      init_lora_weights=False)  # fmt: skip
    trainer = MusicDPOTrainer(fresh_model(), args=config(tmp_path, max_steps=2), train_dataset=pairs,
                              processing_class=processor, peft_config=lora)  # fmt: skip
    assert trainer.ref_model is None and trainer.is_peft_model
    held = {id(m) for m in trainer.__dict__.values() if isinstance(m, torch.nn.Module)}
    assert held == {id(trainer.model)}  # the policy is the only model the trainer holds
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(4)]))
    with torch.no_grad():
        expected = trainer.sequence_logps(base, batch)
        policy_logps = trainer.sequence_logps(trainer.model, batch)
    assert not torch.allclose(policy_logps, expected)  # the random adapter changes the policy...
    torch.testing.assert_close(trainer.reference_logps(batch), expected)  # ...but not the reference
    frozen = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if "lora_" not in name}
    trainer.train()
    for name, parameter in trainer.model.named_parameters():
        if "lora_" not in name:
            assert torch.equal(parameter, frozen[name]), name
    torch.testing.assert_close(trainer.reference_logps(batch), expected)


def test_qlora_policy_trains_only_adapters_against_its_quantized_base(tiny, tmp_path):
    """QLoRA on CPU (bitsandbytes 4-bit, as tests/test_quantization.py runs it): the reference is the quantized
    policy with its adapter disabled, no copy; only adapters move, and the reference's log-probs stay put."""
    from peft import LoraConfig

    from musicrl_trl.quantization import is_quantized, musicgen_quantization_config

    model, processor = tiny
    pairs, _ = code_pairs(model, processor, pairs=4)
    quantized, _ = tiny_musicgen(quantization_config=musicgen_quantization_config(load_in_4bit=True))
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "fc1"])
    trainer = MusicDPOTrainer(quantized, args=config(tmp_path), train_dataset=pairs, processing_class=processor,
                              peft_config=lora)  # fmt: skip
    policy = trainer.accelerator.unwrap_model(trainer.model)
    assert trainer.ref_model is None and is_quantized(policy)
    trainable = {name: p.detach().clone() for name, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(4)]))
    reference = trainer.reference_logps(batch)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and losses[0] == pytest.approx(math.log(2), abs=1e-5) and losses[1] < losses[0]
    unchanged = [name for name, p in policy.named_parameters() if p.requires_grad and torch.equal(trainable[name], p)]
    assert not unchanged, unchanged[:5]
    torch.testing.assert_close(trainer.reference_logps(batch), reference)


def test_activation_checkpointing_trains_exactly_as_without(tiny, tmp_path):
    """``activation_checkpointing=True`` (``gradient_checkpointing`` before transformers 5.25; Trainer turns it on in
    the decoder) recomputes the same forward: dropout is zeroed, so the losses of two steps are the same numbers."""
    model, processor = tiny
    pairs, _ = code_pairs(model, processor, pairs=4)
    losses = {}
    for checkpointing in (False, True):
        trainer = MusicDPOTrainer(fresh_model(), args=config(tmp_path / str(checkpointing),
                                                             activation_checkpointing=checkpointing),
                                  train_dataset=pairs, processing_class=processor)  # fmt: skip
        trainer.train()
        assert unwrap_musicgen(trainer.model).decoder.is_gradient_checkpointing == checkpointing
        losses[checkpointing] = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[True] == pytest.approx(losses[False], rel=1e-6)


def test_precomputed_reference_needs_no_copy_and_matches(tiny, tmp_path):
    model, processor = tiny
    pairs, _ = code_pairs(model, processor, pairs=4)
    on_the_fly = MusicDPOTrainer(fresh_model(), args=config(tmp_path / "a"), train_dataset=pairs,
                                 processing_class=processor)  # fmt: skip
    precomputed = MusicDPOTrainer(fresh_model(), args=config(tmp_path / "b", precompute_ref_log_probs=True),
                                  train_dataset=pairs, processing_class=processor)  # fmt: skip
    assert on_the_fly.ref_model is not None and precomputed.ref_model is None
    batch = on_the_fly.data_collator([on_the_fly.train_dataset[i] for i in range(4)])
    chosen, rejected = on_the_fly.reference_logps(batch).chunk(2)
    torch.testing.assert_close(torch.tensor(precomputed.train_dataset["ref_chosen_logps"]), chosen)
    torch.testing.assert_close(torch.tensor(precomputed.train_dataset["ref_rejected_logps"]), rejected)
    with pytest.raises(ValueError, match="eval_kl needs the reference"):  # never a KL of the policy to itself
        precomputed.evaluate(Dataset.from_dict({"prompt": PROMPTS}))
    on_the_fly.train()
    precomputed.train()
    first = [trainer.state.log_history[0] for trainer in (on_the_fly, precomputed)]
    assert first[0]["loss"] == pytest.approx(first[1]["loss"], rel=1e-5)
    assert first[0]["rewards/chosen"] == pytest.approx(0.0, abs=1e-4)


# ------------------------------------------------------------------------------------------------ saving
def test_save_model_writes_safetensors_and_the_sampling_config(tiny, tmp_path):
    model, processor = tiny
    pairs, _ = code_pairs(model, processor, pairs=2)
    args = config(tmp_path, guidance_scale=3.0, temperature=0.9, top_k=50, save_strategy="steps", save_steps=1)
    trainer = MusicDPOTrainer(fresh_model(), args=args, train_dataset=pairs, processing_class=processor)
    trainer.train()
    trainer.save_model()
    out = args.output_dir
    assert load_file(os.path.join(out, "model.safetensors"))
    assert not [name for name in os.listdir(out) if name.endswith((".bin", ".pt")) and name != "training_args.bin"]
    from transformers import GenerationConfig, MusicgenForConditionalGeneration

    generation = GenerationConfig.from_pretrained(out)
    assert (generation.guidance_scale, generation.temperature, generation.top_k) == (3.0, 0.9, 50)
    assert generation.max_new_tokens == trainer.response_length
    reloaded = MusicgenForConditionalGeneration.from_pretrained(out)
    assert reloaded.decoder.config.pad_token_id == 2048  # Trainer did not "align" it with T5's pad token
    # Crash-safe checkpoints with the DPO card; resume picks the newest complete one.
    assert sorted(os.listdir(out)).count("checkpoint-2") == 1
    card = open(os.path.join(out, "checkpoint-2", "README.md"), encoding="utf-8").read()
    assert "DPO" in card and "beta = 0.1" in card and "2 preference pairs" in card
    resumed = MusicDPOTrainer(fresh_model(), args=config(tmp_path, max_steps=3, save_strategy="no"),
                              train_dataset=pairs, processing_class=processor)  # fmt: skip
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 3


def test_eval_dataset_of_prompts_gives_the_kl_only(tiny, tmp_path):
    model, processor = tiny
    pairs, _ = code_pairs(model, processor, pairs=2)
    trainer = MusicDPOTrainer(fresh_model(), args=config(tmp_path), train_dataset=pairs,
                              eval_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=processor)
    metrics = trainer.evaluate()
    assert "eval_loss" not in metrics and abs(metrics["eval_kl"]) < 1e-4  # no pairs: the KL only



# ------------------------------------------------------------------------------------------------ the example
def run_example(args, cwd, **env_overrides):
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    path = os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(cwd / "hf-home"), "CUDA_VISIBLE_DEVICES": "",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **env_overrides}  # fmt: skip
    command = [sys.executable, str(repo / "examples" / "dpo_musicrl.py"), "--report_to", "none", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
                          stdin=subprocess.DEVNULL)  # fmt: skip


def test_example_script_runs_offline_on_scripted_votes(tmp_path):
    result = run_example(["--demo_votes", "8", "--demo_tie_db", "0", "--num_train_epochs", "1", "--output_dir", "out"],
                         tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "trained on 8 pairs" in result.stdout and "KL to the reference" in result.stdout
    assert os.path.isfile(tmp_path / "out" / "model.safetensors")
    card = (tmp_path / "out" / "README.md").read_text(encoding="utf-8")
    assert "DPO" in card and "beta = 0.1" in card and "8 preference pairs" in card


def test_example_script_reports_a_missing_dataset_in_one_line(tmp_path, monkeypatch):
    import importlib.util
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "dpo_musicrl.py"
    spec = importlib.util.spec_from_file_location("dpo_musicrl_example", script)
    example = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, example)  # dataclasses look their module up there
    spec.loader.exec_module(example)
    argv = ["dpo_musicrl.py", "--dataset_name", str(tmp_path / "no-such-votes"), "--output_dir", str(tmp_path / "out"),
            "--report_to", "none"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        example.main()
    message = str(exit_info.value)
    assert message.startswith("error: cannot load --dataset_name") and "\n" not in message
    assert not (tmp_path / "out").exists()  # nothing written before the inputs were read


def test_example_quantizes_the_decoder_with_load_in_4bit(tmp_path, monkeypatch):
    """``--load_in_4bit --use_peft`` reaches the model (QLoRA), in process: the trainer is replaced by a stub that
    records what it was given."""
    import importlib.util
    import sys
    from pathlib import Path

    from musicrl_trl.quantization import is_quantized

    script = Path(__file__).resolve().parents[1] / "examples" / "dpo_musicrl.py"
    spec = importlib.util.spec_from_file_location("dpo_musicrl_qlora", script)
    example = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, example)  # dataclasses look their module up there
    spec.loader.exec_module(example)
    given = {}

    class Stop(Exception):
        pass

    def stub(model, **kwargs):
        given.update(model=model, **kwargs)
        raise Stop

    monkeypatch.setattr(example, "MusicDPOTrainer", stub)
    argv = ["dpo_musicrl.py", "--load_in_4bit", "--use_peft", "--lora_target_modules", "q_proj", "v_proj",
            "--demo_votes", "2", "--output_dir", str(tmp_path / "out"), "--report_to", "none"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(Stop):
        example.main()
    assert is_quantized(given["model"]) and given["peft_config"] is not None


def test_example_pushes_a_lora_policy_with_a_dpo_card_and_no_pickles(tmp_path):
    """Through the real huggingface_hub client and the test Hub server (tests/hub_server.py)."""
    from hub_server import HubServer

    token, repo = "hf_MusicDPOtestTOKEN0123456789", "test-org/tiny-dpo"
    server = HubServer(token=token).start()
    try:
        result = run_example(
            ["--demo_votes", "4", "--demo_tie_db", "0", "--num_train_epochs", "1", "--output_dir", "out",
             "--use_peft", "--lora_r", "4", "--lora_target_modules", "q_proj", "v_proj", "--push_to_hub",
             "--hub_model_id", repo, "--hub_token", token, "--push_lora", "both", "--save_strategy", "no"],
            tmp_path, HF_ENDPOINT=server.endpoint, HF_HUB_DISABLE_XET="1", HF_HUB_OFFLINE="0", HF_TOKEN=token,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
        files = server.files(repo)
    finally:
        server.stop()
    assert {"model.safetensors", "adapter/adapter_model.safetensors", "generation_config.json", "README.md"} <= set(
        files
    )
    assert not [name for name in files if name.endswith((".bin", ".pt", ".pth", ".pkl"))]
    card = files["README.md"].decode()
    assert "DPO" in card and "beta = 0.1" in card and "4 preference pairs" in card and "- dpo" in card
    assert token not in card


# ------------------------------------------------------------------------------------------------ two processes
@pytest.mark.slow
def test_two_cpu_processes_split_the_pairs_and_keep_identical_weights(tmp_path):
    """`ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2` (two gloo ranks; see DESIGN.md on why not accelerate)."""
    import json
    from pathlib import Path

    from two_ranks import run_two_cpu_ranks

    run_two_cpu_ranks(Path(__file__).parent / "scripts" / "dpo_two_ranks.py", tmp_path)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [record["world"] for record in ranks] == [2, 2]
    assert not set(ranks[0]["seen"]) & set(ranks[1]["seen"])  # each pair on one rank only
    assert len(ranks[0]["seen"]) == len(ranks[1]["seen"]) == 4  # 2 steps x 2 pairs per rank
    assert ranks[0]["checksum"] == pytest.approx(ranks[1]["checksum"], rel=1e-9)  # DDP kept the weights equal
    assert ranks[0]["logs"][0]["loss"] == pytest.approx(ranks[1]["logs"][0]["loss"])  # metrics reduced over ranks
