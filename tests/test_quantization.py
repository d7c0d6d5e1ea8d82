"""Quantized (QLoRA) policies on CPU: what is quantized, correct LoRA gradients, training with the default value
network, saving an adapter, and clear errors for what cannot run."""

import copy

import bitsandbytes as bnb
import pytest
import torch
import torch.nn as nn
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model

from musicrl_trl.quantization import is_quantized, musicgen_quantization_config, prepare_quantized_model
from musicrl_trl.rollout import SamplingConfig, generate_rollout, teacher_forced_logprobs
from musicrl_trl.testing import tiny_musicgen
from musicrl_trl.trainers import MusicPPOConfig, MusicPPOTrainer
from musicrl_trl.trainers.ppo_trainer import zero_dropout

TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
PROMPTS = ["bright shimmering bells", "deep dark bass", "happy upbeat tune", "slow sad piano"]


def loudness(prompts, audio, sampling_rate, codes, **kwargs):
    return audio.pow(2).mean((1, 2)).sqrt()


def quantized_tiny_musicgen(bits=4):
    config = musicgen_quantization_config(load_in_4bit=bits == 4, load_in_8bit=bits == 8)
    return tiny_musicgen(quantization_config=config)


def test_only_the_decoder_layers_are_quantized():
    model, _ = quantized_tiny_musicgen()
    quantized = {name for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)}
    assert quantized and all(name.startswith("decoder.model.decoder.layers.") for name in quantized)
    assert len(quantized) == 2 * 10  # 2 layers x (self-attention 4, cross-attention 4, fc1, fc2)
    assert all(type(head) is nn.Linear for head in model.decoder.lm_heads)
    assert is_quantized(model) and not is_quantized(tiny_musicgen()[0])


def _lora_pair(quantized):
    """The 4-bit model and its dequantized float32 twin, both with the same (non-zero) LoRA adapters."""
    dequantized = copy.deepcopy(quantized).dequantize()
    assert not is_quantized(dequantized)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    models = []
    for model in (quantized, dequantized):
        torch.manual_seed(0)
        model = get_peft_model(model, copy.deepcopy(lora))
        zero_dropout(model)
        models.append(model)
    return models


def test_lora_gradients_on_4bit_after_a_no_grad_rollout_equal_the_dequantized_models():
    quantized, processor = quantized_tiny_musicgen()
    policy, reference = _lora_pair(quantized)
    prepare_quantized_model(policy)  # what MusicPPOTrainer does with every model it is given
    sampling = SamplingConfig(guidance_scale=3.0)
    # The rollout: eval mode, no gradients (the forward after which bitsandbytes repacks weights on AVX512-BF16 CPUs).
    rollout = generate_rollout(policy, processor, PROMPTS, num_steps=10, sampling=sampling)
    grads = []
    for model in (policy, reference):
        model.train()
        logprobs = teacher_forced_logprobs(model, rollout.prompt_ids, rollout.prompt_mask, rollout.grid, sampling)
        model.zero_grad()
        (-logprobs.sum()).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if "lora_" in n})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * 10 * 2
    for name, grad in grads[0].items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, grads[1][name], rtol=1e-4, atol=1e-5, msg=name)


def test_prepare_quantized_model_keeps_gradients_of_layers_repacked_before():
    # A layer as wide as bitsandbytes' CPU repacking needs (in_features % 64 == 0): a no-grad eval forward repacks
    # its weights on CPUs with AVX512-BF16; prepare_quantized_model turns that off and undoes an earlier repacking.
    torch.manual_seed(0)
    linear = nn.Sequential(nn.Linear(128, 64))
    quantized = copy.deepcopy(linear)
    quantized[0] = bnb.nn.Linear4bit(128, 64, compute_dtype=torch.float32, quant_type="nf4")
    quantized[0].load_state_dict(linear[0].state_dict())
    quantized[0].weight = bnb.nn.Params4bit(linear[0].weight.data.clone(), requires_grad=False, quant_type="nf4")
    quantized = quantized.to("cpu")
    x = torch.randn(3, 128)
    with torch.no_grad():
        expected = quantized.eval()(x)
    prepare_quantized_model(quantized)
    dequantized = bnb.functional.dequantize_4bit(quantized[0].weight.data, quantized[0].weight.quant_state)
    inputs = x.clone().requires_grad_(True)
    output = quantized.train()(inputs)
    torch.testing.assert_close(output, expected, rtol=0, atol=2e-2)  # the repacked path computes in bf16
    output.square().sum().backward()
    reference_inputs = x.clone().requires_grad_(True)
    torch.nn.functional.linear(reference_inputs, dequantized, quantized[0].bias).square().sum().backward()
    torch.testing.assert_close(inputs.grad, reference_inputs.grad, rtol=1e-4, atol=1e-4)


def make_config(tmp_path, **overrides):
    settings = dict(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=4,
        total_episodes=8,
        response_length=10,
        learning_rate=1e-2,
        report_to=[],
        disable_tqdm=True,
        seed=0,
    )
    settings.update(overrides)
    return MusicPPOConfig(**settings)


@pytest.mark.parametrize("bits", [4, 8, None], ids=["4bit", "8bit", "float32-lora_value_trunk"])
def test_quantized_lora_trains_with_the_default_value_network_and_saves_an_adapter(tmp_path, bits):
    # None: a full-precision policy that asks for the same LoRA value trunk (lora_value_trunk=True).
    model, processor = quantized_tiny_musicgen(bits) if bits else tiny_musicgen()
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)
    # Three updates: the value head starts at zero and LoRA's B matrices too, so the value trunk's B adapters get a
    # gradient from the second update on and its A adapters from the third.
    args = make_config(tmp_path, save_merged_lora=False, lora_value_trunk=None if bits else True, total_episodes=12)
    assert not args.share_value_backbone  # the default: a separate value network
    trainer = MusicPPOTrainer(
        args,
        processor,
        model,
        reward_model=loudness,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        peft_config=lora,
    )
    assert trainer.ref_model is None  # the anchor is the adapter-disabled quantized policy, no second copy
    wrapper = trainer.accelerator.unwrap_model(trainer.model)
    assert is_quantized(wrapper.value_model.backbone) == bool(bits)  # the value trunk: a LoRA'd (quantized) copy
    trainable = {n: p.detach().clone() for n, p in wrapper.named_parameters() if p.requires_grad}
    assert all("lora_" in n or n.startswith("value_model.score") for n in trainable)
    assert any(n.startswith("value_model.backbone") for n in trainable)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss/value_avg" in entry]
    assert len(logs) == 3 and all(torch.isfinite(torch.tensor(entry["loss/value_avg"])) for entry in logs)
    # The rollout's log-probs match the training forward's: exactly in 4-bit (dequantize, then a float32 matmul),
    # to int8 precision in 8-bit (LLM.int8 casts activations to float16).
    assert logs[0]["policy/first_ratio_max_error"] < (1e-2 if bits == 8 else 1e-4)
    unchanged = [n for n, p in wrapper.named_parameters() if p.requires_grad and torch.equal(trainable[n], p)]
    assert not unchanged, unchanged[:5]

    trainer.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    base, _ = tiny_musicgen()
    adapted = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    policy = wrapper.policy
    for name, param in adapted.named_parameters():
        if "lora_" in name:
            torch.testing.assert_close(param, policy.get_parameter(name))


def test_quantized_policy_without_lora_is_a_clear_error(tmp_path):
    model, processor = quantized_tiny_musicgen()
    with pytest.raises(ValueError, match="peft_config"):
        MusicPPOTrainer(
            make_config(tmp_path),
            processor,
            model,
            reward_model=loudness,
            train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        )
    with pytest.raises(ValueError, match="cannot be trained fully"):
        MusicPPOTrainer(
            make_config(tmp_path, lora_value_trunk=False),
            processor,
            model,
            reward_model=loudness,
            train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
            peft_config=LoraConfig(target_modules=TARGETS),
        )


def test_quantized_lm_heads_are_a_clear_error():
    from transformers import BitsAndBytesConfig

    # bitsandbytes matches skip names against full module paths: "lm_heads" alone does not keep decoder.lm_heads.0.
    model, _ = tiny_musicgen(
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules=["lm_heads"])
    )
    with pytest.raises(ValueError, match="decoder.lm_heads.0 is quantized"):
        prepare_quantized_model(model)
    with pytest.raises(ValueError, match="exclusive"):
        musicgen_quantization_config(load_in_4bit=True, load_in_8bit=True)


def test_example_load_policy_quantizes_the_demo_model_too():
    # --load_in_4bit on the offline demo used to be ignored without a word.
    import importlib.util
    import sys
    from pathlib import Path

    from trl import ModelConfig

    path = Path(__file__).resolve().parents[1] / "examples" / "ppo_musicrl.py"
    spec = importlib.util.spec_from_file_location("ppo_musicrl_example", path)
    example = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = example  # its dataclasses look their module up while being defined
    spec.loader.exec_module(example)
    model, _ = example.load_policy(ModelConfig(load_in_4bit=True))
    quantized = [name for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)]
    assert quantized and all(name.startswith("decoder.model.decoder.layers.") for name in quantized)
    model, _ = example.load_policy(ModelConfig())
    assert not is_quantized(model)


def test_quantized_value_trunk_checkpoints_and_resumes(tmp_path):
    def trainer():
        model, processor = quantized_tiny_musicgen()
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)
        args = make_config(tmp_path, total_episodes=4, save_strategy="steps", save_steps=1, save_merged_lora=False)
        return MusicPPOTrainer(
            args,
            processor,
            model,
            reward_model=loudness,
            train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
            peft_config=lora,
        )

    def value_state(t):
        value_model = t.accelerator.unwrap_model(t.model).value_model
        return {n: p.detach().clone() for n, p in value_model.named_parameters() if p.requires_grad}

    first = trainer()
    first.train()
    resumed = trainer()
    assert any(not torch.equal(p, value_state(first)[n]) for n, p in value_state(resumed).items())
    resumed.train(resume_from_checkpoint=True)  # checkpoint-1: the end of the first run, nothing left to train
    assert resumed.state.global_step == 1
    for name, param in value_state(resumed).items():
        torch.testing.assert_close(param, value_state(first)[name], msg=name)
