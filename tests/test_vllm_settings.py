"""`use_vllm=True` settings that cannot work are clear errors, raised before any engine starts (no vLLM needed)."""

from importlib.util import find_spec

import pytest
from datasets import Dataset

from qrpo_trl import ReferenceConfig, precompute_rewards
from qrpo_trl.reference_stage.vllm_sampling import check_vllm_sampling


def length_reward(completions, **kwargs):
    return [float(len(completion.split())) for completion in completions]


@pytest.mark.skipif(find_spec("vllm") is not None, reason="vLLM is installed")
def test_use_vllm_without_vllm_is_a_clear_error(tiny_llama_path, tmp_path):
    args = ReferenceConfig(use_vllm=True, num_generations=2, reference_cache_dir=str(tmp_path))
    with pytest.raises(ImportError, match=r"`use_vllm=True` needs vLLM, which is not installed \(see docs/vllm.md"):
        precompute_rewards(Dataset.from_dict({"prompt": ["hello"]}), tiny_llama_path, length_reward, args)


def test_tensor_parallel_size_must_divide_the_processes(tiny_llama_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_path)
    with pytest.raises(ValueError, match=r"`vllm_tensor_parallel_size=2` must divide the number of processes \(3\)"):
        check_vllm_sampling(model, ReferenceConfig(use_vllm=True, vllm_tensor_parallel_size=2), num_processes=3)
    with pytest.raises(ValueError, match=r"`vllm_tensor_parallel_size=4` must divide the number of processes \(1\)"):
        check_vllm_sampling(model, ReferenceConfig(use_vllm=True, vllm_tensor_parallel_size=4), num_processes=1)


def test_a_model_without_a_path_is_a_clear_error(tokenizer):
    from conftest import build_tiny_llama

    with pytest.raises(ValueError, match=r"vLLM loads the reference model from its local directory.*save_pretrained"):
        check_vllm_sampling(build_tiny_llama(tokenizer), ReferenceConfig(use_vllm=True), num_processes=1)


@pytest.mark.parametrize(
    "setting, match",
    [
        (dict(vllm_tensor_parallel_size=0), r"`vllm_tensor_parallel_size` must be >= 1, got 0"),
        (dict(vllm_gpu_memory_utilization=1.5), r"`vllm_gpu_memory_utilization` must be in \(0, 1\], got 1.5"),
        (dict(vllm_gpu_memory_utilization=0.0), r"`vllm_gpu_memory_utilization` must be in \(0, 1\], got 0.0"),
    ],
)
def test_bad_vllm_settings(setting, match):
    with pytest.raises(ValueError, match=match):
        ReferenceConfig(use_vllm=True, **setting)
